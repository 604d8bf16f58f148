"""The seed's own case on the ONE_REG BookE simulator (regsync.sim): the kernel's
watchdog sets TSR bits while userspace is outside the run, and a value write of
TSR made from an older read loses them. regsync writes TSR only by intent
(set_bits/clear_bits -> KVM_REG_PPC_OR_TSR / KVM_REG_PPC_CLEAR_TSR); the QEMU
strategies write it by value (strategies/qemu.py explains how on this catalog).

The deep hypothesis profile (REGSYNC_HYPOTHESIS=deep) runs >= 10,000 interleavings.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regsync.cache
from regsync.sim import (CATALOG, TCR_ARE, TCR_WRC, TSR_DIS, TSR_ENW, TSR_WIS, SimKernel,
                         SimVcpu)

R = CATALOG.by_name
LEVELS = CATALOG.levels
QEMU_STRATEGIES = ("qemu2012", "qemu2013", "qemu")


# --- the interface: refusal, intent transfers ---------------------------------------------
def test_plain_tsr_assignment_is_refused_and_points_to_the_intent_calls() -> None:
    v = SimVcpu()
    for assign in (lambda: setattr(v.regs, "tsr", 0), lambda: v.regs.__setitem__("tsr", 0)):
        with pytest.raises(ValueError, match=r"set_bits\('tsr', mask\).*clear_bits"):
            assign()
    assert not v.cache.dirty_registers() and not v.kernel.one_reg_sets


def test_set_bits_and_clear_bits_are_or_and_clear_transfers_now() -> None:
    v = SimVcpu()
    k = v.kernel
    k.values["tsr"] = TSR_ENW | TSR_WIS
    v.regs.clear_bits("tsr", TSR_ENW)
    assert k.one_reg_sets == {"clear_tsr": 1} and k.values["tsr"] == TSR_WIS
    v.regs.set_bits("tsr", TSR_DIS)
    assert k.one_reg_sets == {"clear_tsr": 1, "or_tsr": 1}
    assert k.values["tsr"] == TSR_WIS | TSR_DIS
    assert v.regs.tsr == TSR_WIS | TSR_DIS            # the group was dropped: read fresh
    v.run()
    assert not k.sets                                 # the run wrote nothing by value


def test_intent_calls_are_refused_for_value_registers_and_bad_masks() -> None:
    v = SimVcpu()
    with pytest.raises(ValueError, match="tcr is written by value"):
        v.regs.set_bits("tcr", 1)
    with pytest.raises(ValueError, match="does not fit in 32 bits"):
        v.regs.clear_bits("tsr", 1 << 32)
    with pytest.raises(KeyError, match="tsr"):
        v.regs.set_bits("tsrr", 1)
    assert not v.kernel.one_reg_sets


def test_cache_module_has_no_branch_on_the_backend() -> None:
    """The same RegisterCache drives KVM and the simulator: cache.py imports only the
    arch-neutral vocabulary and never asks which backend or architecture it has."""
    tree = ast.parse(Path(regsync.cache.__file__).read_text())
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert local <= {"regdefs"}, local
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"SimTransport", "KvmTransport", "SimKernel"}
    assert "arch" not in attrs and "isinstance" not in {
        n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name) and any(
            isinstance(a, ast.Attribute) and a.attr == "transport" for a in n.args)}


# --- the kernel's watchdog and decrementer ---------------------------------------------------
def test_watchdog_sets_enw_then_wis_then_exits_on_the_final_expiry() -> None:
    k = SimKernel()
    k.values["tcr"] |= TCR_WRC & 0x1000_0000
    k.watchdog_timeout()
    assert k.values["tsr"] == TSR_ENW
    k.watchdog_timeout()
    assert k.values["tsr"] == TSR_ENW | TSR_WIS and k.values["pending_irq"] & 1
    assert k.watchdog_exits == 0
    k.watchdog_timeout()
    assert k.watchdog_exits == 1


def test_decrementer_sets_dis_and_reloads_from_decar() -> None:
    k = SimKernel()
    k.values |= {"dec": 10, "decar": 500, "tcr": TCR_ARE}
    k.decrement(4)
    assert k.values["dec"] == 6 and not k.values["tsr"] & TSR_DIS
    k.decrement(6)
    assert k.values["dec"] == 500 and k.values["tsr"] & TSR_DIS


# --- the seed's race ---------------------------------------------------------------------------
def acknowledge_enw(v: SimVcpu, old_tsr: int) -> None:
    """Userspace's watchdog model acknowledges the first timeout: clear ENW.

    regsync: by intent. The QEMU strategies: as env->spr[SPR_BOOKE_TSR] = value, a
    value computed from the read (cache.write is that env store)."""
    if v.cache.__class__.__name__ == "RegisterCache":
        v.regs.clear_bits("tsr", TSR_ENW)
    else:
        v.cache.write(R["tsr"], old_tsr & ~TSR_ENW)


def seed_race(strategy: str) -> SimKernel:
    """Read TSR, the watchdog ticks (WIS), write TSR from the read, run."""
    v = SimVcpu(strategy=strategy)
    k = v.kernel
    k.watchdog_timeout()                              # ENW: the first period elapsed
    old = v.regs.tsr                                  # userspace reads TSR ...
    k.watchdog_timeout()                              # ... the kernel sets WIS ...
    acknowledge_enw(v, old)                           # ... userspace writes TSR
    v.run()
    return k


@pytest.mark.parametrize("strategy", QEMU_STRATEGIES)
def test_seed_race_loses_wis_under_the_qemu_strategies(strategy: str) -> None:
    k = seed_race(strategy)
    assert not k.values["tsr"] & TSR_ENW              # the acknowledgement landed ...
    assert not k.values["tsr"] & TSR_WIS              # ... and wiped the kernel's WIS


def test_seed_race_keeps_wis_under_regsync() -> None:
    k = seed_race("regsync")
    assert k.values["tsr"] == TSR_WIS                 # ENW cleared, WIS kept
    assert k.one_reg_sets == {"clear_tsr": 1}


# Interleavings: userspace steps and kernel timeouts in any order. The model keeps
# what TSR must be: the kernel's timeouts, minus exactly the bits userspace cleared.
OPS = st.lists(st.sampled_from(["timeout", "read", "ack_enw", "ack_wis", "run", "sync_full",
                                "edit_gpr", "edit_tcr", "read_dec"]), max_size=30)
DEEP = os.environ.get("REGSYNC_HYPOTHESIS") == "deep"
EXAMPLES = max(10_000, settings().max_examples) if DEEP else settings().max_examples


def interleave(strategy: str, ops: list[str]) -> tuple[int, int]:
    """Run ops; return (kernel TSR, the TSR no bit of which was lost)."""
    v = SimVcpu(strategy=strategy)
    k, expect, seen = v.kernel, 0, 0
    for op in ops:
        if op == "timeout":
            k.watchdog_timeout()
            expect = _timeout(expect)
        elif op == "read":
            seen = v.regs.tsr
        elif op in ("ack_enw", "ack_wis"):
            bit = TSR_ENW if op == "ack_enw" else TSR_WIS
            if strategy == "regsync":
                v.regs.clear_bits("tsr", bit)
            else:
                v.cache.write(R["tsr"], seen & ~bit)
            expect &= ~bit
        elif op == "run":
            v.run()
        elif op == "sync_full":
            v.cache.synchronize(LEVELS["FULL"])
        elif op == "edit_gpr":
            v.regs.r3 = 0x33
        elif op == "edit_tcr":
            v.regs.tcr = 0x0800_0000
        elif op == "read_dec":
            v.regs.dec
    v.run()
    return k.values["tsr"], expect


def _timeout(tsr: int) -> int:
    if not tsr & TSR_ENW:
        return tsr | TSR_ENW
    return tsr | TSR_WIS


@settings(max_examples=EXAMPLES, deadline=None)
@given(ops=OPS)
def test_no_interleaving_loses_a_watchdog_bit_under_regsync(ops: list[str]) -> None:
    tsr, expect = interleave("regsync", ops)
    assert tsr & (TSR_ENW | TSR_WIS) == expect & (TSR_ENW | TSR_WIS), ops


@pytest.mark.parametrize("strategy", QEMU_STRATEGIES)
def test_the_same_interleavings_find_the_loss_under_qemu(strategy: str) -> None:
    """The interleaving model is not vacuous: the seed's race in its terms."""
    tsr, expect = interleave(strategy, ["timeout", "read", "timeout", "ack_enw"])
    assert expect & TSR_WIS and not tsr & TSR_WIS


# --- the other stale write-backs, shown here because real KVM here cannot -------------------
def test_stale_dec_write_back_fires_late_under_qemu2013_only() -> None:
    """The TSC/TSC_DEADLINE class (this host ignores TSC writes): after a FULL
    dump, qemu2013 puts FULL before the run, writing DEC back as it was at the
    dump; the decrementer fires later by the time the vCPU sat stopped."""
    for strategy, late in (("qemu2013", True), ("qemu", False), ("qemu2012", False),
                           ("regsync", False)):
        v = SimVcpu(strategy=strategy)
        k = v.kernel
        v.regs.dump()                                 # a monitor's full register dump
        dec_at_dump = k.values["dec"]
        k.decrement(400_000)                          # time passes while stopped
        v.run()
        assert (k.values["dec"] == dec_at_dump) is late, strategy


def test_pending_interrupt_erased_by_a_full_dump_under_qemu2013_only() -> None:
    """The x86 NMI/INIT class on the simulator: an interrupt the kernel raises
    between a FULL dump and the run is erased by a put that writes EVENTS back."""
    for strategy, erased in (("qemu2013", True), ("qemu", False), ("qemu2012", False),
                             ("regsync", False)):
        v = SimVcpu(strategy=strategy)
        v.regs.dump()
        v.kernel.values["pending_irq"] |= 1 << 5      # raised while the vCPU is stopped
        v.run()
        assert (not v.kernel.values["pending_irq"] & 1 << 5) is erased, strategy
