"""Guest images: parse and validate an image completely before anything touches guest memory.

    image = parse_image(data)                       # ImageError says what is wrong
    check_placement(image, ram=[(0, 64 << 20)], reserved=[(0x500, 0x9000, "boot tables")])
    for seg in image.segments: ...                  # the caller places (machine.py)

Formats, tried in this order:

* **ELF64** x86-64 ``ET_EXEC``: ``PT_LOAD`` segments at their physical addresses,
  entered in long mode (regsync's own convention; the boot tables identity-map 4 GiB).
* **Multiboot v1 with the a.out kludge** (header flags bit 16): the header's address
  fields say where the file goes; entered in 32-bit protected mode (EAX=0x2BADB002,
  EBX=info), or in long mode at ``entry64`` when a regsync header follows (the bundled
  guests). The kludge wins over an ELF32 header, as the spec says.
* **ELF32** i386 ``ET_EXEC`` with a multiboot header: ``PT_LOAD`` segments at their
  physical addresses, entered in protected mode, as multiboot v1 says.
* **Flat**: anything else, copied to ``flat_addr`` and entered there.

The result is plain data (:class:`Image`): entry, mode, segments, where the image
ends, the multiboot header if any. No guest memory, no I/O: building the multiboot
info, fw_cfg or ACPI on top reads this description. Sources for the checks:

* ELF: elf(5) (man7.org/linux/man-pages/man5/elf.5.html, "Program header": ``PT_LOAD``;
  "the file size may not be larger than the memory size"; the bytes past ``p_filesz``
  are zero) and the AMD64 psABI ("Machine Information": ELFCLASS64, ELFDATA2LSB,
  EM_X86_64 = 62). ELF's entry is virtual; QEMU translates it into the physical address
  of the segment holding it (include/hw/elf_ops.h, glue(load_elf, SZ)) and so do we.
* Multiboot v1 (gnu.org/software/grub/manual/multiboot, 3.1 "OS image format"): the
  header is 4-byte aligned within the first 8192 bytes, magic 0x1BADB002, magic + flags
  + checksum = 0 mod 2^32; flags bits 0-15 are requirements a loader that does not
  understand them must refuse; bit 16 makes the address fields (all physical) valid;
  "load_addr must be less than or equal to header_addr"; load_end_addr = 0 means "to
  the end of the file", bss_end_addr = 0 "no bss". QEMU's reading of the same fields:
  hw/i386/multiboot.c, load_multiboot().
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from .memory import GuestMemoryError

MULTIBOOT_MAGIC = 0x1BADB002            # in the image's header
MULTIBOOT_BOOT_MAGIC = 0x2BADB002       # in EAX at the hand-off
MULTIBOOT_SEARCH = 8192                 # the header lies within the first 8 KiB
MB_PAGE_ALIGN, MB_MEMORY_INFO, MB_VIDEO_MODE = 1 << 0, 1 << 1, 1 << 2
MB_AOUT_KLUDGE = 1 << 16
MB_UNDERSTOOD = MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_VIDEO_MODE   # of the required bits 0-15
REGSYNC_MAGIC = b"RSYNC64\0"            # regsync header after the multiboot one (guests/)

ELFCLASS32, ELFCLASS64, ELFDATA2LSB = 1, 2, 1
ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
_MACHINES = {2: "SPARC", 3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390",
             40: "ARM", 50: "IA-64", 62: "x86-64", 183: "AArch64", 243: "RISC-V"}
_ELF_TYPES = {0: "ET_NONE", 1: "ET_REL (an object file)", 2: "ET_EXEC",
              3: "ET_DYN (a shared library or position-independent program)",
              4: "ET_CORE (a core dump)"}

MODES = ("long", "protected", "real")


class ImageError(GuestMemoryError):
    """An image regsync cannot load; the message names what is wrong."""


@dataclass(frozen=True)
class Segment:
    """Bytes to place at a guest-physical address; memsz - len(data) zero bytes follow."""
    gpa: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class MultibootHeader:
    """A multiboot v1 header as found in the image (address fields: None without bit 16)."""
    offset: int                  # file offset of the magic
    flags: int
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None
    video: tuple[int, int, int, int] | None = None   # mode_type, width, height, depth (bit 2)

    @property
    def has_addresses(self) -> bool:
        return bool(self.flags & MB_AOUT_KLUDGE)


@dataclass(frozen=True)
class Image:
    """What to place and how to enter it. ``mode`` is "long", "protected" or "real";
    ``multiboot`` is set when the entry is a multiboot hand-off (EAX magic, EBX info)."""
    format: str                        # "elf64", "elf32", "multiboot-aout", "flat"
    entry: int
    mode: str
    segments: tuple[Segment, ...]
    multiboot: MultibootHeader | None = None
    entry64: int | None = None         # the regsync header's long-mode entry, if any

    @property
    def start(self) -> int:
        return min(s.gpa for s in self.segments)

    @property
    def end(self) -> int:
        """First byte past the image, bss included."""
        return max(s.end for s in self.segments)

    @property
    def multiboot_handoff(self) -> bool:
        return self.multiboot is not None and self.mode == "protected"


# --- the entry point -------------------------------------------------------------------
def parse_image(data: bytes, *, mode: str = "auto", flat_addr: int = 0x100000) -> Image:
    """Parse and check an image (no guest memory involved).

    ``mode`` "auto" takes the image's own mode; "long"/"protected"/"real" override it
    where the format allows (a flat image, or a multiboot image with a regsync header).
    """
    if mode not in ("auto", *MODES):
        raise ValueError(f"mode={mode!r}: one of auto, {', '.join(MODES)}")
    data = bytes(data)
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    mb = find_multiboot_header(data)
    if data[:4] == b"\x7fELF":
        cls = data[4] if len(data) > 4 else 0
        if cls == ELFCLASS64:
            entry, segs = _elf_segments(data)
            return _checked(Image("elf64", entry, _mode(mode, "long"), segs, mb))
        if cls == ELFCLASS32 and not (mb and mb.has_addresses):
            entry, segs = _elf_segments(data)
            if mb is None:
                raise ImageError("ELF32 image without a multiboot header (magic 0x1badb002 "
                                 f"in the first {MULTIBOOT_SEARCH} bytes): regsync starts "
                                 "32-bit kernels by the multiboot convention only")
            if mode not in ("auto", "protected"):
                raise ValueError(f"mode={mode!r}: a multiboot ELF32 kernel starts in "
                                 "protected mode")
            return _checked(Image("elf32", entry, "protected", segs, mb))
        if cls not in (ELFCLASS32, ELFCLASS64):
            raise ImageError(_elf_class_problem(data))
    if mb is not None:
        if not mb.has_addresses:
            raise ImageError(f"multiboot header at offset {mb.offset:#x}: flags {mb.flags:#x} "
                             "lack bit 16 (address fields) and the image is not ELF: "
                             "nothing says where to load it")
        return _checked(_aout_image(data, mb, mode))
    start = flat_addr
    return _checked(Image("flat", start, _mode(mode, "long"), (Segment(start, data, len(data)),)))


def _mode(requested: str, default: str) -> str:
    return default if requested == "auto" else requested


def _checked(img: Image) -> Image:
    """Checks common to every format: something to load, no overlap, entry inside."""
    if not img.segments:
        raise ImageError(f"{img.format} image has no loadable segment (PT_LOAD with a "
                         "non-zero size): nothing to run")
    segs = sorted(img.segments, key=lambda s: s.gpa)
    for a, b in zip(segs, segs[1:]):
        if b.gpa < a.end:
            raise ImageError(f"segments at {a.gpa:#x}..{a.end:#x} and {b.gpa:#x}..{b.end:#x} "
                             "overlap")
    if img.mode == "real" and img.entry >= 1 << 20:
        raise ImageError(f"entry point {img.entry:#x}: real mode reaches only the first MiB")
    if not any(s.gpa <= img.entry < s.gpa + len(s.data) for s in segs):
        raise ImageError(f"entry point {img.entry:#x} is outside the image's loaded bytes "
                         f"({', '.join(f'{s.gpa:#x}..{s.gpa + len(s.data):#x}' for s in segs)})")
    return img


# --- placement against RAM and regsync's own structures --------------------------------
def check_placement(img: Image, ram: Iterable[tuple[int, int]],
                    reserved: Iterable[tuple[int, int, str]]) -> None:
    """Every segment inside one RAM range [start, end) and clear of every reserved
    range (start, end, what lives there). Raises ImageError naming the segment."""
    ram = sorted(ram)
    reserved = list(reserved)
    for i, s in enumerate(sorted(img.segments, key=lambda s: s.gpa)):
        if not any(lo <= s.gpa and s.end <= hi for lo, hi in ram):
            where = ", ".join(f"{lo:#x}..{hi:#x}" for lo, hi in ram)
            raise ImageError(f"segment {i} at {s.gpa:#x}..{s.end:#x} ({_size(s.memsz)}) lies "
                             f"outside guest RAM ({where}); a larger --mem may help")
        for lo, hi, what in reserved:
            if s.gpa < hi and lo < s.end:
                raise ImageError(f"segment {i} at {s.gpa:#x}..{s.end:#x} overlaps regsync's "
                                 f"boot structures at {lo:#x}..{hi:#x} ({what})")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


# --- multiboot ---------------------------------------------------------------------------
def find_multiboot_header(data: bytes) -> MultibootHeader | None:
    """The multiboot v1 header (magic at a 4-byte aligned offset in the first 8 KiB),
    or None. A magic whose checksum or requirement flags are wrong is an error: the
    image meant to be multiboot and is broken."""
    head = data[:MULTIBOOT_SEARCH]
    off = next((o for o in range(0, len(head) - 11, 4)
                if struct.unpack_from("<I", head, o)[0] == MULTIBOOT_MAGIC), None)
    if off is None:
        return None
    magic, flags, checksum = struct.unpack_from("<III", head, off)
    # Multiboot 3.1.2 "Header magic fields": the three sum to 0 mod 2^32; bits 0-15
    # are requirements a loader must refuse when it does not understand them.
    if (magic + flags + checksum) & 0xFFFFFFFF:
        raise ImageError(f"multiboot header at offset {off:#x}: bad checksum {checksum:#x} "
                         f"(magic + flags + checksum must be 0 mod 2^32)")
    unknown = flags & 0xFFFF & ~MB_UNDERSTOOD
    if unknown:
        raise ImageError(f"multiboot header at offset {off:#x}: flags {flags:#x} require "
                         f"features regsync does not know (bits {unknown:#x} of 0-15)")
    need = 48 if flags & MB_VIDEO_MODE else 32 if flags & MB_AOUT_KLUDGE else 12
    if off + need > len(head):
        raise ImageError(f"multiboot header at offset {off:#x} is cut off: flags {flags:#x} "
                         f"need {need} bytes within the first {MULTIBOOT_SEARCH} of the image")
    fields: dict[str, object] = {}
    if flags & MB_AOUT_KLUDGE:
        names = ("header_addr", "load_addr", "load_end_addr", "bss_end_addr", "entry_addr")
        fields = dict(zip(names, struct.unpack_from("<5I", head, off + 12)))
    if flags & MB_VIDEO_MODE:
        fields["video"] = struct.unpack_from("<4I", head, off + 32)
    return MultibootHeader(off, flags, **fields)  # type: ignore[arg-type]


def _aout_image(data: bytes, mb: MultibootHeader, mode: str) -> Image:
    """Place by the header's address fields (the a.out kludge)."""
    assert mb.header_addr is not None and mb.load_addr is not None
    assert mb.load_end_addr is not None and mb.bss_end_addr is not None
    assert mb.entry_addr is not None
    at = f"multiboot header at offset {mb.offset:#x}"
    # Multiboot 3.1.3 "Header address fields" (all physical): the text starts at file
    # offset (header offset - (header_addr - load_addr)); load_end_addr 0 = to the end
    # of the file; bss_end_addr 0 = no bss. QEMU: hw/i386/multiboot.c, load_multiboot().
    if mb.header_addr < mb.load_addr:
        raise ImageError(f"{at}: header_addr {mb.header_addr:#x} < load_addr "
                         f"{mb.load_addr:#x} (the spec wants load_addr <= header_addr)")
    text_offset = mb.offset - (mb.header_addr - mb.load_addr)
    if text_offset < 0:
        raise ImageError(f"{at}: header_addr {mb.header_addr:#x} - load_addr "
                         f"{mb.load_addr:#x} puts the start of the text before the file")
    if mb.load_end_addr:
        if mb.load_end_addr <= mb.load_addr:
            raise ImageError(f"{at}: load_end_addr {mb.load_end_addr:#x} <= load_addr "
                             f"{mb.load_addr:#x}")
        load_size = mb.load_end_addr - mb.load_addr
        if text_offset + load_size > len(data):
            raise ImageError(f"image is {len(data)} bytes but the {at} loads {load_size} from "
                             f"offset {text_offset:#x} (load_addr {mb.load_addr:#x}.."
                             f"{mb.load_end_addr:#x})")
    else:
        load_size = len(data) - text_offset
    load_end = mb.load_addr + load_size
    bss_end = mb.bss_end_addr or load_end
    if bss_end < load_end:
        raise ImageError(f"{at}: bss_end_addr {bss_end:#x} < load_end_addr {load_end:#x}")
    if bss_end > 1 << 32:
        raise ImageError(f"{at}: the image ends at {bss_end:#x}, past 4 GiB")
    if not mb.load_addr <= mb.entry_addr < load_end:
        raise ImageError(f"{at}: entry_addr {mb.entry_addr:#x} is outside the loaded image "
                         f"{mb.load_addr:#x}..{load_end:#x}")
    seg = Segment(mb.load_addr, data[text_offset:text_offset + load_size], bss_end - mb.load_addr)
    entry64 = _regsync_entry64(data, mb, load_end)
    if entry64 is not None and mode in ("auto", "long"):
        return Image("multiboot-aout", entry64, "long", (seg,), mb, entry64)
    if mode not in ("auto", "protected"):
        raise ValueError(f"mode={mode!r}: this multiboot image has no regsync header with a "
                         "long-mode entry; it starts in protected mode")
    return Image("multiboot-aout", mb.entry_addr, "protected", (seg,), mb, entry64)


def _regsync_entry64(data: bytes, mb: MultibootHeader, load_end: int) -> int | None:
    """The regsync header: 8-byte aligned right after the 32-byte multiboot header,
    ``RSYNC64\\0``, u64 entry64, u64 reserved (see regsync.guests)."""
    off = (mb.offset + 32 + 7) & ~7
    if off + 24 > len(data) or data[off:off + 8] != REGSYNC_MAGIC:
        return None
    (entry64,) = struct.unpack_from("<Q", data, off + 8)
    assert mb.load_addr is not None
    if not mb.load_addr <= entry64 < load_end:
        raise ImageError(f"regsync entry64 {entry64:#x} is outside the loaded image "
                         f"{mb.load_addr:#x}..{load_end:#x}")
    return int(entry64)


# --- ELF -------------------------------------------------------------------------------
def _elf_class_problem(data: bytes) -> str:
    if len(data) < 16:
        return f"truncated ELF image: {len(data)} bytes, the identification alone needs 16"
    return f"ELF class {data[4]} is neither ELFCLASS32 nor ELFCLASS64"


def _elf_segments(data: bytes) -> tuple[int, tuple[Segment, ...]]:
    """(physical entry, PT_LOAD segments with a non-zero size) of an x86 ELF executable."""
    if len(data) < 16:
        raise ImageError(_elf_class_problem(data))
    is64 = data[4] == ELFCLASS64
    bits, machine_ok = (64, EM_X86_64) if is64 else (32, EM_386)
    ehsize, phsize = (64, 56) if is64 else (52, 32)
    if data[5] != ELFDATA2LSB:
        raise ImageError(f"ELF{bits} image is not little-endian (EI_DATA {data[5]})")
    if len(data) < ehsize:
        raise ImageError(f"truncated ELF{bits} image: {len(data)} bytes, its header alone "
                         f"needs {ehsize}")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    # AMD64 psABI "Machine Information": ELFCLASS64, ELFDATA2LSB, EM_X86_64 (62);
    # multiboot ELF kernels are i386 (EM_386, 3), as QEMU's load_multiboot requires.
    if e_machine != machine_ok:
        name = _MACHINES.get(e_machine, "unknown")
        raise ImageError(f"ELF{bits} image is for machine {e_machine} ({name}), not "
                         f"{_MACHINES[machine_ok]} (e_machine {machine_ok})")
    if e_type != ET_EXEC:
        raise ImageError(f"ELF{bits} image has type {_ELF_TYPES.get(e_type, e_type)}: regsync "
                         "loads executables (ET_EXEC) at their physical addresses, not host "
                         "programs or libraries")
    if is64:
        e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
        layout = "<IIQQQQQQ"
    else:
        e_entry, e_phoff = struct.unpack_from("<II", data, 24)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
        layout = "<IIIIIIII"
    if e_phnum and e_phentsize < phsize:
        raise ImageError(f"ELF{bits} e_phentsize {e_phentsize} is smaller than a program "
                         f"header ({phsize})")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise ImageError(f"ELF{bits} program header table ({e_phnum} entries at offset "
                         f"{e_phoff:#x}) lies past the end of the file ({len(data)} bytes)")
    segs: list[Segment] = []
    entry_phys: int | None = None
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if is64:
            p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = \
                struct.unpack_from(layout, data, off)
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _flags, _ = \
                struct.unpack_from(layout, data, off)
        if p_type != PT_LOAD or p_memsz == 0:
            continue                 # QEMU skips zero-size segments too (elf_ops.h)
        # elf(5), PT_LOAD: "The file size may not be larger than the memory size";
        # the bytes from p_filesz to p_memsz are zero (the bss).
        if p_filesz > p_memsz:
            raise ImageError(f"ELF segment {i}: p_filesz {p_filesz:#x} > p_memsz {p_memsz:#x} "
                             "(the file size may not exceed the memory size)")
        if p_offset + p_filesz > len(data):
            raise ImageError(f"ELF segment {i} lies past the end of the file (offset "
                             f"{p_offset:#x} + {p_filesz:#x} > {len(data)} bytes)")
        if not is64 and p_paddr + p_memsz > 1 << 32:
            raise ImageError(f"ELF32 segment {i} at {p_paddr:#x} + {p_memsz:#x} runs past 4 GiB")
        segs.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
        if entry_phys is None and p_vaddr <= e_entry < p_vaddr + p_filesz:
            entry_phys = e_entry - p_vaddr + p_paddr       # virtual entry -> physical
    if not segs:
        raise ImageError(f"ELF{bits} image has no loadable segment (PT_LOAD with a non-zero "
                         "size): nothing to run")
    if entry_phys is None:
        raise ImageError(f"ELF{bits} entry point {e_entry:#x} is outside every loadable "
                         "segment's file bytes")
    return entry_phys, tuple(segs)


def describe(img: Image) -> str:
    """One line for logs: format, entry and mode, the span."""
    return (f"{img.format} image, entry {img.entry:#x} ({img.mode} mode), "
            f"{img.start:#x}..{img.end:#x} in {len(img.segments)} segment(s)")


__all__ = ["Image", "ImageError", "MultibootHeader", "Segment", "parse_image",
           "check_placement", "find_multiboot_header", "describe", "MULTIBOOT_MAGIC",
           "MULTIBOOT_BOOT_MAGIC", "MB_AOUT_KLUDGE", "REGSYNC_MAGIC", "MODES"]

