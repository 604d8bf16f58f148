"""What QEMU wrote and read, per version and level, as data (for strategies/qemu.py).

Each list cites the QEMU file and function it follows. Read for this module:
  * qemu/qemu today: target/i386/kvm/kvm.c (kvm_arch_put_registers, kvm_put_msrs,
    kvm_put_vcpu_events, kvm_put_tscdeadline_msr, kvm_arch_get_registers) and
    accel/kvm/kvm-all.c (do_kvm_cpu_synchronize_state, kvm_cpu_exec).
  * QEMU v1.3 (Dec 2012), target-i386/kvm.c of that era (kvm_arch_put_registers(
    CPUX86State *env, int level), kvm_put_msrs, kvm_put_vcpu_events, kvm_put_apic,
    kvm_arch_get_registers), found in the search tool's stored trees.
  * The seed's patch (shared/seed, "[PATCH 7/7] KVM regsync"): kvm-all.c only; the
    x86 lists of its time are the v1.3 ones. Its patches 1-6 (a level argument for
    kvm_arch_get_registers) were not found; the thread says no architecture got
    selectively at the time ("Currently no architecture has code to selectively
    GET register state"), so a get fetches everything.

A put is a list of steps in QEMU's order; a step names a catalog group, or "MSRS"
(one KVM_SET_MSRS of the listed indices), "EVENTS" (KVM_SET_VCPU_EVENTS with
QEMU's flags) or "TSC_DEADLINE" (its own KVM_SET_MSRS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..regdefs import Catalog

RUNTIME, RESET, FULL = 1, 2, 3          # KVM_PUT_RUNTIME_STATE / _RESET_STATE / _FULL_STATE
LEVEL_NAMES = {RUNTIME: "RUNTIME", RESET: "RESET", FULL: "FULL"}

# --- x86 MSRs (index, name) ------------------------------------------------------------
# QEMU writes an MSR when KVM_GET_MSR_INDEX_LIST has it (its has_msr_* flags), or
# when the vCPU's CPUID has the feature; the model writes those the host saves.
# Left out on purpose: MCG_*/MCi_* (written at every level, but only after
# KVM_X86_SETUP_MCE, which regsync never calls), PMU counters (CPUID leaf 0xA),
# Hyper-V (never enabled by regsync), Intel PT, SGX, XFD, arch LBR, FRED.

# v1.3 kvm_put_msrs: always (RUNTIME and up).
MSRS_2012_RUNTIME = (
    (0x174, "sysenter_cs"), (0x175, "sysenter_esp"), (0x176, "sysenter_eip"), (0x277, "pat"),
    (0xC0000081, "star"), (0xC0010117, "hsave_pa"),
    (0x6E0, "tsc_deadline"),            # in the RUNTIME batch in 2012 (has_msr_tsc_deadline)
    (0x1A0, "misc_enable"),
    (0xC0000083, "cstar"), (0xC0000102, "kernel_gs_base"), (0xC0000084, "fmask"),
    (0xC0000082, "lstar"),
)
# v1.3: level == KVM_PUT_FULL_STATE ("if (smp_cpus == 1 || env->tsc != 0)").
MSRS_2012_FULL = ((0x10, "tsc"),)
# v1.3: level >= KVM_PUT_RESET_STATE. The old kvmclock numbers (MSR_KVM_WALL_CLOCK
# 0x11, MSR_KVM_SYSTEM_TIME 0x12 are #defined at the top of that kvm.c).
MSRS_2012_RESET = ((0x12, "kvm_system_time_old"), (0x11, "kvm_wall_clock_old"),
                   (0x4B564D02, "async_pf_en"), (0x4B564D04, "pv_eoi_en"))

# Today's kvm_put_msrs: always.
MSRS_TODAY_RUNTIME = (
    (0x174, "sysenter_cs"), (0x175, "sysenter_esp"), (0x176, "sysenter_eip"), (0x277, "pat"),
    (0xC0000081, "star"), (0xC0010117, "hsave_pa"), (0xC0000103, "tsc_aux"),
    (0x3B, "tsc_adjust"), (0x1A0, "misc_enable"), (0x9E, "smbase"), (0x34, "smi_count"),
    (0x6E1, "pkrs"), (0xD90, "bndcfgs"), (0xDA0, "xss"), (0xE1, "umwait_control"),
    (0x48, "spec_ctrl"), (0xC0000104, "tsc_ratio"), (0x122, "tsx_ctrl"),
    (0xC001011F, "virt_ssbd"), (0xC0010015, "hwcr"),
    (0xC0000083, "cstar"), (0xC0000102, "kernel_gs_base"), (0xC0000084, "fmask"),
    (0xC0000082, "lstar"),
)
# Today: level >= KVM_PUT_RESET_STATE ("side effects on the guest or too heavy for
# normal writeback"). kvmclock and the PV MSRs when CPUID has the KVM feature
# (treated as on when the host saves the MSR, as -cpu host would); MTRRs when
# CPUID has MTRR (the host saves 0x2ff).
MSRS_TODAY_RESET = (
    (0x10, "tsc"), (0x4B564D01, "kvm_system_time"), (0x4B564D00, "kvm_wall_clock"),
    (0x4B564D06, "async_pf_int"), (0x4B564D02, "async_pf_en"), (0x4B564D04, "pv_eoi_en"),
    (0x4B564D03, "steal_time"), (0x4B564D05, "poll_control"),
    (0x2FF, "mtrr_def_type"), (0x250, "mtrr_fix64k_00000"), (0x258, "mtrr_fix16k_80000"),
    (0x259, "mtrr_fix16k_a0000"), *((0x268 + i, f"mtrr_fix4k_{i}") for i in range(8)),
    *((0x200 + i, f"mtrr_var_{i}") for i in range(16)),
)
MSR_FEATURE_CONTROL = 0x3A   # today: written alone, first, at RESET and FULL
MSR_TSC_DEADLINE = 0x6E0     # today: kvm_put_tscdeadline_msr, its own KVM_SET_MSRS, every put
MSR_SMBASE = 0x9E            # has_msr_smbase decides KVM_VCPUEVENT_VALID_SMM today

KVM_MP_STATE_SIPI_RECEIVED = 4


@dataclass(frozen=True)
class EventsPut:
    """kvm_put_vcpu_events: which valid-flags QEMU sets at a level."""
    nmi_pending: bool           # KVM_VCPUEVENT_VALID_NMI_PENDING
    sipi: str                   # "no" | "yes" | "if-sipi-received" (VALID_SIPI_VECTOR)
    smm_if_smbase: bool         # KVM_VCPUEVENT_VALID_SMM with smi.latched_init, if has_msr_smbase


@dataclass(frozen=True)
class PutPlan:
    """One QEMU version's kvm_arch_put_registers on x86, per level."""
    version: str
    steps: dict[int, tuple[tuple[str, object], ...]] = field(default_factory=dict)
    get_order: tuple[str, ...] = ()

    def msrs(self, level: int) -> tuple[int, ...]:
        return tuple(i for kind, arg in self.steps[level] if kind == "MSRS"
                     for i in arg)  # type: ignore[attr-defined]


def _idx(*lists: tuple[tuple[int, str], ...]) -> tuple[int, ...]:
    return tuple(i for lst in lists for i, _ in lst)


# v1.3 target-i386/kvm.c kvm_arch_put_registers: regs, xsave, xcrs, sregs,
# (kvm_inject_mce_oldstyle), msrs(level), [>= RESET: mp_state, apic], vcpu_events(level),
# debugregs, (kvm_guest_debug_workarounds). kvm_put_vcpu_events sets
# NMI_PENDING | SIPI_VECTOR at >= RESET, nothing at RUNTIME; no SMM fields then.
_EV_2012_RUNTIME = EventsPut(nmi_pending=False, sipi="no", smm_if_smbase=False)
_EV_2012_RESET = EventsPut(nmi_pending=True, sipi="yes", smm_if_smbase=False)


def _plan_2012(version: str) -> PutPlan:
    def steps(level: int) -> tuple[tuple[str, object], ...]:
        msrs = _idx(MSRS_2012_RUNTIME, *((MSRS_2012_RESET,) if level >= RESET else ()),
                    *((MSRS_2012_FULL,) if level == FULL else ()))
        out: list[tuple[str, object]] = [("REGS", None), ("XSAVE", None), ("XCRS", None),
                                         ("SREGS", None), ("MSRS", msrs)]
        if level >= RESET:
            out += [("MP_STATE", None), ("LAPIC", None)]
        out += [("EVENTS", _EV_2012_RESET if level >= RESET else _EV_2012_RUNTIME),
                ("DEBUGREGS", None)]
        return tuple(out)
    # v1.3 kvm_arch_get_registers: regs, xsave, xcrs, sregs, msrs, mp_state, apic,
    # vcpu_events, debugregs -- MP_STATE after REGS (fixed later: see today's order).
    return PutPlan(version, {lv: steps(lv) for lv in (RUNTIME, RESET, FULL)},
                   ("REGS", "XSAVE", "XCRS", "SREGS", "MSRS", "MSRS_TIME", "MP_STATE",
                    "LAPIC", "EVENTS", "DEBUGREGS"))


# Today's kvm_arch_put_registers: [>= RESET: feature control MSR], sregs,
# [>= RESET: nested state], regs, xsave, xcrs, msrs(level), vcpu_events(level),
# [>= RESET: mp_state], kvm_put_tscdeadline_msr (every put), debugregs. The LAPIC
# is not in it (the APIC device writes it on reset and loadvm).
# kvm_put_vcpu_events: VALID_SMM (smi.*, latched_init from CPU_INTERRUPT_INIT) when
# has_msr_smbase; at >= RESET NMI_PENDING, and SIPI_VECTOR if mp_state is
# SIPI_RECEIVED. (PAYLOAD and TRIPLE_FAULT need caps regsync does not enable.)
_EV_TODAY_RUNTIME = EventsPut(nmi_pending=False, sipi="no", smm_if_smbase=True)
_EV_TODAY_RESET = EventsPut(nmi_pending=True, sipi="if-sipi-received", smm_if_smbase=True)


def _plan_today() -> PutPlan:
    def steps(level: int) -> tuple[tuple[str, object], ...]:
        msrs = _idx(MSRS_TODAY_RUNTIME, *((MSRS_TODAY_RESET,) if level >= RESET else ()))
        out: list[tuple[str, object]] = []
        if level >= RESET:
            out.append(("MSRS", (MSR_FEATURE_CONTROL,)))
        out += [("SREGS", None), ("REGS", None), ("XSAVE", None), ("XCRS", None),
                ("MSRS", msrs),
                ("EVENTS", _EV_TODAY_RESET if level >= RESET else _EV_TODAY_RUNTIME)]
        if level >= RESET:
            out.append(("MP_STATE", None))
        out += [("TSC_DEADLINE", None), ("DEBUGREGS", None)]
        return tuple(out)
    # kvm_arch_get_registers: vcpu_events, mp_state ("KVM_GET_MPSTATE can modify CS
    # and RIP, call it before KVM_GET_REGS and KVM_GET_SREGS"), regs, xsave, xcrs,
    # sregs, msrs (incl. TSC_DEADLINE; TSC only while !tsc_valid), apic, debugregs.
    return PutPlan("qemu", {lv: steps(lv) for lv in (RUNTIME, RESET, FULL)},
                   ("EVENTS", "MP_STATE", "REGS", "XSAVE", "XCRS", "SREGS", "MSRS",
                    "MSRS_TIME", "LAPIC", "DEBUGREGS"))


X86_PLANS = {"qemu2012": _plan_2012("qemu2012"), "qemu2013": _plan_2012("qemu2013"),
             "qemu": _plan_today()}


def generic_plan(version: str, catalog: Catalog) -> PutPlan:
    """Another architecture (the simulated BookE): a put at level L writes every
    group of L, in catalog order; a get fetches every group. No QEMU code exists for
    it: this is kvm-all.c's level algorithm on that catalog (see qemu.py). The get
    order follows each version's x86 one: today a group whose fetch has side effects
    (MPSTATE) comes first, in 2012 after the registers it resets."""
    def steps(level: int) -> tuple[tuple[str, object], ...]:
        mask = catalog.levels[LEVEL_NAMES[level]]
        return tuple((g.name, None) for g in catalog.groups if g.bit & mask)
    order = [g.name for g in catalog.groups]
    if version == "qemu":
        order.sort(key=lambda n: not catalog.group_by_name[n].invalidates)
    return PutPlan(version, {lv: steps(lv) for lv in (RUNTIME, RESET, FULL)}, tuple(order))
