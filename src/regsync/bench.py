"""Benchmarks: workloads × register-sync strategies, in one run, as a table and JSON.

Workloads (each a guest loop; the VMM's work per exit differs):
  pio        counter guest, tick exits, no register access
  hypercall  hypercall guest, read rdi and rsi, write rax per exit
  debugger   counter guest, read every RUNTIME register per exit
  monitor    counter guest, dump ALL registers every 1,000 exits
Strategies:
  raw        hand-written loop on the kvm_run page's sync regs, no cache (the
             limit for Python; XSAVE by ioctl where a workload needs it)
  eager, qemu2012, qemu2013, qemu  the comparison strategies (no SYNC_REGS;
                                   strategies/qemu.py: what each QEMU wrote)
  regsync-nosync, regsync          the cache without and with KVM_CAP_SYNC_REGS
  regsync-serve                    regsync, exits served by Vcpu.serve() (hypercall:
                                   a @uses handler naming rdi, rsi and rax)
Each cell reports user-mode CPU per exit (getrusage of the vCPU's thread) beside
exits/s and ioctls/exit: on a host with fast exits Python's own cost dominates.

Speed goals live here, never in tests. Rates vary with the host's load, so the
table reports ratios measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .devices.basic import HYPERCALL_PORT, TICK_PORT
from .kvm import Counters
from .kvm import structs as ks
from .machine import Machine
from .vcpu import LEVELS

WORKLOADS = ("pio", "hypercall", "debugger", "monitor")
STRATEGIES = ("raw", "eager", "qemu2012", "qemu2013", "qemu", "regsync-nosync", "regsync",
              "regsync-serve")
COMPARISON = ("eager", "qemu2012", "qemu2013", "qemu")
_FXSAVE_HEAD = struct.Struct("<HHBBHQQI")   # fcw fsw ftw pad fop fip fdp mxcsr


@dataclass
class Cell:
    workload: str
    strategy: str
    exits: int
    seconds: float
    exits_per_s: float
    ioctls_per_exit: float
    register_ioctls_per_exit: float
    user_us_per_exit: float = 0.0
    ratio_to_raw: float = 0.0
    user_ratio_to_raw: float = 0.0        # user CPU per exit / the raw loop's (same VM)


def _machine(strategy: str, guest: str) -> Machine:
    if strategy == "regsync-nosync":
        m = Machine(smp=1, strategy="regsync", sync_regs=False)
    elif strategy in ("raw", "regsync-serve"):
        m = Machine(smp=1, strategy="regsync", sync_regs=True)
    else:
        m = Machine(smp=1, strategy=strategy)
    m.load(guest, arg=1 << 40)
    m.vcpus[0].flush()        # the boot state is in the cache: raw bypasses it
    return m


def _loop(workload: str, strategy: str, m: Machine, n: int) -> None:
    v = m.vcpus[0]
    if strategy == "raw":
        _raw_loop(workload, v, n)
        return
    if strategy == "regsync-serve":
        _serve_loop(workload, v, n)
        return
    regs = v.regs
    run = v.run
    if workload == "pio":
        for _ in range(n):
            run()
    elif workload == "hypercall":
        for _ in range(n):
            ex = run()
            if ex.port == HYPERCALL_PORT:  # type: ignore[union-attr]
                regs.rax = regs.rdi + regs.rsi
    elif workload == "debugger":
        runtime = LEVELS["RUNTIME"]
        for _ in range(n):
            run()
            regs.dump(runtime)
    elif workload == "monitor":
        for i in range(n):
            run()
            if i % 1000 == 999:
                regs.dump()


def _serve_loop(workload: str, v, n: int) -> None:  # type: ignore[no-untyped-def]
    """The workloads as handlers run by Vcpu.serve() (regsync.serving)."""
    from .serving import uses
    handlers: dict[int, Callable[..., object]]
    if workload == "hypercall":
        @uses("rdi", "rsi", writes="rax")
        def hypercall(ex: object, rdi: int, rsi: int) -> int:
            return rdi + rsi
        handlers = {HYPERCALL_PORT: hypercall}
    elif workload == "pio":
        handlers = {TICK_PORT: lambda ex: None}
    elif workload == "debugger":
        runtime, dump = LEVELS["RUNTIME"], v.regs.dump
        handlers = {TICK_PORT: lambda ex: dump(runtime)}
    else:
        count, dump_all = [0], v.regs.dump

        def tick(ex: object) -> None:
            count[0] += 1
            if count[0] % 1000 == 0:
                dump_all()
        handlers = {TICK_PORT: tick}
    ex = v.serve(handlers, n)
    if ex is not None:
        raise RuntimeError(f"{workload}/regsync-serve: an exit no handler takes: {ex}")


def _raw_loop(workload: str, v, n: int) -> None:  # type: ignore[no-untyped-def]
    h = v.handle
    page = h.run_page
    saved = page.kvm_valid_regs
    page.kvm_valid_regs = 7          # the limit uses SYNC_REGS, whatever the VM's strategy
    try:
        _raw_body(workload, v, h, page, n)
    finally:
        page.kvm_valid_regs = saved


def _raw_body(workload: str, v, h, page, n: int) -> None:  # type: ignore[no-untyped-def]
    sync = page.s.regs
    r, sr = sync.regs, sync.sregs
    hrun = h.run
    if workload == "pio":
        for _ in range(n):
            hrun()
            if page.exit_reason != 2:
                raise RuntimeError(f"raw loop: unexpected exit {page.exit_reason}")
    elif workload == "hypercall":
        for _ in range(n):
            hrun()
            if page.exit_reason == 2 and page.io.port == HYPERCALL_PORT:
                r.rax = r.rdi + r.rsi
                page.kvm_dirty_regs = 1
    elif workload == "debugger":
        # The same values regsync's dump(RUNTIME) returns, decoded by hand: kvm_regs
        # and kvm_sregs from the kvm_run page, x87/SSE from one KVM_GET_XSAVE2.
        gprs = [f for f, *_ in type(r)._fields_]
        segs = [(n, getattr(sr, k)) for n, k in (("cs", "cs"), ("ds", "ds"), ("es", "es"),
                ("fs", "fs"), ("gs", "gs"), ("ss", "ss"), ("tr", "tr"), ("ldtr", "ldt"))]
        xs = bytearray(h.xsave2_size or 4096)
        for _ in range(n):
            hrun()
            out = {f: getattr(r, f) for f in gprs}
            for name, sg in segs:
                out[name + ".selector"], out[name + ".base"] = sg.selector, sg.base
                out[name + ".limit"] = sg.limit
                out[name + ".attr"] = (sg.type | sg.s << 4 | sg.dpl << 5 | sg.present << 7
                                       | sg.avl << 12 | sg.l << 13 | sg.db << 14 | sg.g << 15
                                       | sg.unusable << 16)
            out["gdtr.base"], out["gdtr.limit"] = sr.gdt.base, sr.gdt.limit
            out["idtr.base"], out["idtr.limit"] = sr.idt.base, sr.idt.limit
            for f in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
                out[f] = getattr(sr, f)
            h.get_xsave(xs)
            out["fcw"], out["fsw"], out["ftw"], _, out["fop"], out["fip"], out["fdp"], \
                out["mxcsr"] = _FXSAVE_HEAD.unpack_from(xs, 0)
            for i in range(8):
                out[f"st{i}"] = int.from_bytes(xs[32 + 16 * i:42 + 16 * i], "little")
            for i in range(16):
                out[f"xmm{i}"] = int.from_bytes(xs[160 + 16 * i:176 + 16 * i], "little")
    elif workload == "monitor":
        for i in range(n):
            hrun()
            if i % 1000 == 999:
                h.get_regs(); h.get_sregs(); h.get_xsave(); h.get_xcrs(); h.get_debugregs()
                h.get_vcpu_events(); h.get_lapic(); h.get_mp_state()


Run = tuple[float, float, float, float, float]
# exits/s, ioctls/exit, register ioctls/exit, seconds, user CPU µs/exit

CHUNKS = 10
_EXPECTED_PORT = {"hypercall": HYPERCALL_PORT}   # the others run the counter guest: tick


def _timed(workload: str, strategy: str, m: Machine, n: int) -> tuple[float, float, Counters]:
    """(wall seconds, user CPU seconds of this thread, ioctls) of n exits."""
    v = m.vcpus[0]
    before = dict(v.handle.counters)
    u0 = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
    t0 = time.perf_counter()
    _loop(workload, strategy, m, n)
    dt = time.perf_counter() - t0
    du = resource.getrusage(resource.RUSAGE_THREAD).ru_utime - u0
    after = v.handle.counters
    return dt, du, Counters({k: after[k] - before.get(k, 0) for k in after})


def _run_of(n: int, dt: float, du: float, delta: Counters) -> Run:
    return n / dt, sum(delta.values()) / n, delta.register_ioctls() / n, dt, du / n * 1e6


def _against_raw(workload: str, strategy: str, n: int, n_raw: int) -> tuple[Run, Run]:
    """(strategy, raw) measured on one VM, alternating in chunks.

    This host's exit cost drifts by 2x over seconds, and from VM to VM: only a
    comparison on the same VM, interleaved in time, says what a ratio claims.
    A hand-off between chunks keeps the guest's answers intact (checked at the end).
    """
    guest = "hypercall" if workload == "hypercall" else "counter"
    steps = {strategy: max(1, n // CHUNKS), "raw": max(1, n_raw // CHUNKS)}
    time_of = {strategy: 0.0, "raw": 0.0}
    user_of = {strategy: 0.0, "raw": 0.0}
    ioctls = {strategy: Counters(), "raw": Counters()}
    with _machine(strategy, guest) as m:
        v = m.vcpus[0]
        _loop(workload, strategy, m, 50)          # warm up
        v.cache.before_run()
        for i in range(CHUNKS):
            for s in ((strategy, "raw") if i % 2 else ("raw", strategy)):
                dt, du, delta = _timed(workload, s, m, steps[s])
                time_of[s] += dt
                user_of[s] += du
                ioctls[s].update(delta)
                # Hand-off, untimed: what the strategy writes before a run, it writes
                # now (queued in kvm_dirty_regs or by ioctl), so the raw loop's next
                # KVM_RUN delivers the last answer; then the cache forgets what it held.
                v.cache.before_run()
                v.invalidate()
        port = m.vcpus[0].handle.run_page.io.port
        if port != _EXPECTED_PORT.get(workload, TICK_PORT):
            raise RuntimeError(f"{workload}/{strategy}: the guest left its loop (last exit "
                               f"on port {port:#x}): a hand-off between loops lost an edit")
    return (_run_of(steps[strategy] * CHUNKS, time_of[strategy], user_of[strategy],
                    ioctls[strategy]),
            _run_of(steps["raw"] * CHUNKS, time_of["raw"], user_of["raw"], ioctls["raw"]))


def _cell(workload: str, strategy: str, n: int, runs: list[Run]) -> Cell:
    rates = sorted(r[0] for r in runs)
    mid = runs[[r[0] for r in runs].index(rates[len(rates) // 2])]
    return Cell(workload, strategy, n, mid[3], mid[0], mid[1], mid[2],
                statistics.median(r[4] for r in runs))


def run_all(quick: bool = False, progress: Callable[[str], None] = print) -> list[Cell]:
    """Every workload × strategy. Repetitions are interleaved across strategies so a
    change in the host's load hits all of them alike, and every strategy alternates
    with the raw loop on its own VM (_against_raw). A cell's rate is the median of
    its runs; its ratio to raw is the median of the same-VM ratios."""
    base = 10000 if quick else 20000   # quick: chunks of 1,000 still see a monitor dump
    repeat = 3 if quick else 5
    cells: list[Cell] = []
    for w in WORKLOADS:
        # The comparison strategies cost a register round trip per exit: fewer exits
        # keep the run short (rates, not totals, are compared). Monitor needs > 1,000.
        sizes = {s: base // 10 if s in COMPARISON and w in ("hypercall", "debugger")
                 else base for s in STRATEGIES}
        runs: dict[str, list[Run]] = {s: [] for s in STRATEGIES}
        ratios: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        user_ratios: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for _ in range(repeat):
            for s in STRATEGIES:
                if s == "raw":
                    continue
                mine, raw = _against_raw(w, s, sizes[s], base)
                runs[s].append(mine)
                runs["raw"].append(raw)
                ratios[s].append(mine[0] / raw[0])
                user_ratios[s].append(mine[4] / raw[4] if raw[4] else float("nan"))
        ratios["raw"] = user_ratios["raw"] = [1.0]
        for s in STRATEGIES:
            c = _cell(w, s, sizes[s], runs[s])
            c.ratio_to_raw = statistics.median(ratios[s])
            c.user_ratio_to_raw = statistics.median(user_ratios[s])
            cells.append(c)
            progress(f"  {w:<10} {s:<15} {c.exits_per_s:>9.0f} exits/s  "
                     f"{c.ratio_to_raw:.2f}x raw  {c.ioctls_per_exit:.3f} ioctls/exit  "
                     f"{c.user_us_per_exit:.2f} µs user/exit ({c.user_ratio_to_raw:.2f}x raw)")
    return cells


def syscall_costs(n: int = 20000) -> dict[str, float]:
    """µs per KVM_RUN round trip for a port-I/O exit, and per KVM_GET_REGS, each from
    the choke point's counters over a timing loop (median of 3)."""
    out: dict[str, list[float]] = {"kvm_run_pio_us": [], "kvm_get_regs_us": [],
                                   "kvm_get_sregs_us": [], "kvm_get_msrs_1_us": []}
    for _ in range(3):
        with _machine("raw", "counter") as m:
            h = m.vcpus[0].handle
            regs, sregs = ks.kvm_regs(), ks.kvm_sregs()
            for key, fn in (("kvm_run_pio_us", h.run),
                            ("kvm_get_regs_us", lambda: h.get_regs(regs)),
                            ("kvm_get_sregs_us", lambda: h.get_sregs(sregs)),
                            ("kvm_get_msrs_1_us", lambda: h.get_msrs([0xC0000081]))):
                fn()
                calls0 = sum(h.counters.values())
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                dt = time.perf_counter() - t0
                calls = sum(h.counters.values()) - calls0
                assert calls == n, f"{key}: {calls} ioctls for {n} calls"
                out[key].append(dt / calls * 1e6)
    return {k: statistics.median(v) for k, v in out.items()}


def run_on_cpu_latency(kicks: int = 1000) -> dict[str, float]:
    """run_on_cpu on a vCPU spinning in the guest (no exits of its own): µs per call."""
    from .guests import symbols
    with open(os.devnull, "w") as sink, Machine(smp=2, serial_out=sink) as m:
        m.load("spin")
        m.start()
        time.sleep(0.2)
        v = m.vcpus[0]
        lat = []
        for _ in range(kicks):
            t0 = time.perf_counter()
            m.run_on_cpu(v, lambda: v.regs.rip)
            lat.append((time.perf_counter() - t0) * 1e6)
        m.memory.write_u64(symbols("spin")["spin_stop"], 1)
        m.wait(30)
    lat.sort()
    return {"kicks": kicks, "median_us": lat[len(lat) // 2],
            "p99_us": lat[int(len(lat) * 0.99) - 1], "max_us": lat[-1]}


def demo_wall_times(cpus: tuple[int, ...] = (1, 2, 4), repeat: int = 5) -> dict[int, float]:
    """Wall time of the SMP demo guest, creation to exit, median of repeat runs (ms)."""
    out: dict[int, float] = {}
    for n in cpus:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with open(os.devnull, "w") as sink, Machine(smp=n, serial_out=sink) as m:
                m.load("smp")
                m.start()
                if m.wait(60) != 0:
                    raise RuntimeError(f"smp demo failed on {n} vCPUs")
            times.append((time.perf_counter() - t0) * 1e3)
        out[n] = statistics.median(times)
    return out


def table(cells: list[Cell]) -> str:
    lines = ["| workload | strategy | exits/s | × raw | ioctls/exit | register ioctls/exit "
             "| user CPU µs/exit | × raw (user CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c.workload} | {c.strategy} | {c.exits_per_s:,.0f} | "
                     f"{c.ratio_to_raw:.2f} | {c.ioctls_per_exit:.3f} | "
                     f"{c.register_ioctls_per_exit:.3f} | {c.user_us_per_exit:.2f} | "
                     f"{c.user_ratio_to_raw:.2f} |")
    by = {(c.workload, c.strategy): c for c in cells}
    hc, eager = by.get(("hypercall", "regsync")), by.get(("hypercall", "eager"))
    if hc and eager:
        lines.append("")
        lines.append(f"hypercall: regsync = {hc.ratio_to_raw:.2f}× raw, "
                     f"{hc.exits_per_s / eager.exits_per_s:.1f}× eager, "
                     f"{hc.ioctls_per_exit:.3f} ioctls/exit")
    return "\n".join(lines)


# Runs write here unless told otherwise (git-ignored): the tracked
# benchmarks/results.json changes only when it is named with --out.
DEFAULT_OUT = "benchmarks/out/results.json"


def main(quick: bool = False, out: str = DEFAULT_OUT) -> int:
    print(f"regsync benchmarks ({'quick' if quick else 'full'}) on {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    cells = run_all(quick)
    text = table(cells)
    print()
    print(text)
    costs = syscall_costs(5000 if quick else 20000)
    print("\nOne kernel round trip from Python (choke point, median of 3): " +
          ", ".join(f"{k[:-3]} {v:.2f} µs" for k, v in costs.items()))
    lat = run_on_cpu_latency(300 if quick else 1000)
    demo = demo_wall_times(repeat=3 if quick else 5)
    print(f"\nrun_on_cpu on a spinning vCPU ({lat['kicks']} kicks): median {lat['median_us']:.0f} µs, "
          f"p99 {lat['p99_us']:.0f} µs, max {lat['max_us']:.0f} µs")
    print("SMP demo wall time (create, boot, run, exit; median): " +
          ", ".join(f"{n} vCPU{'s' if n > 1 else ''} {ms:.1f} ms" for n, ms in demo.items()))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
                                "python": platform.python_version(),
                                "cells": [asdict(c) for c in cells],
                                "syscalls_us": costs, "run_on_cpu": lat,
                                "smp_demo_ms": demo}, indent=1))
    print(f"\nJSON written to {path}")
    return 0
