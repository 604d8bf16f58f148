"""Prebuilt x86 guest images for regsync tests and demos.

Each guest is a flat binary linked at 0x100000 (``<name>.bin``) with a symbol
list (``<name>.sym``); sources are in ``src/`` and ``python -m
regsync.guests.build`` rebuilds them (``--check`` verifies the shipped files).

An image starts with a multiboot v1 header (a.out kludge, 32-bit entry) so
``qemu-system-x86_64 -kernel <name>.bin`` boots it, followed by a regsync
header: ``b"RSYNC64\\0"``, the u64 64-bit entry point, a reserved u64.
:func:`parse_header` reads both.

The boot contract the guests rely on (see ``src/common.inc`` for details):
long mode at ``entry64`` with the tables of :mod:`regsync.arch.x86_64.boot`;
boot info at 0x500 (magic ``RSBI``, u32 vCPUs, u64 memory size, u64 guest
argument at 0x510, 0 = the guest's default); serial at 0x3f8 (LSR 0x3fd),
debug exit at 0xf4 (status = ``al``), hypercalls as a 4-byte OUT to 0x500
(``eax`` = number, arguments ``rdi``/``rsi``, result in ``rax``), ticks as an
OUT to 0x501.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .. import loader

GUESTS: dict[str, str] = {
    "hello": "prints 'Hello from the regsync guest!' and exits 0",
    "hypercall": "N ADD hypercalls (argument N, default 10000), prints a checksum, exits 0",
    "counter": "endless loop: r12 += 1, reads STAR/DR0/CR8/XMM0 into r13/r14/r15/rbx, tick exit",
    "timer": "LAPIC one-shot timer rounds (argument, default 200) with tick exits, exits 0",
    "smp": "starts every AP, each prints 'cpu N online', IPI handshake, exits 0",
    "watchdog": "arms a 100 ms watchdog and pets it (argument times, default 20; 0xFFFF never)",
    "spin": "every vCPU spins at spin_loop counting in spin_counters; exits when spin_stop != 0",
    "reset": "the fast-reset guest: tick at reset_ready, dirties k pages from reset_input, exits 0",
}

LOAD_ADDR = 0x100000
MULTIBOOT_MAGIC = loader.MULTIBOOT_MAGIC
MULTIBOOT_AOUT_KLUDGE = loader.MB_AOUT_KLUDGE
MULTIBOOT_SEARCH = loader.MULTIBOOT_SEARCH
REGSYNC_MAGIC = loader.REGSYNC_MAGIC

# Exit statuses the guests use (the status byte written to port 0xf4).
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_LOST_IRQ = 2
EXIT_AP_TIMEOUT = 3
EXIT_UNEXPECTED_IRQ = 0x7E
EXIT_EXCEPTION = 0x7F

# The ports and hypercall numbers the guests use are the devices' own:
# regsync.devices.basic (SERIAL_PORT, DEBUG_EXIT_PORT, HYPERCALL_PORT, TICK_PORT, HC_*).

_DIR = Path(__file__).resolve().parent
SRC_DIR = _DIR / "src"


class ImageHeader(NamedTuple):
    load_addr: int      # where the file's first byte goes
    load_end: int       # end of the file's bytes in memory (multiboot load_end_addr)
    bss_end: int        # end of the zero-filled area after load_end
    entry32: int        # multiboot entry: 32-bit protected mode, paging off
    entry64: int | None  # regsync entry: 64-bit long mode (None: no regsync header)


def _check_name(name: str) -> str:
    if name not in GUESTS:
        raise KeyError(f"unknown guest {name!r}; known: {', '.join(sorted(GUESTS))}")
    return name


def image_path(name: str) -> Path:
    """Path of the shipped flat image ``<name>.bin``."""
    return _DIR / f"{_check_name(name)}.bin"


def symbol_path(name: str) -> Path:
    return _DIR / f"{_check_name(name)}.sym"


def load_image(name: str) -> bytes:
    return image_path(name).read_bytes()


def parse_symbols(text: str) -> dict[str, int]:
    """Parse ``.sym`` text: one ``<hex address> <name>`` per line."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"symbol file line {lineno}: expected 'address name', got {line!r}")
        out[parts[1]] = int(parts[0], 16)
    return out


def symbols(name: str) -> dict[str, int]:
    """Label -> guest-physical address (= virtual: the guests identity-map)."""
    return parse_symbols(symbol_path(name).read_text())


def hypercall_checksum(n: int) -> int:
    """The checksum the hypercall guest prints for N calls answered correctly."""
    c = 0
    for i in range(1, n + 1):
        c = (c * 31 + i + i * i) & 0xFFFFFFFFFFFFFFFF
    return c


def parse_header(image: bytes) -> ImageHeader:
    """Find and check the multiboot v1 header (a.out kludge) and the regsync header
    after it; the checks themselves live in :mod:`regsync.loader`.

    Raises ValueError saying what is wrong with an image that cannot be loaded.
    """
    image = bytes(image)
    mb = loader.find_multiboot_header(image)
    if mb is None:
        raise ValueError(f"no multiboot header (magic {MULTIBOOT_MAGIC:#x}) in the first "
                         f"{MULTIBOOT_SEARCH} bytes of the {len(image)}-byte image")
    if not mb.has_addresses:
        raise ValueError(f"multiboot header at offset {mb.offset:#x}: flags {mb.flags:#x} lack "
                         "bit 16 (address fields); the bundled guests are a.out-kludge images")
    img = loader.parse_image(image)
    (seg,) = img.segments
    assert mb.entry_addr is not None
    return ImageHeader(seg.gpa, seg.gpa + len(seg.data), seg.end, mb.entry_addr, img.entry64)


__all__ = ["GUESTS", "ImageHeader", "image_path", "symbol_path", "load_image", "symbols",
           "parse_symbols", "parse_header", "hypercall_checksum", "LOAD_ADDR", "SRC_DIR"]
