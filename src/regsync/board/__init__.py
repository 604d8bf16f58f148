"""The pc board: QEMU's pc machine as firmware leaves it for a multiboot kernel.

One door: ``Machine(board="pc")`` builds a :class:`PcBoard` (``m.board``), which
puts on the machine's port bus the devices such kernels expect at QEMU's
addresses — fw_cfg (0x510/0x511, DMA 0x514), the ACPI PM block and timer
(0x600..0x60b), CMOS/RTC (0x70/0x71), PCI
configuration space (0xcf8/0xcfc) with the i440FX host bridge, optionally
pc-testdev (0xe0, 0x2000+n, MMIO scratch at 0xff000000) — wires COM1 to IRQ 4,
and at every load writes the ACPI tables (RSDP in 0xE0000..0xFFFFF) and leaves
the in-kernel PIC programmed as SeaBIOS does (vector bases 0x08 and 0x70).

The multiboot information (:mod:`.multiboot`) does not need the board; the
conformance kernels that check all of this are in :mod:`.kernels`.
"""

from __future__ import annotations

from typing import Any

from . import acpi, multiboot
from .fwcfg import CTL_PORT as FW_CFG_PORT, DMA_PORT as FW_CFG_DMA_PORT, FwCfg
from .isa import AcpiPm, Cmos, PcTestdev
from .pci import ADDR_PORT as PCI_PORT, PciHost

ACPI_TABLES_ADDR = 0xE0000
RSDP_ADDR = 0xF0000
PIC_MASTER_BASE, PIC_SLAVE_BASE = 0x08, 0x70     # SeaBIOS: BIOS_HWIRQ0_VECTOR, BIOS_HWIRQ8_VECTOR
BOARDS = ("pc",)


class PcBoard:
    """The devices and firmware tables of QEMU's pc machine, attached to a Machine."""

    def __init__(self, machine: Any, *, testdev: bool = False,
                 reserved: list[tuple[int, int]] = ()) -> None:
        self.m = machine
        mem = machine.memory
        cpus = len(machine.vcpus)
        self.ram_size = mem.size
        self.reserved = list(reserved)       # e.g. KVM's identity map + TSS pages: never RAM
        self.fw_cfg = FwCfg.for_pc(mem, self.ram_size, cpus,
                                   [(0, self.ram_size, 1)] + [(a, n, 2) for a, n in self.reserved])
        self.pm = AcpiPm(on_poweroff=lambda: machine._finish(0))
        self.cmos = Cmos(self.ram_size, cpus)
        self.pci = PciHost()
        self.testdev = PcTestdev(self.irq) if testdev else None
        bus = machine.bus
        bus.register(self.fw_cfg, FW_CFG_PORT, 2)
        bus.register(self.fw_cfg, FW_CFG_DMA_PORT, 8)
        bus.register(self.pm, acpi.PM_BASE, 12)
        bus.register(self.cmos, 0x70, 2)
        bus.register(self.pci, PCI_PORT, 8)
        if self.testdev is not None:
            bus.register(self.testdev, 0xE0, 12)
            bus.register(self.testdev, 0x2000, 24)
            machine.mmio_handlers.append(self._testdev_mmio)
        if machine.irqchip:
            machine.serial.irq = lambda level: self.irq(machine.serial.IRQ, level)
            machine.vm.set_gsi_routing(qemu_gsi_routes())

    # --- interrupts --------------------------------------------------------------------
    def irq(self, line: int, level: int) -> None:
        """Set ISA IRQ ``line`` (GSI) to level: KVM_IRQ_LINE drives PIC and IOAPIC pins."""
        if self.m.irqchip:
            self.m.vm.irq_line(line, level)

    def _testdev_mmio(self, addr: int, data: bytes | None, length: int) -> bytes | None:
        assert self.testdev is not None
        return self.testdev.mmio(addr, data, length)

    def program_pic(self) -> None:
        """Leave the in-kernel 8259s as SeaBIOS does: initialised (ICW1-4 done, ICW4
        8086 mode) with vector bases 0x08/0x70 (SeaBIOS pic_setup), and the masks
        and edge/level register SeaBIOS leaves behind once its drivers have unmasked
        their lines (timer, keyboard, floppy, RTC, mouse, FPU, disk: IMR 0xb8/0x8e,
        ELCR 0x00/0x0c), as the irq conformance kernel reads them under QEMU 7.2 +
        SeaBIOS 1.16. KVM_GET_IRQCHIP / KVM_SET_IRQCHIP on chips 0 and 1."""
        from ..kvm import structs as ks
        for chip_id, base, imr, elcr in ((ks.KVM_IRQCHIP_PIC_MASTER, PIC_MASTER_BASE, 0xB8, 0x00),
                                         (ks.KVM_IRQCHIP_PIC_SLAVE, PIC_SLAVE_BASE, 0x8E, 0x0C)):
            chip = self.m.vm.get_irqchip(chip_id)
            pic = chip.chip.pic
            pic.irq_base, pic.imr, pic.init_state, pic.init4 = base, imr, 0, 1
            pic.irr = pic.isr = pic.last_irr = 0
            pic.elcr = elcr & pic.elcr_mask
            self.m.vm.set_irqchip(chip)

    # --- firmware tables ------------------------------------------------------------------
    def write_tables(self) -> None:
        """The state firmware leaves at every (re)load: ACPI tables in guest memory (RAM
        was cleared), the PIC programmed, COM1 as after a reset (QEMU serial_reset)."""
        for addr, data in acpi.build(ACPI_TABLES_ADDR, RSDP_ADDR, len(self.m.vcpus)).items():
            self.m.memory.write(addr, data)
        self.m.serial.reset()
        if self.m.irqchip:
            self.program_pic()

    def memory_map(self) -> list[tuple[int, int, int]]:
        return multiboot.memory_map(self.ram_size, self.reserved)


def qemu_gsi_routes() -> list[tuple[int, int, int]]:
    """(gsi, irqchip, pin) as QEMU's pc routes them (hw/i386/kvm/ioapic.c
    kvm_pc_setup_irq_routing): ISA IRQs 0-7 but 2 to the master PIC, 8-15 to the
    slave, and GSI 0 to IOAPIC pin 2 (the MADT's IRQ0 override), every other GSI
    but 2 to its own IOAPIC pin. KVM's default routing sends GSI 0 to pin 0,
    where a kernel following the MADT never looks for the PIT."""
    master, slave, ioapic = 0, 1, 2       # KVM_IRQCHIP_PIC_MASTER, _SLAVE, _IOAPIC
    routes = [(i, master, i) for i in range(8) if i != 2]
    routes += [(i, slave, i - 8) for i in range(8, 16)]
    routes += [(i, ioapic, 2 if i == 0 else i) for i in range(24) if i != 2]
    return routes


def make_board(name: str, machine: Any, **options: Any) -> PcBoard:
    if name != "pc":
        raise ValueError(f"board {name!r}: regsync knows {', '.join(BOARDS)}")
    return PcBoard(machine, **options)


__all__ = ["PcBoard", "make_board", "BOARDS", "acpi", "multiboot"]
