"""The orders in which a snapshot's parts are taken and put back, with the kernel's reasons.

Sources: Documentation/virt/kvm/api.rst (KVM_SET_REGS, KVM_SET_LAPIC,
KVM_SET_MSRS, KVM_SET_VCPU_EVENTS, KVM_SET_CPUID2, "KVM_EXIT_IO ... complete
only after userspace has re-entered the kernel"), arch/x86/kvm/x86.c, and
Firecracker's src/vmm/src/arch/x86_64/vcpu.rs (save_state / restore_state) and
arch/x86_64/vm.rs (restore_state), whose orders and reasons these follow.
"""

from __future__ import annotations

# Taking a vCPU's state. The cache fetches side-effect groups first on its own
# (catalog: MP_STATE invalidates the rest); this order only adds EVENTS last.
CAPTURE_ORDER: tuple[str, ...] = (
    # KVM_GET_MP_STATE runs kvm_apic_accept_events(): a pending INIT/SIPI changes
    # the registers and the LAPIC, so it must be read before everything else.
    "MP_STATE",
    "REGS", "SREGS", "XSAVE", "XCRS", "DEBUGREGS",
    # KVM_GET_LAPIC first merges posted interrupts into IRR.
    "LAPIC",
    "MSRS", "MSRS_TIME",
    # KVM_GET_VCPU_EVENTS runs process_nmi() (queued NMIs become pending) and
    # reports what the GETs above may have moved: read last, and fresh (the copy
    # the kvm_run page handed back at the exit predates any NMI queued since).
    "EVENTS",
)

# Putting a vCPU's state back. CPUID is not a cache group: it is set (or checked
# equal) before this, because KVM_SET_CPUID2 after the first KVM_RUN is refused
# unless identical (api.rst KVM_SET_CPUID2) and SET_MP_STATE consults the BSP bit.
RESTORE_ORDER: tuple[str, ...] = (
    # KVM_SET_MP_STATE first: the others then describe a vCPU in that state
    # (an AP waiting for SIPI, a halted vCPU), and SET_MP_STATE depends on
    # kvm_vcpu_is_bsp(), which the CPUID above fixes.
    "MP_STATE",
    # KVM_SET_REGS clears a pending exception unconditionally (x86.c __set_regs:
    # exception.pending = false), so it must come before EVENTS, which restores it.
    "REGS",
    # SREGS holds apic_base: KVM_SET_LAPIC interprets the page in the APIC mode
    # (xAPIC/x2APIC) that apic_base selects, so SREGS precedes LAPIC.
    "SREGS",
    # XSAVE, XCRS and DEBUGREGS are checked against the vCPU's CPUID (XCR0 against
    # the supported XSAVE components), not against CR4 or EFER: any place after
    # CPUID works; here, in Firecracker's order.
    "XSAVE", "XCRS", "DEBUGREGS",
    # KVM_SET_LAPIC restarts the one-shot/periodic timer from the saved TMCCT
    # (lapic.c kvm_apic_set_state -> __start_apic_timer) and resets TSC_DEADLINE.
    "LAPIC",
    # MSRs after the LAPIC: a TSC_DEADLINE write arms the timer only when the LVT
    # timer is already in TSC-deadline mode (lapic.c kvm_set_lapic_tscdeadline_msr),
    # and SET_LAPIC above would clear it. Both MSR groups go TSC, TSC_ADJUST,
    # TSC_DEADLINE last (the deadline is relative to the TSC); a short
    # KVM_SET_MSRS count is an error naming the MSR (handles.Vcpu.set_msrs).
    "MSRS", "MSRS_TIME",
    # Events last: SET_REGS/SET_SREGS/SET_LAPIC may queue or drop pending events,
    # and KVM_SET_VCPU_EVENTS puts back the pending/injected exception, NMI and
    # interrupt shadow exactly as saved.
    "EVENTS",
)

# VM-wide state, put back before any vCPU state and before any vCPU runs
# (Firecracker vm.rs restore_state: PIT, clock, PIC master, PIC slave, IOAPIC).
# The IOAPIC goes after the PICs and before the LAPICs: KVM_SET_IRQCHIP(IOAPIC)
# re-delivers pending level interrupts (ioapic.c kvm_set_ioapic ->
# kvm_ioapic_inject_all) and the LAPIC state put afterwards is the saved one.
VM_RESTORE_ORDER: tuple[str, ...] = ("pit", "clock", "pic_master", "pic_slave", "ioapic")
