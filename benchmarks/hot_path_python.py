"""Python's own cost per exit, without the kernel: KVM_RUN is replaced by a stub that
leaves the kvm_run page describing the last hypercall exit (and clears kvm_dirty_regs,
as KVM does when it applies them). On this nested paravirtual host the guest's time is
partly accounted as user CPU of the vCPU thread, so getrusage in hot_path.py cannot
isolate Python; this can.

Two measures:
  default          user CPU µs per exit, best of 8 alternating rounds of 50,000 exits
  --instructions   machine instructions per exit under valgrind's cachegrind (the
                   difference of a 2,000- and a 12,000-exit run): exact and immune to
                   the machine's load, the number to compare code changes with.
                   Needs valgrind (Debian package valgrind).

    .venv/bin/python benchmarks/hot_path_python.py [--instructions]
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
from typing import Any, Callable

from regsync import Machine
from regsync.devices.basic import HYPERCALL_PORT
try:
    from regsync.serving import uses
except ImportError:             # an older regsync (a "before" column): no serve()
    uses = None                 # type: ignore[assignment]

Loop = Callable[[int], None]


def loops(m: Machine) -> dict[str, Loop]:
    """The hypercall loop four ways, on m's vCPU 0 with KVM_RUN stubbed."""
    m.load("hypercall", arg=1 << 40)
    v = m.vcpus[0]
    for _ in range(10):
        v.run()
        v.regs.rax = v.regs.rdi + v.regs.rsi
    v.flush()
    page = v.handle.run_page
    r = page.s.regs.regs

    def stub() -> int:
        page.kvm_dirty_regs = 0
        return 0
    v._kvm_run = stub  # type: ignore[method-assign]
    regs = v.regs

    def raw(n: int) -> None:
        for _ in range(n):
            stub()
            if page.exit_reason == 2 and page.io.port == HYPERCALL_PORT:
                r.rax = r.rdi + r.rsi
                page.kvm_dirty_regs = 1

    def typed(n: int) -> None:
        run = v.run
        for _ in range(n):
            ex = run()
            if ex.port == HYPERCALL_PORT:  # type: ignore[union-attr]
                regs.rax = regs.rdi + regs.rsi

    def answer(ex: Any) -> None:
        regs.rax = regs.rdi + regs.rsi

    def named(ex: Any, rdi: int, rsi: int) -> int:
        return rdi + rsi

    def serve(n: int) -> None:
        v.serve({HYPERCALL_PORT: answer}, n)

    def serve_uses(n: int) -> None:
        v.serve({HYPERCALL_PORT: uses("rdi", "rsi", writes="rax")(named)}, n)
    if uses is None:
        return {"raw": raw, "typed": typed}
    return {"raw": raw, "typed": typed, "serve": serve, "serve @uses": serve_uses}


def user_cpu() -> dict[str, float]:
    with Machine(smp=1) as m:
        fs = loops(m)
        best: dict[str, float] = {}
        for _ in range(8):
            for name, f in fs.items():
                u = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
                f(50_000)
                us = (resource.getrusage(resource.RUSAGE_THREAD).ru_utime - u) / 50_000 * 1e6
                best[name] = min(best.get(name, 1e9), us)
    return best


def _refs(name: str, n: int) -> int:
    p = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                        "--cachegrind-out-file=/dev/null", sys.executable, __file__,
                        "--one", name, str(n)], capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", p.stderr)
    if not found:
        raise RuntimeError(f"cachegrind printed no instruction count:\n{p.stderr[-800:]}")
    return int(found.group(1).replace(",", ""))


def instructions() -> dict[str, float]:
    names = ("raw", "typed") if uses is None else ("raw", "typed", "serve", "serve @uses")
    return {name: (_refs(name, 12_000) - _refs(name, 2_000)) / 10_000 for name in names}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instructions", action="store_true",
                   help="instructions per exit under cachegrind instead of user CPU")
    p.add_argument("--one", nargs=2, metavar=("LOOP", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:                                    # one loop, inside valgrind
        with Machine(smp=1) as m:
            loops(m)[a.one[0]](int(a.one[1]))
        return 0
    if a.instructions:
        if shutil.which("valgrind") is None:
            print("--instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
            return 2
        res, unit = instructions(), "instructions"
    else:
        res, unit = user_cpu(), "µs user CPU"
    print(f"| loop (KVM_RUN stubbed) | {unit} per exit | × raw |\n|---|---:|---:|")
    for name, x in res.items():
        print(f"| {name} | {x:,.2f} | {x / res['raw']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
