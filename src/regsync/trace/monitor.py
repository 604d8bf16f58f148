"""gdb's ``monitor trace on [FILE] | off | show`` (registered in gdb.monitor's table).

The machine is stopped (all-stop) when a monitor command runs; each vCPU's trace is
attached or detached on its own thread (run_on_cpu), as every cache mutation is.
The trace lives on the machine (``machine.sync_trace``) until ``off``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..gdb.monitor import MonitorError, monitor_command
from .recorder import SyncTrace
from .summary import format_summary, summary

if TYPE_CHECKING:
    from ..gdb.adapter import MachineTarget


def _each_vcpu(target: "MachineTarget", fn: Any) -> None:
    m = target.m
    for v in m.vcpus:
        m.run_on_cpu(v, lambda v=v: fn(v), timeout=10.0)


@monitor_command("trace", usage="on [FILE] | off | show", max_args=2,
                 help="record every register transfer with its reason and caller "
                      "(on), stop (off), or summarize what was recorded (show)")
def _trace(target: "MachineTarget", args: list[str]) -> str:
    m = target.m
    tr: SyncTrace | None = getattr(m, "sync_trace", None)
    what = args[0] if args else "show"
    if what == "on":
        if tr is not None and tr.attached:
            raise MonitorError("trace: already on (monitor trace off first)")
        out = None
        if len(args) > 1:
            try:
                out = open(args[1], "w")
            except OSError as e:
                raise MonitorError(f"trace: {args[1]}: {e.strerror or e}") from None
        tr = SyncTrace(out)
        _each_vcpu(target, tr.attach)
        m.sync_trace = tr
        return f"sync trace on{' to ' + args[1] if out else ''}\n"
    if len(args) > 1:
        raise MonitorError(f"trace {what}: unexpected argument {args[1]!r}")
    if what == "off":
        if tr is None or not tr.attached:
            raise MonitorError("trace: not on")
        saved = list(tr._attached)
        tr._attached.clear()
        for vcpu, orig in saved:                # each vCPU put back on its own thread
            def put_back(v: Any, o: dict[str, Any] = orig) -> None:
                tr._attached.append((v, o))
                tr.detach()
            m.run_on_cpu(vcpu, lambda v=vcpu, f=put_back: f(v), timeout=10.0)
        if tr.out is not None:
            tr.out.close()
        return f"sync trace off ({len(tr.records)} records)\n"
    if what == "show":
        if tr is None:
            raise MonitorError("trace: nothing recorded (monitor trace on first)")
        return format_summary(summary(tr.records)) + "\n"
    raise MonitorError(f"trace: unknown argument {what!r} (on [FILE], off or show)")
