"""PCI configuration mechanism #1 at 0xcf8 (address) / 0xcfc..0xcff (data), with the
i440FX host bridge at 00:00.0 as QEMU's pc machine has it (hw/pci-host/i440fx.c,
hw/pci/pci_host.c pci_host_config_read/write: an access with the enable bit clear,
or to a function with no device, reads all ones and writes vanish)."""

from __future__ import annotations

import struct
import threading

from ..devices import VcpuPort

ADDR_PORT, DATA_PORT = 0xCF8, 0xCFC
ENABLE = 1 << 31


def host_bridge_config() -> bytearray:
    """00:00.0, Intel 82441FX (8086:1237) rev 2, class 0600 (host bridge), with QEMU's
    default subsystem ids (1af4:1100)."""
    cfg = bytearray(256)
    struct.pack_into("<HHHHBBBB", cfg, 0, 0x8086, 0x1237, 0x0006, 0x0280, 0x02, 0x00, 0x00, 0x06)
    struct.pack_into("<HH", cfg, 0x2C, 0x1AF4, 0x1100)
    return cfg


class PciHost:
    """The config-space ports; ``devices`` maps (bus, slot, function) to 256 bytes."""
    name = "pci-host"

    def __init__(self) -> None:
        self.address = 0
        self.devices: dict[tuple[int, int, int], bytearray] = {(0, 0, 0): host_bridge_config()}
        self._lock = threading.Lock()

    def _target(self) -> tuple[bytearray | None, int]:
        if not self.address & ENABLE:
            return None, 0
        bdf = ((self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 7)
        return self.devices.get(bdf), self.address & 0xFC

    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        with self._lock:
            if port == ADDR_PORT and size == 4:
                self.address = value & 0xFFFFFFFC | (value & ENABLE)
            elif DATA_PORT <= port < DATA_PORT + 4:
                cfg, reg = self._target()
                # The host bridge's identity and BARs are read-only; its writable
                # chipset registers (PAM, SMRAM) do nothing here.
                if cfg is not None and reg + (port & 3) >= 0x40:
                    off = reg + (port & 3)
                    cfg[off:off + size] = value.to_bytes(size, "little")[:256 - off]

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        with self._lock:
            if port == ADDR_PORT and size == 4:
                return self.address
            if DATA_PORT <= port < DATA_PORT + 4:
                cfg, reg = self._target()
                if cfg is None:
                    return (1 << (8 * size)) - 1
                off = reg + (port & 3)
                return int.from_bytes(cfg[off:off + size], "little")
            return (1 << (8 * size)) - 1
