"""The VM: /dev/kvm, the VM fd, guest memory, vCPUs, guest loading.

    with Machine(mem_mb=64, smp=2) as m:
        m.load("hello")
        ex = m.vcpus[0].run()          # one entry into the guest, a typed exit

Threads, devices and the exit dispatch loop live in vmm.py, built on this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .arch.x86_64 import boot
from .guests import GUESTS, load_image, parse_header
from .kvm import System
from .memory import GuestMemory, GuestMemoryError, elf_segments, load_segments
from .vcpu import LEVELS, Vcpu
from .vmm import VmmMixin

TSS_ADDR = 0xFFFBD000          # three pages KVM needs below 4 GiB (VMX real-mode TSS)
IDENTITY_MAP_ADDR = 0xFFFBC000
MULTIBOOT_MAGIC = 0x2BADB002
MULTIBOOT_INFO = 0x600          # a minimal multiboot info (flags = mem_lower/upper)
BOOT_ARG = boot.BOOT_INFO + 0x10
COMPARISON_STRATEGIES = ("eager", "qemu2012", "qemu")


@dataclass(frozen=True)
class LoadedGuest:
    name: str
    entry: int
    mode: str            # "long", "protected" or "real"
    end: int             # first byte past the image (bss included)
    arg: int = 0         # the guest argument in the boot info
    addr: int = 0x100000


def _read_image(guest: str | os.PathLike[str]) -> bytes:
    """A bundled guest by name, or the bytes of an image file."""
    name = str(guest)
    if name in GUESTS:
        return load_image(name)
    path = Path(guest)
    if not path.is_file():
        known = ", ".join(sorted(GUESTS))
        raise FileNotFoundError(f"{name}: no such guest image (bundled guests: {known})")
    return path.read_bytes()


def _has_multiboot_magic(image: bytes) -> bool:
    head = image[:8192]
    return any(head[o:o + 4] == b"\x02\xb0\xad\x1b" for o in range(0, len(head) - 3, 4))


class Machine(VmmMixin):
    """Owns /dev/kvm, the VM and its memory; a context manager (close is idempotent).

    Threads, devices, run_on_cpu, pause/resume and reset come from VmmMixin.
    ``strategy`` picks the register sync ("regsync" or a comparison strategy);
    ``sync_regs=None`` uses KVM_CAP_SYNC_REGS where KVM has it.
    """

    def __init__(self, *, mem_mb: int = 64, smp: int = 1, irqchip: bool = True,
                 strategy: str = "regsync", sync_regs: bool | None = None,
                 serial_out: object = None, watchdog_action: str = "stop") -> None:
        if not 1 <= mem_mb <= 3072:
            raise ValueError(f"mem_mb={mem_mb}: must be 1..3072 (RAM sits below the 4 GiB hole)")
        if smp < 1:
            raise ValueError(f"smp={smp}: need at least one vCPU")
        self._init_vmm(serial_out, watchdog_action)
        self.kvm = System()
        self.closed = False   # from here on close() has something to release
        try:
            self.vm = self.kvm.create_vm()
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            self.irqchip = irqchip
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.memory = GuestMemory(self.vm)
            self.memory.add_slot(0, mem_mb << 20)
            self.strategy = strategy
            has_sync = bool(self.kvm.check_extension("SYNC_REGS"))
            if sync_regs is None:
                # The comparison strategies model VMMs that do not use SYNC_REGS.
                sync_regs = has_sync and strategy not in COMPARISON_STRATEGIES
            elif sync_regs and not has_sync:
                raise ValueError("sync_regs=True but this KVM lacks KVM_CAP_SYNC_REGS")
            self.sync_regs = sync_regs
            self.max_vcpus = self.kvm.check_extension("MAX_VCPUS") or \
                self.kvm.check_extension("NR_VCPUS")
            if smp > self.max_vcpus:
                raise ValueError(f"smp={smp}: this KVM allows at most {self.max_vcpus} vCPUs")
            self._cpuid = self.kvm.supported_cpuid()
            self.supported_msrs = set(self.kvm.msr_index_list())
            self.vcpus: list[Vcpu] = []
            self._power_on: dict[int, dict[str, int]] = {}
            for _ in range(smp):
                self.add_vcpu()
        except BaseException:
            self.close()
            raise
        self.guest: LoadedGuest | None = None

    # --- vCPUs -------------------------------------------------------------------------
    def add_vcpu(self) -> Vcpu:
        """Create the next vCPU (id = len(vcpus)) with KVM's supported CPUID."""
        vid = len(self.vcpus)
        handle = self.vm.create_vcpu(vid)
        try:
            handle.set_cpuid2(self._cpuid_for(vid))
            vcpu = Vcpu(handle, strategy=self.strategy, use_sync_regs=self.sync_regs,
                        supported_msrs=self.supported_msrs, has_lapic=self.irqchip)
        except BaseException:
            handle.close()
            raise
        # What reset() puts back: KVM's power-on values of the RESET level and the LAPIC.
        power_on = vcpu.regs.dump(LEVELS["RESET"] | vcpu.cache.catalog.group_mask("LAPIC"))
        # It includes MP_STATE: the BSP runnable, APs waiting for INIT/SIPI.
        self._power_on[vid] = {k: v for k, v in power_on.items() if v is not None}
        self.vcpus.append(vcpu)
        return vcpu

    def _cpuid_for(self, vid: int) -> object:
        buf = type(self._cpuid).from_buffer_copy(self._cpuid)
        for e in buf.entries[:buf.nent]:
            if e.function == 1:                       # initial APIC id
                e.ebx = (e.ebx & 0x00FFFFFF) | (vid << 24)
            elif e.function in (0xB, 0x1F):           # x2APIC id
                e.edx = vid
        return buf

    # --- guests ------------------------------------------------------------------------
    def load(self, guest: str | os.PathLike[str], *, arg: int = 0, mode: str = "auto",
             addr: int = 0x100000) -> LoadedGuest:
        """Load a bundled guest by name, or an ELF/multiboot/flat image by path, and put
        vCPU 0 at its entry (long mode when the image has a 64-bit entry).

        ``arg`` is the guest argument in the boot info (e.g. the hypercall count).
        For a flat image without a header, ``mode`` picks "long" (default),
        "protected" or "real", entering at ``addr``.
        """
        if mode not in ("auto", "long", "protected", "real"):
            raise ValueError(f"mode={mode!r}: one of auto, long, protected, real")
        name = str(guest)
        image = _read_image(guest)
        boot.write_boot_tables(self.memory, len(self.vcpus), self.memory.size)
        self.memory.write_u64(BOOT_ARG, arg)
        entry, entry_mode, end = self._place(image, mode, addr)
        loaded = LoadedGuest(name, entry, entry_mode, end, arg, addr)
        self._enter(loaded)
        self.guest = loaded
        return loaded

    def _place(self, image: bytes, mode: str, addr: int) -> tuple[int, str, int]:
        """Copy the image into guest memory: (entry, mode, end of image and bss)."""
        if image[:4] == b"\x7fELF":
            entry, segs = elf_segments(image)
            load_segments(self.memory, segs)
            end = max((s.gpa + s.memsz for s in segs), default=entry)
            return entry, "long" if mode == "auto" else mode, end
        # An image that carries a multiboot header must parse (a corrupt one is an
        # error that names the problem); one without is a flat binary at addr.
        if not _has_multiboot_magic(image):
            self.memory.write(addr, image)
            return addr, "long" if mode == "auto" else mode, addr + len(image)
        hdr = parse_header(image)
        self.memory.write(hdr.load_addr, image[:hdr.load_end - hdr.load_addr])
        if hdr.bss_end > hdr.load_end:
            self.memory.write(hdr.load_end, bytes(hdr.bss_end - hdr.load_end))
        if hdr.entry64 is not None and mode in ("auto", "long"):
            return hdr.entry64, "long", hdr.bss_end
        return hdr.entry32, "protected", hdr.bss_end

    def _enter(self, g: LoadedGuest) -> None:
        regs = self.vcpus[0].regs
        if g.mode == "long":
            state = boot.long_mode_state(g.entry)
        elif g.mode == "protected":
            # multiboot hand-off: EAX magic, EBX -> info with mem_lower/mem_upper.
            mem_upper_kb = max(0, (self.memory.size >> 10) - 1024)
            self.memory.write(MULTIBOOT_INFO, (1).to_bytes(4, "little") + (640).to_bytes(4, "little")
                              + mem_upper_kb.to_bytes(4, "little"))
            state = boot.protected_mode_state(g.entry, MULTIBOOT_MAGIC, MULTIBOOT_INFO)
        else:
            state = boot.real_mode_state(g.entry)
        for name, value in state.items():
            regs[name] = value

    def reload(self) -> None:
        """Zero RAM and load the same guest again (used by reset)."""
        if self.guest is None:
            raise RuntimeError("reload(): no guest was loaded")
        g = self.guest
        self.memory.clear()
        self.load(g.name, arg=g.arg, mode=g.mode, addr=g.addr)

    # --- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Close vCPUs, memory, the VM and /dev/kvm (idempotent; safe after a failed init)."""
        if self.closed:
            return
        self.closed = True
        self.shutdown_vmm()
        for v in getattr(self, "vcpus", ()):
            v.close()
        for part in (getattr(self, "memory", None), getattr(self, "vm", None)):
            if part is not None:
                part.close()
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Machine", "LoadedGuest", "GuestMemoryError"]
