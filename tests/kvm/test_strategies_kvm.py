"""Each QEMU strategy's historical bug on real KVM, and its absence under regsync.

The strategies write back what QEMU wrote (strategies/qemu_plans.py); the guest
is ``counter`` (src/regsync/guests/src/counter.S): it reads LVT LINT1 into r11
(flag 1), counts NMIs per CPU, and starts the AP with INIT-SIPI-SIPI when the
VMM sets counter_start_ap (flag 4). Every test fails if regsync behaved like the
strategy it shows.
"""

from __future__ import annotations

import time

import pytest

from regsync import Machine
from regsync.guests import symbols
from regsync.strategies.qemu import _host_msrs
from regsync.strategies.qemu_plans import MSR_SMBASE

COUNTER = symbols("counter")
COUNTER_LAPIC, COUNTER_SMP = 1, 4
LINT1_NMI = 0x400           # LVT delivery mode NMI (bits 8-10 = 100)
MSR_TSC = 0x10


def run_to_tick(m: Machine, v) -> None:
    for _ in range(10_000):
        ex = v.run()
        if ex.kind == "interrupted":      # an AP's KVM_RUN between INIT and SIPI (EAGAIN)
            continue
        assert ex.kind == "io", ex
        if ex.port == 0x501:
            return
        m.dispatch(v, ex)
    raise AssertionError("no tick exit")


# --- the seed's lost edit ------------------------------------------------------------------
def seed_sequence(strategy: str) -> tuple[int, int, int]:
    """synchronize RUNTIME, edit r12, synchronize FULL, edit LVT LINT1 (outside
    RUNTIME), run: what the guest sees of both edits at its next tick."""
    with Machine(smp=1, strategy=strategy) as m:
        m.load("counter", arg=COUNTER_LAPIC)
        v = m.vcpus[0]
        run_to_tick(m, v)
        v.synchronize_state("RUNTIME")
        v.regs.r12 = 1000
        v.synchronize_state("FULL")
        # Toggle the delivery mode (NMI), not the mask: the counter guest's APIC is
        # software-disabled, and a guest write (so an edit) of an LVT then stays masked.
        edited = v.regs["lapic.lvt_lint1"] ^ LINT1_NMI
        v.regs["lapic.lvt_lint1"] = edited
        run_to_tick(m, v)
        v.synchronize_state("RUNTIME")
        return v.regs.r12, v.regs.r11, edited


@pytest.mark.parametrize("strategy,lost", [("qemu2012", True), ("qemu", True),
                                           ("qemu2013", False), ("regsync", False)])
def test_seed_sequence_loses_the_lapic_edit_where_the_put_has_no_lapic(strategy: str,
                                                                     lost: bool) -> None:
    """QEMU v1.3 puts the LAPIC only at RESET and FULL (kvm_put_apic), today never
    from kvm_arch_put_registers: after a RUNTIME sync the FULL request is ignored
    and the edit vanishes. The seed's patch puts at the dirty level (FULL)."""
    r12, r11, edited = seed_sequence(strategy)
    assert r12 == 1001                                # the guest incremented the GPR edit
    assert (r11 != edited) is lost, f"{strategy}: guest saw LINT1 {r11:#x}, edit {edited:#x}"


# --- what the seed's patch still gets wrong: a FULL dump erases a pending NMI --------------
@pytest.mark.parametrize("strategy,erased", [("qemu2013", True), ("qemu2012", False),
                                             ("qemu", False), ("regsync", False)])
def test_nmi_arriving_after_a_full_dump(strategy: str, erased: bool) -> None:
    """A monitor dumps every register (FULL), then an NMI is queued (KVM_NMI, as
    another thread's device would) before the vCPU runs again. qemu2013 now puts
    FULL, whose KVM_SET_VCPU_EVENTS carries KVM_VCPUEVENT_VALID_NMI_PENDING with the
    dump's nmi.pending = 0: the NMI is gone. QEMU's RUNTIME put sets no such flag."""
    with Machine(smp=1, strategy=strategy) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        v.regs.dump()
        v.handle.nmi()
        run_to_tick(m, v)
        run_to_tick(m, v)
        nmis = m.memory.read_u64(COUNTER["counter_nmis"])
        assert nmis == (0 if erased else 1), f"{strategy}: the guest counted {nmis} NMIs"


# --- QEMU today: a dump between exits erases a latched INIT (hosts with SMM) ---------------
@pytest.mark.parametrize("strategy", ["qemu", "regsync"])
def test_dump_between_exits_and_a_latched_init(strategy: str) -> None:
    """The AP is dumped (its events read: no INIT yet); the BSP then sends
    INIT-SIPI-SIPI; before the AP's next KVM_RUN QEMU puts RUNTIME, and its
    kvm_put_vcpu_events sets KVM_VCPUEVENT_VALID_SMM with smi.latched_init from the
    dump (0): KVM clears the pending INIT, the SIPI finds the AP not waiting for it
    and the AP never starts (LKML 2025, "Latch INITs only in specific CPU states in
    KVM_SET_VCPU_EVENTS"). QEMU sets VALID_SMM only when MSR_IA32_SMBASE is in
    KVM_GET_MSR_INDEX_LIST (has_msr_smbase)."""
    if strategy == "qemu" and MSR_SMBASE not in _host_msrs():
        pytest.skip("this host has no SMM (MSR_IA32_SMBASE not in KVM_GET_MSR_INDEX_LIST): "
                    "QEMU would not set KVM_VCPUEVENT_VALID_SMM here, so its put leaves "
                    "a latched INIT alone")
    with Machine(smp=2, strategy=strategy) as m:
        m.load("counter", arg=COUNTER_SMP)
        bsp, ap = m.vcpus
        run_to_tick(m, bsp)
        ap.regs.dump()                                # the monitor: AP still waits for INIT
        m.memory.write_u64(COUNTER["counter_start_ap"], 1)
        run_to_tick(m, bsp)                           # INIT, SIPI, SIPI sent to the AP
        assert ap.handle.get_vcpu_events().smi.latched_init, "INIT was not latched"
        ap.cache.before_run()                         # what the AP's next KVM_RUN writes first
        kept = ap.handle.get_vcpu_events().smi.latched_init
        assert kept == (strategy == "regsync"), f"{strategy}: latched_init {kept}"
        if strategy == "regsync":
            run_to_tick(m, ap)                        # INIT then SIPI: the AP runs its loop


# --- TSC_DEADLINE and the TSC written back stale ---------------------------------------------
def test_qemu_writes_tsc_deadline_on_every_put_regsync_never() -> None:
    """kvm_put_tscdeadline_msr runs on every put: after a read-only dump QEMU
    writes the MSR batch and the deadline (2 KVM_SET_MSRS); regsync writes nothing."""
    for strategy, expect in (("qemu", 2), ("regsync", 0)):
        with Machine(smp=1, strategy=strategy) as m:
            m.load("counter")
            v = m.vcpus[0]
            run_to_tick(m, v)
            v.regs.dump()
            before = v.handle.counters.get("KVM_SET_MSRS", 0)
            run_to_tick(m, v)
            assert v.handle.counters.get("KVM_SET_MSRS", 0) - before == expect, strategy


def tsc_writes_work(v) -> tuple[bool, str]:
    now = v.handle.get_msrs([MSR_TSC])[0]
    target = now // 2
    v.handle.set_msrs([(MSR_TSC, target)])
    back = v.handle.get_msrs([MSR_TSC])[0]
    ok = back < now
    return ok, f"wrote TSC {target:#x} at {now:#x}, read back {back:#x}"


def test_full_put_moves_the_tsc_back_so_the_deadline_fires_late() -> None:
    """qemu2013 after a FULL dump puts FULL before the run: the TSC goes back to its
    value at the dump (v1.3 kvm_put_msrs writes MSR_IA32_TSC at FULL), so a
    TSC_DEADLINE armed in guest time fires late by the time the vCPU sat stopped.
    regsync never writes the TSC it did not edit."""
    with Machine(smp=1, strategy="regsync") as m:
        m.load("counter")
        ok, how = tsc_writes_work(m.vcpus[0])
    if not ok:
        pytest.skip(f"this host ignores TSC writes ({how}); the same stale write-back is "
                    "shown on the simulator: test_onereg_watchdog.py::"
                    "test_stale_dec_write_back_fires_late_under_qemu2013_only")
    for strategy, backwards in (("qemu2013", True), ("regsync", False)):
        with Machine(smp=1, strategy=strategy) as m:
            m.load("counter")
            v = m.vcpus[0]
            run_to_tick(m, v)
            v.regs.dump()
            time.sleep(0.05)                          # the vCPU sits stopped
            before = v.handle.get_msrs([MSR_TSC])[0]
            v.cache.before_run()
            after = v.handle.get_msrs([MSR_TSC])[0]
            assert (after < before) is backwards, f"{strategy}: TSC {before:#x} -> {after:#x}"
