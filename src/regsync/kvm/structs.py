"""ctypes mirrors of the x86_64 KVM uAPI structs (<linux/kvm.h>, <asm/kvm.h>).

Only what regsync uses is declared. tests/test_layout.py walks every struct here
(fields, nested structs, unions, arrays), compiles a C probe against the installed
headers and checks every size and offset, so a drift is caught there.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import (
    Structure, Union, c_char, c_uint8, c_uint16, c_uint32, c_uint64,
)
from typing import Any, Iterable


class KvmStruct(Structure):
    """Base: pretty repr and bytes round trip for snapshots and debugging."""

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        """Tolerate size drift: pad short data with zeros, drop extra bytes."""
        size = ctypes.sizeof(cls)
        return cls.from_buffer_copy(data[:size].ljust(size, b"\0"))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        parts = []
        for name, *_ in self._fields_:
            value = getattr(self, name)
            parts.append(f"{name}={value:#x}" if isinstance(value, int) else f"{name}=…")
        return f"{type(self).__name__}({', '.join(parts)})"


# --- general purpose registers -------------------------------------------------
class kvm_regs(KvmStruct):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


# --- segments and system registers ---------------------------------------------
class kvm_segment(KvmStruct):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
        ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
        ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
        ("unusable", c_uint8), ("padding", c_uint8),
    ]


class kvm_dtable(KvmStruct):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


# The part kvm_sregs and kvm_sregs2 share.
_SREGS_COMMON: list[Any] = (
    [(n, kvm_segment) for n in _SEGMENTS]
    + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
    + [(n, c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
)


class kvm_sregs(KvmStruct):
    _fields_ = _SREGS_COMMON + [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_sregs2(KvmStruct):
    _fields_ = _SREGS_COMMON + [("flags", c_uint64), ("pdptrs", c_uint64 * 4)]


# --- FPU / XSAVE / XCRs --------------------------------------------------------
class kvm_fpu(KvmStruct):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16),
        ("ftwx", c_uint8), ("pad1", c_uint8), ("last_opcode", c_uint16),
        ("last_ip", c_uint64), ("last_dp", c_uint64), ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class kvm_xsave(KvmStruct):
    """The fixed 4 KiB part; KVM_GET_XSAVE2 may write more (see Vcpu.get_xsave2)."""
    _fields_ = [("region", c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(KvmStruct):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(KvmStruct):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32),
                ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", c_uint64 * 16)]


# --- MSRs ----------------------------------------------------------------------
class kvm_msr_entry(KvmStruct):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(KvmStruct):
    """Header only; msrs_buffer() builds header + entries in one buffer."""
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(KvmStruct):
    _fields_ = [("nmsrs", c_uint32)]


@functools.lru_cache(maxsize=64)
def _flex(header: tuple[tuple[str, Any], ...], array: str, entry: Any, n: int) -> type:
    """A struct header followed by n entries (C's flexible array member). A ctypes
    class costs ~20 µs to build, so one per (shape, length) is made and reused."""
    return type(f"flex_{array}_{n}", (KvmStruct,), {"_fields_": [*header, (array, entry * n)]})


_MSRS_HEADER = (("nmsrs", c_uint32), ("pad", c_uint32))


def msrs_buffer(n: int) -> Any:
    """A kvm_msrs followed by n entries, as one ctypes object."""
    buf = _flex(_MSRS_HEADER, "entries", kvm_msr_entry, n)()
    buf.nmsrs = n
    return buf


def msr_list_buffer(n: int) -> Any:
    """A kvm_msr_list with room for n indices."""
    buf = _flex((("nmsrs", c_uint32),), "indices", c_uint32, n)()
    buf.nmsrs = n
    return buf


# --- KVM_SET_SIGNAL_MASK ---------------------------------------------------------
class kvm_signal_mask(KvmStruct):
    """Header only; signal_mask_buffer() appends the sigset bytes."""
    _fields_ = [("len", c_uint32)]


# The kernel's sigset_t (64 signals on x86-64): KVM refuses any other len
# (virt/kvm/kvm_main.c, KVM_SET_SIGNAL_MASK: "kvm_sigmask.len != sizeof(sigset_t)").
KERNEL_SIGSET_BYTES = 8


def signal_mask_buffer(signals: Iterable[int]) -> Any:
    """A kvm_signal_mask blocking ``signals`` (signal n is bit n-1, as in sigset_t)."""
    bits = 0
    for sig in signals:
        if 1 <= sig <= 8 * KERNEL_SIGSET_BYTES:
            bits |= 1 << (sig - 1)
    buf = _flex((("len", c_uint32),), "sigset", c_uint8, KERNEL_SIGSET_BYTES)()
    buf.len = KERNEL_SIGSET_BYTES
    buf.sigset[:] = bits.to_bytes(KERNEL_SIGSET_BYTES, "little")
    return buf


# --- debug registers, events, LAPIC, MP state ------------------------------------
class kvm_debugregs(KvmStruct):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64),
                ("flags", c_uint64), ("reserved", c_uint64 * 9)]


class _events_exception(KvmStruct):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class _events_interrupt(KvmStruct):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(KvmStruct):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(KvmStruct):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class _events_triple_fault(KvmStruct):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(KvmStruct):
    _fields_ = [
        ("exception", _events_exception), ("interrupt", _events_interrupt),
        ("nmi", _events_nmi), ("sipi_vector", c_uint32), ("flags", c_uint32),
        ("smi", _events_smi), ("triple_fault", _events_triple_fault),
        ("reserved", c_uint8 * 26), ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(KvmStruct):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_mp_state(KvmStruct):
    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


# --- CPUID ---------------------------------------------------------------------
class kvm_cpuid_entry2(KvmStruct):
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("padding", c_uint32 * 3)]


class kvm_cpuid2(KvmStruct):
    """Header only; cpuid_buffer() builds header + entries."""
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid_buffer(n: int) -> Any:
    """A kvm_cpuid2 followed by n entries."""
    buf = _flex((("nent", c_uint32), ("padding", c_uint32)), "entries", kvm_cpuid_entry2, n)()
    buf.nent = n
    return buf


# --- guest debug ---------------------------------------------------------------
class kvm_guest_debug_arch(KvmStruct):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(KvmStruct):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


class kvm_debug_exit_arch(KvmStruct):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64),
                ("dr6", c_uint64), ("dr7", c_uint64)]


# --- ONE_REG, memory, irqchip, PIT, caps ----------------------------------------
class kvm_one_reg(KvmStruct):
    _fields_ = [("id", c_uint64), ("addr", c_uint64)]


class kvm_userspace_memory_region(KvmStruct):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class kvm_pit_config(KvmStruct):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_level(KvmStruct):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


# --- KVM_SET_GSI_ROUTING: which irqchip pin each GSI drives --------------------------
class kvm_irq_routing_irqchip(KvmStruct):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class _routing_union(Union):
    # msi, s390 adapter, hv_sint and xen_evtchn members are not used: the pad is their size.
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(KvmStruct):
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32), ("pad", c_uint32),
                ("u", _routing_union)]


class kvm_irq_routing(KvmStruct):
    """Header only; irq_routing_buffer() appends the entries."""
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


KVM_IRQ_ROUTING_IRQCHIP = 1


def irq_routing_buffer(routes: "list[tuple[int, int, int]]") -> Any:
    """A kvm_irq_routing with one irqchip entry per (gsi, irqchip, pin)."""
    buf = _flex((("nr", c_uint32), ("flags", c_uint32)), "entries", kvm_irq_routing_entry,
                len(routes))()
    buf.nr = len(routes)
    for e, (gsi, chip, pin) in zip(buf.entries, routes):
        e.gsi, e.type = gsi, KVM_IRQ_ROUTING_IRQCHIP
        e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
    return buf


class kvm_enable_cap(KvmStruct):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", c_uint8 * 64)]


# --- the shared kvm_run page ----------------------------------------------------
class _exit_hw(KvmStruct):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _exit_fail_entry(KvmStruct):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _exit_io(KvmStruct):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


class _exit_debug(KvmStruct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _exit_mmio(KvmStruct):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


# --- VM-wide state for snapshots: irqchip, PIT, kvmclock, dirty log ----------------
class kvm_pic_state(KvmStruct):
    _fields_ = [(n, c_uint8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(KvmStruct):
    # Each redirection entry is a u64 (the C union's ``bits`` view).
    _fields_ = [("base_address", c_uint64), ("ioregsel", c_uint32), ("id", c_uint32),
                ("irr", c_uint32), ("pad", c_uint32), ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS)]


class _irqchip_union(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(KvmStruct):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _irqchip_union)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_pit_channel_state(KvmStruct):
    _fields_ = [("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8),
                ("status_latched", c_uint8), ("status", c_uint8), ("read_state", c_uint8),
                ("write_state", c_uint8), ("write_latch", c_uint8), ("rw_mode", c_uint8),
                ("mode", c_uint8), ("bcd", c_uint8), ("gate", c_uint8),
                ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(KvmStruct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32),
                ("reserved", c_uint32 * 9)]


class kvm_clock_data(KvmStruct):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_dirty_log(KvmStruct):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(KvmStruct):
    _fields_ = [("slot", c_uint32), ("num_pages", c_uint32), ("first_page", c_uint64),
                ("dirty_bitmap", c_uint64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class _exit_internal(KvmStruct):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _exit_system_event(KvmStruct):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _exit_union(Union):
    _fields_ = [("hw", _exit_hw), ("fail_entry", _exit_fail_entry), ("io", _exit_io),
                ("debug", _exit_debug), ("mmio", _exit_mmio), ("internal", _exit_internal),
                ("system_event", _exit_system_event), ("padding", c_char * 256)]


class kvm_sync_regs(KvmStruct):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class _sync_union(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * 2048)]


class kvm_run(KvmStruct):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6), ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8), ("flags", c_uint16),
        ("cr8", c_uint64), ("apic_base", c_uint64), ("u", _exit_union),
        ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64), ("s", _sync_union),
    ]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# Exit reasons (KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

__all__ = [n for n in dir() if n.startswith(("kvm_", "KVM_"))] + [
    "KvmStruct", "msrs_buffer", "msr_list_buffer", "cpuid_buffer", "signal_mask_buffer"]
