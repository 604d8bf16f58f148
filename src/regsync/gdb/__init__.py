"""GDB Remote Serial Protocol stub for regsync VMs, without I/O.

Layers (each usable alone):

* :mod:`.packets` -- framing: :class:`Framer` (bytes -> events) and
  :func:`encode_packet` (payload -> wire bytes).
* :mod:`.targetxml` -- register layouts as data, ``target.xml`` generation
  and conversion between catalog values and gdb's wire format.
* :mod:`.target` -- the :class:`Target` protocol the core drives, plus
  :class:`StopEvent` and the error types.
* :mod:`.core` -- :class:`StubCore`, the all-stop protocol state machine.

A server wires a socket to ``StubCore.receive``/``StubCore.on_stop`` and an
adapter implementing :class:`Target` over the VM and its register cache.
"""

from .core import StubCore
from .packets import (
    Ack, BadPacket, DEFAULT_PACKET_SIZE, Event, Framer, Interrupt, Nack, Packet,
    encode_packet,
)
from .target import (
    SIGINT, SIGTRAP, Action, LocalProtocolError, StopEvent, Target, TargetBase,
    TargetError, Unsupported,
)
from .targetxml import (
    I386_LAYOUT, I8086_LAYOUT, X86_64_LAYOUT, GdbRegister, RegisterLayout,
    register_bytes, register_updates, register_value, x86_64_layout,
)

__all__ = [
    "Ack", "Action", "BadPacket", "DEFAULT_PACKET_SIZE", "Event", "Framer",
    "GdbRegister", "I386_LAYOUT", "I8086_LAYOUT", "Interrupt",
    "LocalProtocolError", "Nack", "Packet", "RegisterLayout", "SIGINT",
    "SIGTRAP", "StopEvent", "StubCore", "Target", "TargetBase", "TargetError",
    "Unsupported", "X86_64_LAYOUT", "encode_packet", "register_bytes",
    "register_updates", "register_value", "x86_64_layout",
]
