"""Every KVM ioctl regsync issues, declared once as data.

The request number is computed from (direction, type 0xAE, nr, size of the
argument struct) exactly as the kernel's _IOC macros do; nothing is pasted in
hex. tests/test_layout.py compares each computed number with the C macro.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from . import structs as s

KVMIO = 0xAE

# asm-generic/ioctl.h: nr 8 bits, type 8 bits, size 14 bits, dir 2 bits.
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30


class Dir(Enum):
    NONE = 0   # _IO
    W = 1      # _IOW: userspace writes, kernel reads
    R = 2      # _IOR: kernel writes
    WR = 3     # _IOWR

FdKind = Literal["system", "vm", "vcpu"]


@dataclass(frozen=True)
class Ioctl:
    name: str
    fd: FdKind          # which kind of fd accepts it (a few are valid on two)
    direction: Dir
    nr: int
    arg: type | None    # the struct named in the C macro; None for _IO
    size_type: type | None = None  # for _IOW(.., __u64): the C type whose size is encoded
    c_name: str = ""               # the macro in <linux/kvm.h> when it differs from name

    @property
    def macro(self) -> str:
        return self.c_name or self.name

    @property
    def number(self) -> int:
        t = self.size_type or self.arg
        size = ctypes.sizeof(t) if t is not None else 0
        return ((self.direction.value << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT)
                | (KVMIO << _IOC_TYPESHIFT) | (self.nr << _IOC_NRSHIFT))


_N, _W, _R, _WR = Dir.NONE, Dir.W, Dir.R, Dir.WR

TABLE: tuple[Ioctl, ...] = (
    # /dev/kvm
    Ioctl("KVM_GET_API_VERSION", "system", _N, 0x00, None),
    Ioctl("KVM_CREATE_VM", "system", _N, 0x01, None),
    Ioctl("KVM_GET_MSR_INDEX_LIST", "system", _WR, 0x02, s.kvm_msr_list),
    Ioctl("KVM_CHECK_EXTENSION", "system", _N, 0x03, None),
    Ioctl("KVM_GET_VCPU_MMAP_SIZE", "system", _N, 0x04, None),
    Ioctl("KVM_GET_SUPPORTED_CPUID", "system", _WR, 0x05, s.kvm_cpuid2),
    Ioctl("KVM_GET_MSR_FEATURE_INDEX_LIST", "system", _WR, 0x0a, s.kvm_msr_list),
    # VM fd
    Ioctl("KVM_CREATE_VCPU", "vm", _N, 0x41, None),
    Ioctl("KVM_SET_USER_MEMORY_REGION", "vm", _W, 0x46, s.kvm_userspace_memory_region),
    Ioctl("KVM_SET_TSS_ADDR", "vm", _N, 0x47, None),
    Ioctl("KVM_SET_IDENTITY_MAP_ADDR", "vm", _W, 0x48, None, ctypes.c_uint64),
    Ioctl("KVM_CREATE_IRQCHIP", "vm", _N, 0x60, None),
    Ioctl("KVM_IRQ_LINE", "vm", _W, 0x61, s.kvm_irq_level),
    Ioctl("KVM_SET_GSI_ROUTING", "vm", _W, 0x6a, s.kvm_irq_routing),
    Ioctl("KVM_CREATE_PIT2", "vm", _W, 0x77, s.kvm_pit_config),
    # The same request on a VM fd answers for that VM (KVM_CAP_XSAVE2's size).
    Ioctl("KVM_VM_CHECK_EXTENSION", "vm", _N, 0x03, None, c_name="KVM_CHECK_EXTENSION"),
    Ioctl("KVM_ENABLE_CAP", "vm", _W, 0xa3, s.kvm_enable_cap),
    # VM-wide state a snapshot saves and restores, and the dirty log for the fast reset.
    Ioctl("KVM_GET_DIRTY_LOG", "vm", _W, 0x42, s.kvm_dirty_log),
    Ioctl("KVM_GET_IRQCHIP", "vm", _WR, 0x62, s.kvm_irqchip),
    Ioctl("KVM_SET_IRQCHIP", "vm", _R, 0x63, s.kvm_irqchip),   # _IOR in the header, as it is
    Ioctl("KVM_SET_CLOCK", "vm", _W, 0x7b, s.kvm_clock_data),
    Ioctl("KVM_GET_CLOCK", "vm", _R, 0x7c, s.kvm_clock_data),
    Ioctl("KVM_GET_PIT2", "vm", _R, 0x9f, s.kvm_pit_state2),
    Ioctl("KVM_SET_PIT2", "vm", _W, 0xa0, s.kvm_pit_state2),
    Ioctl("KVM_CLEAR_DIRTY_LOG", "vm", _WR, 0xc0, s.kvm_clear_dirty_log),
    # vCPU fd
    Ioctl("KVM_RUN", "vcpu", _N, 0x80, None),
    Ioctl("KVM_GET_REGS", "vcpu", _R, 0x81, s.kvm_regs),
    Ioctl("KVM_SET_REGS", "vcpu", _W, 0x82, s.kvm_regs),
    Ioctl("KVM_GET_SREGS", "vcpu", _R, 0x83, s.kvm_sregs),
    Ioctl("KVM_SET_SREGS", "vcpu", _W, 0x84, s.kvm_sregs),
    Ioctl("KVM_GET_MSRS", "vcpu", _WR, 0x88, s.kvm_msrs),
    Ioctl("KVM_SET_MSRS", "vcpu", _W, 0x89, s.kvm_msrs),
    Ioctl("KVM_SET_SIGNAL_MASK", "vcpu", _W, 0x8b, s.kvm_signal_mask),
    Ioctl("KVM_GET_FPU", "vcpu", _R, 0x8c, s.kvm_fpu),
    Ioctl("KVM_SET_FPU", "vcpu", _W, 0x8d, s.kvm_fpu),
    Ioctl("KVM_GET_LAPIC", "vcpu", _R, 0x8e, s.kvm_lapic_state),
    Ioctl("KVM_SET_LAPIC", "vcpu", _W, 0x8f, s.kvm_lapic_state),
    Ioctl("KVM_SET_CPUID2", "vcpu", _W, 0x90, s.kvm_cpuid2),
    Ioctl("KVM_GET_CPUID2", "vcpu", _WR, 0x91, s.kvm_cpuid2),
    Ioctl("KVM_GET_MP_STATE", "vcpu", _R, 0x98, s.kvm_mp_state),
    Ioctl("KVM_SET_MP_STATE", "vcpu", _W, 0x99, s.kvm_mp_state),
    Ioctl("KVM_NMI", "vcpu", _N, 0x9a, None),
    Ioctl("KVM_SET_GUEST_DEBUG", "vcpu", _W, 0x9b, s.kvm_guest_debug),
    Ioctl("KVM_GET_VCPU_EVENTS", "vcpu", _R, 0x9f, s.kvm_vcpu_events),
    Ioctl("KVM_SET_VCPU_EVENTS", "vcpu", _W, 0xa0, s.kvm_vcpu_events),
    Ioctl("KVM_GET_DEBUGREGS", "vcpu", _R, 0xa1, s.kvm_debugregs),
    Ioctl("KVM_SET_DEBUGREGS", "vcpu", _W, 0xa2, s.kvm_debugregs),
    Ioctl("KVM_GET_XSAVE", "vcpu", _R, 0xa4, s.kvm_xsave),
    Ioctl("KVM_SET_XSAVE", "vcpu", _W, 0xa5, s.kvm_xsave),
    Ioctl("KVM_GET_XCRS", "vcpu", _R, 0xa6, s.kvm_xcrs),
    Ioctl("KVM_SET_XCRS", "vcpu", _W, 0xa7, s.kvm_xcrs),
    Ioctl("KVM_GET_ONE_REG", "vcpu", _W, 0xab, s.kvm_one_reg),
    Ioctl("KVM_SET_ONE_REG", "vcpu", _W, 0xac, s.kvm_one_reg),
    Ioctl("KVM_GET_SREGS2", "vcpu", _R, 0xcc, s.kvm_sregs2),
    Ioctl("KVM_SET_SREGS2", "vcpu", _W, 0xcd, s.kvm_sregs2),
    Ioctl("KVM_GET_XSAVE2", "vcpu", _R, 0xcf, s.kvm_xsave),
)

BY_NAME: dict[str, Ioctl] = {i.name: i for i in TABLE}

# KVM_CHECK_EXTENSION arguments (KVM_CAP_*), for the capabilities regsync probes.
CAPS: dict[str, int] = {
    "IRQCHIP": 0, "HLT": 1, "USER_MEMORY": 3, "SET_TSS_ADDR": 4, "NR_VCPUS": 9,
    "NR_MEMSLOTS": 10, "PIT": 11, "MP_STATE": 14, "SET_GUEST_DEBUG": 23, "IRQ_ROUTING": 25,
    "PIT2": 33,
    "SET_IDENTITY_MAP_ADDR": 37, "VCPU_EVENTS": 41, "DEBUGREGS": 50,
    "X86_ROBUST_SINGLESTEP": 51, "ENABLE_CAP": 54, "XSAVE": 55, "XCRS": 56,
    "MAX_VCPUS": 66, "ONE_REG": 70, "TSC_DEADLINE_TIMER": 72, "SYNC_REGS": 74,
    "GUEST_DEBUG_HW_BPS": 119, "GUEST_DEBUG_HW_WPS": 120, "MAX_VCPU_ID": 128,
    "IMMEDIATE_EXIT": 136, "GET_MSR_FEATURES": 153, "MANUAL_DIRTY_LOG_PROTECT2": 168,
    "DIRTY_LOG_RING": 192, "SREGS2": 200, "XSAVE2": 208,
}

# GET/SET ioctls that do not move a vCPU's register state: setup (CPUID), guest
# debugging, and VM-wide state. Names outside this table (QEMU's, counted with
# strace) are classified by the same rule.
_NOT_REGISTER_STATE = frozenset({
    "KVM_SET_GUEST_DEBUG", "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_GET_CLOCK", "KVM_SET_CLOCK",
    "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_SET_GSI_ROUTING",
    "KVM_GET_API_VERSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_SET_SIGNAL_MASK", "KVM_GET_DIRTY_LOG",
    "KVM_CLEAR_DIRTY_LOG"})


def moves_register_state(name: str) -> bool:
    """Is this ioctl a transfer of vCPU register state (what the cache saves)?"""
    return name.startswith(("KVM_GET_", "KVM_SET_")) and name not in _NOT_REGISTER_STATE

