"""Promises of the cache and the KVM transport that mutation testing found unguarded
(issue 8 item 21), each shown on real KVM. docs/mutation.md lists the mutants.

The counter guest (guests/src/counter.S): at every tick exit r12 has been
incremented by one and r13 holds MSR_STAR as the guest read it.
"""

from __future__ import annotations

import pytest

from regsync import KvmError, Machine, RegisterWriteError
from regsync.arch.x86_64 import CATALOG
from regsync.kvm import MsrError
from regsync.kvm import structs as ks

STAR = 0x0023_0010_0000_0000
TSC_ADJUST = 0x3B
BIT = {g.name: g.bit for g in CATALOG.groups}


def run_to_tick(m: Machine, v) -> None:
    while True:
        ex = v.run()
        assert ex.kind == "io", ex
        if ex.port == 0x501:
            return
        m.dispatch(v, ex)


@pytest.fixture
def counter():
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        yield m, v


# --- queued writes (rule 3: kvm_dirty_regs) -----------------------------------------------
def test_a_second_queued_group_keeps_the_first_queued(counter) -> None:
    """REGS then SREGS queued by two flushes: both are applied, neither stays dirty, and
    a later GPR edit never carries the first edit again."""
    m, v = counter
    v.regs.r12 = 1000
    v.cache.flush()                                  # REGS queued
    v.regs.cr8 = v.regs.cr8                          # SREGS queued by a second flush
    v.cache.flush()
    run_to_tick(m, v)
    assert v.regs.r12 == 1001 and v.cache.dirty_registers() == []
    v.regs.rbx = 0                                   # a new REGS edit (the guest sets rbx)
    run_to_tick(m, v)
    assert v.regs.r12 == 1002                        # not 1001: the stale 1000 not rewritten


def test_regs_and_events_ride_one_run_beside_an_msr_write(counter) -> None:
    m, v = counter
    io = v.handle.counters
    before = dict(v.stats["deferred_writes"])
    sets = (io["KVM_SET_REGS"], io["KVM_SET_VCPU_EVENTS"])
    v.regs.r12 = 1000
    v.regs["nmi.masked"] = v.regs["nmi.masked"]
    v.regs.star = STAR                               # MSRS: the flush goes through store()
    run_to_tick(m, v)
    assert (io["KVM_SET_REGS"], io["KVM_SET_VCPU_EVENTS"]) == sets   # both rode kvm_run
    assert v.cache.dirty_registers() == []
    after = v.stats["deferred_writes"]
    assert after.get("REGS", 0) == before.get("REGS", 0) + 1
    assert after.get("EVENTS", 0) == before.get("EVENTS", 0) + 1
    v.regs.rbx = 0
    run_to_tick(m, v)
    assert (v.regs.r12, v.regs.r13) == (1002, STAR)


# --- rule 8: a short KVM_SET_MSRS ---------------------------------------------------------
def test_a_short_set_msrs_keeps_exactly_the_refused_msr_dirty(counter, monkeypatch) -> None:
    """KVM wrote STAR (MSRS) and stopped at TSC_ADJUST (MSRS_TIME): MSRS is clean, only
    tsc_adjust stays dirty, and the next flush writes it alone."""
    m, v = counter
    v.regs.star = STAR
    run_to_tick(m, v)                                # one MSRS write already counted
    real = v.handle.set_msrs

    def short(items: list[tuple[int, int]]) -> None:
        indices = [i for i, _ in items]
        if TSC_ADJUST in indices:                    # KVM stops there, the ones before happen
            n = indices.index(TSC_ADJUST)
            real(items[:n])
            raise MsrError("KVM_SET_MSRS", "vcpu 0", indices, n, value=items[n][1])
        real(items)

    monkeypatch.setattr(v.handle, "set_msrs", short)
    writes = v.stats["writes"]["MSRS"]
    v.regs.star = STAR + 0x10000
    v.regs.tsc_adjust = 0
    with pytest.raises(RegisterWriteError) as ei:
        v.run()
    assert ei.value.registers == ["tsc_adjust"]
    assert v.cache.dirty_registers() == ["tsc_adjust"]
    assert v.stats["writes"]["MSRS"] == writes + 1
    with pytest.raises(RegisterWriteError):          # still dirty: the vCPU does not run
        v.run()
    monkeypatch.setattr(v.handle, "set_msrs", real)
    io = v.handle.counters
    before = dict(io)
    v.flush()
    changed = {k: io[k] - before.get(k, 0) for k in io if io[k] != before.get(k, 0)}
    assert changed == {"KVM_SET_MSRS": 1}
    run_to_tick(m, v)
    assert v.regs.r13 == STAR + 0x10000


# --- put: a whole group replaced (snapshots) ----------------------------------------------
def test_put_writes_at_once_and_keeps_every_other_edit_and_held_group(counter) -> None:
    m, v = counter
    v.regs.r12 = 100
    run_to_tick(m, v)                                # r12 = 101, one REGS write counted
    saved = v.cache.export(BIT["REGS"])["REGS"]
    run_to_tick(m, v)                                # r12 = 102
    io = v.handle.counters
    writes = v.stats["writes"]["REGS"]
    v.regs.r12 = 500
    v.regs.star = STAR                               # another group's edit
    sets, sregs_gets = io["KVM_SET_REGS"], io["KVM_GET_SREGS"]
    v.cache.put("REGS", saved)
    assert io["KVM_SET_REGS"] == sets + 1            # written now, by ioctl
    assert v.stats["writes"]["REGS"] == writes + 1
    assert v.cache.dirty_registers() == ["star"]
    gets = io["KVM_GET_REGS"]
    assert v.regs.r12 == 101 and io["KVM_GET_REGS"] == gets   # held: the put's value
    v.regs.cr0                                                   # SREGS is still held
    assert io["KVM_GET_SREGS"] == sregs_gets
    run_to_tick(m, v)
    assert (v.regs.r12, v.regs.r13) == (102, STAR)


def test_put_deferred_rides_the_next_run(counter) -> None:
    m, v = counter
    saved = v.cache.export(BIT["REGS"])["REGS"]      # r12 = 1
    run_to_tick(m, v)
    io = v.handle.counters
    sets = io["KVM_SET_REGS"]
    v.cache.put("REGS", saved, defer=True)
    assert io["KVM_SET_REGS"] == sets
    run_to_tick(m, v)
    assert v.regs.r12 == 2 and io["KVM_SET_REGS"] == sets


def test_put_lands_after_a_write_queued_before_it(counter) -> None:
    m, v = counter
    saved = v.cache.export(BIT["REGS"])["REGS"]      # r12 = 1
    v.regs.r12 = 500
    v.cache.flush()                                  # queued in kvm_dirty_regs
    v.cache.put("REGS", saved)
    run_to_tick(m, v)
    assert v.regs.r12 == 2                           # the put's value, not 500's


def test_a_refused_put_leaves_the_group_not_held_and_nothing_else_held(counter) -> None:
    m, v = counter
    cr0 = v.regs.cr0
    sregs = ks.kvm_sregs.from_buffer_copy(v.cache.export(BIT["SREGS"])["SREGS"])
    sregs.cr0 = 0x8000_0000                          # PG without PE: KVM_SET_SREGS refuses
    with pytest.raises(KvmError):
        v.cache.put("SREGS", bytes(sregs))
    io = v.handle.counters
    gets, dbg = io["KVM_GET_SREGS"], io["KVM_GET_DEBUGREGS"]
    assert v.regs.cr0 == cr0 and io["KVM_GET_SREGS"] == gets + 1   # fetched again
    v.regs.dr7                                       # never held since the run: fetched
    assert io["KVM_GET_DEBUGREGS"] == dbg + 1
    run_to_tick(m, v)


def test_a_deferred_put_counts_one_write(counter) -> None:
    """stats.writes counts transfers: a put queued in kvm_dirty_regs is one write, counted
    when the run applies it (it was counted twice: at put() and again by the run)."""
    m, v = counter
    saved = v.cache.export(BIT["REGS"])["REGS"]
    writes = v.stats["writes"].get("REGS", 0)
    v.cache.put("REGS", saved, defer=True)
    run_to_tick(m, v)
    assert v.stats["writes"].get("REGS", 0) == writes + 1
