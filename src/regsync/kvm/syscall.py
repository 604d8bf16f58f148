"""The one choke point every KVM ioctl passes through.

It counts calls per ioctl name (benchmarks and ``--stats`` read these
counters) and turns a failure into a KvmError naming the ioctl, the object
and errno. KVM_RUN goes through libc's ioctl via ctypes with use_errno: since
PEP 475 fcntl.ioctl retries on EINTR, which would make a vCPU unkickable. It is
the one ioctl of every exit, so its choke point is Vcpu.run in handles.py (the
same counting and errors, one Python call less, the request number computed once).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
from collections import Counter
from typing import Any

from .ioctls import Ioctl, moves_register_state

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc_ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """An ioctl failed. Keeps errno; says which ioctl on which object."""

    def __init__(self, ioctl: str, obj: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.obj = obj
        msg = f"{ioctl} on {obj} failed: [Errno {err}] {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


class MsrError(KvmError):
    """KVM_GET_MSRS / KVM_SET_MSRS stopped short: the kernel returns how many entries it
    processed and stops at the first one it refuses (api.rst, "4.18 KVM_GET_MSRS").
    The entries before ``processed`` did happen; ``index`` is the MSR it refused."""

    def __init__(self, ioctl: str, obj: str, indices: list[int], processed: int,
                 value: int | None = None, read: list[int] | None = None) -> None:
        self.indices, self.processed = list(indices), processed
        self.index = indices[processed]
        self.value = value              # SET: the value refused
        self.read = read or []          # GET: the values of the entries processed
        what = "read" if value is None else f"write {value:#x} to"
        super().__init__(ioctl, obj, errno_mod.EINVAL,
                         f"KVM would not {what} MSR {self.index:#x} "
                         f"({processed} of {len(indices)} processed)")


class KvmUnavailable(RuntimeError):
    """/dev/kvm is missing or unusable on this machine."""


class Counters(Counter[str]):
    """ioctl name -> calls. One per handle; Counter arithmetic sums them."""

    def register_ioctls(self) -> int:
        """Calls that moved vCPU register state (not runs, setup or VM-wide state)."""
        return sum(n for name, n in self.items() if moves_register_state(name))


def ioctl(fd: int, obj: str, op: Ioctl, arg: Any, counters: Counters) -> int:
    """Issue op on fd. arg: an int, or a ctypes object the kernel reads/writes in place."""
    counters[op.name] += 1
    if not isinstance(arg, int):
        try:
            return fcntl.ioctl(fd, op.number, arg, True)
        except OSError as e:
            raise KvmError(op.name, obj, e.errno or errno_mod.EIO) from None
    # Integer arguments are unsigned long in the kernel (fcntl.ioctl takes a C int).
    while True:
        ret = _libc_ioctl(fd, op.number, arg)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno_mod.EINTR:
            raise KvmError(op.name, obj, err)
