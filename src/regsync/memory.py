"""Guest memory: anonymous-mmap slots registered with KVM, accessed by guest-physical address."""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Protocol


class GuestMemoryError(ValueError):
    """An access outside every memory slot, or an image that does not fit."""


class _SlotRegistrar(Protocol):
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None: ...


@dataclass
class Slot:
    index: int
    gpa: int
    size: int
    mem: mmap.mmap
    host_addr: int

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """Slots of guest RAM. ``mem.write(0x1000, b"..."); mem.read_u64(0x1000)``"""

    def __init__(self, vm: _SlotRegistrar) -> None:
        self._vm = vm
        self.slots: list[Slot] = []

    def add_slot(self, gpa: int, size: int) -> Slot:
        if gpa % mmap.PAGESIZE or size <= 0 or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"slot at {gpa:#x} size {size:#x}: must be page aligned")
        for s in self.slots:
            if gpa < s.gpa + s.size and s.gpa < gpa + size:
                raise GuestMemoryError(f"slot at {gpa:#x} overlaps slot {s.index} at {s.gpa:#x}")
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        index = len(self.slots)
        try:
            self._vm.set_user_memory_region(index, gpa, size, host)
        except BaseException:
            mem.close()
            raise
        slot = Slot(index, gpa, size, mem, host)
        self.slots.append(slot)
        return slot

    @property
    def size(self) -> int:
        return sum(s.size for s in self.slots)

    def _find(self, gpa: int, length: int) -> Slot:
        for s in self.slots:
            if s.contains(gpa, length):
                return s
        raise GuestMemoryError(
            f"guest-physical range {gpa:#x}..{gpa + length:#x} is outside every memory slot")

    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length}")
        s = self._find(gpa, length)
        off = gpa - s.gpa
        return s.mem[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        if gpa < 0:
            raise GuestMemoryError(f"bad guest address {gpa:#x}")
        s = self._find(gpa, len(data))
        off = gpa - s.gpa
        s.mem[off:off + len(data)] = bytes(data)

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def clear(self) -> None:
        """Zero all RAM (used by reset with reload)."""
        for s in self.slots:
            s.mem[:] = bytes(s.size)

    def close(self) -> None:
        for s in self.slots:
            s.mem.close()
        self.slots.clear()
