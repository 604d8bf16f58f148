"""Sans-I/O GDB remote stub core for an all-stop, multi-vCPU x86 machine.

The server owns the socket and the VM.  It passes every chunk read from
gdb to :meth:`StubCore.receive` and sends what comes back; when the VM
stops after a resume (or an interrupt), it calls :meth:`StubCore.on_stop`
and sends that too.  While ``not core.stopped`` the server must watch both
the socket (gdb's Ctrl-C arrives through ``receive``) and the VM.  It closes
the connection once ``core.wants_close`` is set (after ``D``/``k``).

Peer misbehaviour never raises: it is answered with ``E nn`` (``E16``
EINVAL for malformed requests, ``E0e`` EFAULT for memory) or an empty reply
("unsupported").  Misuse of this API by the server raises
:class:`~regsync.gdb.target.LocalProtocolError`.

Refusals that carry a message reach the user where the protocol lets them
(gdb's remote.c, gdb 13.1): a gdb that announces ``error-message+`` in
qSupported (gdb 15 and later) gets ``E.text`` for every refusal; older gdbs
print the text of ``E.<code>.<text>`` only for a refused ``Z1``
(remote_target::insert_hw_breakpoint, "Remote failure reply: ...") and
ignore it for watchpoints (insert_watchpoint returns -1 whatever the text),
so those replies carry it anyway.  A refused ``monitor`` command sends its
message as console output (``O``) before the error, which gdb prints.

Physical memory: ``Qqemu.PhyMemMode:1`` switches m/M/X (and qCRC,
qSearch:memory) to guest-physical addresses, ``qqemu.PhyMemMode`` reports the
mode -- QEMU's packets (gdbstub/gdbstub.c gdb_gen_query_table/gdb_gen_set_table,
gdbstub/system.c gdb_handle_{query,set}_qemu_phy_mem_mode).  QEMU keeps the
mode in a global that outlives the connection; here each connection starts in
virtual mode, so a new gdb never inherits a surprise.
"""

from __future__ import annotations

import collections
import errno
import re
from typing import Callable

from .packets import (
    ADDR_LIMIT, DEFAULT_PACKET_SIZE, OVERSIZE, BadPacket, Framer, Interrupt, Nack,
    Packet, PacketError, chunk_thread_list, encode_packet, format_stop_reply,
    hex_bytes, parse_addr_len, parse_hex, parse_signal, parse_vcont, unhex,
)
from .scan import SCAN_LIMIT, crc_of, search
from .target import (
    Action, LocalProtocolError, StopEvent, Target, TargetError, Unsupported,
)
from .targetxml import GdbRegister, RegisterLayout

__all__ = ["StubCore"]

Reply = bytes | list[bytes] | None  # None: no reply (resume, k)

_E_INVAL = b"E%02x" % errno.EINVAL
#: QEMU's reply to Qqemu.PhyMemMode without a value (gdb_handle_set_qemu_phy_mem_mode).
_E_QEMU_NO_PARAM = b"E22"
#: qSupported features by which a gdb says it reads E.text for any packet (the name
#: in gdb 15's remote.c, and the one in the patch's documentation).
_TEXT_ERROR_FEATURES = frozenset({b"error-message+", b"accept-error-message+"})
#: Refusals whose text gdb 13 shows from an ``E.<code>.<text>`` reply (see above).
_TEXT_IN_E_DOT = frozenset({b"Z"})
_NAME = re.compile(rb"[^:,;]*")


class StubCore:
    """Protocol state machine: bytes in, bytes out, calls into a Target.

    ``initial_stop`` says the machine is already stopped (the usual case when
    gdb connects); without it the core assumes it runs, and gdb's first ``?``
    interrupts it, the reply being what :meth:`on_stop` returns.
    """

    def __init__(
        self,
        target: Target,
        *,
        packet_size: int = DEFAULT_PACKET_SIZE,
        initial_stop: StopEvent | None = None,
    ) -> None:
        if packet_size < 64:  # replies need room for a register or an error
            raise ValueError("packet_size must be at least 64")
        self.target = target
        self.packet_size = packet_size
        self.wants_close = False
        self._framer = Framer(packet_size)
        self._noack = False
        self._g_thread = 0  # Hg selection; 0 = any (resolved to stop thread)
        self._c_thread = 0
        self._running = initial_stop is None
        self._awaiting_stop = False  # gdb waits for a stop reply
        self._last_stop = initial_stop
        self._layout: RegisterLayout | None = None
        self._pending_threads: list[bytes] = []
        self._last_sent = b""
        self._peer_features: set[bytes] = set()
        self._physical = False          # Qqemu.PhyMemMode
        #: Packets handled on this connection, in all and by name (the server's records).
        self.packets = 0
        self.by_packet: collections.Counter[str] = collections.Counter()
        self._handlers: dict[bytes, Callable[[bytes], Reply]] = {
            b"?": self._h_why, b"g": self._h_g, b"G": self._h_G, b"p": self._h_p,
            b"P": self._h_P, b"m": self._h_m, b"H": self._h_H,
            b"M": lambda a: self._write_mem(a, binary=False),
            b"X": lambda a: self._write_mem(a, binary=True),
            **{c: self._legacy_resume(c) for c in (b"c", b"C", b"s", b"S")},
            b"Z": lambda a: self._breakpoint(True, a),
            b"z": lambda a: self._breakpoint(False, a),
            b"T": self._h_T, b"D": self._h_D, b"k": lambda a: self._kill(None),
            b"qSupported": self._q_supported, b"QStartNoAckMode": self._q_noack,
            b"qfThreadInfo": self._q_fthreads, b"qsThreadInfo": self._q_sthreads,
            b"qC": self._q_c, b"qAttached": lambda a: b"1",
            b"qThreadExtraInfo": self._q_extra, b"qRcmd": self._q_rcmd,
            b"qXfer": self._q_xfer, b"vCont?": lambda a: b"vCont;c;C;s;S;t",
            b"vCont": self._v_cont, b"vKill": lambda a: self._kill(b"OK"),
            b"qqemu.Supported": lambda a: b"PhyMemMode",
            b"qqemu.PhyMemMode": lambda a: b"1" if self._physical else b"0",
            b"Qqemu.PhyMemMode": self._set_phys_mode,
            b"qCRC": self._q_crc, b"qSearch": self._q_search,
        }

    # --- public API ------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """True while the machine is stopped (register access allowed)."""
        return not self._running

    @property
    def no_ack_mode(self) -> bool:
        """True once gdb negotiated QStartNoAckMode."""
        return self._noack

    @property
    def layout(self) -> RegisterLayout:
        """The register layout pinned for this connection.

        gdb reads target.xml once, so the numbering must stay fixed even if
        a vCPU later switches mode; the first use asks the target."""
        if self._layout is None:
            self._layout = self.target.register_layout(self._resolve(self._g_thread))
        return self._layout

    def receive(self, data: bytes) -> bytes:
        """Process bytes from gdb; return the bytes to send back."""
        out = bytearray()
        for event in self._framer.feed(data):
            if self.wants_close:
                break
            if isinstance(event, Packet):
                if not self._noack:
                    out += b"+"
                for reply in self._handle(event.payload):
                    out += self._frame(reply)
            elif isinstance(event, Interrupt):
                self._interrupt()
            elif isinstance(event, BadPacket):
                if event.reason == OVERSIZE:
                    # Retransmitting would not help: answer it as an error.
                    out += (b"" if self._noack else b"+") + self._frame(_E_INVAL)
                elif not self._noack:
                    out += b"-"
            elif isinstance(event, Nack):
                if not self._noack:
                    out += self._last_sent
            # Ack: nothing to do, we never wait for acknowledgements.
        return bytes(out)

    def on_stop(self, event: StopEvent) -> bytes:
        """Report that the machine stopped; return the stop reply to send.

        Returns b"" when gdb is not waiting for one (the event is kept for
        its next ``?``).  The stopped thread becomes the current thread."""
        if not self._running:
            raise LocalProtocolError("on_stop while already stopped")
        if event.tid not in self.target.threads():
            raise LocalProtocolError(f"on_stop for unknown thread {event.tid}")
        reply = self._stop_reply(event)
        self._running = False
        self._last_stop = event
        self._g_thread = self._c_thread = event.tid
        if not self._awaiting_stop:
            return b""
        self._awaiting_stop = False
        return self._frame(reply)

    def on_exit(self, status: int = 0, signal: int | None = None) -> bytes:
        """Report that the machine is gone: ``W status`` (it exited), or
        ``X signal`` when ``signal`` is given (it died, e.g. a fatal exit)."""
        self._running = False
        self.wants_close = True
        if signal is not None:
            return self._frame(b"X%02x" % (signal & 0xFF))
        return self._frame(b"W%02x" % (status & 0xFF))

    @property
    def current_thread(self) -> int:
        """The thread register and memory requests go to (``Hg``, else the
        thread of the last stop)."""
        return self._resolve(self._g_thread)

    # --- plumbing --------------------------------------------------------

    def _frame(self, payload: bytes) -> bytes:
        self._last_sent = encode_packet(payload)
        return self._last_sent

    def _handle(self, payload: bytes) -> list[bytes]:
        self.packets += 1
        try:
            reply = self._dispatch(payload)
        except ValueError:  # PacketError included: malformed request
            reply = _E_INVAL
        except TargetError as exc:
            reply = self._error_reply(payload[:1], exc)
        except Unsupported:
            reply = b""
        if reply is None:
            return []
        return reply if isinstance(reply, list) else [reply]

    @property
    def _peer_takes_text(self) -> bool:
        return bool(self._peer_features & _TEXT_ERROR_FEATURES)

    def _error_reply(self, head: bytes, exc: TargetError) -> bytes:
        """``E nn``, or the message where gdb shows it (module docstring)."""
        text = exc.message.encode("ascii", "replace").replace(b"#", b"?").replace(b"$", b"?")
        text = text.replace(b"}", b"?").replace(b"*", b"?")
        if text and self._peer_takes_text:
            return b"E." + text
        if text and head in _TEXT_IN_E_DOT:
            name = errno.errorcode.get(exc.errno_value, "E%d" % exc.errno_value)
            return b"E." + name.encode() + b"." + text
        return b"E%02x" % (exc.errno_value & 0xFF)

    def _dispatch(self, payload: bytes) -> Reply:
        head = payload[:1]
        if head in (b"q", b"Q", b"v"):
            name = _NAME.match(payload).group()  # type: ignore[union-attr]
            args = payload[len(name) + 1 :]
        else:
            name, args = head, payload[1:]
        self.by_packet[name.decode("ascii", "replace")] += 1
        handler = self._handlers.get(name)
        # Unknown packets (qOffsets, qSymbol, qTStatus, vMustReplyEmpty...)
        # get the empty reply, which gdb reads as "not supported".
        return b"" if handler is None else handler(args)

    def _interrupt(self) -> None:
        # While stopped a ^C is a race with a stop reply in flight: ignore.
        if self._running:
            self._awaiting_stop = True
            try:
                self.target.interrupt()
            except (TargetError, Unsupported):
                pass

    def _need_stopped(self) -> None:
        if self._running:  # all-stop: gdb only sends these while stopped
            raise PacketError("target is running")

    def _threads(self) -> list[int]:
        threads = self.target.threads()
        if not threads:
            raise TargetError(errno.ESRCH, "no threads")
        return threads

    def _resolve(self, tid: int) -> int:
        """Map 0/-1/vanished thread ids to a real one (stop thread first)."""
        threads = self._threads()
        if tid in threads:
            return tid
        if self._last_stop is not None and self._last_stop.tid in threads:
            return self._last_stop.tid
        return threads[0]

    def _parse_tid(self, text: bytes, *, allow_any: bool = True) -> int:
        if text.startswith(b"p"):  # multiprocess form p<pid>.<tid>
            _, dot, tid_s = text.partition(b".")
            text = tid_s if dot else b"-1"
        tid = parse_hex(text)
        if tid in (0, -1):
            if not allow_any:
                raise PacketError("specific thread required")
            return tid
        if tid not in self._threads():
            raise PacketError(f"unknown thread {tid}")
        return tid

    def _register(self, regno_text: bytes) -> GdbRegister:
        regno = parse_hex(regno_text)
        regs = self.layout.registers
        if not 0 <= regno < len(regs):
            raise PacketError(f"no register {regno}")
        return regs[regno]

    @staticmethod
    def _reg_hex(reg: GdbRegister, value: bytes | None) -> bytes:
        if value is None:
            return b"xx" * reg.nbytes
        if len(value) != reg.nbytes:
            raise LocalProtocolError(f"target gave {len(value)} bytes for {reg.name}")
        return hex_bytes(value)

    def _stop_reply(self, event: StopEvent) -> bytes:
        regs = self.layout.registers
        if event.expedite is not None:
            expedite = dict(event.expedite)
            for regno, value in expedite.items():
                if not 0 <= regno < len(regs) or len(value) != regs[regno].nbytes:
                    raise LocalProtocolError(f"bad expedited register {regno}")
        else:
            expedite = {}
            for reg in self.layout.expedite_registers:
                try:
                    got = self.target.read_register(event.tid, reg)
                except (TargetError, Unsupported, ValueError):
                    continue  # expediting is an optimisation; gdb can ask
                if got is not None and len(got) == reg.nbytes:
                    expedite[reg.regnum] = got
        reason = event.reason.encode() if event.reason else None
        address = event.address
        if reason in (b"swbreak", b"hwbreak"):
            address = None
            if reason + b"+" not in self._peer_features:
                reason = None  # only if gdb said it understands them
        return format_stop_reply(event.signal, event.tid, expedite, reason, address)

    # --- stop state and resumption --------------------------------------

    def _h_why(self, args: bytes) -> Reply:
        if self._running:
            # gdb connected to a running machine: stop it, reply on on_stop.
            self._interrupt()
            return None
        assert self._last_stop is not None
        return self._stop_reply(self._last_stop)

    def _resume(self, actions: dict[int, Action], default: Action | None) -> Reply:
        self._need_stopped()
        self.target.resume(actions, default)
        self._running = True
        self._awaiting_stop = True
        self._pending_threads = []
        return None

    def _legacy_resume(self, letter: bytes) -> Callable[[bytes], Reply]:
        """c/C/s/S [sig;][addr]: gdb only uses these without vCont support."""

        def handler(args: bytes) -> Reply:
            self._need_stopped()
            sig: int | None = None
            if letter in (b"C", b"S"):
                sig_s, _, args = args.partition(b";")
                sig = parse_signal(sig_s)
            tid = self._resolve(self._c_thread)
            if args:
                addr, pc = parse_hex(args), self.layout.pc_register
                if not 0 <= addr < 1 << pc.bitsize:
                    raise PacketError("address does not fit the pc")
                self.target.write_register(tid, pc, addr.to_bytes(pc.nbytes, "little"))
            if letter in (b"s", b"S"):
                return self._resume({tid: ("s", sig)}, None)
            return self._resume({}, ("c", sig))

        return handler

    def _v_cont(self, args: bytes) -> Reply:
        self._need_stopped()
        actions: dict[int, Action] = {}
        default: Action | None = None
        resumes = 0
        for letter, sig, tid_s in parse_vcont(args):
            tid = -1 if tid_s is None else self._parse_tid(tid_s)
            if letter == "t":
                continue  # all-stop: threads not resumed simply stay stopped
            resumes += 1
            if tid in (0, -1):
                default = default or (letter, sig)  # leftmost match wins
            else:
                actions.setdefault(tid, (letter, sig))
        if not resumes:
            return b"OK"
        return self._resume(actions, default)

    def _breakpoint(self, insert: bool, args: bytes) -> Reply:
        """Z/z type,addr,kind[;cond...]: conditions are not supported and
        ignored (we do not advertise ConditionalBreakpoints)."""
        self._need_stopped()
        fields = args.partition(b";")[0].split(b",")
        if len(fields) != 3:
            raise PacketError("expected type,addr,kind")
        kind, addr, length = (parse_hex(f) for f in fields)
        if not 0 <= kind <= 4:
            return b""  # unknown Z type: "not supported"
        if not 0 <= addr < ADDR_LIMIT or length < 0:
            raise PacketError("bad breakpoint address or size")
        if insert:
            self.target.insert_breakpoint(kind, addr, length)
        else:
            self.target.remove_breakpoint(kind, addr, length)
        return b"OK"

    # --- registers and memory --------------------------------------------

    def _h_g(self, args: bytes) -> Reply:
        self._need_stopped()
        layout = self.layout
        values = self.target.read_registers(self._resolve(self._g_thread), layout)
        # A prefix is allowed: gdb then fetches the rest with 'p' when needed.
        if not 0 < len(values) <= len(layout.registers):
            raise LocalProtocolError("read_registers returned the wrong count")
        return b"".join(self._reg_hex(r, v) for r, v in zip(layout.registers, values))

    def _h_G(self, args: bytes) -> Reply:
        self._need_stopped()
        layout = self.layout
        data = unhex(args)
        # After a short 'g' reply gdb sends a G block of that shorter size.
        sizes = [0]
        for reg in layout.registers:
            sizes.append(sizes[-1] + reg.nbytes)
        if len(data) not in sizes[1:]:
            raise PacketError("G block size does not match the layout")
        count = sizes.index(len(data))
        tid = self._resolve(self._g_thread)
        current = list(self.target.read_registers(tid, layout))
        for reg in layout.registers[len(current):count]:
            current.append(self.target.read_register(tid, reg))
        offset = 0
        for reg, old in zip(layout.registers[:count], current):
            new = data[offset : offset + reg.nbytes]
            offset += reg.nbytes
            # Only write what changed: keeps the cache clean and avoids
            # refusals on registers gdb merely echoes back (e.g. fiseg).
            if new != old:
                self.target.write_register(tid, reg, new)
        return b"OK"

    def _h_p(self, args: bytes) -> Reply:
        self._need_stopped()
        reg = self._register(args)
        value = self.target.read_register(self._resolve(self._g_thread), reg)
        return self._reg_hex(reg, value)

    def _h_P(self, args: bytes) -> Reply:
        self._need_stopped()
        regno_s, eq, value_s = args.partition(b"=")
        if not eq:
            raise PacketError("expected n=value")
        reg = self._register(regno_s)
        value = unhex(value_s)
        if len(value) != reg.nbytes:
            raise PacketError(f"{reg.name} takes {reg.nbytes} bytes")
        self.target.write_register(self._resolve(self._g_thread), reg, value)
        return b"OK"

    def _h_m(self, args: bytes) -> Reply:
        self._need_stopped()
        addr, length = parse_addr_len(args)
        # Short reads are allowed; hex doubles the size, so cap it.
        length = min(length, (self.packet_size - 4) // 2)
        if self._physical:
            return hex_bytes(self.target.read_physical(addr, length))
        tid = self._resolve(self._g_thread)
        try:
            data = self.target.read_memory(tid, addr, length)
        except TargetError:
            # Serve the mapped head of a range crossing into an unmapped
            # page; gdb then asks for the rest and gets the error.
            boundary = (addr | 0xFFF) + 1
            if addr + length <= boundary:
                raise
            data = self.target.read_memory(tid, addr, boundary - addr)
        return hex_bytes(data[:length])

    def _write_mem(self, args: bytes, binary: bool) -> Reply:
        self._need_stopped()
        head, colon, payload = args.partition(b":")
        if not colon:
            raise PacketError("expected addr,length:data")
        addr, length = parse_addr_len(head)
        data = payload if binary else unhex(payload)
        if len(data) != length:
            raise PacketError("length does not match data")
        if data and self._physical:
            self.target.write_physical(addr, data)
        elif data:  # X with length 0 is gdb probing for X support
            self.target.write_memory(self._resolve(self._g_thread), addr, data)
        return b"OK"

    def _set_phys_mode(self, args: bytes) -> Reply:
        # QEMU: schema "l0" (a hex number), none -> E22, zero -> virtual, else physical.
        if not args:
            return _E_QEMU_NO_PARAM
        self._physical = parse_hex(args) != 0
        return b"OK"

    def _read_any(self, addr: int, length: int) -> bytes:
        """Memory in the current mode (virtual through the thread's page tables, or physical)."""
        if self._physical:
            return self.target.read_physical(addr, length)
        return self.target.read_memory(self._resolve(self._g_thread), addr, length)

    def _scan_range(self, args: bytes) -> tuple[int, int]:
        addr, length = parse_addr_len(args)
        if length > SCAN_LIMIT:
            raise TargetError(errno.E2BIG, f"range of {length:#x} bytes is over the "
                                           f"{SCAN_LIMIT:#x} limit")
        return addr, length

    def _q_crc(self, args: bytes) -> Reply:
        """qCRC:addr,length -> C<crc32> as gdb's compare-sections computes it."""
        self._need_stopped()
        addr, length = self._scan_range(args)
        return b"C%x" % crc_of(self._read_any, addr, length)

    def _q_search(self, args: bytes) -> Reply:
        """qSearch:memory:addr;length;pattern -> 1,addr | 0 (gdb's find command)."""
        self._need_stopped()
        kind, _, rest = args.partition(b":")
        fields = rest.split(b";", 2)
        if kind != b"memory" or len(fields) != 3:
            return b""
        addr, length = self._scan_range(fields[0] + b"," + fields[1])
        if not fields[2]:          # the framer already undid the escapes
            raise PacketError("empty pattern")
        found = search(self._read_any, addr, length, fields[2])
        return b"0" if found is None else b"1,%x" % found

    # --- threads -----------------------------------------------------------

    def _h_H(self, args: bytes) -> Reply:
        op, tid_s = args[:1], args[1:]
        tid = self._parse_tid(tid_s)
        if op == b"g":
            self._g_thread = tid
        elif op == b"c":
            self._c_thread = tid
        else:
            raise PacketError("H needs g or c")
        return b"OK"

    def _h_T(self, args: bytes) -> Reply:
        return b"OK" if self._parse_tid(args, allow_any=False) else None

    def _q_fthreads(self, args: bytes) -> Reply:
        # Chunked so each reply fits gdb's buffer (matters for many vCPUs).
        chunks = chunk_thread_list(self._threads(), self.packet_size)
        self._pending_threads = chunks[1:]
        return b"m" + chunks[0]

    def _q_sthreads(self, args: bytes) -> Reply:
        return b"m" + self._pending_threads.pop(0) if self._pending_threads else b"l"

    def _q_c(self, args: bytes) -> Reply:
        return b"QC%x" % self._resolve(self._g_thread)

    def _q_extra(self, args: bytes) -> Reply:
        tid = self._parse_tid(args, allow_any=False)
        return hex_bytes(self.target.thread_extra_info(tid).encode("utf-8"))

    # --- session -------------------------------------------------------------

    def _q_supported(self, args: bytes) -> Reply:
        self._peer_features = set(args.split(b";"))
        return (
            b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;"
            b"vContSupported+;swbreak+;hwbreak+" % self.packet_size
        )

    def _q_noack(self, args: bytes) -> Reply:
        # The '+' for this packet was already queued; from now on, none.
        self._noack = True
        return b"OK"

    def _q_xfer(self, args: bytes) -> Reply:
        parts = args.split(b":")
        if len(parts) != 4 or parts[0] != b"features" or parts[1] != b"read":
            return b""
        doc = self.layout.xml(parts[2].decode("ascii", "replace"))
        if doc is None:
            return b"E00"  # the protocol's "bad annex" reply
        offset, length = parse_addr_len(parts[3])
        chunk = doc[offset : offset + min(length, self.packet_size - 1)]
        done = offset + len(chunk) >= len(doc)
        return (b"l" if done else b"m") + chunk

    def _q_rcmd(self, args: bytes) -> Reply:
        command = unhex(args).decode("utf-8", "replace")
        try:
            output = self.target.monitor(command).encode("utf-8")
        except TargetError as exc:
            if not exc.message or self._peer_takes_text:
                raise
            # gdb 13 reads E nn after a qRcmd as "Protocol error with Rcmd": say what
            # was wrong on its console first (remote_target::rcmd prints O packets).
            return [b"O" + hex_bytes(f"{exc.message}\n".encode("utf-8")), b"E%02x" % (
                exc.errno_value & 0xFF)]
        if not output:
            return b"OK"
        text = hex_bytes(output)
        if len(text) < self.packet_size:
            return text  # a bare hex reply is the whole output
        # Long output: console O-packets, then OK to end the command.
        step = (self.packet_size - 2) // 2 * 2
        return [b"O" + text[i : i + step] for i in range(0, len(text), step)] + [b"OK"]

    def _h_D(self, args: bytes) -> Reply:
        self.target.detach()
        self.wants_close = True
        return b"OK"

    def _kill(self, reply: bytes | None) -> Reply:
        self.target.kill()  # gdb does not wait for a reply to 'k'
        self.wants_close = True
        return reply
