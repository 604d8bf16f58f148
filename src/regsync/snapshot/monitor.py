"""gdb's ``monitor savevm FILE`` / ``monitor loadvm FILE`` (registered in gdb.monitor's table).

The stub is all-stop: every vCPU is paused while gdb has the guest stopped, so
the snapshot is consistent; each vCPU's state is taken or put on its own thread.
QEMU's HMP takes a snapshot *name* inside its disk image; regsync takes a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..gdb.monitor import MonitorError, monitor_command
from .state import SnapshotError

if TYPE_CHECKING:
    from ..gdb.adapter import MachineTarget


def _path(cmd: str, args: list[str]) -> str:
    if not args:
        raise MonitorError(f"{cmd}: which file? (monitor {cmd} FILE)")
    return args[0]


@monitor_command("savevm", usage="FILE", max_args=1,
                 help="save the whole machine (every vCPU, memory, devices) to FILE")
def _savevm(target: "MachineTarget", args: list[str]) -> str:
    path = _path("savevm", args)
    try:
        size = target.m.save(path)
    except (SnapshotError, OSError) as e:
        raise MonitorError(f"savevm: {' '.join(str(e).split())}") from None
    return f"saved the machine to {path} ({size} bytes)\n"


@monitor_command("loadvm", usage="FILE", max_args=1,
                 help="put the machine back to a snapshot FILE (same vCPUs and memory)")
def _loadvm(target: "MachineTarget", args: list[str]) -> str:
    path = _path("loadvm", args)
    try:
        target.m.restore(path)
    except (SnapshotError, OSError) as e:
        raise MonitorError(f"loadvm: {' '.join(str(e).split())}") from None
    return (f"loaded {path}; gdb still shows the old registers until "
            f"'maintenance flush register-cache'\n")
