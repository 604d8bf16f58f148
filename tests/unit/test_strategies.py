"""The comparison strategies: what each QEMU version writes (data, checked against
the facts read from QEMU's source, cited in strategies/qemu_plans.py) and how each
one's synchronize/put algorithm behaves on the simulator. No /dev/kvm needed."""

from __future__ import annotations

import pytest

from regsync.sim import CATALOG, RESET_GPRS, SimKernel, SimTransport, SimVcpu
from regsync.strategies import STRATEGIES, make_cache
from regsync.strategies import qemu_plans as P

TODAY, V13 = P.X86_PLANS["qemu"], P.X86_PLANS["qemu2012"]
LEVELS = CATALOG.levels


def kinds(plan: P.PutPlan, level: int) -> list[str]:
    return [k for k, _ in plan.steps[level]]


def events(plan: P.PutPlan, level: int) -> P.EventsPut:
    return next(a for k, a in plan.steps[level] if k == "EVENTS")  # type: ignore[return-value]


def test_registry_has_every_strategy() -> None:
    assert set(STRATEGIES) == {"regsync", "eager", "qemu2012", "qemu2013", "qemu"}
    with pytest.raises(ValueError, match="unknown strategy 'qemu2014'"):
        make_cache("qemu2014", SimTransport(SimKernel()))


# --- QEMU today (target/i386/kvm/kvm.c) ---------------------------------------------------
def test_today_put_order_and_groups_per_level() -> None:
    assert kinds(TODAY, P.RUNTIME) == ["SREGS", "REGS", "XSAVE", "XCRS", "MSRS", "EVENTS",
                                       "TSC_DEADLINE", "DEBUGREGS"]
    assert kinds(TODAY, P.RESET) == ["MSRS", "SREGS", "REGS", "XSAVE", "XCRS", "MSRS",
                                     "EVENTS", "MP_STATE", "TSC_DEADLINE", "DEBUGREGS"]
    assert "LAPIC" not in kinds(TODAY, P.FULL)       # the APIC device writes it, not the put


def test_today_msr_lists() -> None:
    runtime, reset = set(TODAY.msrs(P.RUNTIME)), set(TODAY.msrs(P.RESET))
    assert {0x3B, 0xC0000081, 0xC0000082} <= runtime  # TSC_ADJUST, STAR, LSTAR every put
    assert not {0x10, 0x4B564D00, 0x4B564D01, 0x6E0} & runtime   # TSC, kvmclock: RESET+
    assert {0x10, 0x4B564D00, 0x4B564D01, P.MSR_FEATURE_CONTROL} <= reset
    assert TODAY.msrs(P.FULL) == TODAY.msrs(P.RESET)


def test_today_event_flags() -> None:
    assert events(TODAY, P.RUNTIME) == P.EventsPut(False, "no", True)
    assert events(TODAY, P.RESET) == P.EventsPut(True, "if-sipi-received", True)


def test_today_gets_mp_state_before_the_registers_it_can_change() -> None:
    order = TODAY.get_order
    assert order[:3] == ("EVENTS", "MP_STATE", "REGS") and order.index("SREGS") > 1


# --- QEMU v1.3 (target-i386/kvm.c) ---------------------------------------------------------
def test_v13_put_order_and_msrs() -> None:
    assert kinds(V13, P.RUNTIME) == ["REGS", "XSAVE", "XCRS", "SREGS", "MSRS", "EVENTS",
                                     "DEBUGREGS"]
    assert kinds(V13, P.RESET)[5:7] == ["MP_STATE", "LAPIC"]
    assert 0x6E0 in V13.msrs(P.RUNTIME)               # TSC_DEADLINE in the RUNTIME batch
    assert 0x10 not in V13.msrs(P.RESET) and 0x10 in V13.msrs(P.FULL)
    assert {0x11, 0x12} <= set(V13.msrs(P.RESET)) - set(V13.msrs(P.RUNTIME))
    assert events(V13, P.RUNTIME) == P.EventsPut(False, "no", False)
    assert events(V13, P.RESET) == P.EventsPut(True, "yes", False)
    assert V13.get_order.index("REGS") < V13.get_order.index("MP_STATE")
    assert P.X86_PLANS["qemu2013"].steps == V13.steps   # the patch changed kvm-all.c only


# --- the algorithms, on the simulator ------------------------------------------------------
def seed(strategy: str) -> SimVcpu:
    """RUNTIME sync, edit r1, FULL sync, edit tcr (FULL only), run."""
    v = SimVcpu(strategy=strategy)
    v.cache.synchronize(LEVELS["RUNTIME"])
    v.regs.r1 = 0xAAAA
    v.cache.synchronize(LEVELS["FULL"])
    v.regs.tcr = 0x1234
    v.run()
    return v


def test_qemu2012_ignores_the_wider_request_and_loses_the_edit() -> None:
    v = seed("qemu2012")
    assert v.kernel.values["r1"] == 0xAAAA and v.kernel.values["tcr"] != 0x1234
    assert v.kernel.gets["TIMER"] == 1                 # one get of everything, no second


def test_qemu2013_puts_the_dirty_level_then_gets_and_keeps_both_edits() -> None:
    v = seed("qemu2013")
    assert v.kernel.values["r1"] == 0xAAAA and v.kernel.values["tcr"] == 0x1234
    log = [e for e in v.kernel.log if e[0] != "run"]
    first_put = log.index(("set", "GPRS"))
    assert ("get", "GPRS") in log[first_put:]          # put RUNTIME, then get at FULL
    assert v.kernel.sets["TIMER"] == 1 and v.kernel.sets["EVENTS"] == 1   # run put FULL


def test_qemu_today_writes_back_after_a_read_only_access() -> None:
    v = SimVcpu(strategy="qemu")
    v.regs.r3                                          # any read: get all, vcpu_dirty
    v.run()
    assert v.kernel.sets["GPRS"] == 1 and v.kernel.sets["SPRS"] == 1
    v.run()                                            # nothing read since: no put
    assert v.kernel.sets["GPRS"] == 1


@pytest.mark.parametrize("strategy,stale", [("qemu2012", True), ("qemu2013", True),
                                            ("qemu", False), ("regsync", False)])
def test_get_order_and_a_reset_applied_by_the_mp_state_fetch(strategy: str, stale: bool) -> None:
    """2012's get fetched the registers before MP_STATE (whose fetch applies a pending
    reset, as KVM_GET_MP_STATE processes INIT/SIPI), then put them back: the reset's
    pc was overwritten. QEMU moved MP_STATE first; regsync refetches what it resets."""
    v = SimVcpu(strategy=strategy, use_sync=False)
    v.kernel.request_reset()
    v.regs.dump()
    v.run()
    reset_pc = (RESET_GPRS["pc"] + 4) & 0xFFFF_FFFF
    assert (v.kernel.values["pc"] != reset_pc) is stale, hex(v.kernel.values["pc"])
