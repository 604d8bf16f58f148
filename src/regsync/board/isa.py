"""The pc machine's small ISA-side devices: the ACPI PM block with its timer,
CMOS/RTC, and QEMU's pc-testdev.

Each is modelled on the QEMU source named in its docstring. Devices take the
interrupt line as a callable ``irq(n, level)``; with an in-kernel irqchip that is
KVM_IRQ_LINE, which drives the PIC and the IOAPIC pin together.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..devices import VcpuPort
from . import acpi

IrqLine = Callable[[int, int], None]


class AcpiPm:
    """PIIX4 power management I/O block at 0x600 (QEMU hw/acpi/core.c, hw/acpi/piix4.c):
    PM1a_EVT (status, enable) at +0, PM1a_CNT at +4, the PM timer at +8.

    The timer (acpi_pm_tmr_get) counts at 3.579545 MHz from the host's monotonic
    clock, 24 bits wide as on PIIX4. Writing SLP_EN with SLP_TYP 0 (S5 in QEMU's
    DSDT) powers the machine off: ``on_poweroff()``.
    """
    name = "acpi-pm"
    SLP_EN = 1 << 13
    SCI_EN = 1

    def __init__(self, on_poweroff: Callable[[], None] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.t0 = clock()
        self.on_poweroff = on_poweroff
        self.sts = self.en = 0
        self.cnt = self.SCI_EN

    def timer(self) -> int:
        return ((self.clock() - self.t0) * acpi.PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFF

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        off = port - acpi.PM_BASE
        if acpi.PM_TMR - acpi.PM_BASE <= off < acpi.PM_TMR - acpi.PM_BASE + 4:
            return self.timer() >> (8 * (off - 8))
        regs = self.sts | (self.en << 16) | (self.cnt << 32)
        return (regs >> (8 * off)) & ((1 << (8 * size)) - 1)

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        off = port - acpi.PM_BASE
        if off in (0, 1):                    # status bits are write-1-to-clear
            self.sts &= ~(value << (8 * off)) & 0xFFFF
        elif off in (2, 3):
            self.en = (self.en & ~(0xFFFF << (8 * (off - 2))) | (value << (8 * (off - 2)))) & 0xFFFF
        elif off in (4, 5):
            value <<= 8 * (off - 4)
            self.cnt = (self.cnt & ~(((1 << (8 * size)) - 1) << (8 * (off - 4))) | value) & 0xFFFF
            if self.cnt & self.SLP_EN and (self.cnt >> 10) & 7 == 0 and self.on_poweroff:
                self.cnt &= ~self.SLP_EN
                self.on_poweroff()


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


class Cmos:
    """MC146818 RTC and CMOS memory at 0x70 (index, bit 7 = NMI mask) / 0x71 (data).

    Modelled on QEMU hw/rtc/mc146818rtc.c (register A 0x26, B 0x02: 24-hour BCD,
    D 0x80: valid RAM) with the clock read from the host at every access, so it
    runs in real time. The memory-size bytes are those of hw/i386/pc.c
    pc_cmos_init: 0x15/0x16 base memory (640 KiB), 0x17/0x18 and 0x30/0x31 KiB
    above 1 MiB (at most 65535), 0x34/0x35 64 KiB blocks above 16 MiB, 0x5f the
    number of CPUs minus one, 0x32 the century.
    """
    name = "cmos"
    REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
    B_24H, B_BINARY = 0x02, 0x04

    def __init__(self, ram_size: int, cpus: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[self.REG_A], self.nvram[self.REG_B], self.nvram[self.REG_D] = 0x26, 0x02, 0x80
        kib = ram_size >> 10
        self._set16(0x15, 640)
        ext = min(max(kib - 1024, 0), 0xFFFF)
        self._set16(0x17, ext)
        self._set16(0x30, ext)
        self._set16(0x34, min(max((ram_size - (16 << 20)) >> 16, 0), 0xFFFF))
        self.nvram[0x5F] = cpus - 1
        self._lock = threading.Lock()

    def _set16(self, index: int, value: int) -> None:
        self.nvram[index], self.nvram[index + 1] = value & 0xFF, value >> 8

    def _clock_register(self, index: int) -> int | None:
        t = time.gmtime(self.clock())
        values = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: (t.tm_wday + 1) % 7 + 1,
                  0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100,
                  acpi.RTC_CENTURY: t.tm_year // 100}
        if index not in values:
            return None
        v = values[index]
        return v if self.nvram[self.REG_B] & self.B_BINARY else _bcd(v)

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        with self._lock:
            if port == 0x70:
                self.index = value & 0x7F
            elif self.index not in (self.REG_C, self.REG_D):
                self.nvram[self.index] = value & 0xFF   # clock writes do not move the host's clock

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        with self._lock:
            if port == 0x70:
                return 0xFF
            clock = self._clock_register(self.index)
            return self.nvram[self.index] if clock is None else clock


class PcTestdev:
    """QEMU's pc-testdev (hw/misc/pc-testdev.c): a 32-bit register at 0xe0 (and its
    byte-wide alias at 0xe8), the flush-page port 0xe4 (a no-op here), and the 24
    IRQ-line ports 0x2000+n that set ISA IRQ n to the written value's truth.
    The 64 KiB scratch memory at 0xff000000 is :meth:`mmio`."""
    name = "pc-testdev"
    IOMEM_BASE, IOMEM_LEN = 0xFF000000, 0x10000

    def __init__(self, irq: IrqLine) -> None:
        self.irq = irq
        self.data = 0
        self.iomem = bytearray(self.IOMEM_LEN)

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        if 0x2000 <= port < 0x2018:
            self.irq(port - 0x2000, 1 if value else 0)
        elif 0xE0 <= port < 0xE4 or 0xE8 <= port < 0xEC:
            shift = (port & 3) * 8
            mask = ((1 << (8 * size)) - 1) << shift
            self.data = (self.data & ~mask | (value << shift) & mask) & 0xFFFFFFFF

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        if 0xE0 <= port < 0xE4 or 0xE8 <= port < 0xEC:
            return (self.data >> ((port & 3) * 8)) & ((1 << (8 * size)) - 1)
        return 0

    def mmio(self, addr: int, data: bytes | None, length: int) -> bytes | None:
        """Read (data None) or write the scratch area; None when addr is not ours."""
        off = addr - self.IOMEM_BASE
        if not 0 <= off <= self.IOMEM_LEN - length:
            return None
        if data is None:
            return bytes(self.iomem[off:off + length])
        self.iomem[off:off + length] = data
        return b""
