"""Devices on a port bus. A device sees an exit through a narrow port: the vCPU
(for registers, through its cache), the port, the size and the data."""

from __future__ import annotations

from typing import Any, Protocol

from ..exits import IoExit


class VcpuPort(Protocol):
    """What a device may touch of a vCPU: its id and its registers (through the cache)."""
    id: int
    regs: Any


class PortDevice(Protocol):
    name: str

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None: ...
    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int: ...


class PortBus:
    """Maps port ranges to devices and answers I/O exits."""

    def __init__(self) -> None:
        self._ports: dict[int, PortDevice] = {}
        self.unhandled: dict[int, int] = {}       # port -> count (ignored accesses)

    def register(self, device: PortDevice, first: int, count: int = 1) -> None:
        for p in range(first, first + count):
            if p in self._ports:
                raise ValueError(f"port {p:#x} already belongs to {self._ports[p].name}")
            self._ports[p] = device

    def unregister(self, first: int, count: int = 1) -> None:
        """Take ports off the bus (e.g. a board that has no device there)."""
        for p in range(first, first + count):
            self._ports.pop(p, None)

    def dispatch(self, vcpu: VcpuPort, ex: IoExit) -> None:
        dev = self._ports.get(ex.port)
        if dev is None:
            # Like an ISA bus with nothing there: writes vanish, reads float high.
            self.unhandled[ex.port] = self.unhandled.get(ex.port, 0) + 1
            if ex.direction == "in":
                ex.respond(b"\xff" * (ex.size * ex.count))
            return
        size = ex.size
        if ex.direction == "out":
            data = ex.data
            for i in range(ex.count):        # the rep outs form: one element at a time
                dev.io_out(vcpu, ex.port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
        else:
            ex.respond(b"".join(dev.io_in(vcpu, ex.port, size).to_bytes(size, "little")
                                for _ in range(ex.count)))
