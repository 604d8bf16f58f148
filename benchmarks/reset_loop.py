"""The fast reset loop, side by side with a full restore and a fresh Machine per run; and
save/restore of 16 MiB, 128 MiB and 1 GiB guests.

    .venv/bin/python benchmarks/reset_loop.py [--quick] [--out FILE] [--costs]

Workload: the ``reset`` guest (src/regsync/guests/src/reset.S). A harness
snapshots it at its tick at ``reset_ready``; each iteration resets, writes an
input (seed, k) into guest memory, and runs it to its debug exit: it dirties k
guest pages (k = 1, 10, 100, 1000), touches a few registers and exits. Counted
per iteration: everything from the reset to the guest's exit, every ioctl of
the VM and its vCPU (the guest's own KVM_RUN included).

Ways:
  limit        one KVM_RUN plus one KVM_GET_DIRTY_LOG, nothing restored (rip put
               back through kvm_dirty_regs): the floor for Python on this host
  dirty-only   m.reset_to(snap): dirty pages and the register groups that differ
               (RESET_POLICY: compared in kvm_run, checked, or written blind)
  promised     m.reset_to(snap, assume_unchanged=REGS_AND_MEMORY_ONLY): the caller
               vouches the guest touches only registers and memory
  full         snapshot.apply(m, snap.state): every group, all memory
  fresh        a new Machine, load, run to reset_ready, then the run

Prints tables and writes JSON (default benchmarks/out/reset_loop.json, git-ignored).
Speed goals live here, not in tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from regsync import Machine
from regsync.guests import symbols
from regsync.kvm import structs as ks
from regsync.snapshot import REGS_AND_MEMORY_ONLY, apply
from regsync.snapshot.reset import RESET_POLICY

SYM = symbols("reset")
MASK64 = (1 << 64) - 1
KS = (1, 10, 100, 1000)
DEFAULT_OUT = "benchmarks/out/reset_loop.json"


def expected(seed: int, k: int) -> int:
    c = seed
    for i in range(k):
        c = (c * 31 + seed + i) & MASK64
    return c


def ready(mem_mb: int = 64) -> Machine:
    m = Machine(smp=1, mem_mb=mem_mb, serial_out=io.StringIO())
    m.load("reset")
    ex = m.vcpus[0].run()
    assert ex.kind == "io" and ex.port == 0x501, ex
    return m


def ioctls(m: Machine) -> int:
    return sum(m.vm.counters.values()) + sum(sum(v.handle.counters.values()) for v in m.vcpus)


def run_input(m: Machine, seed: int, k: int) -> None:
    m.memory.write(SYM["reset_input"], seed.to_bytes(8, "little") + k.to_bytes(8, "little"))
    v = m.vcpus[0]
    ex = v.run()
    if ex.port != 0xF4 or v.regs.rbx != expected(seed, k):
        raise AssertionError(f"wrong run: {ex!r}, rbx={v.regs.rbx:#x}")


def measure(n: int, step: Callable[[int], None], count: Callable[[], int]) -> dict[str, float]:
    step(0)                                              # warm
    c0, t0 = count(), time.perf_counter()
    for i in range(1, n + 1):
        step(i)
    dt = time.perf_counter() - t0
    return {"n": n, "per_s": n / dt, "us": dt / n * 1e6, "ioctls": (count() - c0) / n}


def loop_rows(k: int, quick: bool) -> dict[str, dict[str, float]]:
    scale = 0.2 if quick else 1.0
    n_fast = max(50, int((3000 if k <= 10 else 1500 if k == 100 else 400) * scale))
    rows: dict[str, dict[str, float]] = {}
    with ready() as m:
        v = m.vcpus[0]
        snap = m.snapshot()
        rows["dirty-only"] = measure(n_fast, lambda i: (m.reset_to(snap), run_input(m, i, k)),
                                     lambda: ioctls(m))
        rows["promised"] = measure(
            n_fast, lambda i: (m.reset_to(snap, assume_unchanged=REGS_AND_MEMORY_ONLY),
                               run_input(m, i, k)), lambda: ioctls(m))
        rows["full"] = measure(max(20, int(150 * scale)),
                               lambda i: (apply(m, snap.state), run_input(m, i, k)),
                               lambda: ioctls(m))
        # The floor: guest run + dirty log, rip and rsp put back through the kvm_run page.
        m.reset_to(snap)
        regs = v.transport.local(v.cache.catalog.group_by_name["REGS"])
        rip, rsp = regs.rip, regs.rsp
        page = v.handle.run_page
        mem = m.memory

        def raw(i: int) -> None:
            mem.write(SYM["reset_input"], i.to_bytes(8, "little") + k.to_bytes(8, "little"))
            regs.rip, regs.rsp = rip, rsp
            page.kvm_dirty_regs = ks.KVM_SYNC_X86_REGS
            v.handle.run()
            for s in mem.slots:
                m.vm.get_dirty_log(s.index, s.bitmap_addr)
        rows["limit"] = measure(n_fast, raw, lambda: ioctls(m))
    cells: list[int] = []

    def fresh(i: int) -> None:
        fm = ready()
        try:
            run_input(fm, i, k)
            cells.append(ioctls(fm) + sum(fm.kvm.counters.values()))
        finally:
            fm.close()
    r = measure(max(5, int(40 * scale)), fresh, lambda: 0)
    r["ioctls"] = statistics.mean(cells[1:]) if len(cells) > 1 else float(cells[0])
    rows["fresh"] = r
    return rows


def save_restore_rows(quick: bool) -> list[dict[str, Any]]:
    out = []
    sizes = (16, 128) if quick else (16, 128, 1024)
    with tempfile.TemporaryDirectory(prefix="regsync-bench-") as d:
        for mem_mb in sizes:
            for layout in ("sparse", "dense"):
                path = Path(d) / f"{mem_mb}-{layout}.snap"
                with ready(mem_mb) as m:
                    if layout == "dense":       # every page holds data
                        chunk = os.urandom(1 << 20)
                        for off in range(2 << 20, mem_mb << 20, 1 << 20):
                            m.memory.write(off, chunk)
                    t0 = time.perf_counter()
                    size = m.save(path)
                    t_save = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    m.restore(path)
                    t_restore = time.perf_counter() - t0
                t0 = time.perf_counter()
                fm = Machine.from_snapshot(path, serial_out=io.StringIO())
                t_from = time.perf_counter() - t0
                run_input(fm, 7, 3)
                fm.close()
                t0 = time.perf_counter()
                with Machine(smp=1, mem_mb=mem_mb, serial_out=io.StringIO()):
                    pass
                t_create = time.perf_counter() - t0
                path.unlink()
                out.append({"mem_mb": mem_mb, "layout": layout, "file_bytes": size,
                            "save_ms": t_save * 1e3, "restore_same_ms": t_restore * 1e3,
                            "from_snapshot_ms": t_from * 1e3, "new_machine_ms": t_create * 1e3})
    return out


def group_costs(n: int = 300) -> dict[str, dict[str, float]]:
    """µs per GET and per SET of each group (the RESET_POLICY evidence)."""
    from regsync.snapshot.state import get_vm_part, put_vm_part
    out = {}
    with ready() as m:
        v = m.vcpus[0]
        t, g = v.transport, v.cache.catalog.group_by_name
        data = v.cache.export(v.cache.catalog.levels["FULL"])
        for name in ("MP_STATE", "XSAVE", "XCRS", "DEBUGREGS", "LAPIC", "MSRS", "MSRS_TIME"):
            t0 = time.perf_counter()
            for _ in range(n):
                t.fetch(g[name])
            get = (time.perf_counter() - t0) / n * 1e6
            t0 = time.perf_counter()
            for _ in range(n):
                t.put(g[name], data[name])
            put = (time.perf_counter() - t0) / n * 1e6
            out[name] = {"get_us": get, "set_us": put, "policy": RESET_POLICY[name]}
        for name in ("pit", "clock", "pic_master", "pic_slave", "ioapic"):
            cur = get_vm_part(m, name)
            t0 = time.perf_counter()
            for _ in range(n):
                get_vm_part(m, name)
            get = (time.perf_counter() - t0) / n * 1e6
            t0 = time.perf_counter()
            for _ in range(n):
                put_vm_part(m, name, cur)
            put = (time.perf_counter() - t0) / n * 1e6
            out[name] = {"get_us": get, "set_us": put, "policy": RESET_POLICY[name]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, no 1 GiB guest")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    ap.add_argument("--costs", action="store_true", help="only the GET/SET cost per group")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": f"{platform.node()} {platform.machine()} Python {platform.python_version()}",
        "command": "python benchmarks/reset_loop.py" + (" --quick" if args.quick else "")}
    costs = group_costs()
    result["group_costs_us"] = costs
    print("GET vs SET per group (µs per ioctl) and the reset's choice:")
    print("| group | GET | SET | policy |\n|---|---:|---:|---|")
    for name, c in costs.items():
        print(f"| {name} | {c['get_us']:.1f} | {c['set_us']:.1f} | {c['policy']} |")
    if args.costs:
        return 0
    result["loop"] = {}
    print("\nReset loop (per iteration: reset + input + the guest's run to its exit):")
    print("| k pages | way | resets/s | µs/reset | ioctls/reset |\n|---:|---|---:|---:|---:|")
    for k in KS:
        rows = loop_rows(k, args.quick)
        result["loop"][str(k)] = rows
        for way in ("limit", "dirty-only", "promised", "full", "fresh"):
            r = rows[way]
            print(f"| {k} | {way} | {r['per_s']:,.0f} | {r['us']:,.0f} | {r['ioctls']:.1f} |",
                  flush=True)
    print("\nSave / restore (ms; sparse = the guest image only, dense = every page written):")
    print("| guest | layout | file | save | restore (same VM) | from_snapshot | new Machine |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = save_restore_rows(args.quick)
    result["save_restore"] = rows
    for r in rows:
        print(f"| {r['mem_mb']} MiB | {r['layout']} | {r['file_bytes'] / (1 << 20):,.1f} MiB | "
              f"{r['save_ms']:,.1f} | {r['restore_same_ms']:,.1f} | {r['from_snapshot_ms']:,.1f} | "
              f"{r['new_machine_ms']:,.1f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
