"""The VM: /dev/kvm, the VM fd, guest memory, vCPUs, guest loading.

    with Machine(mem_mb=64, smp=2) as m:
        m.load("hello")
        ex = m.vcpus[0].run()          # one entry into the guest, a typed exit

Threads, devices and the exit dispatch loop live in vmm.py, built on this.
"""

from __future__ import annotations

import os
import sys
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from typing import Sequence

from . import loader
from .arch.x86_64 import boot
from .board import cpuid as cpu_model, multiboot
from .guests import GUESTS, load_image
from .kvm import System
from .loader import Image, ImageError
from .memory import GuestMemory, GuestMemoryError
from .strategies import STRATEGIES
from .vcpu import LEVELS, Vcpu
from .vmm import VmmMixin, interrupts_deferred

if TYPE_CHECKING:
    from .snapshot import Snapshot

TSS_ADDR = 0xFFFBD000          # three pages KVM needs below 4 GiB (VMX real-mode TSS)
IDENTITY_MAP_ADDR = 0xFFFBC000
MULTIBOOT_MAGIC = loader.MULTIBOOT_BOOT_MAGIC
MULTIBOOT_INFO = 0x600          # a minimal multiboot info (flags = mem_lower/upper)
BOOT_ARG = boot.BOOT_INFO + 0x10
COMPARISON_STRATEGIES = ("eager", "qemu2012", "qemu2013", "qemu")
MAX_MEM_MB = 3072               # RAM is one slot below the 4 GiB hole (TSS_ADDR and up)
# Guest-physical ranges regsync itself writes at load (boot info and BOOT_ARG at
# 0x500, MULTIBOOT_INFO at 0x600, GDT, page tables at 0x2000..0x8000, boot stack
# below 0x9000: arch/x86_64/boot.py): an image placed over them would be
# overwritten, or overwrite them. (start, end, what) for loader.check_placement.
BOOT_STRUCTURES: tuple[tuple[int, int, str], ...] = (
    (boot.BOOT_INFO, boot.BOOT_STACK_TOP,
     "boot info, multiboot info, GDT, page tables and boot stack"),
)
# xAPIC IDs are 8 bits and 0xff is the broadcast destination, so 255 vCPUs (IDs
# 0..254) is the most the in-kernel LAPIC can address one by one in xAPIC mode
# (Linux arch/x86/kvm/lapic.c, kvm_apic_match_physical_addr / APIC_BROADCAST);
# _cpuid_for() also puts the ID in CPUID.1:EBX[31:24], 8 bits. (x2APIC would lift
# this, but regsync's guests and the boot state use xAPIC.)
MAX_XAPIC_VCPUS = 255
MAX_IMAGE_BYTES = MAX_MEM_MB << 20


@dataclass(frozen=True)
class LoadedGuest:
    name: str
    entry: int
    mode: str            # "long", "protected" or "real"
    end: int             # first byte past the image (bss included)
    arg: int = 0         # the guest argument in the boot info
    addr: int = 0x100000
    image: Image | None = None   # the parsed image (segments, multiboot header ...)
    cmdline: str = ""            # multiboot: the command line after the image's path
    initrd: tuple[str, ...] = ()  # multiboot modules ("FILE [ARGS]")


def _read_image(guest: str | os.PathLike[str]) -> bytes:
    """A bundled guest by name, or the bytes of an image file (a regular file)."""
    name = str(guest)
    if name in GUESTS:
        return load_image(name)
    path = Path(guest)
    try:
        st = path.stat()
    except FileNotFoundError:
        known = ", ".join(sorted(GUESTS))
        raise FileNotFoundError(f"{name}: no such guest image (bundled guests: {known})") \
            from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name} is a directory, not a guest image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name} is not a regular file (a device, FIFO or socket): "
                         "a guest image is read from a file")
    if st.st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{name} is {st.st_size} bytes, larger than the largest guest RAM "
                         f"({MAX_MEM_MB} MiB)")
    return path.read_bytes()


def _check_int(name: str, value: object, lo: int, hi: int, why: str = "") -> int:
    """Argument validation before any syscall: TypeError/ValueError naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value}: must be {lo}..{hi}{why}")
    return value


class Machine(VmmMixin):
    """Owns /dev/kvm, the VM and its memory; a context manager (close is idempotent).

    Threads, devices, run_on_cpu, pause/resume and reset come from VmmMixin.
    ``strategy`` picks the register sync ("regsync" or a comparison strategy);
    ``sync_regs=None`` uses KVM_CAP_SYNC_REGS where KVM has it.
    """

    def __init__(self, *, mem_mb: int = 64, smp: int = 1, irqchip: bool = True,
                 strategy: str = "regsync", sync_regs: bool | None = None,
                 serial_out: object = None, watchdog_action: str = "stop",
                 board: str | None = None, testdev: bool = False, cpu: str | None = None) -> None:
        # A Ctrl-C while the machine is built is held until it is whole, then closes it:
        # raised inside threading's own code (the watchdog's Thread.start) it would leave
        # a lock released twice or held for ever, and a half-built machine unclosed.
        try:
            with interrupts_deferred():
                self._build(mem_mb, smp, irqchip, strategy, sync_regs, serial_out,
                            watchdog_action, board, testdev, cpu)
        except KeyboardInterrupt:
            if getattr(self, "_release", None) is not None:
                self.close()       # built: the interrupt came once it was whole
            raise

    def _build(self, mem_mb: int, smp: int, irqchip: bool, strategy: str,
               sync_regs: bool | None, serial_out: object, watchdog_action: str,
               board: str | None, testdev: bool, cpu: str | None) -> None:
        _check_int("mem_mb", mem_mb, 1, MAX_MEM_MB, " (RAM sits below the 4 GiB hole)")
        _check_int("smp", smp, 1, MAX_XAPIC_VCPUS, " (xAPIC IDs are 8 bits, 0xff is broadcast)")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: one of {', '.join(STRATEGIES)}")
        for flag, value in (("irqchip", irqchip), ("sync_regs", sync_regs)):
            if not isinstance(value, bool) and not (flag == "sync_regs" and value is None):
                raise TypeError(f"{flag}={value!r}: must be True or False")
        if cpu is not None:
            cpu_model.parse(cpu)        # a bad -cpu is refused before /dev/kvm is opened
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
            # vCPU ids are 0..smp-1; KVM refuses an id >= KVM_CAP_MAX_VCPU_ID (api.rst,
            # KVM_CREATE_VCPU), which defaults to KVM_CAP_MAX_VCPUS when unreported.
            max_id = self.kvm.check_extension("MAX_VCPU_ID") or self.max_vcpus
            if smp > max_id:
                raise ValueError(f"smp={smp}: this KVM allows vCPU ids below {max_id}")
            self._cpuid = self.kvm.supported_cpuid()
            if cpu is not None:         # QEMU's -cpu host,+feat,-feat (regsync.board.cpuid)
                self._cpuid = cpu_model.apply(
                    self._cpuid, cpu, lambda msg: print(f"regsync: warning: {msg}", file=sys.stderr))
            self.supported_msrs = set(self.kvm.msr_index_list())
            self.vcpus: list[Vcpu] = []
            self._power_on: dict[int, dict[str, int]] = {}
            self._power_on_lapic: dict[int, bytes] = {}
            for _ in range(smp):
                self.add_vcpu()
            self._release = _release_when_collected(self)
        except BaseException:
            self.close()
            raise
        self.guest: LoadedGuest | None = None
        # The pc board (QEMU's devices and firmware tables): regsync.board's one door.
        self.board = None
        if board is not None:
            from .board import make_board
            try:
                self.board = make_board(board, self, testdev=testdev,
                                        reserved=[(IDENTITY_MAP_ADDR, 0x4000)])
            except BaseException:
                self.close()
                raise

    # --- vCPUs -------------------------------------------------------------------------
    def add_vcpu(self) -> Vcpu:
        """Create the next vCPU (id = len(vcpus)) with KVM's supported CPUID."""
        vid = len(self.vcpus)
        if vid >= MAX_XAPIC_VCPUS:      # the next xAPIC ID would be 0xff, the broadcast ID
            raise ValueError(f"vCPU {vid}: at most {MAX_XAPIC_VCPUS} vCPUs (8-bit xAPIC IDs)")
        handle = self.vm.create_vcpu(vid)
        try:
            handle.set_cpuid2(self._cpuid_for(vid))
            vcpu = Vcpu(handle, strategy=self.strategy, use_sync_regs=self.sync_regs,
                        supported_msrs=self.supported_msrs, has_lapic=self.irqchip)
        except BaseException:
            handle.close()
            raise
        # What reset() puts back: KVM's power-on values of the RESET level (with
        # MP_STATE: the BSP runnable, APs waiting for INIT/SIPI), and the power-on
        # LAPIC page whole: a reset is a restore, and most LAPIC registers cannot be
        # edited as a guest write would (transport.LAPIC_EDITS).
        power_on = vcpu.regs.dump(LEVELS["RESET"])
        self._power_on[vid] = {k: v for k, v in power_on.items() if v is not None}
        if self.irqchip:
            self._power_on_lapic[vid] = vcpu.cache.export(
                vcpu.cache.catalog.group_mask("LAPIC"))["LAPIC"]
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
             addr: int = 0x100000, cmdline: str = "",
             initrd: Sequence[str] = ()) -> LoadedGuest:
        """Load a bundled guest by name, or an ELF/multiboot/flat image by path, and put
        vCPU 0 at its entry (long mode when the image has a 64-bit entry).

        ``arg`` is the guest argument in the boot info (e.g. the hypercall count).
        For a flat image without a header, ``mode`` picks "long" (default),
        "protected" or "real", entering at ``addr``. A multiboot kernel gets QEMU's
        information structure (regsync.board.multiboot): ``cmdline`` after the
        image's path, ``initrd`` as modules ("FILE [ARGS]" each).
        """
        _check_int("arg", arg, 0, (1 << 64) - 1, " (an unsigned 64-bit guest argument)")
        _check_int("addr", addr, 0, (1 << 32) - 1)
        name = str(guest)
        # The whole image is parsed and checked against RAM and regsync's own
        # structures before guest memory is touched (loader.py); a refused image
        # leaves the machine as it was.
        image = loader.parse_image(_read_image(guest), mode=mode, flat_addr=addr)
        loader.check_placement(image, self.ram_ranges(), BOOT_STRUCTURES)
        mb_info = None
        if image.mode == "protected":   # modules read and laid out before memory is touched
            mb_info = multiboot.plan(name, image.end, self.memory.size, cmdline, tuple(initrd),
                                     self.board.memory_map() if self.board else
                                     multiboot.memory_map(self.memory.size,
                                                          [(IDENTITY_MAP_ADDR, 0x4000)]))
        boot.write_boot_tables(self.memory, len(self.vcpus), self.memory.size)
        self.memory.write_u64(BOOT_ARG, arg)
        if self.board is not None:
            self.board.write_tables()
        self._place(image)
        loaded = LoadedGuest(name, image.entry, image.mode, image.end, arg, addr, image,
                             cmdline, tuple(initrd))
        if mb_info is not None:
            for at, blob in mb_info.blobs.items():
                self.memory.write(at, blob)
        self._enter(loaded, mb_info.info_addr if mb_info else 0)
        self.guest = loaded
        return loaded

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM as [start, end) guest-physical ranges, one per memory slot."""
        return [(s.gpa, s.gpa + s.size) for s in self.memory.slots]

    def _place(self, image: Image) -> None:
        """Copy a checked image into guest memory, zero-filling each segment's bss."""
        for seg in image.segments:
            self.memory.write(seg.gpa, seg.data)
            if seg.memsz > len(seg.data):
                self.memory.write(seg.gpa + len(seg.data), bytes(seg.memsz - len(seg.data)))

    def _enter(self, g: LoadedGuest, multiboot_info: int = 0) -> None:
        regs = self.vcpus[0].regs
        if g.mode == "long":
            state = boot.long_mode_state(g.entry)
        elif g.mode == "protected":
            # multiboot hand-off: EAX magic, EBX -> the information structure.
            state = boot.protected_mode_state(g.entry, MULTIBOOT_MAGIC, multiboot_info)
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
        self.load(g.name, arg=g.arg, mode=g.mode, addr=g.addr, cmdline=g.cmdline, initrd=g.initrd)

    # --- snapshots: thin doors into regsync.snapshot ---------------------------------------
    def snapshot(self) -> "Snapshot":
        """The whole state in memory (cheap: populated pages only); reset_to() goes back."""
        from .snapshot import take
        return take(self)

    def reset_to(self, snap: "Snapshot", *, assume_unchanged: Iterable[str] = ()) -> None:
        """Back to snap, writing only dirty pages and register groups that differ."""
        from .snapshot import reset_to
        reset_to(self, snap, assume_unchanged=assume_unchanged)

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the whole state to a snapshot file (atomically); returns its size."""
        from .snapshot import capture, write
        return write(path, capture(self))

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Put a snapshot file's state into this machine (same shape); the file is
        validated whole first, and a refusal leaves the machine untouched."""
        from .snapshot import apply, read
        apply(self, read(path).state)

    @classmethod
    def from_snapshot(cls, path: str | os.PathLike[str], **kwargs: Any) -> "Machine":
        """A new Machine in the saved state, its vCPUs not started (start() runs it)."""
        from .snapshot import SnapshotError, apply, read
        st = read(path).state
        if len(st.memory) != 1 or st.memory[0].gpa != 0 or st.mem_bytes % (1 << 20):
            raise SnapshotError(f"{path}: memory layout {[(s.gpa, s.size) for s in st.memory]} "
                                f"is not one this Machine builds (one slot at 0, whole MiB)")
        try:
            m = cls(mem_mb=st.mem_bytes >> 20, smp=st.smp, irqchip=st.irqchip, **kwargs)
        except ValueError as e:
            raise SnapshotError(f"{path}: this host cannot take the snapshot's machine: {e}") from None
        try:
            apply(m, st, fresh=True)
        except BaseException:
            m.close()
            raise
        return m

    # --- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPU threads, wait until every one has left KVM_RUN for good, then
        close vCPUs (unmapping kvm_run), memory, the VM and /dev/kvm.

        Idempotent; safe after a failed init, from any thread but this machine's
        vCPU threads (RuntimeError there), and against a Ctrl-C meanwhile (it is
        delivered once close is done). TimeoutError, with nothing released, if a
        vCPU thread does not stop. A Machine never closed is released when it is
        collected (running vCPU threads keep it alive until its guest stops).
        """
        self.refuse_on_vcpu_thread("close()")
        with interrupts_deferred(), self._close_lock:
            if self.closed:
                return
            self.shutdown_vmm()
            with self._direct_lock:        # no direct call on a threadless vCPU is running
                self.closed = True
                release = getattr(self, "_release", None)
                if release is not None:
                    release()              # the finaliser, run now (it runs only once)
                else:                      # __init__ failed part-way: what exists so far
                    _release_parts(getattr(self, "vcpus", []), getattr(self, "memory", None),
                                   getattr(self, "vm", None), self.kvm, self.watchdog)

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_parts(vcpus: list[Vcpu], memory: GuestMemory | None, vm: Any, kvm: System,
                   watchdog: Any) -> None:
    """Release what a Machine holds from the kernel, in dependency order. Holds no
    reference to the Machine, so it can be its finaliser; only ever called once
    every vCPU thread has ended (close() waits for them; a running thread keeps
    the Machine reachable, so the finaliser cannot run before)."""
    try:
        watchdog.close()
    except RuntimeError:
        pass                     # collected on the watchdog's own thread: it ends by itself
    for v in vcpus:
        v.close()
    for part in (memory, vm):
        if part is not None:
            part.close()
    kvm.close()


def _release_when_collected(m: Machine) -> weakref.finalize:
    """close()'s release step, also run if ``m`` is garbage-collected unclosed (a
    Machine that is dropped would otherwise keep its fds and mappings for the
    process's life). Not at interpreter exit: daemon vCPU threads may still be in
    KVM_RUN then, and the kernel frees everything with the process anyway."""
    release = weakref.finalize(m, _release_parts, m.vcpus, m.memory, m.vm, m.kvm, m.watchdog)
    release.atexit = False
    return release


__all__ = ["Machine", "LoadedGuest", "GuestMemoryError"]
