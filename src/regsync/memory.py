"""Guest memory: anonymous-mmap slots registered with KVM, accessed by guest-physical address.

Dirty-page tracking (for the snapshot room's fast reset): ``track_dirty()``
turns on KVM's dirty log for every slot; ``collect_dirty()`` then returns the
page numbers written since the last collect -- by the guest (KVM's log) and by
regsync itself through ``write``/``clear`` (KVM logs only guest writes, so this
layer records its own).
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field
from typing import Protocol

from .kvm import KvmError
from .kvm import structs as ks

PAGE = mmap.PAGESIZE
PAGE_SHIFT = PAGE.bit_length() - 1


class GuestMemoryError(ValueError):
    """An access outside every memory slot, or an image that does not fit."""


class _SlotRegistrar(Protocol):
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None: ...


class _DirtyLogVm(_SlotRegistrar, Protocol):
    def check_extension(self, cap: str | int) -> int: ...
    def enable_cap(self, cap: str | int, *args: int, flags: int = 0) -> None: ...
    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None: ...
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap_addr: int) -> None: ...


@dataclass
class Slot:
    index: int
    gpa: int
    size: int
    mem: mmap.mmap
    host_addr: int
    # KVM's dirty bitmap for this slot (one bit per page), once tracking is on.
    bitmap: bytearray | None = field(default=None, repr=False)
    bitmap_addr: int = 0
    bitmap_words: memoryview | None = field(default=None, repr=False)

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """Slots of guest RAM. ``mem.write(0x1000, b"..."); mem.read_u64(0x1000)``"""

    def __init__(self, vm: _SlotRegistrar) -> None:
        self._vm = vm
        self.slots: list[Slot] = []
        # None: not tracking; "get" or "manual": how KVM's dirty log is read (track_dirty).
        self.dirty_mode: str | None = None
        self.user_dirty: set[int] = set()    # guest page numbers regsync itself wrote

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
        if self.dirty_mode is not None and len(data):
            self.user_dirty.update(range(gpa >> PAGE_SHIFT, ((gpa + len(data) - 1) >> PAGE_SHIFT) + 1))

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
            if self.dirty_mode is not None:
                self.user_dirty.update(range(s.gpa >> PAGE_SHIFT, (s.gpa + s.size) >> PAGE_SHIFT))

    # --- dirty pages ---------------------------------------------------------------
    def track_dirty(self, vm: _DirtyLogVm, mode: str = "get") -> str:
        """Turn on KVM's dirty log for every slot; returns the mode in use.

        "get": KVM_GET_DIRTY_LOG alone both reads and resets the log (it
        re-protects the pages it reports): one ioctl per slot and collect.
        "manual": KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 -- KVM_GET_DIRTY_LOG reads,
        KVM_CLEAR_DIRTY_LOG re-protects only the reported pages (api.rst,
        "KVM_CLEAR_DIRTY_LOG"); two ioctls, meant for large VMs that clear in
        chunks. Asked for where the host lacks the capability, "get" is used.
        The dirty ring (KVM_CAP_DIRTY_LOG_RING) is not used: it must be enabled
        before the vCPUs exist and costs the same one ioctl (KVM_RESET_DIRTY_RINGS).
        """
        if mode not in ("get", "manual"):
            raise ValueError(f"dirty log mode {mode!r}: 'get' or 'manual'")
        if self.dirty_mode is not None:
            return self.dirty_mode
        if mode == "manual":
            caps = vm.check_extension("MANUAL_DIRTY_LOG_PROTECT2")
            if caps & ks.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                try:
                    vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", ks.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                except KvmError:
                    mode = "get"
            else:
                mode = "get"
        for s in self.slots:
            pages = s.size >> PAGE_SHIFT
            s.bitmap = bytearray(((pages + 63) // 64) * 8)   # KVM writes whole u64 words
            s.bitmap_addr = ctypes.addressof(ctypes.c_char.from_buffer(s.bitmap))
            s.bitmap_words = memoryview(s.bitmap).cast("Q")
            vm.set_user_memory_region(s.index, s.gpa, s.size, s.host_addr,
                                      ks.KVM_MEM_LOG_DIRTY_PAGES)
        self._log_vm = vm
        self.dirty_mode = mode
        self.user_dirty.clear()
        return mode

    def collect_dirty(self) -> list[int]:
        """Guest page numbers (gpa >> 12) written since the last collect, sorted;
        both logs start afresh. One KVM_GET_DIRTY_LOG per slot ("manual": plus one
        KVM_CLEAR_DIRTY_LOG per slot that had dirty pages)."""
        if self.dirty_mode is None:
            raise RuntimeError("collect_dirty(): dirty tracking is off (track_dirty() first)")
        vm = self._log_vm
        pages = self.user_dirty
        self.user_dirty = set()
        for s in self.slots:
            assert s.bitmap is not None
            vm.get_dirty_log(s.index, s.bitmap_addr)
            bm, words = s.bitmap, s.bitmap_words
            end = len(bm.rstrip(b"\0"))                # the span of non-zero bytes, found in C
            if not end:
                continue
            start = len(bm) - len(bm.lstrip(b"\0"))
            base = s.gpa >> PAGE_SHIFT
            for i in range(start >> 3, (end + 7) >> 3):  # u64 words, as KVM writes them
                word = words[i]
                if word:
                    at = base + 64 * i
                    while word:
                        low = word & -word
                        pages.add(at + low.bit_length() - 1)
                        word ^= low
            if self.dirty_mode == "manual":
                vm.clear_dirty_log(s.index, 0, s.size >> PAGE_SHIFT, s.bitmap_addr)
        return sorted(pages)

    def close(self) -> None:
        for s in self.slots:
            s.mem.close()
        self.slots.clear()
