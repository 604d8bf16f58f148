"""The shipped guest images: headers, symbol files, and a reproducible build."""

from __future__ import annotations

import struct

import pytest

from regsync import guests
from regsync.guests import build

NAMES = sorted(guests.GUESTS)

# Labels the kvm/gdb tests rely on, per guest (beyond the common ones).
EXPECTED_SYMBOLS = {
    "hello": [],
    "hypercall": ["hc_loop", "hc_n", "hc_checksum"],
    "counter": ["counter_loop", "counter_tick", "counter_value", "counter_xmm0"],
    "timer": ["timer_isr", "irq_count", "timer_arm", "timer_wait", "timer_doubled"],
    "smp": ["ap_main", "ipi_isr", "smp_arrived", "ap_done", "trampoline_start", "ap_entry64"],
    "watchdog": ["wd_loop", "wd_pet", "wd_starve", "wd_pets_done"],
    "spin": ["spin_loop", "spin_a", "spin_b", "spin_c", "spin_d", "spin_stop", "spin_counters",
             "bsp_work", "bsp_work_ret", "bw_0", "bw_19", "bsp_work_result", "aps_online"],
    "reset": ["reset_ready", "reset_input", "reset_area", "reset_result", "reset_done"],
}
COMMON_SYMBOLS = ["multiboot_header", "regsync_header", "_start32", "entry64", "main", "exit",
                  "putc", "puts", "idt", "gdt", "boot_ncpus", "boot_arg", "_edata", "_end"]


def test_every_guest_has_source_image_and_symbols():
    assert set(build.guest_sources()) == set(NAMES)
    for name in NAMES:
        assert guests.image_path(name).is_file(), name
        assert guests.symbol_path(name).is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_header_parses(name):
    image = guests.load_image(name)
    hdr = guests.parse_header(image)
    syms = guests.symbols(name)
    assert hdr.load_addr == guests.LOAD_ADDR
    assert hdr.load_end - hdr.load_addr == len(image)
    assert hdr.load_end == syms["_edata"]
    assert hdr.bss_end == syms["_end"] >= hdr.load_end
    assert hdr.entry32 == syms["_start32"]
    assert hdr.entry64 == syms["entry64"]
    # The regsync header sits 8-byte aligned right after the 32-byte multiboot header.
    assert image[32:40] == b"RSYNC64\0"


@pytest.mark.parametrize("name", NAMES)
def test_symbols(name):
    text = guests.symbol_path(name).read_text()
    rows = [line.split() for line in text.splitlines()]
    assert all(len(r) == 2 for r in rows)
    keys = [(int(a, 16), n) for a, n in rows]
    assert keys == sorted(keys)
    syms = guests.symbols(name)
    for label in COMMON_SYMBOLS + EXPECTED_SYMBOLS[name]:
        assert label in syms, f"{name}.sym lacks {label}"
    image_end = guests.parse_header(guests.load_image(name)).bss_end
    assert all(guests.LOAD_ADDR <= a <= image_end for a in syms.values())


def test_unknown_guest():
    with pytest.raises(KeyError, match="unknown guest"):
        guests.image_path("nope")


def test_hypercall_checksum_formula():
    # The value the hypercall guest printed under KVM for the default N.
    assert guests.hypercall_checksum(10000) == 0xA5BB0F14B0409090
    assert guests.hypercall_checksum(5) == 0x1F18D2
    assert guests.hypercall_checksum(0) == 0


def _image(**over) -> bytearray:
    img = bytearray(guests.load_image("hello"))
    fields = dict(zip(("magic", "flags", "checksum", "header_addr", "load_addr", "load_end",
                       "bss_end", "entry32"), struct.unpack_from("<8I", img, 0)))
    fields.update(over)
    if "checksum" not in over:
        fields["checksum"] = (-(fields["magic"] + fields["flags"])) & 0xFFFFFFFF
    struct.pack_into("<8I", img, 0, *fields.values())
    return img


@pytest.mark.parametrize("image, message", [
    (b"", "no multiboot header"),
    (bytes(9000), "no multiboot header"),
    (_image(checksum=0), "bad checksum"),
    (_image(flags=0), "bit 16"),
    (_image(header_addr=0x200000), "header_addr"),
    (_image(load_end=0x100000), "load_end_addr"),
    (_image(load_end=0x100000 + 100000), "image is"),
    (_image(bss_end=0x100001), "bss_end_addr"),
    (_image(entry32=0x400000), "entry_addr"),
])
def test_bad_headers(image, message):
    with pytest.raises(ValueError, match=message):
        guests.parse_header(bytes(image))


def test_bad_entry64_and_missing_regsync_header():
    img = _image()
    struct.pack_into("<Q", img, 40, 0x5000000)
    with pytest.raises(ValueError, match="entry64"):
        guests.parse_header(bytes(img))
    img[32:40] = b"NOTRSYNC"
    assert guests.parse_header(bytes(img)).entry64 is None


def test_build_is_reproducible():
    missing = build.missing_tools()
    if missing:
        pytest.skip(f"binutils not installed (missing {', '.join(missing)}): "
                    "cannot rebuild the guest images")
    differ = build.check()
    assert differ == [], (f"shipped guest files differ from a fresh build: {differ}; "
                          "run python -m regsync.guests.build")


def test_guest_port_and_hypercall_numbers_are_the_devices() -> None:
    """common.inc spells the device contract in assembler; it must agree with the
    one Python definition (regsync.devices.basic) and the boot-info magic."""
    import re

    from regsync.arch.x86_64 import boot
    from regsync.devices import basic
    from regsync.guests import SRC_DIR

    sets = {m.group(1): int(m.group(2), 0) for m in re.finditer(
        r"^\s*\.set\s+(\w+),\s*(0x[0-9a-fA-F]+|\d+)", (SRC_DIR / "common.inc").read_text(), re.M)}
    assert sets["COM1"] == basic.SERIAL_PORT
    assert sets["PORT_EXIT"] == basic.DEBUG_EXIT_PORT
    assert sets["PORT_HCALL"] == basic.HYPERCALL_PORT
    assert sets["PORT_TICK"] == basic.TICK_PORT
    for name in ("HC_ADD", "HC_WATCHDOG_ARM", "HC_WATCHDOG_PET", "HC_WATCHDOG_DISARM", "HC_REPORT"):
        assert sets[name] == getattr(basic, name), name
    assert sets["BOOTINFO_MAGIC"] == boot.BOOT_INFO_MAGIC
