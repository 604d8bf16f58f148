"""QEMU's firmware configuration device (fw_cfg) on the pc machine's ports.

Follows QEMU docs/specs/fw_cfg.rst and hw/nvram/fw_cfg.c: a 16-bit selector at
0x510 picks an item and resets the offset (fw_cfg_select); each byte read from
0x511 returns the next byte of the item, 0 past its end or for an item that does
not exist (fw_cfg_data_read); data-port writes are ignored (QEMU >= 2.4). The DMA
interface (fw_cfg_dma_transfer): a big-endian 64-bit address register at 0x514
whose low half (0x518) triggers the transfer of the FWCfgDmaAccess at that
guest address; reading the register returns the signature "QEMU CFG".

The items are those QEMU's pc machine adds (hw/nvram/fw_cfg.c fw_cfg_common_init,
hw/i386/fw_cfg.c fw_cfg_arch_create): signature, id, uuid, RAM size, nographic,
boot CPUs, boot menu, max CPUs (the APIC id limit), the NUMA table, the IRQ0
override flag, and the file directory with ``etc/e820``.
"""

from __future__ import annotations

import struct
import threading
from typing import Protocol

from ..devices import VcpuPort

CTL_PORT, DATA_PORT, DMA_PORT = 0x510, 0x511, 0x514

# Keys (include/standard-headers/linux/qemu_fw_cfg.h, hw/i386/fw_cfg.h).
SIGNATURE, ID, UUID, RAM_SIZE, NOGRAPHIC, NB_CPUS = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
NUMA, BOOT_MENU, MAX_CPUS, FILE_DIR, FILE_FIRST = 0x0D, 0x0E, 0x0F, 0x19, 0x20
ARCH_LOCAL = 0x8000
IRQ0_OVERRIDE = ARCH_LOCAL + 2
ENTRY_MASK = 0x3FFF | ARCH_LOCAL      # bit 14 (the old write channel) is ignored

ID_TRADITIONAL, ID_DMA = 0x1, 0x2
DMA_SIGNATURE = b"QEMU CFG"
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10

E820_RAM, E820_RESERVED = 1, 2


class GuestRam(Protocol):
    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...


def e820_entries(entries: list[tuple[int, int, int]]) -> bytes:
    """``etc/e820``: packed (u64 address, u64 length, u32 type) little-endian."""
    return b"".join(struct.pack("<QQI", a, n, t) for a, n, t in entries)


class FwCfg:
    """The fw_cfg device: ``FwCfg(memory).add(key, data)``, ``add_file(name, data)``."""
    name = "fw_cfg"

    def __init__(self, memory: GuestRam, dma: bool = True) -> None:
        self.memory = memory
        self.items: dict[int, bytes] = {}
        self.files: list[tuple[str, int]] = []        # (name, key)
        self.dma = dma
        self._key = 0
        self._offset = 0
        self._dma_addr = bytearray(8)
        self._lock = threading.Lock()
        self.add(SIGNATURE, b"QEMU")
        self.add(ID, struct.pack("<I", ID_TRADITIONAL | (ID_DMA if dma else 0)))
        self._rebuild_dir()

    @classmethod
    def for_pc(cls, memory: GuestRam, ram_size: int, cpus: int,
               e820: list[tuple[int, int, int]]) -> "FwCfg":
        """The items QEMU's pc machine answers (hw/i386/fw_cfg.c fw_cfg_arch_create)."""
        fw = cls(memory)
        apic_id_limit = cpus                  # APIC ids 0..cpus-1 (one thread per core)
        fw.add(UUID, bytes(16))
        fw.add(RAM_SIZE, struct.pack("<Q", ram_size))
        fw.add(NOGRAPHIC, struct.pack("<H", 0))
        fw.add(NB_CPUS, struct.pack("<H", cpus))
        fw.add(BOOT_MENU, struct.pack("<H", 0))
        fw.add(MAX_CPUS, struct.pack("<H", apic_id_limit))
        fw.add(NUMA, bytes(8 * (1 + apic_id_limit)))   # no NUMA nodes
        fw.add(IRQ0_OVERRIDE, struct.pack("<I", 1))
        fw.add_file("etc/e820", e820_entries(e820))
        return fw

    # --- items ---------------------------------------------------------------------------
    def add(self, key: int, data: bytes) -> None:
        if not 0 <= key <= 0xFFFF or key & 0x4000:
            raise ValueError(f"fw_cfg key {key:#x}: outside 0..0x3fff / 0x8000..0xbfff")
        self.items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named item at the next free key >= 0x20 and list it in the directory."""
        raw = name.encode("ascii")
        if not raw or len(raw) > 55:
            raise ValueError(f"fw_cfg file name {name!r}: 1..55 ASCII characters")
        key = FILE_FIRST + len(self.files)
        self.add(key, data)
        self.files.append((name, key))
        self._rebuild_dir()
        return key

    def _rebuild_dir(self) -> None:
        # FWCfgFiles: u32 count, then 64-byte entries, all big-endian (fw_cfg.rst).
        entries = sorted(self.files)          # QEMU keeps the directory sorted by name
        self.items[FILE_DIR] = struct.pack(">I", len(entries)) + b"".join(
            struct.pack(">IHH56s", len(self.items[key]), key, 0, name.encode()) for name, key in entries)

    # --- the port interface ------------------------------------------------------------
    def io_out(self, vcpu: VcpuPort, port: int, size: int, value: int) -> None:
        with self._lock:
            if port == CTL_PORT and size == 2:
                self._select(value)
            elif self.dma and DMA_PORT <= port < DMA_PORT + 8:
                off = port - DMA_PORT
                self._dma_addr[off:off + size] = value.to_bytes(size, "little")[:8 - off]
                if off == 4 and size == 4:    # a write to the low half triggers the transfer
                    addr = int.from_bytes(self._dma_addr, "big")
                    self._dma_addr[:] = bytes(8)
                    self._dma_transfer(addr)
            # Data-port writes are ignored (QEMU >= 2.4), as are odd-sized selector writes.

    def io_in(self, vcpu: VcpuPort, port: int, size: int) -> int:
        with self._lock:
            if port == DATA_PORT or (port == CTL_PORT and size == 2):
                return int.from_bytes(self._read(size), "little")
            if self.dma and DMA_PORT <= port < DMA_PORT + 8:
                off = port - DMA_PORT
                return int.from_bytes(DMA_SIGNATURE[off:off + size].ljust(size, b"\0"), "little")
            return 0

    def _select(self, key: int) -> None:
        self._key = key & ENTRY_MASK
        self._offset = 0

    def _item(self) -> bytes:
        return self.items.get(self._key, b"")

    def _read(self, n: int) -> bytes:
        data = self._item()[self._offset:self._offset + n]
        self._offset += n
        return data.ljust(n, b"\0")           # past the end (or no item): zeros

    def _dma_transfer(self, addr: int) -> None:
        # FWCfgDmaAccess: u32 control, u32 length, u64 address, big-endian.
        try:
            control, length, target = struct.unpack(">IIQ", self.memory.read(addr, 16))
        except ValueError:
            return                            # not in RAM: nothing to report it to
        if control & DMA_SELECT:
            self._select(control >> 16)
        status = 0
        try:
            if control & DMA_READ:
                self.memory.write(target, self._read(length))
            elif control & DMA_WRITE:
                status = DMA_ERROR            # every item here is read-only
            elif control & DMA_SKIP:
                self._offset += length
        except ValueError:
            status = DMA_ERROR                # the buffer is outside guest RAM
        self.memory.write(addr, struct.pack(">I", status))
