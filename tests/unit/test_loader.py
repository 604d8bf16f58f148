"""regsync.loader without KVM: every format, every refusal, placement checks."""

from __future__ import annotations

import struct

import pytest

from regsync import loader
from regsync.loader import ImageError, parse_image

MB = 0x1BADB002
RAM = [(0, 64 << 20)]
RESERVED = [(0x500, 0x9000, "boot tables")]


def elf(code: bytes = b"\xf4", *, bits: int = 64, addr: int = 0x200000, vaddr: int | None = None,
        entry: int | None = None, memsz: int | None = None, machine: int | None = None,
        etype: int = 2, ptype: int = 1, extra: bytes = b"", nseg: int = 1) -> bytes:
    """An ELF executable: nseg program headers (each the same code, 0x1000 apart)."""
    vaddr = addr if vaddr is None else vaddr
    entry = vaddr if entry is None else entry
    if bits == 64:
        ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, etype,
                           62 if machine is None else machine, 1, entry, 64, 0, 0, 64, 56,
                           nseg, 0, 0, 0)
        ph = [struct.pack("<IIQQQQQQ", ptype, 5, 0x1000, vaddr + i * 0x1000, addr + i * 0x1000,
                          len(code), len(code) if memsz is None else memsz, 0x1000)
              for i in range(nseg)]
    else:
        ehdr = struct.pack("<4sBBBBB7xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0, etype,
                           3 if machine is None else machine, 1, entry, 52, 0, 0, 52, 32,
                           nseg, 0, 0, 0)
        ph = [struct.pack("<IIIIIIII", ptype, 0x1000, vaddr + i * 0x1000, addr + i * 0x1000,
                          len(code), len(code) if memsz is None else memsz, 5, 0x1000)
              for i in range(nseg)]
    head = (ehdr + b"".join(ph)).ljust(0x100, b"\0") + extra
    return head.ljust(0x1000, b"\0") + code


def mb_header(flags: int = 0, fields: tuple[int, ...] = (), checksum: int | None = None) -> bytes:
    cs = (-(MB + flags)) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", MB, flags, cs) + struct.pack(f"<{len(fields)}I", *fields)


def aout(code: bytes = b"\xf4" * 16, *, load: int = 0x100000, pad: int = 0, bss: int = 0,
         entry_off: int = 32, flags: int = 1 << 16) -> bytes:
    """A flat a.out-kludge image: [pad bytes][header 32][code], loaded from offset pad."""
    total = 32 + len(code)
    hdr = mb_header(flags, (load, load, load + total, load + total + bss, load + entry_off))
    return b"\xcc" * pad + hdr + code


# --- ELF64 --------------------------------------------------------------------------------
def test_elf64_segments_entry_and_end() -> None:
    img = parse_image(elf(b"\x90\xf4", memsz=0x100))
    assert (img.format, img.entry, img.mode) == ("elf64", 0x200000, "long")
    (seg,) = img.segments
    assert (seg.gpa, seg.data, seg.memsz, img.end) == (0x200000, b"\x90\xf4", 0x100, 0x200100)
    assert img.multiboot is None


def test_elf_entry_is_translated_to_the_physical_address_like_qemu() -> None:
    img = parse_image(elf(b"\x90\xf4", vaddr=0xFFFFFFFF80200000, entry=0xFFFFFFFF80200001))
    assert img.entry == 0x200001


@pytest.mark.parametrize("data,message", [
    (elf()[:30], "truncated ELF64 image: 30 bytes"),
    (elf()[:10], "truncated ELF image: 10 bytes"),
    (elf(machine=183), r"machine 183 \(AArch64\)"),
    (elf(bits=32, machine=62), r"machine 62 \(x86-64\), not i386"),
    (elf(etype=3), "ET_DYN"),
    (elf(etype=1), "ET_REL"),
    (elf(ptype=4), "no loadable segment"),
    (elf(memsz=0), "no loadable segment"),
    (elf(b"\x90" * 16, memsz=8), "p_filesz 0x10 > p_memsz 0x8"),
    (elf(entry=0x300000), "entry point 0x300000 is outside"),
    (elf()[:0x1000], "past the end of the file"),
    (elf(nseg=2, memsz=0x2000), "overlap"),
    (b"\x7fELF\x03" + bytes(60), "ELF class 3"),
    (b"\x7fELF\x02\x02" + bytes(60), "not little-endian"),
    (elf(bits=32, addr=0xFFFFF000, memsz=0x2000), "past 4 GiB"),
])
def test_bad_elf(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_image(data)


def test_elf_program_header_table_past_the_end() -> None:
    data = bytearray(elf())
    struct.pack_into("<H", data, 56, 500)            # e_phnum
    with pytest.raises(ImageError, match="program header table"):
        parse_image(bytes(data))


# --- ELF32 multiboot ------------------------------------------------------------------------
def test_elf32_multiboot_kernel_enters_protected_mode() -> None:
    img = parse_image(elf(b"\xf4", bits=32, addr=0x100000, extra=mb_header(3)))
    assert (img.format, img.entry, img.mode) == ("elf32", 0x100000, "protected")
    assert img.multiboot is not None and img.multiboot.flags == 3 and img.multiboot_handoff
    assert img.multiboot.offset == 0x100 and not img.multiboot.has_addresses


def test_elf32_without_multiboot_header_is_refused() -> None:
    with pytest.raises(ImageError, match="without a multiboot header"):
        parse_image(elf(bits=32))


def test_elf32_cannot_start_in_long_mode() -> None:
    with pytest.raises(ValueError, match="protected mode"):
        parse_image(elf(bits=32, extra=mb_header(0)), mode="long")


def test_the_aout_kludge_wins_over_the_elf32_header() -> None:
    """Multiboot spec 3.1.3: with bit 16 the address fields, not the executable's
    own header, say where to load (QEMU's load_multiboot does the same)."""
    body = elf(b"\xf4", bits=32, addr=0x300000)
    off = 0x100
    hdr = mb_header(1 << 16, (0x200000 + off, 0x200000, 0, 0, 0x200000 + 0x1000))
    data = body[:off] + hdr + body[off + len(hdr):]
    img = parse_image(data)
    assert (img.format, img.entry, img.mode) == ("multiboot-aout", 0x201000, "protected")
    assert img.segments[0].gpa == 0x200000 and img.segments[0].data == data


# --- multiboot a.out kludge -------------------------------------------------------------------
def test_aout_image_loads_from_its_text_offset_with_bss() -> None:
    data = aout(pad=8, bss=0x40)
    img = parse_image(data)
    (seg,) = img.segments
    assert seg.gpa == 0x100000 and seg.data == data[8:] and seg.memsz == len(data) - 8 + 0x40
    assert (img.entry, img.mode, img.end) == (0x100020, "protected", 0x100000 + 48 + 0x40)


def test_video_flag_is_accepted_and_unknown_requirements_refused() -> None:
    code = bytes(16) + b"\xf4" * 16                  # room for the 16 bytes of video fields
    data = aout(code, flags=(1 << 16) | 4, entry_off=48)
    img = parse_image(data)
    assert img.multiboot is not None and img.multiboot.video == (0, 0, 0, 0)
    with pytest.raises(ImageError, match=r"bits 0x8 of 0-15"):
        parse_image(aout(flags=(1 << 16) | 8))


@pytest.mark.parametrize("data,message", [
    (mb_header(0) + b"\xf4" * 8, "lack bit 16"),
    (mb_header(1 << 16, (0x100000,) * 5, checksum=0), "bad checksum"),
    (mb_header(1 << 16), "cut off"),
    (mb_header(1 << 16, (0x100000, 0x100010, 0, 0, 0x100010)) + bytes(8), "header_addr"),
    (mb_header(1 << 16, (0x100010, 0x100000, 0, 0, 0x100010)) + bytes(8), "before the file"),
    (mb_header(1 << 16, (0x100000, 0x100000, 0x100000, 0, 0x100000)), "load_end_addr"),
    (mb_header(1 << 16, (0x100000, 0x100000, 0x200000, 0, 0x100000)), "image is 32 bytes"),
    (mb_header(1 << 16, (0x100000, 0x100000, 0, 0x100010, 0x100000)), "bss_end_addr"),
    (mb_header(1 << 16, (0x100000, 0x100000, 0, 0, 0x100040)), "entry_addr"),
    (mb_header(1 << 16, (0xFFFFF000, 0xFFFFF000, 0, 0xFFFFFFFF, 0xFFFFF000)) + bytes(8), None),
])
def test_bad_aout(data: bytes, message: str | None) -> None:
    if message is None:                               # fits below 4 GiB: parses
        assert parse_image(data).end == 0xFFFFFFFF
        return
    with pytest.raises(ImageError, match=message):
        parse_image(data)


def test_regsync_header_gives_a_long_mode_entry() -> None:
    code = b"RSYNC64\0" + struct.pack("<QQ", 0x100028, 0) + b"\xf4" * 8
    img = parse_image(aout(code))
    assert (img.entry, img.mode, img.entry64) == (0x100028, "long", 0x100028)
    prot = parse_image(aout(code), mode="protected")
    assert (prot.entry, prot.mode) == (0x100020, "protected")


def test_bundled_guests_parse_as_aout_images_with_a_long_mode_entry() -> None:
    from regsync import guests
    for name in guests.GUESTS:
        img = parse_image(guests.load_image(name))
        assert img.format == "multiboot-aout" and img.mode == "long"
        assert img.entry == guests.symbols(name)["entry64"]
        loader.check_placement(img, RAM, RESERVED)


# --- flat images and common checks -------------------------------------------------------------
def test_flat_image() -> None:
    img = parse_image(b"\xeb\xfe", flat_addr=0x200000)
    assert (img.format, img.entry, img.mode, img.end) == ("flat", 0x200000, "long", 0x200002)
    assert parse_image(b"\xeb\xfe", mode="real", flat_addr=0x7C00).mode == "real"
    with pytest.raises(ImageError, match="real mode reaches only the first MiB"):
        parse_image(b"\xeb\xfe", mode="real")


def test_empty_image_and_bad_mode() -> None:
    with pytest.raises(ImageError, match="empty"):
        parse_image(b"")
    with pytest.raises(ValueError, match="mode='vm86'"):
        parse_image(b"\x90", mode="vm86")


# --- placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data,message", [
    (elf(memsz=1 << 40), "outside guest RAM"),
    (elf(addr=64 << 20), "outside guest RAM"),
    (elf(addr=0x1000), r"overlaps regsync's boot structures at 0x500..0x9000 \(boot tables\)"),
    (elf(addr=0, memsz=0x600), "overlaps"),
])
def test_placement_is_refused(data: bytes, message: str) -> None:
    img = parse_image(data)
    with pytest.raises(ImageError, match=message):
        loader.check_placement(img, RAM, RESERVED)


def test_placement_right_after_the_reserved_area_is_fine() -> None:
    loader.check_placement(parse_image(elf(addr=0x9000)), RAM, RESERVED)
    loader.check_placement(parse_image(elf(addr=(64 << 20) - 0x1000, memsz=0x1000)), RAM, RESERVED)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)
    assert "elf64 image, entry 0x200000 (long mode)" in loader.describe(parse_image(elf()))
