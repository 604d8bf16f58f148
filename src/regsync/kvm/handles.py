"""One thin handle per kernel object: System (/dev/kvm), Vm, Vcpu.

Handles return the kernel's structs as they are; policy (caching, ordering,
boot state) lives above. Each owns its fd, closes it once, and is a context
manager. Every call goes through syscall.ioctl, the counting choke point.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any, Iterable

from . import structs as s
from .ioctls import BY_NAME, CAPS
from .syscall import Counters, KvmError, KvmUnavailable, MsrError, _libc_ioctl, ioctl

_OP = BY_NAME
_EINTR, _EAGAIN = errno.EINTR, errno.EAGAIN
_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
_libc_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc_mmap.restype = ctypes.c_void_p
_libc_munmap = _libc.munmap
_libc_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


class _Handle:
    obj = "fd"

    def __init__(self, fd: int, counters: Counters) -> None:
        self.fd = fd
        self.counters = counters

    def _io(self, name: str, arg: Any = 0) -> int:
        if self.fd < 0:
            raise ValueError(f"{name}: {self.obj} is closed")
        return ioctl(self.fd, self.obj, _OP[name], arg, self.counters)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class System(_Handle):
    """/dev/kvm.  ``with System() as kvm: kvm.check_extension("SYNC_REGS")``"""
    obj = "/dev/kvm"

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        super().__init__(fd, Counters())
        version = self._io("KVM_GET_API_VERSION")
        if version != 12:
            self.close()
            raise KvmUnavailable(f"{path}: KVM API version {version}, expected 12")

    def check_extension(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION; 0 when the capability is absent."""
        return self._io("KVM_CHECK_EXTENSION", CAPS[cap] if isinstance(cap, str) else cap)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to map for kvm_run (and what follows it)."""
        return self._io("KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> Any:
        """KVM_GET_SUPPORTED_CPUID, grown until it fits (E2BIG)."""
        while True:
            buf = s.cpuid_buffer(max_entries)
            try:
                self._io("KVM_GET_SUPPORTED_CPUID", buf)
                return buf
            except KvmError as e:
                if e.errno != 7 or max_entries > 4096:  # E2BIG
                    raise
                max_entries *= 2

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        probe = s.msr_list_buffer(0)
        try:
            self._io("KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as e:
            if e.errno != 7:
                raise
        buf = s.msr_list_buffer(probe.nmsrs)
        self._io("KVM_GET_MSR_INDEX_LIST", buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> "Vm":
        """KVM_CREATE_VM (default machine type)."""
        return Vm(self._io("KVM_CREATE_VM", 0), self)


class Vm(_Handle):
    """A VM fd: memory slots, vCPUs, irqchip/PIT, TSS and identity-map addresses."""
    obj = "VM"

    def __init__(self, fd: int, system: System) -> None:
        super().__init__(fd, Counters())
        self.system = system

    def check_extension(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: the answer for this VM (XSAVE2's size)."""
        return self._io("KVM_VM_CHECK_EXTENSION", CAPS[cap] if isinstance(cap, str) else cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (size 0 deletes the slot)."""
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, userspace_addr)
        self._io("KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages below 4 GiB KVM may use (VMX real mode)."""
        self._io("KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map (VMX)."""
        self._io("KVM_SET_IDENTITY_MAP_ADDR", ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and a LAPIC per vCPU (before vCPUs)."""
        self._io("KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254."""
        self._io("KVM_CREATE_PIT2", s.kvm_pit_config(flags))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive a GSI of the in-kernel irqchip."""
        self._io("KVM_IRQ_LINE", s.kvm_irq_level(irq, level))

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """KVM_SET_GSI_ROUTING: the whole table, (gsi, irqchip, pin) per entry; it
        replaces KVM's default routing. ``vm.set_gsi_routing([(0, 2, 2)])``"""
        self._io("KVM_SET_GSI_ROUTING", s.irq_routing_buffer(routes))

    def enable_cap(self, cap: str | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (e.g. MANUAL_DIRTY_LOG_PROTECT2 with its mode bits)."""
        c = s.kvm_enable_cap()
        c.cap, c.flags = (CAPS[cap] if isinstance(cap, str) else cap), flags
        for i, a in enumerate(args):
            c.args[i] = a
        self._io("KVM_ENABLE_CAP", c)

    # VM-wide state (snapshots). Each getter returns the kernel struct as it is.
    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """KVM_GET_IRQCHIP: PIC master (0), PIC slave (1) or IOAPIC (2)."""
        chip = s.kvm_irqchip()
        chip.chip_id = chip_id
        self._io("KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP (chip.chip_id says which)."""
        self._io("KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        """KVM_GET_PIT2: the in-kernel i8254's three channels and flags."""
        st = s.kvm_pit_state2()
        self._io("KVM_GET_PIT2", st)
        return st

    def set_pit2(self, st: s.kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        self._io("KVM_SET_PIT2", st)

    def get_clock(self) -> s.kvm_clock_data:
        """KVM_GET_CLOCK: the VM's kvmclock (ns) and how it was read."""
        c = s.kvm_clock_data()
        self._io("KVM_GET_CLOCK", c)
        return c

    def set_clock(self, c: s.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        self._io("KVM_SET_CLOCK", c)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """KVM_GET_DIRTY_LOG into the caller's bitmap (one bit per page of the slot).
        Without manual protection KVM also clears the log and re-protects the pages."""
        self._io("KVM_GET_DIRTY_LOG", s.kvm_dirty_log(slot, 0, bitmap_addr))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        """KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): re-protect the pages
        whose bits are set, from first_page (a multiple of 64) for num_pages."""
        self._io("KVM_CLEAR_DIRTY_LOG",
                 s.kvm_clear_dirty_log(slot, num_pages, first_page, bitmap_addr))

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        """KVM_CREATE_VCPU, then map its kvm_run page (the fd is closed if that fails)."""
        fd = self._io("KVM_CREATE_VCPU", vcpu_id)
        try:
            vcpu = Vcpu(fd, vcpu_id, self.system.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        vcpu.xsave2_size = self.check_extension("XSAVE2") or None
        return vcpu


class Vcpu(_Handle):
    """A vCPU fd and its mmap'd kvm_run page.

    Each ``get_X(into=None)`` wraps KVM_GET_X and returns the kernel struct (filling
    ``into`` when given); each ``set_X(struct)`` wraps KVM_SET_X. All raise
    KvmError naming the ioctl, the vCPU and errno.

        regs = vcpu.get_regs(); regs.rax = 1; vcpu.set_regs(regs)
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd, Counters())
        self.id = vcpu_id
        self.obj = f"vCPU {vcpu_id}"
        # libc mmap rather than mmap.mmap: the kvm_run view must not pin a Python
        # buffer export, or the page could never be unmapped while views exist.
        addr = _libc_mmap(None, mmap_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise KvmError("mmap(kvm_run)", f"vCPU {vcpu_id}", ctypes.get_errno())
        self._map_size = mmap_size
        self.run_page_addr: int = addr
        self.run_page: s.kvm_run = s.kvm_run.from_address(addr)
        self._run_op = _OP["KVM_RUN"]
        # Hot path: the request number once (Ioctl.number computes it from the table),
        # and KVM_RUN counted and issued in run() below, its choke point (syscall.py).
        self._run_nr = self._run_op.number
        # Set by the owner from the VM's KVM_CAP_XSAVE2; None means plain KVM_GET_XSAVE.
        self.xsave2_size: int | None = None

    def close(self) -> None:
        """Unmap kvm_run and close the fd. Views of the page must not be used after this."""
        if self.fd >= 0:
            _libc_munmap(self.run_page_addr, self._map_size)
        super().close()

    def set_signal_mask(self, blocked: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN (the
        caller's mask is put back when KVM_RUN returns); None turns the override off.

            vcpu.set_signal_mask(signal.pthread_sigmask(signal.SIG_BLOCK, ()) - {SIGUSR1})
        """
        self._io("KVM_SET_SIGNAL_MASK", 0 if blocked is None else s.signal_mask_buffer(blocked))

    def run(self) -> int:
        """KVM_RUN. Returns 0, or -EINTR (signal, immediate_exit) or -EAGAIN (INIT, no SIPI yet).

        The choke point of KVM_RUN: counted, errno kept, the ioctl named in errors, as
        syscall.ioctl does for the others. EINTR and EAGAIN come back as values (a
        kicked vCPU must see its inbox; fcntl.ioctl would retry EINTR under PEP 475).
        """
        fd = self.fd
        if fd < 0:
            raise ValueError(f"KVM_RUN: {self.obj} is closed")
        self.counters["KVM_RUN"] += 1
        ret = _libc_ioctl(fd, self._run_nr, 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (_EINTR, _EAGAIN):
                return -err
            raise KvmError("KVM_RUN", self.obj, err)
        return ret

    # Each pair is one kernel transfer. A getter fills ``into`` when given (the
    # cache reuses its buffers, including the sync area of the kvm_run page).
    def get_regs(self, into: s.kvm_regs | None = None) -> s.kvm_regs:
        r = s.kvm_regs() if into is None else into
        self._io("KVM_GET_REGS", r)
        return r

    def set_regs(self, r: s.kvm_regs) -> None:
        self._io("KVM_SET_REGS", r)

    def get_sregs(self, into: s.kvm_sregs | None = None) -> s.kvm_sregs:
        r = s.kvm_sregs() if into is None else into
        self._io("KVM_GET_SREGS", r)
        return r

    def set_sregs(self, r: s.kvm_sregs) -> None:
        self._io("KVM_SET_SREGS", r)

    def get_sregs2(self, into: s.kvm_sregs2 | None = None) -> s.kvm_sregs2:
        r = s.kvm_sregs2() if into is None else into
        self._io("KVM_GET_SREGS2", r)
        return r

    def set_sregs2(self, r: s.kvm_sregs2) -> None:
        self._io("KVM_SET_SREGS2", r)

    def get_fpu(self, into: s.kvm_fpu | None = None) -> s.kvm_fpu:
        r = s.kvm_fpu() if into is None else into
        self._io("KVM_GET_FPU", r)
        return r

    def set_fpu(self, r: s.kvm_fpu) -> None:
        self._io("KVM_SET_FPU", r)

    def get_xsave(self, into: bytearray | None = None) -> bytearray:
        """KVM_GET_XSAVE2 sized by KVM_CAP_XSAVE2 when the VM has it, else KVM_GET_XSAVE."""
        buf = into if into is not None else bytearray(self.xsave2_size or 4096)
        self._io("KVM_GET_XSAVE2" if self.xsave2_size else "KVM_GET_XSAVE", buf)
        return buf

    def set_xsave(self, data: bytes | bytearray) -> None:
        """KVM_SET_XSAVE; the kernel reads as many bytes as KVM_GET_XSAVE2 wrote."""
        buf = bytearray(data).ljust(self.xsave2_size or 4096, b"\0")
        self._io("KVM_SET_XSAVE", buf)

    def get_xcrs(self, into: s.kvm_xcrs | None = None) -> s.kvm_xcrs:
        r = s.kvm_xcrs() if into is None else into
        self._io("KVM_GET_XCRS", r)
        return r

    def set_xcrs(self, r: s.kvm_xcrs) -> None:
        self._io("KVM_SET_XCRS", r)

    def get_debugregs(self, into: s.kvm_debugregs | None = None) -> s.kvm_debugregs:
        r = s.kvm_debugregs() if into is None else into
        self._io("KVM_GET_DEBUGREGS", r)
        return r

    def set_debugregs(self, r: s.kvm_debugregs) -> None:
        self._io("KVM_SET_DEBUGREGS", r)

    def get_vcpu_events(self, into: s.kvm_vcpu_events | None = None) -> s.kvm_vcpu_events:
        r = s.kvm_vcpu_events() if into is None else into
        self._io("KVM_GET_VCPU_EVENTS", r)
        return r

    def set_vcpu_events(self, r: s.kvm_vcpu_events) -> None:
        self._io("KVM_SET_VCPU_EVENTS", r)

    def get_lapic(self, into: bytearray | None = None) -> bytearray:
        """KVM_GET_LAPIC: the 1 KiB register page (kvm_lapic_state.regs) as bytes."""
        buf = into if into is not None else bytearray(s.KVM_APIC_REG_SIZE)
        self._io("KVM_GET_LAPIC", buf)
        return buf

    def set_lapic(self, regs: bytes | bytearray) -> None:
        self._io("KVM_SET_LAPIC", bytearray(regs))

    def get_mp_state(self) -> int:
        r = s.kvm_mp_state(); self._io("KVM_GET_MP_STATE", r); return r.mp_state

    def set_mp_state(self, state: int) -> None:
        self._io("KVM_SET_MP_STATE", s.kvm_mp_state(state))

    def get_msrs(self, indices: list[int]) -> list[int]:
        """KVM_GET_MSRS; raises naming the first MSR KVM could not read."""
        buf = s.msrs_buffer(len(indices))
        for e, idx in zip(buf.entries, indices):
            e.index = idx
        n = self._io("KVM_GET_MSRS", buf)
        if n != len(indices):
            raise MsrError("KVM_GET_MSRS", self.obj, indices, n,
                           read=[e.data for e in buf.entries[:n]])
        return [e.data for e in buf.entries]

    def set_msrs(self, items: list[tuple[int, int]]) -> None:
        """KVM_SET_MSRS in one call; the return count names the MSR that failed."""
        buf = s.msrs_buffer(len(items))
        for e, (idx, val) in zip(buf.entries, items):
            e.index, e.data = idx, val
        n = self._io("KVM_SET_MSRS", buf)
        if n != len(items):
            raise MsrError("KVM_SET_MSRS", self.obj, [i for i, _ in items], n, items[n][1])

    def set_cpuid2(self, cpuid: Any) -> None:
        self._io("KVM_SET_CPUID2", cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> Any:
        """KVM_GET_CPUID2: the CPUID this vCPU was given (grown until it fits)."""
        while True:
            buf = s.cpuid_buffer(max_entries)
            try:
                self._io("KVM_GET_CPUID2", buf)
                return type(s.cpuid_buffer(buf.nent)).from_buffer_copy(
                    buf.to_bytes()[:8 + ctypes.sizeof(s.kvm_cpuid_entry2) * buf.nent])
            except KvmError as e:
                if e.errno != 7 or max_entries > 4096:  # E2BIG
                    raise
                max_entries *= 2

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        dbg = s.kvm_guest_debug()
        dbg.control = control
        for i, v in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = v
        self._io("KVM_SET_GUEST_DEBUG", dbg)

    def nmi(self) -> None:
        self._io("KVM_NMI")

    def get_one_reg(self, reg_id: int, size: int = 8) -> int:
        val = (ctypes.c_uint8 * size)()
        self._io("KVM_GET_ONE_REG", s.kvm_one_reg(reg_id, ctypes.addressof(val)))
        return int.from_bytes(bytes(val), "little")

    def set_one_reg(self, reg_id: int, value: int, size: int = 8) -> None:
        val = (ctypes.c_uint8 * size).from_buffer_copy(value.to_bytes(size, "little"))
        self._io("KVM_SET_ONE_REG", s.kvm_one_reg(reg_id, ctypes.addressof(val)))
