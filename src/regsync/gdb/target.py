"""The narrow interface between the protocol core and the debugged machine.

:class:`~regsync.gdb.core.StubCore` calls a :class:`Target`; it never touches
KVM, sockets or the register cache itself.  Conventions:

* Thread ids are the protocol's: positive ints, one per vCPU (vCPU i is
  thread i + 1 by convention; gdb reserves 0 for "any" and -1 for "all").
* Registers are addressed by :class:`~regsync.gdb.targetxml.GdbRegister`
  taken from the layout the core pinned for this connection (gdb reads the
  target description once, so the register numbering must not change under
  it even when a vCPU changes mode).  Values are little-endian bytes of
  exactly ``reg.nbytes``; the helpers in :mod:`regsync.gdb.targetxml`
  convert catalog values.
* Register, memory and breakpoint calls only happen while the target is
  stopped (all-stop).  ``resume`` returns at once; the server later reports
  the stop with ``StubCore.on_stop``.

Errors: raise :class:`TargetError` to refuse (the peer gets ``E nn``),
:class:`Unsupported` for "not implemented" (the peer gets an empty reply,
which gdb treats as "packet not supported").  ``ValueError`` (e.g. from
``register_updates``) is answered like ``TargetError(EINVAL)``.  Any other
exception is a bug and propagates out of the core.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable

from .targetxml import GdbRegister, RegisterLayout

__all__ = [
    "Action",
    "BP_ACCESS_WATCH",
    "BP_HARDWARE",
    "BP_READ_WATCH",
    "BP_SOFTWARE",
    "BP_WRITE_WATCH",
    "LocalProtocolError",
    "SIGINT",
    "SIGTRAP",
    "StopEvent",
    "STOP_REASONS",
    "Target",
    "TargetBase",
    "TargetError",
    "Unsupported",
]

#: gdb signal numbers (the protocol uses gdb's numbering, not the host's).
SIGINT = 2
SIGTRAP = 5

#: ``kind`` values of insert/remove_breakpoint: the Z packet type digit.
BP_SOFTWARE, BP_HARDWARE, BP_WRITE_WATCH, BP_READ_WATCH, BP_ACCESS_WATCH = range(5)

#: Valid ``StopEvent.reason`` values; the watch kinds carry a data address.
STOP_REASONS = (None, "swbreak", "hwbreak", "watch", "rwatch", "awatch")
_WATCH_REASONS = ("watch", "rwatch", "awatch")

#: A resume action: ("c" | "s", signal or None).
Action = tuple[str, int | None]


class TargetError(Exception):
    """The target refused a request; ``errno_value`` goes into ``E nn``."""

    def __init__(self, errno_value: int = errno.EINVAL, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(errno_value, str(errno_value)))
        self.errno_value = errno_value
        self.message = message


class Unsupported(Exception):
    """The target does not implement this request (empty reply to gdb)."""


class LocalProtocolError(Exception):
    """The *server* misused the core API (e.g. ``on_stop`` while stopped).

    Peer (gdb) misbehaviour never raises; it is answered on the wire.
    """


@dataclass(frozen=True)
class StopEvent:
    """Why and where the machine stopped (all vCPUs are stopped).

    ``tid`` is the thread that hit the event (it becomes the current thread).
    ``signal`` is a gdb signal number: :data:`SIGTRAP` for breakpoints and
    steps, :data:`SIGINT` after :meth:`Target.interrupt`.  ``reason`` is one
    of :data:`STOP_REASONS`; for ``swbreak`` the target must already have
    moved the pc back to the breakpoint address (that is what ``swbreak``
    tells gdb).  ``address`` is the data address for watchpoint reasons.
    ``expedite`` maps regnums of the core's layout to wire bytes to include
    in the stop reply; when None the core reads the layout's fp/sp/pc itself.
    """

    tid: int
    signal: int = SIGTRAP
    reason: str | None = None
    address: int | None = None
    expedite: Mapping[int, bytes] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.reason not in STOP_REASONS:
            raise ValueError(f"bad stop reason {self.reason!r}")
        if self.reason in _WATCH_REASONS and self.address is None:
            raise ValueError(f"{self.reason} needs an address")
        if not 0 <= self.signal <= 255:
            raise ValueError(f"bad signal {self.signal}")


@runtime_checkable
class Target(Protocol):
    """What the stub core needs from the machine being debugged."""

    def threads(self) -> list[int]:
        """All thread ids (one per vCPU), ascending, each >= 1."""
        ...

    def thread_extra_info(self, tid: int) -> str:
        """Short human text for ``info threads``, e.g. ``"vCPU 0 rip=0x..."``."""
        ...

    def register_layout(self, tid: int) -> RegisterLayout:
        """Layout matching ``tid``'s current mode.  The core asks once per
        connection (when gdb fetches target.xml) and keeps the answer."""
        ...

    def read_registers(self, tid: int, layout: RegisterLayout) -> list[bytes | None]:
        """The registers of ``layout`` in order; None = unavailable.

        May return a non-empty *prefix* (the registers that are cheap to
        read): the ``g`` reply then carries only those and gdb fetches the
        others one at a time with ``p``.  Keep the prefix length fixed for
        a connection: gdb shrinks its idea of the ``g`` size once and
        rejects a longer reply afterwards."""
        ...

    def read_register(self, tid: int, reg: GdbRegister) -> bytes | None:
        """One register's wire bytes, or None if unavailable."""
        ...

    def write_register(self, tid: int, reg: GdbRegister, data: bytes) -> None:
        """Store ``data`` (exactly ``reg.nbytes``) or raise TargetError."""
        ...

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        """Read guest-virtual memory as seen by ``tid`` (its page tables).

        Return exactly ``length`` bytes or raise TargetError (EFAULT) if any
        byte is unmapped; the core retries up to the first page boundary to
        serve partial reads."""
        ...

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        """Write guest-virtual memory or raise TargetError, writing nothing
        unless every byte can be written."""
        ...

    def read_physical(self, addr: int, length: int) -> bytes:
        """Read guest-physical memory (Qqemu.PhyMemMode); exactly ``length``
        bytes or TargetError."""
        ...

    def write_physical(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory, all of it or nothing (TargetError)."""
        ...

    def resume(self, actions: dict[int, Action], default: Action | None) -> None:
        """Start running and return at once.

        ``actions`` maps thread ids to ("c" | "s", signal|None); ``default``
        applies to the other threads (None: they should stay stopped, as with
        gdb's scheduler-locking; an all-stop VM may still run them).  Stops
        are reported later through ``StubCore.on_stop``."""
        ...

    def interrupt(self) -> None:
        """Ask all vCPUs to stop; a SIGINT StopEvent must follow."""
        ...

    def kill(self) -> None:
        """gdb killed the inferior (``k``/``vKill``)."""
        ...

    def detach(self) -> None:
        """gdb detached; remove breakpoints and let the machine run."""
        ...

    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """Insert a Z``kind`` point (0 sw, 1 hw, 2 write, 3 read, 4 access
        watch); ``length`` is the protocol's kind/size field.  Raise
        Unsupported to make gdb fall back (e.g. to writing int3 itself)."""
        ...

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """Remove a point inserted by :meth:`insert_breakpoint`."""
        ...

    def monitor(self, command: str) -> str:
        """Run a ``monitor`` command and return its output text; TargetError
        with a message refuses it (the core shows gdb the message)."""
        ...


class TargetBase:
    """Optional convenience base: sensible defaults for the optional parts.

    Subclasses must still provide threads, register_layout, read_register,
    write_register, read_memory, write_memory, resume, interrupt, kill and
    detach.
    """

    def thread_extra_info(self, tid: int) -> str:
        """No extra text by default."""
        return ""

    def read_registers(self, tid: int, layout: RegisterLayout) -> list[bytes | None]:
        """Read one register at a time (fine when reads hit a cache)."""
        read = getattr(self, "read_register")
        return [read(tid, reg) for reg in layout.registers]

    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """No breakpoint support unless overridden."""
        raise Unsupported()

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """No breakpoint support unless overridden."""
        raise Unsupported()

    def monitor(self, command: str) -> str:
        """No monitor commands unless overridden."""
        raise Unsupported()

    def read_physical(self, addr: int, length: int) -> bytes:
        """No physical memory access unless overridden."""
        raise Unsupported()

    def write_physical(self, addr: int, data: bytes) -> None:
        """No physical memory access unless overridden."""
        raise Unsupported()
