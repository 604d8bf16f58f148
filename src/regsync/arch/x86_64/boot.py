"""x86_64 boot state: identity-mapped long mode, 32-bit protected mode, or real mode.

Memory the VMM reserves below the guest image (guests link at 1 MiB):

    0x0500  boot info: u32 magic 'RSBI', u32 vCPU count, u64 memory size
    0x1000  GDT  (null, 0x08 code64, 0x10 data, 0x18 code32, 0x20 TSS)
    0x2000  PML4
    0x3000  PDPT
    0x4000  4 page directories of 2 MiB pages: identity map of 0..4 GiB
    0x9000  top of the default boot stack (grows down)
    0x8000  reserved for a guest's AP trampoline (SIPI vector 0x08)

The values are plain data returned as catalog-named registers, so the register
cache writes them like any other edit (and they are dirty until the first run).
"""

from __future__ import annotations

from typing import Protocol

BOOT_INFO = 0x500
BOOT_INFO_MAGIC = 0x49425352  # "RSBI"
GDT_ADDR = 0x1000
PML4_ADDR = 0x2000
PDPT_ADDR = 0x3000
PD_ADDR = 0x4000
BOOT_STACK_TOP = 0x9000
TSS_ADDR = 0x0  # TR must hold a valid busy TSS for VM entry; the guest never uses it.

CODE64_SEL, DATA_SEL, CODE32_SEL, TSS_SEL = 0x08, 0x10, 0x18, 0x20

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10

PTE_P, PTE_W, PTE_PS = 1, 2, 0x80


class _Writable(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return (
        (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
        | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56)
    ).to_bytes(8, "little")


def write_boot_tables(mem: _Writable, ncpus: int, mem_size: int) -> None:
    """GDT, page tables and boot info in guest memory."""
    gdt = (bytes(8)
           + _descriptor(0, 0xFFFFF, 0x9B, 0xA)    # 0x08 code64: P, S, exec/read, G, L
           + _descriptor(0, 0xFFFFF, 0x93, 0xC)    # 0x10 data: P, S, read/write, G, DB
           + _descriptor(0, 0xFFFFF, 0x9B, 0xC)    # 0x18 code32: G, DB
           + _descriptor(TSS_ADDR, 0x67, 0x8B, 0x0) + bytes(8))  # 0x20 TSS64 busy (16 bytes)
    mem.write(GDT_ADDR, gdt)
    mem.write(PML4_ADDR, (PDPT_ADDR | PTE_P | PTE_W).to_bytes(8, "little") + bytes(4088))
    mem.write(PDPT_ADDR, b"".join((PD_ADDR + i * 0x1000 | PTE_P | PTE_W).to_bytes(8, "little")
                                  for i in range(4)) + bytes(4096 - 32))
    mem.write(PD_ADDR, b"".join(((i << 21) | PTE_P | PTE_W | PTE_PS).to_bytes(8, "little")
                                for i in range(2048)))
    mem.write(BOOT_INFO, BOOT_INFO_MAGIC.to_bytes(4, "little") + ncpus.to_bytes(4, "little")
              + mem_size.to_bytes(8, "little"))


# Segment attributes in regsync's packed form (see catalog.SEG_ATTR_*):
# type | s<<4 | dpl<<5 | present<<7 | avl<<12 | l<<13 | db<<14 | g<<15 | unusable<<16
def seg_attr(type_: int, s: int = 1, dpl: int = 0, present: int = 1, avl: int = 0,
             l: int = 0, db: int = 0, g: int = 0, unusable: int = 0) -> int:
    return (type_ | s << 4 | dpl << 5 | present << 7 | avl << 12 | l << 13 | db << 14
            | g << 15 | unusable << 16)


def _flat(prefix: str, sel: int, attr: int, limit: int = 0xFFFFFFFF) -> dict[str, int]:
    return {f"{prefix}.selector": sel, f"{prefix}.base": 0, f"{prefix}.limit": limit,
            f"{prefix}.attr": attr}


def long_mode_state(entry: int, stack: int = BOOT_STACK_TOP) -> dict[str, int]:
    """Registers for 64-bit long mode at CPL0 with the tables of write_boot_tables."""
    data = seg_attr(3, db=1, g=1)
    regs = {"rip": entry, "rsp": stack, "rflags": 0x2,
            "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
            "cr3": PML4_ADDR, "cr4": CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            "efer": EFER_SCE | EFER_LME | EFER_LMA,
            "gdtr.base": GDT_ADDR, "gdtr.limit": 6 * 8 - 1, "idtr.base": 0, "idtr.limit": 0xFFFF}
    regs |= _flat("cs", CODE64_SEL, seg_attr(11, l=1, g=1))
    for seg in ("ds", "es", "fs", "gs", "ss"):
        regs |= _flat(seg, DATA_SEL, data)
    regs |= {"tr.selector": TSS_SEL, "tr.base": TSS_ADDR, "tr.limit": 0x67,
             "tr.attr": seg_attr(11, s=0)}
    regs |= {"ldtr.selector": 0, "ldtr.base": 0, "ldtr.limit": 0xFFFF,
             "ldtr.attr": seg_attr(2, s=0)}
    return regs


def protected_mode_state(entry: int, eax: int = 0, ebx: int = 0) -> dict[str, int]:
    """32-bit flat protected mode, paging off: the multiboot hand-off state."""
    regs = long_mode_state(entry)
    regs |= {"cr0": CR0_PE | CR0_ET | CR0_NE, "cr3": 0, "cr4": 0, "efer": 0,
             "rax": eax, "rbx": ebx}
    regs |= _flat("cs", CODE32_SEL, seg_attr(11, db=1, g=1))
    return regs


def real_mode_state(entry: int) -> dict[str, int]:
    """Real mode at a linear address: CS:IP = (entry & ~0xffff) >> 4 : entry & 0xffff."""
    seg = (entry & 0xF0000) >> 4
    regs: dict[str, int] = {"rip": entry & 0xFFFF, "rsp": 0x7000, "rflags": 0x2,
                            "cr0": CR0_ET, "cr3": 0, "cr4": 0, "efer": 0}
    regs |= {"cs.selector": seg, "cs.base": seg << 4, "cs.limit": 0xFFFF,
             "cs.attr": seg_attr(11)}
    for s in ("ds", "es", "fs", "gs", "ss"):
        regs |= {f"{s}.selector": 0, f"{s}.base": 0, f"{s}.limit": 0xFFFF, f"{s}.attr": seg_attr(3)}
    return regs
