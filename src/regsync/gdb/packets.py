"""Framing layer of the GDB Remote Serial Protocol: pure bytes in, events out.

Nothing here does I/O.  :class:`Framer` turns an arbitrary byte stream (as
read from a socket, in arbitrary chunks) into protocol events, and
:func:`encode_packet` produces the wire form of one reply.  The strict hex
helpers at the bottom are shared by the command layer; they exist because
``int(x, 16)`` and ``bytes.fromhex`` accept far more than the protocol allows
(``0x`` prefixes, underscores, signs, spaces), which would let a malformed
request pass as a valid one.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Union

__all__ = [
    "Ack",
    "BadPacket",
    "DEFAULT_PACKET_SIZE",
    "Event",
    "Framer",
    "Interrupt",
    "Nack",
    "OVERSIZE",
    "Packet",
    "PacketError",
    "checksum",
    "encode_packet",
    "escape_binary",
    "hex_bytes",
    "parse_hex",
    "unhex",
]

#: Payload limit we advertise as ``PacketSize`` (gdbserver uses about 16 KiB).
DEFAULT_PACKET_SIZE = 0x4000

# Bytes that cannot appear literally inside a packet body.  '*' is included
# because a literal '*' would be read as the start of a run-length sequence.
_ESCAPED = frozenset(b"#$}*")
_ESCAPE = 0x7D  # '}'
_RLE = 0x2A  # '*'
_INTERRUPT = 0x03

# Run-length count characters are n + 29 where n is the number of *extra*
# copies.  The protocol forbids '#' and '$' (they would break framing) and
# anything above 126; older text also forbids '+' and '-'.  We additionally
# avoid '*' and '}' so that no decoder, however naive, can misread the count.
_RLE_MIN = 3  # n=3 -> ' ', the first count that saves bytes
_RLE_MAX = 126 - 29  # 97 extra copies -> '~'
OVERSIZE = "packet too large"
_RLE_BAD_COUNTS = frozenset(ord(c) - 29 for c in "#$+-*}")


class PacketError(ValueError):
    """A request's arguments are malformed (answered with ``E16`` upstream)."""


@dataclass(frozen=True)
class Packet:
    """A complete packet with a valid checksum; ``payload`` is fully decoded."""

    payload: bytes


@dataclass(frozen=True)
class Interrupt:
    """A raw 0x03 byte seen between packets (gdb's Ctrl-C)."""


@dataclass(frozen=True)
class Ack:
    """A ``+`` acknowledgement from the peer."""


@dataclass(frozen=True)
class Nack:
    """A ``-`` from the peer: it wants our last packet retransmitted."""


@dataclass(frozen=True)
class BadPacket:
    """A packet that was framed but unusable (checksum, escape, size...)."""

    reason: str


Event = Union[Packet, Interrupt, Ack, Nack, BadPacket]


def checksum(body: bytes | bytearray) -> int:
    """Modulo-256 sum of the bytes between ``$`` and ``#`` as transmitted."""
    return sum(body) & 0xFF


def _decode_body(raw: bytes, limit: int) -> bytes:
    """Undo escapes and run-length encoding of a packet body.

    Raises :class:`PacketError` on a dangling escape, a ``*`` with nothing to
    repeat, a count byte outside the printable range, or a decoded payload
    larger than ``limit`` (RLE can expand 2 bytes into 98, so the raw size
    check alone does not bound memory).
    """
    if b"}" not in raw and b"*" not in raw:  # the common case: nothing to undo
        if len(raw) > limit:
            raise PacketError(OVERSIZE)
        return bytes(raw)
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == _ESCAPE:
            if i + 1 >= n:
                raise PacketError("dangling escape")
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == _RLE:
            if not out:
                raise PacketError("run-length with nothing to repeat")
            if i + 1 >= n:
                raise PacketError("run-length without count")
            count = raw[i + 1]
            if not 32 <= count <= 126:
                raise PacketError("run-length count out of range")
            out.extend(out[-1:] * (count - 29))
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            raise PacketError(OVERSIZE)
    return bytes(out)


class Framer:
    """Incremental packet parser.  ``feed`` never raises on any input.

    States: between packets (where ``+``, ``-`` and 0x03 are meaningful and
    everything else is line noise), inside a body, and reading the two
    checksum digits.  A ``$`` inside a body is reported as a bad packet and
    starts a new one, which is how gdb itself resynchronises.
    """

    _IDLE, _BODY, _CSUM = range(3)

    def __init__(self, max_payload: int = DEFAULT_PACKET_SIZE) -> None:
        self.max_payload = max_payload
        self._state = self._IDLE
        self._body = bytearray()
        self._csum = bytearray()
        self._oversize = False

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` and return the events it completes, in order."""
        events: list[Event] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == self._BODY:
                # Copy the body up to the next '#' or '$' in one go (same
                # result as byte by byte, which is what _feed_byte does).
                j = data.find(b"#", i)
                k = data.find(b"$", i, n if j < 0 else j)
                end = n if j < 0 and k < 0 else (k if k >= 0 else j)
                if end > i:
                    if not self._oversize:
                        if len(self._body) + (end - i) > self.max_payload:
                            self._oversize = True
                            self._body.clear()
                        else:
                            self._body += data[i:end]
                    i = end
                    continue
            self._feed_byte(data[i], events)
            i += 1
        return events

    def _feed_byte(self, b: int, events: list[Event]) -> None:
        """The state machine for one byte."""
        if self._state == self._IDLE:
            if b == 0x24:  # '$'
                self._start()
            elif b == 0x2B:  # '+'
                events.append(Ack())
            elif b == 0x2D:  # '-'
                events.append(Nack())
            elif b == _INTERRUPT:
                events.append(Interrupt())
            # anything else between packets is ignored
        elif self._state == self._BODY:
            if b == 0x23:  # '#'
                self._state = self._CSUM
            elif b == 0x24:
                events.append(BadPacket("packet start inside packet"))
                self._start()
            elif not self._oversize:
                # Stop buffering once over the limit but keep scanning
                # for '#', so one huge packet costs no memory and the
                # stream stays in sync.
                if len(self._body) >= self.max_payload:
                    self._oversize = True
                    self._body.clear()
                else:
                    self._body.append(b)
        else:
            self._csum.append(b)
            if len(self._csum) == 2:
                events.append(self._finish())
                self._state = self._IDLE

    def _start(self) -> None:
        self._state = self._BODY
        self._body.clear()
        self._csum.clear()
        self._oversize = False

    def _finish(self) -> Event:
        if self._oversize:
            return BadPacket(OVERSIZE)
        if not _HEXDIGITS.issuperset(self._csum):
            return BadPacket("malformed checksum")
        want = int(self._csum.decode("ascii"), 16)
        body = bytes(self._body)
        if checksum(body) != want:
            return BadPacket("checksum mismatch")
        try:
            return Packet(_decode_body(body, self.max_payload))
        except PacketError as exc:
            return BadPacket(str(exc))


def _rle_count(extra: int) -> int:
    """Largest usable count <= ``extra`` (0 means: do not compress)."""
    n = min(extra, _RLE_MAX)
    while n >= _RLE_MIN and n in _RLE_BAD_COUNTS:
        n -= 1
    return n if n >= _RLE_MIN else 0


def escape_binary(data: bytes) -> bytes:
    """Escape the bytes that cannot appear literally in a packet body."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((_ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


_NEEDS_ESCAPE = re.compile(rb"[#$}*]")
_LONG_RUN = re.compile(rb"(.)\1{3,}", re.S)   # runs short of 4 are spelled out anyway


def _rle_run(match: "re.Match[bytes]") -> bytes:
    run = match.group(0)
    b = run[:1]
    out = bytearray(b)
    extra = len(run) - 1
    while extra > 0:
        count = _rle_count(extra)
        if count:
            out += bytes((_RLE, count + 29))
            extra -= count
        else:
            out += b
            extra -= 1
    return bytes(out)


def encode_packet(payload: bytes, rle: bool = True) -> bytes:
    """Frame ``payload`` as ``$body#cs`` with escaping and optional RLE.

    Only runs of bytes that need no escape are compressed; that keeps the
    rule simple (the repeated byte is always the literal byte before ``*``).
    """
    if _NEEDS_ESCAPE.search(payload) is None:   # the common case, done with re
        body = _LONG_RUN.sub(_rle_run, payload) if rle else bytes(payload)
        return b"$" + body + b"#%02x" % checksum(body)
    return _encode_packet_slow(payload, rle)


def _encode_packet_slow(payload: bytes, rle: bool = True) -> bytes:
    """The reference encoder (any payload)."""
    body = bytearray()
    i = 0
    n = len(payload)
    while i < n:
        b = payload[i]
        if b in _ESCAPED:
            body += bytes((_ESCAPE, b ^ 0x20))
            i += 1
            continue
        run = 1
        while i + run < n and payload[i + run] == b:
            run += 1
        body.append(b)
        extra = run - 1
        while extra > 0:
            count = _rle_count(extra) if rle else 0
            if count:
                body += bytes((_RLE, count + 29))
                extra -= count
            else:
                # Too short to compress: spell the copies out.
                body.append(b)
                extra -= 1
        i += run
    return b"$" + bytes(body) + b"#%02x" % checksum(body)


# --- strict hex helpers --------------------------------------------------

_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")


def parse_hex(text: bytes) -> int:
    """Parse a non-empty unsigned hex number; ``-1`` is accepted only as the
    literal thread id ``-1``.  Raises :class:`PacketError` otherwise."""
    if text == b"-1":
        return -1
    if not text or not _HEXDIGITS.issuperset(text):
        raise PacketError(f"bad hex number {text[:32]!r}")
    return int(text, 16)


def unhex(text: bytes) -> bytes:
    """Decode an even-length string of hex digit pairs, strictly."""
    if len(text) % 2 or not _HEXDIGITS.issuperset(text):
        raise PacketError("bad hex data")
    return bytes.fromhex(text.decode("ascii"))


def hex_bytes(data: bytes) -> bytes:
    """Lower-case hex encoding, as gdb expects in replies."""
    return data.hex().encode("ascii")


# --- pure request parsing / reply formatting ------------------------------
# Kept here (not in core.py) because they are syntax only: no state, no
# target.  The core adds the semantics (thread validity, running state...).

ADDR_LIMIT = 1 << 64


def parse_addr_len(text: bytes) -> tuple[int, int]:
    """Parse ``addr,length`` (both unsigned hex, range within 64 bits)."""
    addr_s, comma, len_s = text.partition(b",")
    if not comma:
        raise PacketError("expected addr,length")
    addr, length = parse_hex(addr_s), parse_hex(len_s)
    if addr < 0 or length < 0:
        raise PacketError("negative address or length")
    if addr + length > ADDR_LIMIT:
        raise PacketError("range wraps around the address space")
    return addr, length


def parse_signal(text: bytes) -> int:
    """A signal number as used by C/S/vCont (hex, 0..255)."""
    sig = parse_hex(text)
    if not 0 <= sig <= 255:
        raise PacketError("bad signal")
    return sig


def parse_vcont(args: bytes) -> list[tuple[str, int | None, bytes | None]]:
    """Split ``vCont;`` arguments into (action, signal, thread-id text).

    ``action`` is one of c, s, t (C/S fold into c/s with a signal); the
    thread text is None for an action without ``:thread``.
    """
    if not args:
        raise PacketError("empty vCont")
    out: list[tuple[str, int | None, bytes | None]] = []
    for item in args.split(b";"):
        what, colon, tid_s = item.partition(b":")
        letter, sig_s = what[:1], what[1:]
        if letter in (b"c", b"s", b"t"):
            if sig_s:
                raise PacketError("unexpected signal")
            sig = None
        elif letter in (b"C", b"S"):
            sig = parse_signal(sig_s)
        else:
            raise PacketError(f"bad vCont action {what[:8]!r}")
        out.append((letter.lower().decode(), sig, tid_s if colon else None))
    return out


def format_stop_reply(
    signal: int,
    tid: int,
    expedite: dict[int, bytes],
    reason: bytes | None = None,
    address: int | None = None,
) -> bytes:
    """``T`` stop reply: ``T05<nn>:<val>;...thread:<tid>;<reason>:<addr>;``.

    Register numbers, the thread id and the address are hex; ``reason`` is
    emitted with an empty value when ``address`` is None (swbreak/hwbreak).
    """
    out = b"T%02x" % signal
    for regno in sorted(expedite):
        out += b"%02x:%s;" % (regno, hex_bytes(expedite[regno]))
    out += b"thread:%02x;" % tid
    if reason is not None:
        out += reason + (b":;" if address is None else b":%x;" % address)
    return out


def chunk_thread_list(tids: list[int], limit: int) -> list[bytes]:
    """Comma-joined hex thread ids split so each ``m`` reply fits ``limit``."""
    chunks: list[bytes] = []
    current = b""
    for tid in tids:
        item = b"%x" % tid
        if current and len(current) + len(item) + 2 > limit:
            chunks.append(current)
            current = b""
        current = item if not current else current + b"," + item
    chunks.append(current)
    return chunks
