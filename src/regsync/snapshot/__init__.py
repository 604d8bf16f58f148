"""Snapshots: a machine's whole state as data, the file it is saved in, the fast reset.

The one door is on Machine: ``m.save(path)``, ``Machine.from_snapshot(path)``,
``m.restore(path)``, ``snap = m.snapshot()``, ``m.reset_to(snap)``. Inside:

    state.py       MachineState / VcpuState (plain data), taking and putting back
    order.py       the capture and restore orders, each entry with the kernel's reason
    fileformat.py  the file: magic, version, arch, section table, SHA-256, limits
    reset.py       the in-memory snapshot and the dirty-only reset
    cli.py         ``regsync snapshot info`` and the run options
"""

from .fileformat import FileInfo, read, write
from .order import CAPTURE_ORDER, RESTORE_ORDER, VM_RESTORE_ORDER
from .reset import REGS_AND_MEMORY_ONLY, RESET_POLICY, Snapshot, reset_to, take
from .state import MachineState, SlotImage, SnapshotError, VcpuState, apply, capture

__all__ = ["MachineState", "VcpuState", "SlotImage", "SnapshotError", "Snapshot", "FileInfo",
           "capture", "apply", "take", "reset_to", "read", "write", "CAPTURE_ORDER",
           "RESTORE_ORDER", "VM_RESTORE_ORDER", "RESET_POLICY", "REGS_AND_MEMORY_ONLY"]
