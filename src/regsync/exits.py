"""Typed VM exits, decoded from the kvm_run page at the kernel boundary.

``Vcpu.run()`` returns one of these; ``.kind`` is one of "io", "mmio", "hlt",
"debug", "shutdown", "fail_entry", "internal_error", "system_event",
"interrupted" (KVM_RUN returned EINTR: a kick) or "unsupported".
"""

from __future__ import annotations

import ctypes
import operator
import struct
from typing import Any

from .kvm import structs as s


class Exit:
    __slots__ = ()
    kind = "unsupported"

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__  # type: ignore[assignment]
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if not n.startswith("_"))
        return f"{type(self).__name__}({fields})"


class IoExit(tuple):  # type: ignore[type-arg]
    """Port I/O. For "out", ``data`` holds size*count bytes; answer an "in" with respond().

    A tuple underneath (port, direction, size, count, data address): the hot
    path of every port-I/O exit, built in C instead of five attribute stores.
    """
    __slots__ = ()
    kind = "io"
    port = property(operator.itemgetter(0))
    direction = property(operator.itemgetter(1))
    size = property(operator.itemgetter(2))
    count = property(operator.itemgetter(3))
    _addr = property(operator.itemgetter(4))

    def __repr__(self) -> str:
        return (f"IoExit(port={self.port:#x}, direction={self.direction!r}, size={self.size}, "
                f"count={self.count})")

    @property
    def data(self) -> bytes:
        return ctypes.string_at(self._addr, self.size * self.count)

    @property
    def value(self) -> int:
        """The first element of an OUT as an int."""
        return int.from_bytes(ctypes.string_at(self._addr, self.size), "little")

    def respond(self, data: bytes | int) -> None:
        """Answer an IN: bytes (size*count of them) or an int for each element."""
        if self.direction != "in":
            raise ValueError(f"port {self.port:#x}: respond() answers an IN, this is an OUT")
        raw = data.to_bytes(self.size, "little") * self.count if isinstance(data, int) else data
        if len(raw) != self.size * self.count:
            raise ValueError(f"port {self.port:#x}: IN wants {self.size * self.count} bytes, "
                             f"got {len(raw)}")
        ctypes.memmove(self._addr, raw, len(raw))


class MmioExit(Exit):
    __slots__ = ("addr", "length", "is_write", "_run")
    kind = "mmio"

    def __init__(self, addr: int, length: int, is_write: bool, run: Any) -> None:
        self.addr, self.length, self.is_write, self._run = addr, length, is_write, run

    @property
    def data(self) -> bytes:
        return bytes(self._run.mmio.data[:self.length])

    def respond(self, data: bytes | int) -> None:
        if self.is_write:
            raise ValueError(f"MMIO {self.addr:#x}: respond() answers a read, this is a write")
        if isinstance(data, int):
            data = data.to_bytes(self.length, "little")
        for i, b in enumerate(data[:self.length]):
            self._run.mmio.data[i] = b


class HltExit(Exit):
    __slots__ = ()
    kind = "hlt"


class ShutdownExit(Exit):
    __slots__ = ()
    kind = "shutdown"


class InterruptedExit(Exit):
    """KVM_RUN returned without an exit: EINTR (a kick) or EAGAIN (an AP still waiting for SIPI)."""
    __slots__ = ()
    kind = "interrupted"


class DebugExit(Exit):
    __slots__ = ("exception", "pc", "dr6", "dr7")
    kind = "debug"

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int) -> None:
        self.exception, self.pc, self.dr6, self.dr7 = exception, pc, dr6, dr7


class FailEntryExit(Exit):
    __slots__ = ("reason", "cpu")
    kind = "fail_entry"

    def __init__(self, reason: int, cpu: int) -> None:
        self.reason, self.cpu = reason, cpu


class InternalErrorExit(Exit):
    """KVM could not go on; suberror 1 is an emulation failure."""
    __slots__ = ("suberror", "data")
    kind = "internal_error"
    SUBERRORS = {1: "emulation failure", 2: "simultaneous exceptions",
                 3: "delivery event failure", 4: "unexpected exit reason"}

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror, self.data = suberror, data

    @property
    def description(self) -> str:
        return self.SUBERRORS.get(self.suberror, f"suberror {self.suberror}")


class SystemEventExit(Exit):
    __slots__ = ("type", "data")
    kind = "system_event"
    TYPES = {1: "shutdown", 2: "reset", 3: "crash", 4: "wakeup", 5: "suspend"}

    def __init__(self, type_: int, data: tuple[int, ...]) -> None:
        self.type, self.data = type_, data

    @property
    def description(self) -> str:
        return self.TYPES.get(self.type, f"type {self.type}")


class UnsupportedExit(Exit):
    __slots__ = ("reason",)
    kind = "unsupported"

    def __init__(self, reason: int) -> None:
        self.reason = reason


_IN_OUT = ("in", "out")
_HLT, _SHUTDOWN = HltExit(), ShutdownExit()
INTERRUPTED = InterruptedExit()


IO_AT = s.kvm_run.io.offset
IO_FIELDS = struct.Struct("<BBHIQ")    # direction, size, port, count, data_offset
_new_tuple = tuple.__new__


def decode_io(run_addr: int, view: memoryview) -> IoExit:
    """The typed exit of a KVM_EXIT_IO (the caller checked the reason): the hot path."""
    d, size, port, count, off = IO_FIELDS.unpack_from(view, IO_AT)
    return _new_tuple(IoExit, (port, _IN_OUT[d], size, count, run_addr + off))


def decode(run: s.kvm_run, run_addr: int, view: memoryview | None = None) -> Exit | IoExit:
    """The typed exit for the reason in the kvm_run page (``view``: the page as bytes)."""
    reason = run.exit_reason
    if reason == s.KVM_EXIT_IO:
        if view is not None:
            d, size, port, count, off = IO_FIELDS.unpack_from(view, IO_AT)
        else:
            io = run.io
            d, size, port, count, off = io.direction, io.size, io.port, io.count, io.data_offset
        return _new_tuple(IoExit, (port, _IN_OUT[d], size, count, run_addr + off))
    if reason == s.KVM_EXIT_MMIO:
        m = run.mmio
        return MmioExit(m.phys_addr, m.len, bool(m.is_write), run)
    if reason == s.KVM_EXIT_HLT:
        return _HLT
    if reason == s.KVM_EXIT_DEBUG:
        a = run.debug.arch
        return DebugExit(a.exception, a.pc, a.dr6, a.dr7)
    if reason == s.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == s.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == s.KVM_EXIT_INTERNAL_ERROR:
        n = min(run.internal.ndata, 16)
        return InternalErrorExit(run.internal.suberror, tuple(run.internal.data[:n]))
    if reason == s.KVM_EXIT_SYSTEM_EVENT:
        n = min(run.system_event.ndata, 16)
        return SystemEventExit(run.system_event.type, tuple(run.system_event.data[:n]))
    return UnsupportedExit(reason)


AnyExit = Exit | IoExit   # what Vcpu.run() returns (IoExit is a tuple for speed)
