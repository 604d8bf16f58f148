"""The multiboot v1 information structure as QEMU's loader (hw/i386/multiboot.c
load_multiboot) fills it, from the Multiboot Specification 0.6.96 §3.3:

flags: bit 0 mem_lower/mem_upper, bit 2 cmdline, bit 3 mods, bit 6 the memory map,
bit 9 the boot loader's name. As in QEMU the kernel's command line starts with
the image's path, then the ``--append`` text; each module (``--initrd``, several
separated by commas as QEMU accepts them) is page aligned after the kernel, its
string the file's path plus any arguments.

Placement: modules from the first page after the image (bss included), then the
info structure, the memory map and the strings, all below the end of RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
INFO_SIZE = 88                                  # through boot_loader_name (offset 64) + apm/vbe
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2
LOADER_NAME = b"regsync\0"
PAGE = 4096

# The PC's low memory as firmware leaves it: conventional RAM up to the EBDA, then the
# EBDA, VGA window and BIOS area up to 1 MiB (what qboot reports through e820).
EBDA_START = 0x9FC00
HIGH_START = 0x100000


class MultibootError(ValueError):
    """Modules or strings that do not fit in guest RAM."""


@dataclass(frozen=True)
class Module:
    data: bytes
    string: str                                 # the path and its arguments


def memory_map(ram_size: int, reserved: list[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """(address, length, type) entries: RAM below the EBDA, the EBDA/ROM hole as
    reserved, RAM from 1 MiB to the end of RAM, then the ranges in ``reserved``."""
    entries = [(0, EBDA_START, MMAP_AVAILABLE), (EBDA_START, HIGH_START - EBDA_START, MMAP_RESERVED)]
    if ram_size > HIGH_START:
        entries.append((HIGH_START, ram_size - HIGH_START, MMAP_AVAILABLE))
    entries += [(a, n, MMAP_RESERVED) for a, n in reserved]
    return entries


@dataclass(frozen=True)
class Placed:
    info_addr: int
    blobs: dict[int, bytes]                     # guest-physical address -> bytes
    end: int


def _align(x: int, a: int = PAGE) -> int:
    return (x + a - 1) & -a


def build(image_end: int, ram_size: int, cmdline: str, modules: list[Module],
          mmap: list[tuple[int, int, int]]) -> Placed:
    """Lay out modules, the info structure, the map and the strings after image_end."""
    blobs: dict[int, bytes] = {}
    cursor = _align(image_end)
    mod_entries = []
    strings = bytearray()
    strings_at: list[int] = []

    def add_string(s: bytes) -> int:
        strings_at.append(len(strings))
        strings.extend(s + b"\0")
        return strings_at[-1]

    for m in modules:
        start = cursor
        blobs[start] = m.data
        cursor = _align(start + len(m.data))
        mod_entries.append((start, start + len(m.data), add_string(m.string.encode())))
    info_addr = cursor
    mods_addr = info_addr + INFO_SIZE
    mmap_addr = mods_addr + 16 * len(mod_entries)
    mmap_bytes = b"".join(struct.pack("<IQQI", 20, a, n, t) for a, n, t in mmap)
    strings_addr = mmap_addr + len(mmap_bytes)
    cmd_off = add_string(cmdline.encode())
    name_off = add_string(LOADER_NAME.rstrip(b"\0"))
    end = strings_addr + len(strings)
    if end > ram_size or info_addr > ram_size:
        raise MultibootError(f"modules and multiboot information need {image_end:#x}..{end:#x}, "
                             f"past the end of RAM ({ram_size >> 20} MiB)")
    mem_lower = EBDA_START >> 10
    mem_upper = max(0, ram_size - HIGH_START) >> 10
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME
    info = struct.pack("<IIIIIII16sIIIIII", flags, mem_lower, mem_upper, 0xFFFFFFFF,
                       strings_addr + cmd_off, len(mod_entries), mods_addr if mod_entries else 0,
                       bytes(16), len(mmap_bytes), mmap_addr, 0, 0, 0, strings_addr + name_off)
    info = info.ljust(INFO_SIZE, b"\0")
    mods = b"".join(struct.pack("<IIII", s, e, strings_addr + o, 0) for s, e, o in mod_entries)
    blobs[info_addr] = info + mods + mmap_bytes + bytes(strings)
    return Placed(info_addr, blobs, end)


def read_modules(paths: "list[str] | tuple[str, ...]") -> list[Module]:
    """``--initrd`` values as QEMU takes them: each item "FILE [ARGS]"; the file is
    read now, so a missing one is refused before guest memory is touched."""
    modules = []
    for item in paths:
        path = str(item).split(" ", 1)[0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise MultibootError(f"module {path}: {e.strerror or e}") from None
        modules.append(Module(data, str(item)))
    return modules


def plan(image_path: str, image_end: int, ram_size: int, append: str, initrd: "list[str] | tuple[str, ...]",
         mmap: list[tuple[int, int, int]]) -> Placed:
    """The whole multiboot hand-off for an image: QEMU's command line ("PATH ARGS",
    hw/i386/multiboot.c load_multiboot), the modules, the map; nothing written yet."""
    return build(image_end, ram_size, f"{image_path} {append}", read_modules(initrd), mmap)
