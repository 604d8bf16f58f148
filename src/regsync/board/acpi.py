"""ACPI tables as firmware leaves them for QEMU's pc machine, built as plain bytes.

Layout and fields follow the ACPI Specification 6.4: the RSDP (§5.2.5.3, found by
scanning 0xE0000-0xFFFFF on 16-byte boundaries, §5.2.5.1), the common table
header (§5.2.6), RSDT (§5.2.7), XSDT (§5.2.8), FADT (§5.2.9, revision 3 layout,
244 bytes), FACS (§5.2.10, 64-byte aligned, no checksum), a DSDT without AML
(§5.2.11.1) and the MADT (§5.2.12). Every checksum makes its bytes sum to 0.

The values are QEMU's pc (i440FX + PIIX4 PM) ones: PM I/O base 0x600 with
PM1a_EVT at 0x600, PM1a_CNT at 0x604, the PM timer at 0x608 (hw/acpi/piix4.c,
hw/i386/acpi-build.c), GPE0 at 0xafe0, SCI on IRQ 9; the MADT as
hw/i386/acpi-common.c acpi_build_madt writes it: one enabled Local APIC per vCPU
(ACPI id = APIC id = index), the IOAPIC (id 0, 0xfec00000, GSI base 0), the ISA
override IRQ0 -> GSI 2, level/active-high overrides for the PCI IRQs 5, 9, 10,
11, and a Local APIC NMI on LINT1 for all processors.
"""

from __future__ import annotations

import struct

RSDP_AREA = (0xE0000, 0x100000)
OEM_ID = b"RGSYNC"
OEM_TABLE_ID = b"REGSYNC "
CREATOR = b"RGSY"

PM_BASE = 0x600
PM1A_EVT, PM1A_CNT, PM_TMR = PM_BASE, PM_BASE + 4, PM_BASE + 8
GPE0_BLK, GPE0_LEN = 0xAFE0, 4
SCI_IRQ = 9
# No SMI command port: ACPI is always enabled (SCI_EN set), as QEMU's pc FADT says
# with SMM off (SMI_CMD, ACPI_ENABLE and ACPI_DISABLE all 0).
SMI_CMD, ACPI_ENABLE, ACPI_DISABLE = 0, 0, 0
RESET_PORT, RESET_VALUE = 0xCF9, 0x06
RTC_CENTURY = 0x32
PM_TIMER_HZ = 3_579_545            # §4.8.3.3: the power management timer's frequency
LAPIC_ADDR, IOAPIC_ADDR, IOAPIC_ID = 0xFEE00000, 0xFEC00000, 0
PCI_IRQS = (5, 9, 10, 11)          # QEMU's ACPI_BUILD_PCI_IRQS

# FADT flags (§5.2.9, table 5.10): WBINVD, PROC_C1, SLP_BUTTON, RTC_S4, RESET_REG_SUP,
# USE_PLATFORM_CLOCK. TMR_VAL_EXT (bit 8) stays clear: the PIIX4 timer is 24 bits.
FADT_FLAGS = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 15)
GAS_IO = 1                          # Generic Address Structure: system I/O space


def checksum(data: bytes) -> int:
    """The byte that makes data sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                       1, CREATOR, 1)
    raw = head + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def _gas(width: int, address: int, access: int = 0) -> bytes:
    return struct.pack("<BBBBQ", GAS_IO, width, 0, access, address)


def rsdp(rsdt: int, xsdt: int) -> bytes:
    """ACPI 2.0+ RSDP (36 bytes): checksum over the first 20, extended over all."""
    first = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, rsdt)
    first = first[:8] + bytes([checksum(first)]) + first[9:]
    full = first + struct.pack("<IQB3s", 36, xsdt, 0, bytes(3))
    return full[:32] + bytes([checksum(full)]) + full[33:]


def rsdt(tables: list[int]) -> bytes:
    return _table(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in tables))


def xsdt(tables: list[int]) -> bytes:
    return _table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in tables))


def facs() -> bytes:
    # signature, length, hardware signature, waking vector, global lock, flags,
    # X waking vector, version 2, reserved, OSPM flags, reserved.
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, bytes(3), 0, bytes(24))


def dsdt() -> bytes:
    return _table(b"DSDT", 1, b"")


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    """FADT revision 3 (244 bytes) with the 32-bit and the X_ (GAS) register blocks."""
    body = struct.pack(
        "<IIBBHIBBBB" "IIIIIIII" "BBBBBBBB" "HHHHBBBBB" "HBI",
        facs_addr, dsdt_addr, 0, 0, SCI_IRQ, SMI_CMD, ACPI_ENABLE, ACPI_DISABLE, 0, 0,
        PM1A_EVT, 0, PM1A_CNT, 0, 0, PM_TMR, GPE0_BLK, 0,
        4, 2, 0, 4, GPE0_LEN, 0, 0, 0,
        0x0FFF, 0x0FFF, 0, 0, 0, 0, 0, 0, RTC_CENTURY,
        0, 0, FADT_FLAGS)
    body += _gas(8, RESET_PORT) + struct.pack("<BHB", RESET_VALUE, 0, 0)
    body += struct.pack("<QQ", facs_addr, dsdt_addr)
    body += (_gas(32, PM1A_EVT) + _gas(0, 0) + _gas(16, PM1A_CNT) + _gas(0, 0) + _gas(0, 0)
             + _gas(32, PM_TMR) + _gas(GPE0_LEN * 8, GPE0_BLK) + _gas(0, 0))
    table = _table(b"FACP", 3, body)
    assert len(table) == 244, len(table)
    return table


def madt(apic_ids: list[int]) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)                        # PCAT_COMPAT: dual 8259s
    for uid, apic_id in enumerate(apic_ids):
        body += struct.pack("<BBBBI", 0, 8, uid, apic_id, 1)        # Local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)               # IRQ0 -> GSI 2
    for irq in PCI_IRQS:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, 0xD)     # level, active high
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)                 # NMI on LINT1, all CPUs
    return _table(b"APIC", 1, body)


def build(base: int, rsdp_addr: int, ncpus: int) -> dict[int, bytes]:
    """Every table placed from ``base`` up, and the RSDP at ``rsdp_addr``:
    {guest-physical address: bytes}, ready to copy into guest memory."""
    if rsdp_addr % 16 or not RSDP_AREA[0] <= rsdp_addr < RSDP_AREA[1] - 36:
        raise ValueError(f"RSDP at {rsdp_addr:#x}: must be 16-byte aligned in 0xE0000..0xFFFFF")
    placed: dict[int, bytes] = {}
    cursor = base

    def put(data: bytes, align: int = 16) -> int:
        nonlocal cursor
        cursor = (cursor + align - 1) & -align
        addr = cursor
        placed[addr] = data
        cursor += len(data)
        return addr

    facs_addr = put(facs(), 64)
    dsdt_addr = put(dsdt())
    tables = [put(fadt(facs_addr, dsdt_addr)), put(madt(list(range(ncpus))))]
    rsdt_addr = put(rsdt(tables))
    xsdt_addr = put(xsdt(tables))
    if cursor > rsdp_addr and base < rsdp_addr + 36:
        raise ValueError(f"ACPI tables ({base:#x}..{cursor:#x}) overlap the RSDP at {rsdp_addr:#x}")
    placed[rsdp_addr] = rsdp(rsdt_addr, xsdt_addr)
    return placed
