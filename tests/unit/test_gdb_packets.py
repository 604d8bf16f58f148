"""Framing layer and target description tests (pure, no KVM)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regsync.gdb.packets import (
    Ack, BadPacket, Framer, Interrupt, Nack, OVERSIZE, Packet, PacketError,
    checksum, chunk_thread_list, encode_packet, format_stop_reply, parse_addr_len,
    parse_hex, parse_vcont, unhex,
)
from regsync.gdb.targetxml import (
    I386_LAYOUT, I8086_LAYOUT, X86_64_LAYOUT, GdbRegister, RegisterLayout,
    abridged_tag_word, full_tag_word, register_bytes, register_updates, x87_tag,
)


def frame(body: bytes) -> bytes:
    """Hand-made packet with a correct checksum and no encoding at all."""
    return b"$" + body + b"#%02x" % checksum(body)


# --- encoding ---------------------------------------------------------------


def test_checksum_of_ok() -> None:
    assert encode_packet(b"OK") == b"$OK#9a"
    assert encode_packet(b"") == b"$#00"


def test_special_bytes_are_escaped() -> None:
    wire = encode_packet(b"a#b$c}d*e", rle=False)
    assert wire == frame(b"a}\x03b}\x04c}]d}\x0ae")


def test_rle_protocol_examples() -> None:
    # From the manual: "0* " is four zeros (the count is *extra* copies).
    assert encode_packet(b"0000") == frame(b"0* ")
    assert encode_packet(b"000") == frame(b"000")
    # 7 and 8 in a row would need '#'/'$' as count: use 5 extra instead.
    assert encode_packet(b"0" * 7) == frame(b'0*"0')
    assert encode_packet(b"0" * 8) == frame(b'0*"00')
    assert encode_packet(b"0" * 9) == frame(b"0*%")


def _count_chars(wire: bytes) -> list[int]:
    body = wire[1:-3]
    out = []
    i = 0
    while i < len(body):
        if body[i] == 0x7D:
            i += 2
            continue
        if body[i] == 0x2A:
            out.append(body[i + 1])
            i += 2
            continue
        i += 1
    return out


@pytest.mark.parametrize("n", range(1, 400))
def test_rle_counts_are_legal_and_round_trip(n: int) -> None:
    wire = encode_packet(b"x" * n)
    for c in _count_chars(wire):
        assert 32 <= c <= 126 and chr(c) not in "#$+-"
    assert b"#" not in wire[1:-3] and b"$" not in wire[1:]
    assert Framer().feed(wire) == [Packet(b"x" * n)]


@given(st.binary(max_size=600), st.booleans())
def test_round_trip(payload: bytes, rle: bool) -> None:
    assert Framer().feed(encode_packet(payload, rle=rle)) == [Packet(payload)]


@given(st.lists(st.binary(max_size=80), max_size=5), st.data())
def test_chunking_does_not_matter(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"+".join(encode_packet(p) for p in payloads) + b"\x03-"
    whole = Framer().feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer, pieces, last = Framer(), [], 0
    for cut in cuts + [len(stream)]:
        pieces += framer.feed(stream[last:cut])
        last = cut
    assert pieces == whole
    assert [e for e in whole if isinstance(e, Packet)] == [Packet(p) for p in payloads]


# --- decoding ---------------------------------------------------------------


def test_events_between_packets() -> None:
    events = Framer().feed(b"+garbage-\x03" + frame(b"g") + b"\x03")
    assert events == [Ack(), Nack(), Interrupt(), Packet(b"g"), Interrupt()]


def test_interrupt_byte_inside_packet_is_data() -> None:
    assert Framer().feed(frame(b"X0,1:\x03")) == [Packet(b"X0,1:\x03")]


def test_bad_checksum() -> None:
    assert Framer().feed(b"$g#00") == [BadPacket("checksum mismatch")]
    assert Framer().feed(b"$g#zz") == [BadPacket("malformed checksum")]


def test_dollar_inside_packet_restarts() -> None:
    events = Framer().feed(b"$abc" + frame(b"g"))
    assert isinstance(events[0], BadPacket) and events[1] == Packet(b"g")


@pytest.mark.parametrize("body", [b"abc}", b"*!", b"a*", b"a*\x1f", b"a*\x7f"])
def test_malformed_bodies(body: bytes) -> None:
    [event] = Framer().feed(frame(body))
    assert isinstance(event, BadPacket)


def test_oversize_raw_and_decoded() -> None:
    framer = Framer(max_payload=16)
    assert framer.feed(frame(b"a" * 17)) == [BadPacket(OVERSIZE)]
    # 2 bytes of RLE expanding past the limit are caught too.
    assert framer.feed(frame(b"a*~")) == [BadPacket(OVERSIZE)]
    assert framer.feed(frame(b"a" * 16)) == [Packet(b"a" * 16)]


@given(st.binary(max_size=2000))
def test_framer_never_raises(data: bytes) -> None:
    framer = Framer(max_payload=64)
    for event in framer.feed(data):
        assert isinstance(event, (Packet, Ack, Nack, Interrupt, BadPacket))
        if isinstance(event, Packet):
            assert len(event.payload) <= 64


# --- small parsers ------------------------------------------------------------


@pytest.mark.parametrize("text", [b"", b"0x10", b" 1", b"+1", b"1_0", b"-2", b"g"])
def test_parse_hex_is_strict(text: bytes) -> None:
    with pytest.raises(PacketError):
        parse_hex(text)


def test_parse_hex_and_unhex() -> None:
    assert parse_hex(b"fF") == 255 and parse_hex(b"-1") == -1
    assert unhex(b"00ff") == b"\x00\xff"
    for bad in (b"0", b"0g", b"0 ", b" 00"):
        with pytest.raises(PacketError):
            unhex(bad)


def test_parse_addr_len() -> None:
    assert parse_addr_len(b"1000,10") == (0x1000, 0x10)
    for bad in (b"1000", b"-1,1", b"ffffffffffffffff,2", b",1"):
        with pytest.raises(PacketError):
            parse_addr_len(bad)


def test_parse_vcont() -> None:
    assert parse_vcont(b"s:2;C0b:p1.3;c") == [
        ("s", None, b"2"), ("c", 11, b"p1.3"), ("c", None, None)]
    for bad in (b"", b"x", b"c05", b"C", b"C1ff"):
        with pytest.raises(PacketError):
            parse_vcont(bad)


def test_stop_reply_format() -> None:
    reply = format_stop_reply(5, 2, {0x10: b"\x01" * 8, 6: b"\x02" * 8}, b"swbreak")
    assert reply == (b"T05" + b"06:" + b"02" * 8 + b";10:" + b"01" * 8
                     + b";thread:02;swbreak:;")
    assert format_stop_reply(5, 1, {}, b"watch", 0x1000).endswith(b"watch:1000;")


def test_thread_list_chunks() -> None:
    chunks = chunk_thread_list(list(range(1, 300)), 40)
    assert all(len(c) + 1 <= 40 for c in chunks)
    ids = [int(x, 16) for c in chunks for x in c.split(b",")]
    assert ids == list(range(1, 300))


# --- target description ---------------------------------------------------------


def _xml_regs(layout: RegisterLayout) -> tuple[ET.Element, list[ET.Element]]:
    doc = layout.xml("target.xml")
    assert doc is not None
    root = ET.fromstring(doc)
    return root, root.findall("./feature/reg")


@pytest.mark.parametrize("layout", [X86_64_LAYOUT, I386_LAYOUT, I8086_LAYOUT])
def test_xml_is_dense_and_matches_layout(layout: RegisterLayout) -> None:
    root, regs = _xml_regs(layout)
    assert root.tag == "target"
    assert root.findtext("architecture") == layout.arch
    # Features appear in order and registers within them stay in regnum order,
    # so document order must equal regnum order.
    assert [int(r.get("regnum", "-1")) for r in regs] == list(range(len(regs)))
    assert [r.get("name") for r in regs] == [g.name for g in layout.registers]
    assert [int(r.get("bitsize", "0")) for r in regs] == [g.bitsize for g in layout.registers]
    # Every non-builtin type used is defined in the document.
    defined = {e.get("id") for e in root.iter() if e.tag in ("flags", "vector", "union")}
    builtin = {"int", "int32", "int64", "uint64", "uint128", "data_ptr", "code_ptr",
               "i387_ext"}
    assert {r.get("type") for r in regs} <= defined | builtin
    assert layout.xml("other.xml") is None


def test_x86_64_order_matches_gdb() -> None:
    names = [r.name for r in X86_64_LAYOUT.registers]
    expected = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip"
                " eflags cs ss ds es fs gs st0 st1 st2 st3 st4 st5 st6 st7 fctrl fstat"
                " ftag fiseg fioff foseg fooff fop").split()
    assert names[:40] == expected
    assert names[40:57] == [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    assert names[57:59] == ["fs_base", "gs_base"]
    assert set(names[59:]) == {"k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"}
    assert X86_64_LAYOUT.by_name("rip").regnum == 16
    assert len(names) == 66


def test_i386_order_matches_gdb() -> None:
    names = [r.name for r in I386_LAYOUT.registers]
    assert names[:10] == "eax ecx edx ebx esp ebp esi edi eip eflags".split()
    assert names[32:41] == [f"xmm{i}" for i in range(8)] + ["mxcsr"]
    assert {r.bitsize for r in I386_LAYOUT.registers[:16]} == {32}
    assert I386_LAYOUT.by_name("ebx").source == "rbx"


def test_i386_avoids_segments_feature() -> None:
    # gdb 13 with its default GNU/Linux OS ABI hits an internal assertion
    # for i386 + org.gnu.gdb.i386.segments without org.gnu.gdb.i386.linux.
    for layout in (I386_LAYOUT, I8086_LAYOUT):
        root, _ = _xml_regs(layout)
        names = {f.get("name") for f in root.findall("feature")}
        assert "org.gnu.gdb.i386.segments" not in names
        assert layout.by_name("fs_base").feature == "org.regsync.x86.sys"
    root, _ = _xml_regs(X86_64_LAYOUT)
    assert "org.gnu.gdb.i386.segments" in {f.get("name") for f in root.findall("feature")}


def test_layout_validation() -> None:
    reg = GdbRegister("a", 64, "int", "f", 1, "rax")
    with pytest.raises(ValueError):
        RegisterLayout("x", (reg,), (), "a", "a", "a")


# --- value conversion ------------------------------------------------------------

ONE = 0x3FFF_8000_0000_0000_0000  # 1.0 as x87 extended


def test_x87_tag_classes() -> None:
    assert x87_tag(ONE) == 0
    assert x87_tag(0) == 1
    assert x87_tag(0x7FFF_8000_0000_0000_0000) == 2  # infinity
    assert x87_tag(0x0000_0000_0000_0000_0001) == 2  # denormal
    assert x87_tag(0x3FFF_0000_0000_0000_0000) == 2  # unnormal


def test_full_tag_word_uses_top() -> None:
    # TOP=6: ST0 is physical 6, ST1 is physical 7.  ST0=1.0, ST1=0.0.
    sts = [ONE, 0] + [0] * 6
    word = full_tag_word(0b1100_0000, sts, top=6)
    assert word == 0b01_00_11_11_11_11_11_11
    assert abridged_tag_word(word) == 0b1100_0000
    assert full_tag_word(0, sts, 0) == 0xFFFF


def _catalog() -> dict[str, int]:
    cat = {n: 0 for n in ("rax", "rip", "rflags", "fip", "fsw", "ftw", "cs.selector")}
    cat.update({f"st{i}": 0 for i in range(8)})
    return cat


def test_register_views() -> None:
    cat = _catalog()
    cat.update(rax=0x1122334455667788, fip=0xAAAA_BBBB_CCCC_DDDD)
    eax = I386_LAYOUT.by_name("eax")
    assert register_bytes(eax, cat.__getitem__) == bytes.fromhex("88776655")
    # Writing eax keeps rax's upper half.
    assert register_updates(eax, b"\x01\x00\x00\x00", cat.__getitem__) == {
        "rax": 0x1122334400000001}
    fioff = X86_64_LAYOUT.by_name("fioff")
    assert register_bytes(fioff, cat.__getitem__) == bytes.fromhex("ddddcccc")
    fiseg = X86_64_LAYOUT.by_name("fiseg")
    assert register_bytes(fiseg, cat.__getitem__) == b"\0" * 4
    assert register_updates(fiseg, b"\0" * 4, cat.__getitem__) == {}
    with pytest.raises(ValueError):
        register_updates(fiseg, b"\1\0\0\0", cat.__getitem__)
    cs = X86_64_LAYOUT.by_name("cs")
    assert register_updates(cs, b"\x10\0\0\0", cat.__getitem__) == {"cs.selector": 0x10}
    with pytest.raises(ValueError):
        register_updates(cs, b"\0\0\1\0", cat.__getitem__)
    ftag = X86_64_LAYOUT.by_name("ftag")
    assert register_bytes(ftag, cat.__getitem__) == b"\xff\xff\0\0"
    assert register_updates(ftag, b"\xfe\xff\0\0", cat.__getitem__) == {"ftw": 1}
    with pytest.raises(ValueError):
        register_updates(eax, b"\0" * 8, cat.__getitem__)


# --- the fast paths agree with the reference code ----------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from regsync.gdb.packets import _encode_packet_slow  # noqa: E402

_WIRE = st.lists(st.sampled_from(list(b"$#}*+-\x03ab0123456789") + [0xFF]), max_size=120).map(bytes)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), _WIRE), st.booleans())
def test_fast_encoder_matches_the_reference(payload: bytes, rle: bool) -> None:
    assert encode_packet(payload, rle) == _encode_packet_slow(payload, rle)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_WIRE, st.binary(max_size=80).map(encode_packet)), max_size=6),
       st.integers(1, 40))
def test_bulk_framing_matches_byte_by_byte(chunks: list[bytes], limit: int) -> None:
    data = b"".join(chunks)
    bulk = Framer(limit).feed(data)
    single = Framer(limit)
    one_by_one = [e for b in data for e in single.feed(bytes([b]))]
    assert bulk == one_by_one
