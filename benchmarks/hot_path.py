"""The hot path: user-mode CPU and wall time per exit, regsync's typed API against a
hand-written raw loop on the kvm_run page, in one process on one VM, interleaved in
chunks (this host's exit cost drifts 2x over seconds; only an interleaved same-VM
comparison says what a ratio claims).

Workload: the bundled ``hypercall`` guest (each exit: read rdi and rsi, write rax).
Variants:
  raw          KVM_RUN by hand, registers straight off/onto the kvm_run page
  regsync      v.run(), ex.port, v.regs.rdi/rsi, v.regs.rax = ... (the typed API)
  traced       the typed API with a SyncTrace attached (what the trace costs on)
  trace detached  the typed API after a SyncTrace was attached and detached: the
               trace "off" (regsync has no compiled-out build: off is no trace code)
  serve        v.serve({port: handler}) with the typed API in the handler
  serve @uses  v.serve with a handler naming its registers (regsync.serving.uses)

    .venv/bin/python benchmarks/hot_path.py [--exits N] [--out FILE]

prints a table and writes JSON (default benchmarks/out/hot_path.json, git-ignored).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

from regsync import Machine
from regsync.devices.basic import HYPERCALL_PORT
try:
    from regsync.trace import SyncTrace
except ImportError:             # an older regsync (the "before" column): no trace
    SyncTrace = None            # type: ignore[assignment,misc]

CHUNKS = 10


def _user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_utime


def _raw(m: Machine, n: int) -> None:
    v = m.vcpus[0]
    h, page = v.handle, v.handle.run_page
    r = page.s.regs.regs
    hrun = h.run
    for _ in range(n):
        hrun()
        if page.exit_reason == 2 and page.io.port == HYPERCALL_PORT:
            r.rax = r.rdi + r.rsi
            page.kvm_dirty_regs = 1


def _typed(m: Machine, n: int) -> None:
    v = m.vcpus[0]
    regs, run = v.regs, v.run
    for _ in range(n):
        ex = run()
        if ex.port == HYPERCALL_PORT:
            regs.rax = regs.rdi + regs.rsi


def _serve(m: Machine, n: int) -> None:
    v = m.vcpus[0]
    regs = v.regs

    def hypercall(ex: Any) -> None:
        regs.rax = regs.rdi + regs.rsi

    if v.serve({HYPERCALL_PORT: hypercall}, n) is not None:
        raise RuntimeError("serve: the guest left its loop")


def _serve_uses(m: Machine, n: int) -> None:
    from regsync.serving import uses

    @uses("rdi", "rsi", writes="rax")
    def hypercall(ex: Any, rdi: int, rsi: int) -> int:
        return rdi + rsi

    if m.vcpus[0].serve({HYPERCALL_PORT: hypercall}, n) is not None:
        raise RuntimeError("serve: the guest left its loop")


def measure(exits: int) -> dict[str, dict[str, float]]:
    variants: dict[str, Callable[[Machine, int], None]] = {"raw": _raw, "regsync": _typed}
    if SyncTrace is not None:
        variants["traced"] = _typed
        variants["trace detached"] = _typed     # attached once, then off: "off" is measured
    with Machine(smp=1) as probe:
        if hasattr(probe.vcpus[0], "serve"):
            variants["serve"] = _serve
            variants["serve @uses"] = _serve_uses
    out: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        if name == "raw":
            continue
        with Machine(smp=1) as m:
            m.load("hypercall", arg=1 << 40)
            v = m.vcpus[0]
            _typed(m, 100)                          # warm up, boot state flushed
            v.cache.before_run()                    # the last answer reaches the raw loop
            tr = SyncTrace(io.StringIO()) if name == "traced" and SyncTrace else None
            if name == "trace detached":
                off = SyncTrace(io.StringIO())
                off.attach(v)
                off.detach()
            step = max(1, exits // CHUNKS)
            acc = {name: [0.0, 0.0], "raw": [0.0, 0.0]}
            for i in range(CHUNKS):
                for s in ((name, "raw") if i % 2 else ("raw", name)):
                    if s != "raw" and tr is not None:
                        tr.attach(v)
                    t0, u0 = time.perf_counter(), _user_cpu()
                    (variants[s])(m, step)
                    acc[s][0] += time.perf_counter() - t0
                    acc[s][1] += _user_cpu() - u0
                    if s != "raw" and tr is not None:
                        tr.detach()
                    v.cache.before_run()            # hand-off: queued writes stay queued
                    v.invalidate()
            n = step * CHUNKS
            for s in (name, "raw"):
                wall, user = acc[s]
                key = s if s != "raw" else f"raw (vs {name})"
                out[key] = {"exits_per_s": n / wall, "wall_us_per_exit": wall / n * 1e6,
                            "user_us_per_exit": user / n * 1e6}
            out[name]["x_raw_wall"] = out[f"raw (vs {name})"]["wall_us_per_exit"] / \
                out[name]["wall_us_per_exit"]
            out[name]["x_raw_user"] = out[name]["user_us_per_exit"] / \
                out[f"raw (vs {name})"]["user_us_per_exit"]
            port = v.handle.run_page.io.port
            if port != HYPERCALL_PORT:
                raise RuntimeError(f"{name}: the guest left its loop (port {port:#x})")
    return out


def table(res: dict[str, dict[str, float]]) -> str:
    rows = ["| variant | exits/s | wall µs/exit | user CPU µs/exit | × raw (wall rate) "
            "| × raw (user CPU) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        rows.append(f"| {name} | {r['exits_per_s']:,.0f} | {r['wall_us_per_exit']:.2f} | "
                    f"{r['user_us_per_exit']:.2f} | {r.get('x_raw_wall', 1.0):.2f} | "
                    f"{r.get('x_raw_user', 1.0):.2f} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exits", type=int, default=200_000, help="exits per variant (default 200k)")
    p.add_argument("--out", default="benchmarks/out/hot_path.json",
                   help="JSON output (default benchmarks/out/hot_path.json, git-ignored)")
    a = p.parse_args()
    res = measure(a.exits)
    print(table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "python": platform.python_version(), "exits": a.exits, "results": res}, f,
                  indent=2)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
