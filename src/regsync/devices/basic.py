"""The small devices the bundled guests use: serial, debug exit, hypercalls, tick."""

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

LSR_THRE_TEMT = 0x60   # transmitter empty: the guest may always write


class Serial:
    """16550-like UART at 0x3f8..0x3ff: output only (THR), status always ready."""
    name = "serial"

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._buf = bytearray()
        self.lines: list[str] = []          # complete lines, for tests and the CLI
        self._lock = threading.Lock()

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        if port != SERIAL_PORT:
            return                           # IER/FCR/LCR/MCR writes: accepted, no effect
        with self._lock:
            b = value & 0xFF
            self._buf.append(b)
            if b == 0x0A:
                line = self._buf.decode("utf-8", "replace")
                self._buf.clear()
                self.lines.append(line.rstrip("\n"))
                try:
                    self.out.write(line)
                    self.out.flush()
                except (OSError, ValueError):
                    pass          # a closed stdout (| head) must not stop the guest

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        return LSR_THRE_TEMT if port == SERIAL_PORT + 5 else 0

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines) + self._buf.decode("utf-8", "replace")


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
