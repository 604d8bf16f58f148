"""Page-table walks of regsync.gdb.pagewalk over synthetic guest memory (no KVM)."""

from __future__ import annotations

import pytest

from regsync.gdb.pagewalk import PageFault, Paging, ranges, translate

P, W, PS = 1, 2, 0x80
PG_PE = (1 << 31) | 1
LMA = (1 << 10) | (1 << 8)
PAE, PSE, LA57 = 1 << 5, 1 << 4, 1 << 12


class Mem:
    """Sparse physical memory with a bound, like GuestMemory (raises outside RAM)."""

    def __init__(self, size: int = 64 << 20) -> None:
        self.size = size
        self.data: dict[int, int] = {}

    def put(self, gpa: int, value: int, n: int = 8) -> None:
        for i, b in enumerate(value.to_bytes(n, "little")):
            self.data[gpa + i] = b

    def read(self, gpa: int, n: int) -> int:
        if gpa < 0 or gpa + n > self.size:
            raise ValueError(f"{gpa:#x} outside RAM")
        return int.from_bytes(bytes(self.data.get(gpa + i, 0) for i in range(n)), "little")


def long4(mem: Mem) -> Paging:
    """cr3=0x1000: PML4[0]->0x2000 PDPT; PDPT[0]->0x3000 PD; PD[0]->0x4000 PT
    (4 KiB pages), PD[1] a 2 MiB page at 0x600000, PDPT[1] a 1 GiB page at 1 GiB;
    PML4[256] (the upper half) -> the same PDPT."""
    mem.put(0x1000, 0x2000 | P | W)
    mem.put(0x1000 + 256 * 8, 0x2000 | P)
    mem.put(0x2000, 0x3000 | P | W)
    mem.put(0x2008, 0x4000_0000 | P | PS)
    mem.put(0x3000, 0x4000 | P)
    mem.put(0x3008, 0x60_0000 | P | PS | (1 << 63))  # NX must not leak into the address
    mem.put(0x4000 + 5 * 8, 0x9000 | P)               # 0x5000 -> 0x9000
    return Paging(cr0=PG_PE, cr3=0x1000, cr4=PAE, efer=LMA)


def test_long_mode_4k_2m_1g_pages() -> None:
    mem = Mem()
    pg = long4(mem)
    assert pg.mode == "long4"
    assert translate(mem.read, pg, 0x5123) == 0x9123
    assert translate(mem.read, pg, 0x20_0000 + 0x12345) == 0x60_0000 + 0x12345
    assert translate(mem.read, pg, 0x4000_0000 + 0x123456) == 0x4000_0000 + 0x123456
    # upper half: canonical sign-extended address through PML4[256]
    assert translate(mem.read, pg, 0xFFFF_8000_0000_5010) == 0x9010
    with pytest.raises(PageFault, match="not present"):
        translate(mem.read, pg, 0x6000)                 # PT entry 6 empty
    with pytest.raises(PageFault, match="canonical"):
        translate(mem.read, pg, 0x0000_8000_0000_0000)


def test_long_mode_table_outside_ram_faults() -> None:
    mem = Mem(size=1 << 20)
    mem.put(0x1000, 0x7000_0000 | P)                    # PDPT beyond RAM
    with pytest.raises(PageFault, match="outside RAM"):
        translate(mem.read, Paging(PG_PE, 0x1000, PAE, LMA), 0x1000)


def test_five_level() -> None:
    mem = Mem()
    mem.put(0x8000, 0x1000 | P)                         # PML5[0] -> the 4-level tree
    long4(mem)
    pg = Paging(PG_PE, 0x8000, PAE | LA57, LMA)
    assert pg.mode == "long5"
    assert translate(mem.read, pg, 0x5004) == 0x9004


def test_pae() -> None:
    mem = Mem()
    mem.put(0x1020 + 1 * 8, 0x2000 | P)                 # PDPTE[1] (cr3 is 32-byte aligned)
    mem.put(0x2000 + 3 * 8, 0x3000 | P)                 # PD[3] -> PT
    mem.put(0x2000 + 4 * 8, 0x80_0000 | P | PS)         # PD[4] -> 2 MiB page
    mem.put(0x3000 + 2 * 8, 0xA000 | P)
    pg = Paging(PG_PE, 0x1020, PAE, 0)
    assert pg.mode == "pae"
    base = 1 << 30
    assert translate(mem.read, pg, base + 3 * (2 << 20) + 2 * 4096 + 0x10) == 0xA010
    assert translate(mem.read, pg, base + 4 * (2 << 20) + 0x1234) == 0x80_1234
    with pytest.raises(PageFault):
        translate(mem.read, pg, 0x1000)                 # PDPTE[0] empty
    with pytest.raises(PageFault, match="4 GiB"):
        translate(mem.read, pg, 1 << 32)


def test_32bit_with_and_without_pse() -> None:
    mem = Mem()
    mem.put(0x1000 + 1 * 4, 0x2000 | P, 4)              # PD[1] -> PT
    mem.put(0x2000 + 3 * 4, 0x7000 | P, 4)              # PT[3]
    mem.put(0x1000 + 2 * 4, 0x0080_0000 | P | PS | (0x3 << 13), 4)  # 4 MiB, PSE-36 bits
    pg = Paging(PG_PE, 0x1000, PSE, 0)
    assert pg.mode == "32bit"
    assert translate(mem.read, pg, (1 << 22) + 3 * 4096 + 5) == 0x7005
    assert translate(mem.read, pg, (2 << 22) + 0x1234) == (3 << 32) | 0x80_1234
    # without cr4.PSE the PS bit is ignored: PD[2] points at a page table
    mem.put(0x80_6000, 0x5000 | P, 4)       # (its low flag bits 13-14 land in the base)
    assert translate(mem.read, Paging(PG_PE, 0x1000, 0, 0), 2 << 22) == 0x5000


def test_paging_off_and_real_mode_are_identity() -> None:
    mem = Mem()
    assert Paging(1, 0, 0, 0).mode == "flat"
    assert Paging(0, 0, 0, 0).mode == "real"
    assert translate(mem.read, Paging(1, 0x1000, 0, 0), 0xB8000) == 0xB8000
    assert translate(mem.read, Paging(0, 0, 0, 0), 0xFFFF0) == 0xFFFF0


def test_ranges_split_at_pages_and_fault_lazily() -> None:
    mem = Mem()
    pg = long4(mem)
    mem.put(0x4000 + 6 * 8, 0xC000 | P)                 # 0x6000 -> 0xC000
    assert list(ranges(mem.read, pg, 0x5FF0, 0x20)) == [(0x9FF0, 0x10), (0xC000, 0x10)]
    it = ranges(mem.read, pg, 0x6FF8, 0x10)             # 0x7000 is not mapped
    assert next(it) == (0xCFF8, 8)
    with pytest.raises(PageFault):
        next(it)


# --- every mapping (monitor info mem / info tlb) ------------------------------------------


def test_mappings_list_every_leaf_in_order_with_rights_anded_over_levels() -> None:
    from regsync.gdb.pagewalk import mappings
    mem = Mem()
    pg = long4(mem)
    mem.put(0x4000 + 6 * 8, 0xA000 | P | W | 4)     # 0x6000 -> 0xa000, writable, user
    got = [(m.vaddr, m.paddr, m.size, m.writable, m.user) for m in mappings(mem.read, pg)]
    upper = 0xFFFF_8000_0000_0000
    assert got == [
        (0x5000, 0x9000, 0x1000, False, False),        # PD[0] has no W: read-only below it
        (0x6000, 0xA000, 0x1000, False, False),        # W|U in the PTE alone do not count
        (0x20_0000, 0x60_0000, 0x20_0000, False, False),   # NX bit not in the address
        (0x4000_0000, 0x4000_0000, 0x4000_0000, False, False),
        (upper + 0x5000, 0x9000, 0x1000, False, False),    # canonical, sign-extended
        (upper + 0x6000, 0xA000, 0x1000, False, False),
        (upper + 0x20_0000, 0x60_0000, 0x20_0000, False, False),
        (upper + 0x4000_0000, 0x4000_0000, 0x4000_0000, False, False),
    ]
    nx = [m for m in mappings(mem.read, pg) if m.vaddr == 0x20_0000][0]
    assert nx.pte >> 63 == 1


def test_mappings_in_32bit_and_pae_modes_and_none_without_paging() -> None:
    from regsync.gdb.pagewalk import mappings
    mem = Mem()
    mem.put(0x1000, 0x40_0000 | P | W | PS, 4)          # 4 MiB page at 0
    mem.put(0x1004, 0x2000 | P | W | 4, 4)              # PD[1] -> PT at 0x2000
    mem.put(0x2000 + 3 * 4, 0x7000 | P | W | 4, 4)      # 0x403000 -> 0x7000, user, rw
    pg = Paging(cr0=PG_PE, cr3=0x1000, cr4=PSE, efer=0)
    got = [(m.vaddr, m.paddr, m.size, m.writable, m.user) for m in mappings(mem.read, pg)]
    assert got == [(0, 0x40_0000, 0x40_0000, True, False),
                   (0x40_3000, 0x7000, 0x1000, True, True)]
    mem = Mem()
    mem.put(0x1000 + 8, 0x3000 | P)                       # PDPTE 1: no rights bits in PAE
    mem.put(0x3000 + 2 * 8, 0x80_0000 | P | W | PS)       # 2 MiB page
    pae = Paging(cr0=PG_PE, cr3=0x1000, cr4=PAE, efer=0)
    got = [(m.vaddr, m.paddr, m.size, m.writable) for m in mappings(mem.read, pae)]
    assert got == [((1 << 30) + (2 << 21), 0x80_0000, 0x20_0000, True)]
    assert list(mappings(mem.read, Paging(cr0=1, cr3=0x1000, cr4=0, efer=0))) == []
