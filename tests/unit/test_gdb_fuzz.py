"""Hypothesis fuzzing of StubCore: no peer input may raise out of receive().

Every output must also be well-formed protocol (only acks and packets with
valid checksums), because a garbled reply would desynchronise gdb.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regsync.gdb.core import StubCore
from regsync.gdb.packets import Ack, Framer, Nack, Packet, encode_packet
from regsync.gdb.target import STOP_REASONS, StopEvent
from test_gdb_core import FakeTarget

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

COMMANDS = [
    b"?", b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"c", b"C", b"s", b"S",
    b"Z", b"z", b"H", b"Hg", b"Hc", b"T", b"D", b"k", b"qSupported:",
    b"QStartNoAckMode", b"qfThreadInfo", b"qsThreadInfo", b"qC", b"qAttached",
    b"qThreadExtraInfo,", b"qRcmd,", b"qXfer:features:read:target.xml:",
    b"qXfer:features:read:", b"qXfer:", b"vCont?", b"vCont;", b"vKill;",
    b"qOffsets", b"vMustReplyEmpty", b"qSymbol::", b"i", b"!",
]
# Mostly protocol syntax, plus bytes that stress the framing layer.
ARG_ALPHABET = list(b"0123456789abcdefABCDEF,:;=-.pxlmtcsCS") + [0, 0x03, 0x23, 0x24, 0x7D, 0x2A, 0xFF]

args = st.lists(st.sampled_from(ARG_ALPHABET), max_size=40).map(bytes)
hexnum = st.integers(0, 2**64 + 5).map(lambda n: b"%x" % n)
structured = st.one_of(
    st.tuples(st.sampled_from(COMMANDS), args).map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from([b"m", b"M", b"X", b"Z0,", b"Z2,", b"z1,"]), hexnum,
              hexnum, args).map(lambda t: t[0] + t[1] + b"," + t[2] + t[3]),
    st.tuples(st.sampled_from([b"p", b"P", b"H", b"Hg", b"T", b"vCont;s:"]), hexnum,
              args).map(lambda t: t[0] + t[1] + t[2]),
    st.binary(max_size=60),
)


def check_output(out: bytes) -> None:
    assert isinstance(out, bytes)
    for event in Framer(1 << 20).feed(out):
        assert isinstance(event, (Ack, Nack, Packet)), event


def new_core(running: bool, packet_size: int) -> tuple[StubCore, FakeTarget]:
    target = FakeTarget(3)
    target.map(0x1000, bytes(range(256)) * 8)
    stop = None if running else StopEvent(tid=1)
    return StubCore(target, packet_size=packet_size, initial_stop=stop), target


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=10), st.booleans())
def test_random_bytes_never_raise(chunks: list[bytes], running: bool) -> None:
    core, _ = new_core(running, 0x4000)
    for chunk in chunks:
        check_output(core.receive(chunk))


@FUZZ
@given(st.data(), st.booleans(), st.sampled_from([0x40, 0x100, 0x4000]))
def test_nonsense_packets_never_raise(data: st.DataObject, running: bool,
                                      packet_size: int) -> None:
    core, target = new_core(running, packet_size)
    for _ in range(data.draw(st.integers(1, 25))):
        step = data.draw(st.sampled_from(["packet", "packet", "packet", "raw", "stop"]))
        if step == "packet":
            payload = data.draw(structured)
            out = core.receive(encode_packet(payload, rle=data.draw(st.booleans())))
        elif step == "raw":
            out = core.receive(data.draw(st.binary(max_size=30)))
        else:
            if core.stopped or core.wants_close:
                continue
            event = StopEvent(
                tid=data.draw(st.sampled_from(target.threads())),
                signal=data.draw(st.sampled_from([2, 5])),
                reason=data.draw(st.sampled_from(STOP_REASONS)),
                address=0x1000,
            )
            out = core.on_stop(event)
        check_output(out)
