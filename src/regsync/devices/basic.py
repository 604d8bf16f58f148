"""The small devices the bundled guests use: serial (a 16550A), debug exit, hypercalls, tick."""

from __future__ import annotations

import sys
import threading
from typing import IO, Callable

from . import VcpuPort

SERIAL_PORT = 0x3F8
DEBUG_EXIT_PORT = 0xF4
HYPERCALL_PORT = 0x500
TICK_PORT = 0x501

HC_ADD, HC_WATCHDOG_ARM, HC_WATCHDOG_PET, HC_WATCHDOG_DISARM, HC_REPORT = 1, 2, 3, 4, 5

# 16550A registers (offsets from the base port) and bits, as QEMU's hw/char/serial.c
# names them. Output is instantaneous: the transmitter is always empty again after a write.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_FIFO = 0x01, 0x02, 0x04, 0x06, 0xC0
FCR_FE, FCR_RFR = 0x01, 0x02
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
LSR_THRE_TEMT = LSR_THRE | LSR_TEMT
MCR_OUT2, MCR_LOOP = 0x08, 0x10
MSR_CTS_DSR_DCD = 0xB0
RX_FIFO = 16


class Serial:
    """A 16550A UART at 0x3f8..0x3ff, modelled on QEMU's hw/char/serial.c
    (serial_ioport_write/read, serial_update_irq, serial_reset).

    Enough for polling and interrupt-driven drivers: the divisor latch behind
    LCR.DLAB (never transmitted), IER/IIR with the THR-empty and receive
    interrupts on ``irq`` (a callable taking the line level; COM1 is ISA IRQ 4),
    LSR, MSR, the scratch register and loopback (MCR bit 4: what is written is
    received, not transmitted). There is no input from the host.
    """
    name = "serial"
    IRQ = 4

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._buf = bytearray()
        self._drained = 0                   # bytes of _buf already written by drain()
        self.lines: list[str] = []          # complete lines, for tests and the CLI
        self._lock = threading.Lock()
        self.irq: Callable[[int], None] | None = None
        self._level = 0
        self.reset()

    def reset(self) -> None:
        """The state after a reset (QEMU serial_reset): 9600 baud, OUT2, transmitter empty."""
        self.divisor = 0x0C
        self.ier = self.lcr = self.fcr = self.scr = 0
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE_TEMT
        self.iir = IIR_NO_INT
        self.thr_ipending = False
        self.rx: list[int] = []
        self._set_irq(0)

    # --- the interrupt line ---------------------------------------------------------
    def _set_irq(self, level: int) -> None:
        if level != self._level:
            self._level = level
            if self.irq is not None:
                self.irq(level)

    def _update_irq(self) -> None:
        # Priority as in serial_update_irq: line status, received data, THR empty.
        ident = IIR_NO_INT
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            ident = IIR_RLSI
        elif self.ier & IER_RDI and self.lsr & LSR_DR:
            ident = IIR_RDI
        elif self.ier & IER_THRI and self.thr_ipending:
            ident = IIR_THRI
        self.iir = ident | (self.iir & 0xF0)
        self._set_irq(0 if ident == IIR_NO_INT else 1)

    # --- the port interface -----------------------------------------------------------
    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        with self._lock:
            self._write((port - SERIAL_PORT) & 7, value & 0xFF)

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        with self._lock:
            return self._read((port - SERIAL_PORT) & 7)

    def _write(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL and dlab:
            self.divisor = (self.divisor & 0xFF00) | value
        elif reg == RBR_THR_DLL:
            self._transmit(value)
        elif reg == IER_DLM and dlab:
            self.divisor = (self.divisor & 0x00FF) | (value << 8)
        elif reg == IER_DLM:
            self.ier = value & 0x0F
            if self.lsr & LSR_THRE:
                self.thr_ipending = True
            self._update_irq()
        elif reg == IIR_FCR:
            if value & FCR_RFR or (value ^ self.fcr) & FCR_FE:
                self.rx.clear()
                self.lsr &= ~LSR_DR
            self.iir = (self.iir & 0x0F) | (IIR_FIFO if value & FCR_FE else 0)
            self.fcr = value & 0xC9
            self._update_irq()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes are ignored, as on the chip.

    def _read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL and dlab:
            return self.divisor & 0xFF
        if reg == RBR_THR_DLL:
            value = self.rx.pop(0) if self.rx else 0
            if not self.rx:
                self.lsr &= ~LSR_DR
            self._update_irq()
            return value
        if reg == IER_DLM:
            return (self.divisor >> 8) if dlab else self.ier
        if reg == IIR_FCR:
            value = self.iir
            if value & 0x0F == IIR_THRI:          # reading IIR acknowledges THR empty
                self.thr_ipending = False
                self._update_irq()
            return value
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr
            if value & LSR_OE:
                self.lsr &= ~LSR_OE
                self._update_irq()
            return value
        if reg == MSR:
            if self.mcr & MCR_LOOP:               # modem outputs wired to the inputs
                return ((self.mcr & 0x0C) << 4) | ((self.mcr & 0x02) << 3) | ((self.mcr & 0x01) << 5)
            return MSR_CTS_DSR_DCD
        return self.scr

    def _transmit(self, b: int) -> None:
        # As in QEMU: the line drops while THR is full and rises again once the byte
        # is sent, so an edge-triggered PIC sees one interrupt per byte.
        self.thr_ipending = False
        self._update_irq()
        if self.mcr & MCR_LOOP:
            if len(self.rx) < RX_FIFO:
                self.rx.append(b)
            else:
                self.lsr |= LSR_OE
            self.lsr |= LSR_DR
        else:
            self._emit(b)
        self.thr_ipending = True                  # sent at once: THR is empty again
        self._update_irq()

    def _emit(self, b: int) -> None:
        self._buf.append(b)
        if b == 0x0A:
            line = self._buf.decode("utf-8", "replace")
            rest = self._buf[self._drained:].decode("utf-8", "replace")
            self._buf.clear()
            self._drained = 0
            self.lines.append(line.rstrip("\n"))
            self._write_out(rest)

    def _write_out(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass              # a closed stdout (| head) must not stop the guest

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines) + self._buf.decode("utf-8", "replace")

    def drain(self) -> None:
        """Write out an unfinished last line (the guest stopped mid-line): a terminal
        shows it at once under QEMU, so a runner must see it here too. The line
        stays unfinished in ``text``; later bytes continue it."""
        with self._lock:
            if len(self._buf) > self._drained:
                self._write_out(self._buf[self._drained:].decode("utf-8", "replace"))
                self._drained = len(self._buf)


class DebugExit:
    """Port 0xf4: the guest ends the VM with an exit status."""
    name = "debug-exit"

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self.on_exit = on_exit

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        self.on_exit(vcpu.id, value & 0xFF)

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        return 0


class Hypercalls:
    """Port 0x500: number in eax (the OUT's data), arguments in rdi/rsi/rdx, result in rax.

    Registers go through the vCPU's cache: with SYNC_REGS a call costs no
    register ioctl (rdi/rsi are in the kvm_run page, rax goes back through it).
    """
    name = "hypercall"

    def __init__(self) -> None:
        self.handlers: dict[int, Callable[[VcpuPort], int]] = {HC_ADD: self._add,
                                                               HC_REPORT: self._report}
        self.reports: list[tuple[int, int]] = []   # (vcpu id, value)
        self.calls = 0
        self.unknown: dict[int, int] = {}

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        self.calls += 1
        handler = self.handlers.get(value)
        regs = vcpu.regs
        if handler is None:
            self.unknown[value] = self.unknown.get(value, 0) + 1
            regs.rax = (1 << 64) - 1          # -1: no such hypercall
            return
        regs.rax = handler(vcpu) & ((1 << 64) - 1)

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        return 0

    @staticmethod
    def _add(vcpu: VcpuPort) -> int:
        r = vcpu.regs
        return r.rdi + r.rsi  # type: ignore[attr-defined]

    def _report(self, vcpu: VcpuPort) -> int:
        self.reports.append((vcpu.id, vcpu.regs.rdi))  # type: ignore[attr-defined]
        return 0


class Tick:
    """Port 0x501: an exit that means "look at me now"; counted."""
    name = "tick"

    def __init__(self) -> None:
        self.count = 0

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        self.count += 1

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        return 0
