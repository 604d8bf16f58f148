"""Guest-virtual to guest-physical translation by walking the guest's page tables.

Pure functions over a physical reader, so they test without KVM.  The walk
follows what the MMU does for a *read* (present bits only; no permission,
reserved-bit or accessed/dirty handling) in each paging mode:

* paging off (``cr0.PG`` = 0, real and protected mode): linear = physical
  (the caller passes linear addresses: gdb's addresses in the i8086/i386
  layouts are linear, segment bases are not applied here);
* 32-bit paging (``cr4.PAE`` = 0): 2 levels of 4-byte entries, 4 MiB pages
  when ``cr4.PSE`` (PSE-36 high bits included);
* PAE (``cr4.PAE`` = 1, ``efer.LMA`` = 0): 4 PDPTEs from ``cr3[31:5]``, then
  2 levels of 8-byte entries, 2 MiB pages;
* long mode (``efer.LMA`` = 1): 4 levels (5 with ``cr4.LA57``) with 1 GiB and
  2 MiB pages; non-canonical addresses fault.

A not-present entry, or a table outside guest RAM, raises :class:`PageFault`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = [
    "PAGE_SIZE", "Mapping", "PageFault", "Paging", "mappings", "translate", "ranges",
]

PAGE_SIZE = 0x1000

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10

PTE_P = 1 << 0
PTE_PS = 1 << 7
# Physical address bits of a 64-bit entry (bits 51:12); bit 63 is NX.
_ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000

#: Reads ``n`` (4 or 8) bytes of guest-physical memory as a little-endian int;
#: raises any exception for an address outside RAM.
PhysReader = Callable[[int, int], int]


class PageFault(Exception):
    """The address has no translation (not present, or a table outside RAM)."""

    def __init__(self, vaddr: int, detail: str) -> None:
        super().__init__(f"{vaddr:#x}: {detail}")
        self.vaddr = vaddr
        self.detail = detail


@dataclass(frozen=True)
class Paging:
    """The control registers that select the paging mode (read at a stop)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def mode(self) -> str:
        """"real", "flat" (protected, paging off), "32bit", "pae", "long4" or "long5"."""
        if not self.cr0 & CR0_PE:
            return "real"
        if not self.cr0 & CR0_PG:
            return "flat"
        if self.efer & EFER_LMA:
            return "long5" if self.cr4 & CR4_LA57 else "long4"
        if self.cr4 & CR4_PAE:
            return "pae"
        return "32bit"


def _entry(read: PhysReader, gpa: int, size: int, vaddr: int, level: str) -> int:
    try:
        value = read(gpa, size)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a fault
        raise PageFault(vaddr, f"{level} table entry at {gpa:#x} is outside RAM ({exc})") from None
    if not value & PTE_P:
        raise PageFault(vaddr, f"{level} entry {value:#x} at {gpa:#x} is not present")
    return value


def _walk_long(read: PhysReader, vaddr: int, cr3: int, levels: int) -> int:
    bits = 12 + 9 * levels  # 48 or 57
    top = vaddr >> (bits - 1)
    if top not in (0, (1 << (64 - bits + 1)) - 1):
        raise PageFault(vaddr, f"not canonical for {bits}-bit addresses")
    table = cr3 & _ADDR_MASK_64
    names = ("PML5", "PML4", "PDPT", "PD", "PT")[5 - levels:]
    for depth, name in enumerate(names):
        shift = 12 + 9 * (levels - 1 - depth)
        entry = _entry(read, table + ((vaddr >> shift) & 0x1FF) * 8, 8, vaddr, name)
        if name in ("PDPT", "PD") and entry & PTE_PS:
            page_mask = (1 << shift) - 1  # 1 GiB or 2 MiB page
            return (entry & _ADDR_MASK_64 & ~page_mask) | (vaddr & page_mask)
        table = entry & _ADDR_MASK_64
    return table | (vaddr & 0xFFF)


def _walk_pae(read: PhysReader, vaddr: int, cr3: int) -> int:
    vaddr &= 0xFFFF_FFFF
    pdpte = _entry(read, (cr3 & 0xFFFF_FFE0) + ((vaddr >> 30) & 3) * 8, 8, vaddr, "PDPT")
    pde = _entry(read, (pdpte & _ADDR_MASK_64) + ((vaddr >> 21) & 0x1FF) * 8, 8, vaddr, "PD")
    if pde & PTE_PS:
        return (pde & _ADDR_MASK_64 & ~0x1F_FFFF) | (vaddr & 0x1F_FFFF)
    pte = _entry(read, (pde & _ADDR_MASK_64) + ((vaddr >> 12) & 0x1FF) * 8, 8, vaddr, "PT")
    return (pte & _ADDR_MASK_64) | (vaddr & 0xFFF)


def _walk_32(read: PhysReader, vaddr: int, cr3: int, cr4: int) -> int:
    vaddr &= 0xFFFF_FFFF
    pde = _entry(read, (cr3 & 0xFFFF_F000) + (vaddr >> 22) * 4, 4, vaddr, "PD")
    if pde & PTE_PS and cr4 & CR4_PSE:
        high = ((pde >> 13) & 0xFF) << 32  # PSE-36: bits 20:13 are address bits 39:32
        return high | (pde & 0xFFC0_0000) | (vaddr & 0x3F_FFFF)
    pte = _entry(read, (pde & 0xFFFF_F000) + ((vaddr >> 12) & 0x3FF) * 4, 4, vaddr, "PT")
    return (pte & 0xFFFF_F000) | (vaddr & 0xFFF)


def translate(read: PhysReader, paging: Paging, vaddr: int) -> int:
    """The guest-physical address of ``vaddr`` or :class:`PageFault`."""
    if not 0 <= vaddr < 1 << 64:
        raise PageFault(vaddr & ((1 << 64) - 1), "address out of range")
    mode = paging.mode
    if mode in ("real", "flat"):
        return vaddr
    if mode == "long4":
        return _walk_long(read, vaddr, paging.cr3, 4)
    if mode == "long5":
        return _walk_long(read, vaddr, paging.cr3, 5)
    if vaddr >> 32:
        raise PageFault(vaddr, "beyond 4 GiB without long mode")
    if mode == "pae":
        return _walk_pae(read, vaddr, paging.cr3)
    return _walk_32(read, vaddr, paging.cr3, paging.cr4)


def ranges(read: PhysReader, paging: Paging, vaddr: int, length: int) -> Iterator[tuple[int, int]]:
    """(physical address, length) pieces of a virtual range, one per page at most.

    Translation is lazy: a fault on a later page is raised only when reached.
    """
    while length > 0:
        chunk = min(length, PAGE_SIZE - (vaddr & 0xFFF))
        yield translate(read, paging, vaddr), chunk
        vaddr += chunk
        length -= chunk


# --- enumerating every mapping (monitor info mem / info tlb) -------------------------------

PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_NX = 1 << 63


@dataclass(frozen=True)
class Mapping:
    """One present leaf entry: ``size`` bytes at ``vaddr`` map to ``paddr``.

    ``pte`` is the leaf entry as stored; ``writable``/``user`` are the effective
    rights (ANDed over every level, as the MMU and QEMU's ``mem_info_*`` do)."""

    vaddr: int
    paddr: int
    size: int
    pte: int
    writable: bool
    user: bool


def _canonical(vaddr: int, bits: int) -> int:
    """Sign-extend a ``bits``-bit linear address to 64 bits (QEMU's addr_canonical)."""
    return vaddr | ((1 << 64) - (1 << bits)) if vaddr >> (bits - 1) & 1 else vaddr


def _leaf(vaddr: int, paddr: int, size: int, pte: int, rights: int) -> Mapping:
    return Mapping(vaddr, paddr, size, pte, bool(rights & PTE_W), bool(rights & PTE_U))


def mappings(read: PhysReader, paging: Paging) -> Iterator[Mapping]:
    """Every present mapping in ascending virtual order, in the vCPU's paging mode.

    Follows QEMU's target/i386/monitor.c (tlb_info_32/pae32/la48/la57 and
    mem_info_*): a not-present entry skips its range; a table outside RAM is
    skipped too (it cannot be read, the MMU would fault). Empty with paging off."""
    mode = paging.mode
    if mode in ("real", "flat"):
        return
    if mode == "32bit":
        yield from _maps_32(read, paging)
        return
    if mode == "pae":
        tables = [((paging.cr3 & 0xFFFF_FFE0) + i * 8, i) for i in range(4)]
        for gpa, i in tables:
            pdpte = _try(read, gpa, 8)
            if pdpte & PTE_P:
                # PAE PDPTEs carry no R/W or U/S bits: rights start at the PD.
                yield from _maps_table(read, pdpte & _ADDR_MASK_64, i << 30, ("PD", "PT"),
                                       PTE_W | PTE_U, 64)
        return
    levels = 5 if mode == "long5" else 4
    names = ("PML5", "PML4", "PDPT", "PD", "PT")[5 - levels:]
    yield from _maps_table(read, paging.cr3 & _ADDR_MASK_64, 0, names, PTE_W | PTE_U,
                           12 + 9 * levels)


def _try(read: PhysReader, gpa: int, size: int) -> int:
    try:
        return read(gpa, size)
    except Exception:  # noqa: BLE001 - a table outside RAM maps nothing we can show
        return 0


def _maps_table(read: PhysReader, table: int, base: int, names: tuple[str, ...], rights: int,
                bits: int) -> Iterator[Mapping]:
    name, rest = names[0], names[1:]
    shift = 12 + 9 * len(rest)
    try:
        entries = [read(table + 8 * i, 8) for i in range(512)]
    except Exception:  # noqa: BLE001
        return
    for i, e in enumerate(entries):
        if not e & PTE_P:
            continue
        va = base + (i << shift)
        r = rights & e
        if not rest or (name in ("PDPT", "PD") and e & PTE_PS):
            mask = (1 << shift) - 1
            yield _leaf(_canonical(va, bits), e & _ADDR_MASK_64 & ~mask, 1 << shift, e, r)
        else:
            yield from _maps_table(read, e & _ADDR_MASK_64, va, rest, r, bits)


def _maps_32(read: PhysReader, paging: Paging) -> Iterator[Mapping]:
    pd = paging.cr3 & 0xFFFF_F000
    for i in range(1024):
        pde = _try(read, pd + 4 * i, 4)
        if not pde & PTE_P:
            continue
        if pde & PTE_PS and paging.cr4 & CR4_PSE:
            high = ((pde >> 13) & 0xFF) << 32
            yield _leaf(i << 22, high | (pde & 0xFFC0_0000), 1 << 22, pde, pde)
            continue
        for j in range(1024):
            pte = _try(read, (pde & 0xFFFF_F000) + 4 * j, 4)
            if pte & PTE_P:
                yield _leaf((i << 22) | (j << 12), pte & 0xFFFF_F000, 1 << 12, pte, pde & pte)
