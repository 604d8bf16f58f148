"""The register cache's contract (shared/DESIGN.md, rules 1-8) on the simulated
backend, with exact kernel transfer counts. No /dev/kvm needed.

Every test drives ``regsync.sim``: SimKernel counts each group fetch (``gets``)
and write (``sets``), and the GPRS writes a run takes from the run page
(``sync_applied``, free like kvm_dirty_regs).
"""

from __future__ import annotations

from collections import Counter

import pytest

from regsync.cache import EditContradicted, RegisterCache, RegisterWriteError
from regsync.regdefs import Register
from regsync.sim import (CATALOG, MSR_RESERVED, RESET_GPRS, RUNNABLE, TSR_WIS, SimKernel,
                         SimRegisters, SimTransport, SimVcpu)
from regsync.strategies import make_cache

BIT = {g.name: g.bit for g in CATALOG.groups}
LEVELS = CATALOG.levels
R = CATALOG.by_name


def transfers(k: SimKernel) -> int:
    return sum(k.gets.values()) + sum(k.sets.values())


def record_sets(k: SimKernel) -> list[tuple[str, dict[str, int]]]:
    """Log of (group, values) for every write transfer from now on."""
    log: list[tuple[str, dict[str, int]]] = []
    orig = k.set

    def set_(group: str, values: dict[str, int]) -> None:
        log.append((group, dict(values)))
        orig(group, values)
    k.set = set_  # type: ignore[method-assign]
    return log


@pytest.fixture(params=[True, False], ids=["sync", "nosync"])
def vcpu(request: pytest.FixtureRequest) -> SimVcpu:
    return SimVcpu(use_sync=request.param)


# --- rule 7: what costs nothing -------------------------------------------------------
def test_read_of_held_register_costs_no_fetch(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    assert regs.r1 == 0x101
    assert k.gets == {"GPRS": 1}
    assert (regs.r3, regs.pc, regs.r1, regs["msr"]) == (0x103, 0x1000, 0x101, 0x0002_9000)
    assert k.gets == {"GPRS": 1} and not k.sets


@pytest.mark.parametrize("group", [g.name for g in CATALOG.groups])
def test_first_read_of_unheld_group_costs_exactly_one_fetch(group: str) -> None:
    """Then the group is held: its other registers answer locally -- except a
    volatile one, whose copy is a sample: every read of it fetches (issue 8 item 6)."""
    v = SimVcpu()
    regs = CATALOG.registers_of(group)
    for r in regs + regs:
        v.regs[r.name]
    volatile_reads = 2 * sum(r.volatile for r in regs)
    first_is_volatile = regs[0].volatile
    expected = volatile_reads + (0 if first_is_volatile else 1)
    assert v.kernel.gets == {group: expected} and not v.kernel.sets


def test_flush_with_nothing_dirty_costs_zero(vcpu: SimVcpu) -> None:
    vcpu.cache.synchronize(LEVELS["FULL"])
    before = transfers(vcpu.kernel)
    vcpu.cache.flush()
    vcpu.cache.flush(allow_defer=False)
    vcpu.cache.synchronize(LEVELS["RUNTIME"])       # asking for less than held: no-op
    vcpu.run()
    assert transfers(vcpu.kernel) == before
    assert not vcpu.kernel.sets and not vcpu.kernel.sync_applied


def test_sync_group_is_held_after_run_for_free() -> None:
    for use_sync, gets in ((True, 0), (False, 1)):
        v = SimVcpu(use_sync=use_sync)
        v.run()
        assert v.regs.pc == 0x1004 and v.regs.r0 == 0x101
        assert v.kernel.gets["GPRS"] == gets


def test_after_run_only_the_handed_back_group_is_held(vcpu: SimVcpu) -> None:
    k = vcpu.kernel
    vcpu.cache.synchronize(LEVELS["FULL"])
    vcpu.run()                                          # the guest step sets srr0 = pc
    gets = Counter(k.gets)
    assert vcpu.regs.srr0 == 0x1000 and vcpu.regs.tcr == k.values["tcr"]
    assert k.gets - gets == {"SPRS": 1, "TIMER": 1}


def test_a_flush_leaves_every_written_group_complete(vcpu: SimVcpu) -> None:
    """The cache holds what it wrote: the transport must have the whole group."""
    k = vcpu.kernel
    k.tick(irq=2)
    vcpu.regs.irq_vector = 0x41                         # EVENTS never fetched
    vcpu.regs.esr = 0x8
    vcpu.cache.flush()
    assert k.gets == {"EVENTS": 1, "SPRS": 1} and k.sets == {"EVENTS": 1, "SPRS": 1}
    assert vcpu.regs.srr1 == 0 and vcpu.regs.irq_vector == 0x41     # held: no fetch
    assert k.gets == {"EVENTS": 1, "SPRS": 1}
    assert vcpu.regs.pending_irq == 1 << 2           # volatile: fetched again
    assert k.gets == {"EVENTS": 2, "SPRS": 1}


# --- rule 3: only dirty groups, coalesced ----------------------------------------------
def test_only_dirty_groups_are_written(vcpu: SimVcpu) -> None:
    vcpu.cache.synchronize(LEVELS["FULL"])
    vcpu.regs.dear = 0xDEAD
    vcpu.run()
    assert vcpu.kernel.sets == {"SPRS": 1}
    assert vcpu.kernel.values["dear"] == 0xDEAD and not vcpu.kernel.sync_applied


def test_writes_to_one_group_are_one_transfer(vcpu: SimVcpu) -> None:
    k = vcpu.kernel
    vcpu.regs.srr0, vcpu.regs.srr1, vcpu.regs.dear, vcpu.regs.esr = 1, 2, 3, 4
    for i in range(8):
        vcpu.regs[f"r{i}"] = 0x50 + i
    assert not k.gets and not k.sets                    # writes alone cost nothing
    vcpu.run()
    assert k.gets == {"GPRS": 1, "SPRS": 1}              # whole structs: fetched once to overlay
    # SPRS follows GPRS in FLUSH_ORDER and goes by ioctl, so GPRS does too (not deferred).
    assert k.sets == {"SPRS": 1, "GPRS": 1} and not k.sync_applied
    assert [k.values[n] for n in ("srr1", "dear", "esr")] == [2, 3, 4]   # step: srr0 = pc
    assert k.values["r1"] == 0x51 and k.values["r2"] == 0x51      # guest step: r2 = r1


def test_deferred_sync_write_costs_no_set_transfer() -> None:
    v = SimVcpu(use_sync=True)
    v.run()
    v.regs.r1 = 0x77
    v.run()
    assert not v.kernel.sets and not v.kernel.gets and v.kernel.sync_applied == {"GPRS": 1}
    assert v.regs.r2 == 0x77 and v.kernel.gets["GPRS"] == 0


# --- rule 1: a fetch never overwrites an edit --------------------------------------------
def test_fetch_never_overwrites_a_dirty_value(vcpu: SimVcpu) -> None:
    vcpu.regs.r1 = 0xE1
    assert not vcpu.kernel.gets
    assert vcpu.regs.r3 == 0x103                       # fetches GPRS
    assert vcpu.kernel.gets == {"GPRS": 1}
    assert vcpu.regs.r1 == 0xE1
    vcpu.cache.invalidate()
    vcpu.cache.synchronize(BIT["GPRS"])
    assert vcpu.regs.r1 == 0xE1 and vcpu.kernel.values["r1"] == 0x101


# --- rule 5: synchronize(level) keeps edits; the seed's sequence --------------------------
def seed_sequence(cache: RegisterCache) -> SimKernel:
    """synchronize RUNTIME, edit, synchronize FULL, edit a FULL-only register, run."""
    transport: SimTransport = cache.transport  # type: ignore[assignment]
    k, regs = transport.kernel, SimRegisters(cache)
    cache.synchronize(LEVELS["RUNTIME"])
    regs.r1 = 0xAAAA
    cache.synchronize(LEVELS["FULL"])
    regs.tcr = 0x1234
    cache.before_run()
    k.run()
    cache.after_run()
    return k


def test_seed_sequence_keeps_both_edits() -> None:
    timer = BIT[R["tcr"].group]                       # the edit only FULL covers
    assert timer & LEVELS["FULL"] and not timer & LEVELS["RESET"]
    k = seed_sequence(make_cache("regsync", SimTransport(SimKernel())))
    assert k.values["r1"] == 0xAAAA and k.values["tcr"] == 0x1234


def test_seed_sequence_qemu2012_loses_the_full_only_edit() -> None:
    k = seed_sequence(make_cache("qemu2012", SimTransport(SimKernel())))
    assert k.values["r1"] == 0xAAAA
    assert k.values["tcr"] == SimKernel().values["tcr"]          # the seed's bug


# --- rule 4: volatile groups ---------------------------------------------------------------
def test_timer_write_sends_only_the_edit_keeping_a_later_tick(vcpu: SimVcpu) -> None:
    """ONE_REG (sim.py): a TIMER edit is one KVM_SET_ONE_REG of that register, so
    the kernel's own tsr/dec changes since the fetch are never written back."""
    k = vcpu.kernel
    dec0 = vcpu.regs.dec                                # TIMER fetched: now held, soon stale
    k.tick()
    vcpu.regs.tcr = 0x0800_0000
    vcpu.run()
    assert k.values["tcr"] == 0x0800_0000
    assert k.values["tsr"] & TSR_WIS and k.values["dec"] == dec0 - 1000
    assert k.sets["TIMER"] == 1 and k.one_reg_sets == {"tcr": 1}


def test_timer_write_has_no_window_between_fetch_and_write() -> None:
    """A tick between the flush's fetch of TIMER and its write survives: ONE_REG
    writes only tcr. (A whole-struct transport loses it: KvmTransport._store_lapic
    documents that window for the LAPIC page.)"""
    v = SimVcpu()
    k = v.kernel

    def race(op: str, group: str) -> None:
        if (op, group) == ("get", "TIMER"):
            k.hook = None
            k.tick()
    v.regs.tcr = 1
    k.hook = race
    v.run()
    assert k.gets["TIMER"] == 1                         # the race did run
    assert k.values["tsr"] & TSR_WIS and k.values["tcr"] == 1


def test_events_never_write_back_an_untouched_pending_irq(vcpu: SimVcpu) -> None:
    k = vcpu.kernel
    assert vcpu.regs.pending_irq == 0
    k.tick(irq=3)
    log = record_sets(k)
    vcpu.regs.irq_vector = 0x41
    vcpu.run()
    assert log == [("EVENTS", {"irq_vector": 0x41})]     # valid-flags: dirty only, no fetch
    assert k.values["pending_irq"] == 1 << 3 and k.gets["EVENTS"] == 1


# --- fetch side effects: MPSTATE --------------------------------------------------------------
def test_mpstate_fetch_flushes_dirty_gprs_then_invalidates(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    assert regs.srr0 == 0 and regs.esr == 0
    k.values["esr"] = 5                                 # changed behind the cache: held is stale
    regs.r1 = 0xE1
    k.request_reset()
    log = record_sets(k)
    gets = k.gets["GPRS"]
    with pytest.warns(EditContradicted, match="r1 0xe1 -> 0x0"):
        assert regs.mp_state == RUNNABLE                # the fetch applies the reset
    assert log[0][0] == "GPRS" and log[0][1]["r1"] == 0xE1   # edit reached the kernel first
    assert k.sets == {"GPRS": 1} and k.gets["MPSTATE"] == 1
    assert not vcpu.cache.dirty_registers()
    # Written (fetched first: not held), then read back before and after the side
    # effect (to tell a contradiction from the kernel normalising a value): held.
    assert k.gets["GPRS"] == gets + 3
    assert regs.r1 == RESET_GPRS["r1"] and regs.pc == RESET_GPRS["pc"]
    assert k.gets["GPRS"] == gets + 3
    assert [c.register for c in vcpu.cache.stats.contradicted] == ["r1"]
    assert regs.esr == 0 and k.gets["SPRS"] == 2        # SPRS was made stale: one refetch


def test_mpstate_fetch_without_reset_keeps_the_edit(vcpu: SimVcpu) -> None:
    vcpu.regs.r1 = 0xE1
    assert vcpu.regs.mp_state == RUNNABLE
    assert vcpu.regs.r1 == 0xE1 and vcpu.kernel.values["r1"] == 0xE1


def test_mpstate_fetch_takes_back_a_deferred_write_first() -> None:
    v = SimVcpu(use_sync=True)
    k = v.kernel
    v.regs.r1 = 0xE1
    v.cache.flush()                                     # GPRS queued for the run
    assert v.transport.deferred and not k.sets
    k.request_reset()
    assert v.regs.mp_state == RUNNABLE
    assert k.sets == {"GPRS": 1} and not k.dirty_regs   # written by ioctl before the fetch
    v.run()
    assert k.values["r1"] == 0 and k.values["pc"] == (RESET_GPRS["pc"] + 4) & 0xFFFF_FFFF


# --- rule 8: refused writes ---------------------------------------------------------------------
BAD_MSR = MSR_RESERVED | 0x9000


def test_refused_write_names_group_keeps_value_and_does_not_run() -> None:
    v = SimVcpu(use_sync=False)
    k, regs = v.kernel, v.regs
    regs.srr1 = 0x700
    regs.msr = BAD_MSR
    with pytest.raises(RegisterWriteError) as ei:
        v.run()
    assert ei.value.group == "GPRS" and ei.value.registers == ["msr"]
    assert "GPRS" in str(ei.value) and "msr" in str(ei.value)
    assert k.runs == 0 and k.values["msr"] == 0x0002_9000
    assert regs.msr == BAD_MSR and "msr" in v.cache.dirty_registers()
    assert k.values["srr1"] == 0                        # SPRS comes after GPRS: not written
    regs.msr = 0x9000                                   # correct it: both reach the kernel
    v.run()
    assert k.runs == 1 and k.values["msr"] == 0x9000 and k.values["srr1"] == 0x700


def test_refused_write_then_discard_restores_the_kernels_value(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    regs.msr = BAD_MSR
    with pytest.raises(RegisterWriteError):
        vcpu.run()
    assert k.runs == 0 and regs.msr == BAD_MSR
    vcpu.cache.discard()
    assert regs.msr == 0x0002_9000 and not vcpu.cache.dirty_registers()
    vcpu.run()
    assert k.runs == 1


def test_deferred_write_refused_at_run_names_the_group() -> None:
    v = SimVcpu(use_sync=True)
    k, regs = v.kernel, v.regs
    regs.msr = BAD_MSR
    regs.r5 = 0x55
    with pytest.raises(RegisterWriteError) as ei:
        v.run()                                         # refused by the run, found by ioctl
    assert ei.value.group == "GPRS" and set(ei.value.registers) == {"msr", "r5"}
    assert k.runs == 0 and not v.transport.deferred and not k.dirty_regs
    assert k.values["msr"] == 0x0002_9000 and k.values["r5"] == 0x105
    assert regs.msr == BAD_MSR and regs.r5 == 0x55
    v.cache.discard()
    assert regs.msr == 0x0002_9000 and regs.r5 == 0x105
    v.run()
    assert k.runs == 1 and k.values["r5"] == 0x105


# --- the register file: widths and names -----------------------------------------------------
def test_width_checks() -> None:
    v = SimVcpu()
    with pytest.raises(ValueError, match="32 bits"):
        v.regs.r1 = 1 << 32
    with pytest.raises(ValueError):
        v.regs.r1 = -(1 << 31) - 1
    with pytest.raises(TypeError):
        v.regs.r1 = 1.0  # type: ignore[assignment]
    with pytest.raises(TypeError):
        v.regs["tcr"] = "0"  # type: ignore[assignment]
    v.regs.r1 = -1                                      # two's complement, within width
    assert v.regs.r1 == 0xFFFF_FFFF
    assert v.cache.dirty_registers() == ["r1"] and transfers(v.kernel) == 0


def test_unknown_register_names_suggest_close_ones() -> None:
    regs = SimVcpu().regs
    with pytest.raises(AttributeError, match="did you mean.*srr0"):
        regs.srr3
    with pytest.raises(AttributeError, match="tsr"):
        regs.tsrr = 1
    with pytest.raises(KeyError, match="pending_irq"):
        regs["pending_irqs"]
    with pytest.raises(KeyError, match="no register named 'zzz'"):
        regs["zzz"] = 0
    assert "dec" in regs and "r8" not in regs


def test_add_register_outside_the_catalog() -> None:
    v = SimVcpu()
    sprg0 = Register("sprg0", 32, "SPRS", "sprg0")
    v.cache.synchronize(BIT["SPRS"])
    v.cache.add_register(sprg0)                         # probed: the kernel knows it
    after_add = transfers(v.kernel)
    assert v.cache.read(sprg0) == 0 and transfers(v.kernel) == after_add   # held with the group
    v.cache.write(sprg0, 0x5A)
    v.run()
    assert v.kernel.values["sprg0"] == 0x5A and v.kernel.sets == {"SPRS": 1}


# --- regressions: writes deferred into kvm_dirty_regs by an explicit flush() -----------------
def test_side_effect_fetch_after_a_deferred_flush_writes_gprs_once() -> None:
    v = SimVcpu(use_sync=True)
    v.regs.r1 = 5
    v.cache.flush()          # GPRS deferred into the run
    v.regs.r3 = 7            # dirty again
    v.regs.mp_state          # MPSTATE fetch: GPRS must reach the kernel first
    assert v.kernel.values["r1"] == 5 and v.kernel.values["r3"] == 7
    assert v.kernel.sets == {"GPRS": 1}


def test_invalidate_while_a_sync_write_is_deferred_keeps_it() -> None:
    """invalidate() forgets what is held, never an edit: a GPRS write queued in the
    run page still reaches the kernel (it was lost, r1 = 0x101, before the fix)."""
    v = SimVcpu(use_sync=True)
    v.regs.r1 = 5
    v.cache.flush()          # GPRS deferred into the run (r1 only in the run page)
    v.cache.invalidate()     # vcpu.invalidate(): "the kernel state changed"
    assert v.regs.r3 == 0x103    # refetches GPRS: must not overwrite the queued r1
    assert v.regs.r1 == 5
    v.regs.r4 = 9
    v.run()
    assert v.kernel.values["r4"] == 9
    assert v.kernel.values["r1"] == 5


def test_a_deferred_write_keeps_flush_order_across_flush_calls() -> None:
    v = SimVcpu(use_sync=True)
    v.cache.synchronize(LEVELS["FULL"])
    v.regs.r1 = 5
    v.cache.flush()          # GPRS deferred
    v.regs.srr1 = 6          # SPRS comes after GPRS in FLUSH_ORDER
    del v.kernel.log[:]
    v.run()
    assert v.kernel.log == [("set", "GPRS"), ("set", "SPRS")]   # was SPRS, then GPRS


def test_qemu_strategy_on_another_arch_puts_the_runtime_level() -> None:
    """QEMU's x86 put list does not exist elsewhere: the RUNTIME level's groups stand in."""
    cache = make_cache("qemu", SimTransport(SimKernel()))
    assert [g for g, _ in cache.plan.steps[1]] == ["GPRS", "SPRS"]  # type: ignore[attr-defined]


def test_a_run_that_did_not_apply_kvm_dirty_regs_keeps_the_edits() -> None:
    """An AP waiting for SIPI returns from KVM_RUN before sync_regs and stores its own
    registers over the kvm_run page: the queued edit must stay dirty, not vanish."""
    v = SimVcpu(use_sync=True)
    v.run()
    v.kernel.waiting_for_sipi = True
    v.regs.r1 = 77
    v.run()                                   # deferred, not applied, page overwritten
    assert v.kernel.values["r1"] != 77
    assert v.regs.r1 == 77                    # still the edit, still dirty
    v.kernel.waiting_for_sipi = False
    v.run()
    assert v.kernel.values["r1"] == 77        # applied at the first real entry
