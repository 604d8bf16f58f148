"""Python's own cost per exit, without the kernel: KVM_RUN is replaced by a stub that
leaves the kvm_run page describing the last hypercall exit (and clears kvm_dirty_regs,
as KVM does when it applies them). On this nested paravirtual host the guest's time is
partly accounted as user CPU of the vCPU thread, so getrusage in hot_path.py cannot
isolate Python; this can. Best of 8 alternating rounds of 50,000 iterations.

    .venv/bin/python benchmarks/hot_path_python.py
"""

from __future__ import annotations

import resource

from regsync import Machine
from regsync.devices.basic import HYPERCALL_PORT


def main() -> None:
    with Machine(smp=1) as m:
        m.load("hypercall", arg=1 << 40)
        v = m.vcpus[0]
        for _ in range(10):
            v.run()
            v.regs.rax = v.regs.rdi + v.regs.rsi
        v.flush()
        h, page = v.handle, v.handle.run_page
        r = page.s.regs.regs

        def stub() -> int:
            page.kvm_dirty_regs = 0
            return 0
        real = v._kvm_run
        v._kvm_run = stub

        def raw(n: int) -> None:
            for _ in range(n):
                stub()
                if page.exit_reason == 2 and page.io.port == HYPERCALL_PORT:
                    r.rax = r.rdi + r.rsi
                    page.kvm_dirty_regs = 1

        def typed(n: int) -> None:
            regs, run = v.regs, v.run
            for _ in range(n):
                ex = run()
                if ex.port == HYPERCALL_PORT:
                    regs.rax = regs.rdi + regs.rsi

        best: dict[str, float] = {}
        for _ in range(8):
            for f in (raw, typed):
                u = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
                f(50_000)
                us = (resource.getrusage(resource.RUSAGE_THREAD).ru_utime - u) / 50_000 * 1e6
                best[f.__name__] = min(best.get(f.__name__, 1e9), us)
        v._kvm_run = real
        page.kvm_dirty_regs = 0
        print(f"Python per exit, no kernel: raw {best['raw']:.2f} µs, regsync typed API "
              f"{best['typed']:.2f} µs ({best['typed'] / best['raw']:.1f}x)")


if __name__ == "__main__":
    main()
