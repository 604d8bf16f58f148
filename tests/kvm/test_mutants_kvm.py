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
from ticks import run_to_tick  # tests/kvm/ticks.py

STAR = 0x0023_0010_0000_0000
TSC_ADJUST = 0x3B
LVT_MASKED = 1 << 16
BIT = {g.name: g.bit for g in CATALOG.groups}


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
    assert ei.value.registers == ["tsc_adjust"] and ei.value.group == "MSRS+MSRS_TIME"
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
    delta = _ioctl_delta(v, lambda: run_to_tick(m, v))
    assert {k for k in delta if k.startswith("KVM_SET_")} == {"KVM_SET_MSRS"}   # star only
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


def test_a_deferred_put_keeps_another_queued_group(counter) -> None:
    m, v = counter
    saved = v.cache.export(BIT["REGS"])["REGS"]      # r12 = 1
    v.regs.cr8 = v.regs.cr8
    v.cache.flush()                                  # SREGS queued
    v.cache.put("REGS", saved, defer=True)
    run_to_tick(m, v)
    assert v.regs.r12 == 2 and v.cache.dirty_registers() == []


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
    deferred = v.stats["deferred_writes"].get("REGS", 0)
    v.cache.put("REGS", saved, defer=True)
    assert v.cache.in_flight == BIT["REGS"] and v.stats["writes"].get("REGS", 0) == writes
    run_to_tick(m, v)
    assert v.stats["writes"].get("REGS", 0) == writes + 1
    assert v.stats["deferred_writes"].get("REGS", 0) == deferred + 1


# --- the register file on x86: the lapic.tpr alias and MSRs by index -----------------------
def test_tpr_alias_takes_exactly_what_cr8_keeps(counter) -> None:
    """lapic.tpr is 8 bits, CR8 = TPR[7:4]: 0x00..0xF0 in steps of 0x10 are kept, anything
    else is refused naming lapic.tpr (never written to CR8 masked or wrapped)."""
    m, v = counter
    for ok in (0xF0, 0x10, 0):
        v.regs["lapic.tpr"] = ok
        assert v.regs["lapic.tpr"] == ok and v.regs.cr8 == ok >> 4
    for bad in (0x21, 0x01, 0x0F):
        with pytest.raises(ValueError, match=r"^lapic\.tpr=.*TPR\[3:0\]"):
            v.regs["lapic.tpr"] = bad
    for bad in (0x100, 0x1F0, -0x10):
        with pytest.raises(ValueError, match=rf"^lapic\.tpr: {bad!r} does not fit in 8 bits$"):
            v.regs["lapic.tpr"] = bad
    with pytest.raises(ValueError, match=r"^lapic\.tpr: "):
        v.regs["lapic.tpr"] = 1.0  # type: ignore[assignment]
    with pytest.raises(ValueError, match="^lapic.tpr is written by value"):
        v.regs.set_bits("lapic.tpr", 0x10)
    assert v.regs.cr8 == 0
    run_to_tick(m, v)
    assert v.regs.r15 == 0


MTRR_DEF_TYPE = 0x2FF       # an MSR KVM saves that the catalog does not name


def test_an_msr_outside_the_catalog_reads_writes_and_checks_its_width(counter) -> None:
    m, v = counter
    value = v.handle.get_msrs([MTRR_DEF_TYPE])[0]
    assert v.regs.msr(MTRR_DEF_TYPE) == value
    assert v.regs.msr(MTRR_DEF_TYPE) == value             # the same register, again
    with pytest.raises(ValueError, match=r"^msr_0x2ff: 0x10000000000000000 does not fit in 64"):
        v.regs.set_msr(MTRR_DEF_TYPE, 1 << 64)
    v.regs.set_msr(MTRR_DEF_TYPE, value)
    assert v.cache.dirty_registers() == ["msr_0x2ff"]
    v.flush()
    assert v.handle.get_msrs([MTRR_DEF_TYPE])[0] == value
    assert v.regs.dump()["star"] is not None              # the MSRS batch still reads


@pytest.mark.parametrize("index", [1 << 32, 2 << 32, -1])
def test_an_msr_index_beyond_32_bits_is_refused(counter, index: int) -> None:
    m, v = counter
    with pytest.raises(KeyError, match=rf"MSR index {index:#x} is out of range"):
        v.regs.msr(index)


def test_msr_index_zero_is_an_msr_like_any_other(counter) -> None:
    """0 is a valid index (IA32_P5_MC_ADDR): KVM answers, or refuses naming it."""
    m, v = counter
    try:
        v.regs.msr(0)
    except KvmError as e:
        assert "0x0" in str(e)


# --- vcpu.py: an IN or MMIO read completes before registers are written over it -----------
def _in_mmio_guest() -> bytes:
    code = bytearray()
    code += b"\xe4\x60"                                  # in $0x60, %al
    code += b"\xe6\x61"                                  # out %al, $0x61
    code += b"\xa0" + (0xD000_0000).to_bytes(8, "little")  # movabs 0xd0000000, %al (MMIO read)
    code += b"\xe6\x62"                                  # out %al, $0x62
    code += b"\xf4"                                      # hlt
    return bytes(code)


@pytest.fixture
def in_mmio(tmp_path):
    img = tmp_path / "in_mmio.bin"
    img.write_bytes(_in_mmio_guest())
    with Machine(smp=1, irqchip=False) as m:
        m.load(str(img))
        yield m, m.vcpus[0]


def test_edits_at_an_in_and_an_mmio_read_wait_for_their_completion(in_mmio) -> None:
    """api.rst: the I/O completes on re-entry; a register write before it makes this host
    re-execute the IN. run() completes it first, so the guest goes on."""
    m, v = in_mmio
    ex = v.run()
    assert (ex.kind, ex.port, ex.direction) == ("io", 0x60, "in")
    ex.respond(0x42)
    v.regs.r9 = 0xE1
    ex = v.run()
    assert (ex.kind, ex.port, ex.direction, ex.value) == ("io", 0x61, "out", 0x42)
    assert v.regs.r9 == 0xE1
    ex = v.run()
    assert ex.kind == "mmio" and not ex.is_write
    ex.respond(0x37)
    v.regs.r10 = 0xE2
    ex = v.run()
    assert (ex.kind, ex.port, ex.value) == ("io", 0x62, 0x37)
    assert v.regs.r10 == 0xE2
    io = v.handle.counters
    runs = io["KVM_RUN"]
    assert v.run().kind == "hlt" and io["KVM_RUN"] == runs + 1
    assert v.complete_pending_operation() is False and io["KVM_RUN"] == runs + 1
    v.regs.r9 = 1
    v.flush()                                            # nothing to complete at a HLT
    assert io["KVM_RUN"] == runs + 1


def test_completing_an_in_for_another_groups_edit_writes_no_gprs(in_mmio) -> None:
    m, v = in_mmio
    ex = v.run()
    ex.respond(0x42)
    v.regs.dr0 = 0x1000                                  # DEBUGREGS: not a kvm_run group
    queued = v.stats["deferred_writes"].get("REGS", 0)
    delta = _ioctl_delta(v, lambda: v.run())
    assert "KVM_SET_REGS" not in delta and delta.get("KVM_SET_DEBUGREGS") == 1
    assert v.stats["deferred_writes"].get("REGS", 0) == queued
    assert v.regs.dr0 == 0x1000 and v.last_exit.port == 0x61


def test_a_fresh_vcpu_has_no_exit_yet() -> None:
    with Machine(smp=1) as m:
        v = m.vcpus[0]
        assert v.last_exit is None and not v.has_pending_exit


def test_flush_completes_a_pending_in_only_when_it_has_something_to_write(in_mmio) -> None:
    m, v = in_mmio
    ex = v.run()
    ex.respond(0x42)
    io = v.handle.counters
    before = dict(io)
    v.flush()                                            # nothing dirty: no syscall (rule 7)
    assert dict(io) == before
    v.regs.r9 = 0xE1
    v.flush()                                            # completes the IN, then writes
    assert io["KVM_RUN"] == before["KVM_RUN"] + 1 and io["KVM_SET_REGS"] == before.get(
        "KVM_SET_REGS", 0) + 1
    assert v.last_exit.kind == "interrupted"
    ex = v.run()
    assert (ex.kind, ex.port, ex.value) == ("io", 0x61, 0x42)
    ex = v.run()
    ex.respond(0x37)
    v.regs.r10 = 0xE2
    v.flush()
    ex = v.run()
    assert (ex.kind, ex.port, ex.value) == ("io", 0x62, 0x37) and v.regs.r10 == 0xE2


def test_complete_pending_operation_answers_whether_it_ran(in_mmio) -> None:
    m, v = in_mmio
    ex = v.run()
    ex.respond(0x42)
    assert v.complete_pending_operation() is True
    assert v.regs.rax & 0xFF == 0x42                      # the IN is done
    ex = v.run()
    assert (ex.kind, ex.port, ex.value) == ("io", 0x61, 0x42)
    ex = v.run()
    ex.respond(0x37)
    assert v.complete_pending_operation() is True
    assert v.regs.rax & 0xFF == 0x37


def test_an_edit_at_an_out_exit_costs_no_extra_kvm_run(counter) -> None:
    """Only an IN or an MMIO read needs completing: an OUT's edit rides the next run."""
    m, v = counter
    io = v.handle.counters
    runs = io["KVM_RUN"]
    v.regs.r12 = 1000
    assert v.run().port == 0x501
    assert io["KVM_RUN"] == runs + 1 and v.regs.r12 == 1001


# --- vcpu.py: the sync vocabulary and the rest of the door ----------------------------------
def test_synchronize_defaults_to_full_and_levels_are_checked(counter) -> None:
    m, v = counter
    io = v.handle.counters
    v.synchronize()
    v.synchronize_state()
    gets = io["KVM_GET_DEBUGREGS"]
    v.regs.dr7
    assert io["KVM_GET_DEBUGREGS"] == gets                # FULL holds DEBUGREGS
    with pytest.raises(ValueError) as ei:
        v.synchronize_state("full")                       # QEMU's names, exactly
    assert str(ei.value) == "unknown level 'full' (known: RUNTIME, RESET, FULL)"


def test_invalidate_and_flush_by_name(counter) -> None:
    m, v = counter
    io = v.handle.counters
    v.regs.cr0
    v.invalidate("SREGS")
    gets = io["KVM_GET_SREGS"]
    v.regs.cr0
    assert io["KVM_GET_SREGS"] == gets + 1
    v.regs.r12 = 1000
    sets = io["KVM_SET_REGS"]
    v.flush()                                             # now, by ioctl: not queued
    assert io["KVM_SET_REGS"] == sets + 1 and v.handle.get_regs().r12 == 1000


def test_writes_avoided_counts_a_group_read_and_not_written_back(counter) -> None:
    m, v = counter
    avoided = v.stats["writes_avoided"]
    v.regs.dr7                                            # DEBUGREGS fetched, unchanged
    run_to_tick(m, v)
    assert v.stats["writes_avoided"] == avoided + 1


@pytest.mark.parametrize("strategy", ["eager", "qemu", "qemu2012", "qemu2013"])
def test_every_strategy_writes_an_edit_before_the_run(strategy: str) -> None:
    with Machine(smp=1, strategy=strategy) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        v.regs.r12 = 1000
        run_to_tick(m, v)
        assert v.regs.r12 == 1001


def test_a_hardware_breakpoint_set_through_the_vcpu_stops_the_guest(counter) -> None:
    from regsync.guests import symbols
    m, v = counter
    tick = symbols("counter")["counter_tick"]
    v.set_guest_debug(ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP,
                      [tick, 0, 0, 0, 0, 0, 0, 0x1])
    ex = v.run()
    assert ex.kind == "debug" and v.regs.rip == tick
    v.set_guest_debug(0)


def test_a_machine_without_irqchip_has_no_lapic_group(tmp_path) -> None:
    img = tmp_path / "hlt.bin"
    img.write_bytes(b"\xf4")
    with Machine(smp=1, irqchip=False) as m:
        m.load(str(img))
        v = m.vcpus[0]
        assert repr(v) == "<Vcpu 0 strategy=regsync>"
        d = v.regs.dump()
        assert "rip" in d and not any(k.startswith("lapic.") for k in d)
        with pytest.raises(KeyError, match="no in-kernel LAPIC"):
            v.regs.lapic_tmict


def test_end_setup_keeps_the_counts_so_far(counter) -> None:
    m, v = counter
    assert v.setup_stats is None                      # none kept before end_setup()
    v.end_setup()
    assert v.setup_stats == v.stats and v.setup_stats["exits"] >= 1


# --- the transport: put/export round trips, riding rules, stats, no sync_regs --------------
@pytest.fixture(params=[True, False], ids=["sync_regs", "ioctl_only"])
def counter_any(request):
    with Machine(smp=1, sync_regs=request.param) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        yield m, v


def _stable(d: dict) -> dict:
    """The registers a run of the counter guest does not move on its own."""
    moving = {r.name for r in CATALOG.registers if r.volatile} | {"r12", "rip", "rflags", "rax",
                                                                 "rcx", "rdx", "r13", "r14"}
    return {k: v for k, v in d.items() if k not in moving}


def test_put_of_every_exported_group_restores_it(counter_any) -> None:
    m, v = counter_any
    full = CATALOG.levels["FULL"] & v.transport.available_mask
    saved = v.cache.export(full)
    before = _stable(v.regs.dump())
    r12 = v.regs.r12
    v.regs.star = STAR
    v.regs.dr0 = 0x1000
    v.regs.xmm0 = 0x1234
    v.regs.rbx = 0x55
    run_to_tick(m, v)
    assert v.regs.rbx == 0x1234 and v.regs.r13 == STAR and v.regs.r14 == 0x1000
    for name in ("MP_STATE", "XSAVE", "XCRS", "DEBUGREGS", "REGS", "SREGS", "LAPIC", "MSRS",
                 "MSRS_TIME", "EVENTS"):
        if name in saved:
            data = saved[name]
            if name in ("REGS", "DEBUGREGS"):
                data += b"\xff" * 16                      # extra bytes are dropped
            v.cache.put(name, data)
    v.cache.invalidate()
    assert _stable(v.regs.dump()) == before
    run_to_tick(m, v)
    assert v.regs.r12 == r12 + 1 and v.regs.r13 == saved_star(saved) and v.regs.r14 == 0


def saved_star(saved: dict) -> int:
    entry = ctypes_sizeof_msr_entry()
    data = saved["MSRS"]
    for o in range(0, len(data), entry):
        e = ks.kvm_msr_entry.from_buffer_copy(data[o:o + entry])
        if e.index == 0xC0000081:
            return e.data
    raise AssertionError("STAR not exported")


def ctypes_sizeof_msr_entry() -> int:
    import ctypes
    return ctypes.sizeof(ks.kvm_msr_entry)


def test_short_put_data_is_padded_with_zeros(counter) -> None:
    m, v = counter
    v.regs.dr0 = 0x1000
    v.flush()
    data = v.cache.export(BIT["DEBUGREGS"])["DEBUGREGS"]
    v.cache.put("DEBUGREGS", data[:8])                    # dr0 only: the rest becomes 0
    v.cache.invalidate()
    assert v.regs.dr0 == 0x1000 and v.regs.dr7 == 0 and v.regs.dr6 == 0


def test_an_xmm_edit_reaches_the_guest(counter_any) -> None:
    m, v = counter_any
    v.regs.xmm0 = 0xABCD_0000_1234
    run_to_tick(m, v)
    assert v.regs.rbx == 0xABCD_0000_1234


def _ioctl_delta(v, fn) -> dict:
    io = v.handle.counters
    before = dict(io)
    fn()
    return {k: io[k] - before.get(k, 0) for k in io if io[k] != before.get(k, 0)}


def test_sregs_rides_kvm_run_unless_lapic_or_an_apic_base_edit_with_msrs_follows(counter) -> None:
    """MUST_PRECEDE beside FLUSH_ORDER: SREGS by ioctl before LAPIC, and before MSRs when
    apic_base is edited; otherwise it rides kvm_dirty_regs like REGS."""
    m, v = counter

    def edit(*names: str):
        def go() -> None:
            for n in names:
                v.regs[n] = v.regs[n]
            v.regs.star = STAR                            # the flush goes through store()
            run_to_tick(m, v)
        return go

    assert "KVM_SET_SREGS" not in _ioctl_delta(v, edit("cr8"))
    assert _ioctl_delta(v, edit("cr8", "lapic.tdcr")).get("KVM_SET_SREGS") == 1
    assert _ioctl_delta(v, edit("apic_base")).get("KVM_SET_SREGS") == 1
    assert "KVM_SET_REGS" not in _ioctl_delta(v, edit("r9", "lapic.tdcr"))
    assert v.cache.dirty_registers() == []


def test_cache_fetch_counts_match_the_kernels_get_ioctls(counter_any) -> None:
    m, v = counter_any
    get_of = {"REGS": "KVM_GET_REGS", "SREGS": "KVM_GET_SREGS", "EVENTS": "KVM_GET_VCPU_EVENTS",
              "XSAVE": "KVM_GET_XSAVE2", "XCRS": "KVM_GET_XCRS", "DEBUGREGS": "KVM_GET_DEBUGREGS",
              "LAPIC": "KVM_GET_LAPIC", "MP_STATE": "KVM_GET_MP_STATE", "MSRS": "KVM_GET_MSRS",
              "MSRS_TIME": "KVM_GET_MSRS"}
    stats0 = dict(v.stats["fetches"])

    def work() -> None:
        v.regs.dr7 = 0x400                                # DEBUGREGS not held: fetched first
        v.regs.lapic_tdcr = 0xB                           # LAPIC: always fetched fresh
        v.regs.star = STAR
        v.regs["exception.injected"] = 0
        run_to_tick(m, v)
        v.regs.dump()
    delta = _ioctl_delta(v, work)
    fetched = {g: n - stats0.get(g, 0) for g, n in v.stats["fetches"].items()}
    by_ioctl: dict[str, int] = {}
    for g, n in fetched.items():
        by_ioctl[get_of[g]] = by_ioctl.get(get_of[g], 0) + n
    gets = {k: n for k, n in delta.items() if k.startswith("KVM_GET_") and k in get_of.values()}
    assert {k: n for k, n in by_ioctl.items() if n} == gets


def test_a_short_set_msrs_within_one_group_keeps_the_refused_msr_dirty(counter) -> None:
    m, v = counter
    v.regs.star = STAR
    v.regs.lstar = 1 << 63                               # not canonical: KVM stops there
    for _ in range(2):
        with pytest.raises(RegisterWriteError):          # still dirty: refused again
            v.run()
    v.discard("MSRS")
    run_to_tick(m, v)
    assert v.regs.r13 == STAR


# --- the transport: LAPIC edits act as the guest's write, and nothing more -----------------
_LAPIC_MOVING = {"lapic.tmcct", "lapic.irr", "lapic.isr", "lapic.tmr", "lapic.ppr"}


def _lapic(v) -> dict:
    return {k: val for k, val in v.regs.dump(BIT["LAPIC"]).items() if k not in _LAPIC_MOVING}


def test_a_tmict_edit_changes_tmict_and_nothing_else_in_the_page(counter) -> None:
    m, v = counter
    v.regs.lapic_tdcr = 0xB
    v.regs.lapic_lvt_timer = LVT_MASKED | 0x40
    v.flush()
    before = _lapic(v)
    v.regs.lapic_tmict = 0xF000_0000
    v.flush()
    after = _lapic(v)
    assert after.pop("lapic.tmict") == 0xF000_0000
    before.pop("lapic.tmict")
    assert after == before
    assert 0 < v.regs.lapic_tmcct <= 0xF000_0000


def test_disabling_the_apic_masks_each_lvt_and_changes_nothing_else(counter) -> None:
    m, v = counter
    v.regs.lapic_svr = 0x1FF
    v.regs.lapic_lvt_error = 0x33
    v.flush()
    before = _lapic(v)
    v.regs.lapic_svr = 0xFF
    v.regs.lapic_lvt_lint1 = 0x700                        # edited in the same flush: masked
    v.flush()                                             # (the guest's writes, either order)
    after = _lapic(v)
    assert after.pop("lapic.svr") == 0xFF and after.pop("lapic.lvt_lint1") == 0x700 | LVT_MASKED
    for name in ("svr", "lvt_lint1"):
        before.pop(f"lapic.{name}")
    lvts = [k for k in before if k.startswith("lapic.lvt_")]
    assert lvts and all(after[k] == before[k] | LVT_MASKED for k in lvts)
    assert {k: x for k, x in after.items() if k not in lvts} == \
        {k: x for k, x in before.items() if k not in lvts}
    v.regs.lapic_svr = 0x1FF                              # enabling again unmasks nothing
    v.flush()
    assert v.regs.lapic_lvt_lint1 == 0x700 | LVT_MASKED


def test_ldr_and_dfr_are_refused_in_x2apic_mode_naming_them(counter) -> None:
    m, v = counter
    v.regs.lapic_ldr = 1 << 24                            # xAPIC: a plain load
    v.flush()
    assert v.regs.lapic_ldr == 1 << 24
    v.regs.apic_base = v.regs.apic_base | (1 << 10)       # x2APIC
    v.flush()
    for names in (("lapic.ldr",), ("lapic.dfr",), ("lapic.dfr", "lapic.ldr")):
        for n in names:
            v.regs[n] = 1
        v.cache.invalidate(BIT["SREGS"])                  # the mode is fetched to be checked
        with pytest.raises(RegisterWriteError) as ei:
            v.flush()
        assert str(ei.value.cause) == (f"{' and '.join(names)}: read-only in x2APIC mode "
                                       "(KVM derives LDR from the APIC ID)")
        v.discard("LAPIC")


def test_a_closed_vcpu_keeps_its_cached_values_readable(counter) -> None:
    m, v = counter
    r12, cr0 = v.regs.r12, v.regs.cr0
    v.close()
    assert v.regs.r12 == r12 and v.regs.cr0 == cr0


# --- put: every group at once, in the kernel's order, whole ---------------------------------
TSC, TSC_DEADLINE, SYSENTER_CS = 0x10, 0x6E0, 0x174


def _msr_blob(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(bytes(ks.kvm_msr_entry(i, 0, d)) for i, d in entries)


def _msr_entries(data: bytes) -> list[tuple[int, int, int]]:
    import ctypes
    n = ctypes.sizeof(ks.kvm_msr_entry)
    return [(e.index, e.reserved, e.data) for e in
            (ks.kvm_msr_entry.from_buffer_copy(data[o:o + n]) for o in range(0, len(data), n))]


def test_put_of_msrs_in_any_order_writes_tsc_adjust_and_deadline_last_in_that_order(
        counter, monkeypatch) -> None:
    """put() docstring / FLUSH_ORDER: one KVM_SET_MSRS, TSC, TSC_ADJUST, TSC_DEADLINE last
    (the deadline is relative to the TSC), whatever order the saved bytes hold."""
    m, v = counter
    saved = v.cache.export(BIT["MSRS"] | BIT["MSRS_TIME"])
    value = {i: d for i, _, d in _msr_entries(saved["MSRS"] + saved["MSRS_TIME"])}
    assert {TSC, TSC_ADJUST, SYSENTER_CS} <= set(value)
    order = [i for i in (TSC_DEADLINE, TSC_ADJUST, TSC, SYSENTER_CS) if i in value]
    calls: list[list[int]] = []
    real = v.handle.set_msrs

    def spy(items: list[tuple[int, int]]) -> None:
        calls.append([i for i, _ in items])
        real(items)

    monkeypatch.setattr(v.handle, "set_msrs", spy)
    v.cache.put("MSRS", _msr_blob([(i, value[i]) for i in order]))
    assert calls == [[SYSENTER_CS] + [i for i in (TSC, TSC_ADJUST, TSC_DEADLINE) if i in value]]


def test_put_without_defer_writes_each_group_now_and_counts_it_now(counter_any) -> None:
    m, v = counter_any
    full = CATALOG.levels["FULL"] & v.transport.available_mask
    saved = v.cache.export(full)
    for name, data in saved.items():
        writes = v.stats["writes"].get(name, 0)
        delta = _ioctl_delta(v, lambda: v.cache.put(name, data))
        assert sum(n for k, n in delta.items() if k.startswith("KVM_SET_")) == 1, (name, delta)
        assert v.stats["writes"][name] == writes + 1, name
        assert v.cache.in_flight == 0 and v.handle.run_page.kvm_dirty_regs == 0, name
        assert _ioctl_delta(v, v.flush) == {}, name   # clean afterwards: nothing to write
    run_to_tick(m, v)


def test_put_of_lapic_without_an_irqchip_is_refused_naming_why(tmp_path) -> None:
    img = tmp_path / "hlt.bin"
    img.write_bytes(b"\xf4")
    with Machine(smp=1, irqchip=False) as m:
        m.load(str(img))
        v = m.vcpus[0]
        with pytest.raises(KeyError) as ei:
            v.cache.put("LAPIC", bytes(0x400))
        assert str(ei.value) == "LAPIC: no in-kernel LAPIC (the machine was made with irqchip=False)"


def test_short_xsave_data_is_padded_with_zeros(counter) -> None:
    """The legacy area alone: the missing header reads as zeros, XSTATE_BV = 0, so the
    SSE state is loaded in its init state (SDM XRSTOR: a clear XSTATE_BV bit)."""
    m, v = counter
    v.regs.xmm1 = 0x1111_2222_3333_4444_5555_6666_7777_8888
    v.flush()
    data = v.cache.export(BIT["XSAVE"])["XSAVE"]
    v.cache.put("XSAVE", data[:512])
    v.cache.invalidate()
    assert v.regs.xmm1 == 0
    v.cache.put("XSAVE", data[:576])                 # legacy area and header: kept in place
    v.cache.invalidate()
    assert v.regs.xmm1 == 0x1111_2222_3333_4444_5555_6666_7777_8888
    assert not any(v.cache.export(BIT["XSAVE"])["XSAVE"][576:])
    v.cache.put("XSAVE", data)
    v.cache.invalidate()
    assert v.regs.xmm1 == 0x1111_2222_3333_4444_5555_6666_7777_8888


def test_put_of_the_lapic_page_restores_it(counter) -> None:
    m, v = counter
    v.regs.lapic_tdcr = 0xB
    v.flush()
    saved = v.cache.export(BIT["LAPIC"])["LAPIC"]
    v.regs.lapic_tdcr = 0x3
    v.flush()
    io = v.handle.counters
    sets, xsave_sets = io["KVM_SET_LAPIC"], io.get("KVM_SET_XSAVE", 0)
    v.cache.put("LAPIC", saved)
    assert io["KVM_SET_LAPIC"] == sets + 1 and io.get("KVM_SET_XSAVE", 0) == xsave_sets
    v.cache.invalidate()
    assert v.regs.lapic_tdcr == 0xB


def test_put_of_events_sets_nmi_pending_whatever_flags_the_saved_bytes_carry(counter) -> None:
    """put() docstring: EVENTS is written with NMI_PENDING, SIPI_VECTOR and SHADOW valid,
    so a restore puts nmi.pending back even from bytes whose flags field is 0."""
    m, v = counter
    v.regs["nmi.masked"] = v.regs["nmi.masked"]
    v.cache.flush(allow_defer=False)                 # the local copy's flags: none valid
    saved = bytearray(v.cache.export(BIT["EVENTS"])["EVENTS"])
    flags_at = ks.kvm_vcpu_events.flags.offset
    saved[flags_at:flags_at + 4] = bytes(4)
    assert ks.kvm_vcpu_events.from_buffer_copy(saved).nmi.pending == 0
    v.regs["nmi.pending"] = 1
    v.flush()
    v.cache.invalidate()
    assert v.regs["nmi.pending"] == 1
    v.cache.put("EVENTS", bytes(saved))
    v.cache.invalidate()
    assert v.regs["nmi.pending"] == 0


def test_put_of_events_sets_the_interrupt_shadow_whatever_flags_the_saved_bytes_carry(
        counter) -> None:
    m, v = counter
    saved = bytearray(v.cache.export(BIT["EVENTS"])["EVENTS"])
    flags_at = ks.kvm_vcpu_events.flags.offset
    saved[flags_at:flags_at + 4] = bytes(4)
    assert ks.kvm_vcpu_events.from_buffer_copy(saved).interrupt.shadow == 0
    v.regs["interrupt.shadow"] = 1                   # KVM_X86_SHADOW_INT_MOV_SS
    v.flush()
    v.cache.invalidate()
    if v.regs["interrupt.shadow"] != 1:
        pytest.skip("this host does not keep an interrupt shadow set by KVM_SET_VCPU_EVENTS")
    v.cache.put("EVENTS", bytes(saved))
    v.cache.invalidate()
    assert v.regs["interrupt.shadow"] == 0


def test_exported_msrs_are_kvm_msr_entries_as_the_kernel_gives_them(counter) -> None:
    m, v = counter
    data = v.cache.export(BIT["MSRS"])["MSRS"]
    entries = _msr_entries(data)
    indices = [i for i, _, _ in entries]
    assert indices == v.transport.msr_batches["MSRS"]
    assert all(reserved == 0 for _, reserved, _ in entries)
    assert dict((i, d) for i, _, d in entries) == dict(zip(indices, v.handle.get_msrs(indices)))


# --- queued writes: what kvm_dirty_regs carries, and what is taken back ---------------------
SYNC_FLAG = {"REGS": ks.KVM_SYNC_X86_REGS, "SREGS": ks.KVM_SYNC_X86_SREGS,
             "EVENTS": ks.KVM_SYNC_X86_EVENTS}


@pytest.mark.parametrize("groups", [("REGS",), ("SREGS",), ("EVENTS",), ("REGS", "SREGS"),
                                    ("SREGS", "EVENTS"), ("REGS", "SREGS", "EVENTS")])
def test_kvm_dirty_regs_carries_exactly_the_edited_sync_groups(counter, groups) -> None:
    """api.rst kvm_dirty_regs: each bit makes KVM_RUN load that group from the page, so
    only groups with edits may be flagged (a stray bit loads a stale copy)."""
    m, v = counter
    one = {"REGS": "r9", "SREGS": "cr8", "EVENTS": "nmi.masked"}
    v.regs.dump(BIT["REGS"] | BIT["SREGS"] | BIT["EVENTS"])    # all three held
    for g in groups:
        v.regs[one[g]] = v.regs[one[g]]
    v.cache.flush()
    assert v.handle.run_page.kvm_dirty_regs == sum(SYNC_FLAG[g] for g in groups)
    run_to_tick(m, v)
    assert v.cache.dirty_registers() == []


def test_a_discarded_queued_edit_is_never_applied(counter) -> None:
    m, v = counter
    r12 = v.regs.r12
    v.regs.r12 = 1000
    v.cache.flush()                                  # queued in kvm_dirty_regs
    v.discard("REGS")
    assert v.handle.run_page.kvm_dirty_regs == 0
    run_to_tick(m, v)
    assert v.regs.r12 == r12 + 1


def test_a_queued_write_rejoining_an_ioctl_flush_counts_as_one_plain_write(counter) -> None:
    m, v = counter
    writes = v.stats["writes"].get("REGS", 0)
    deferred = v.stats["deferred_writes"].get("REGS", 0)
    v.regs.r12 = 1000
    v.cache.flush()                                  # queued
    sets = v.handle.counters["KVM_SET_REGS"]
    v.regs.dr0 = 0x1000
    v.flush()                                        # DEBUGREGS by ioctl: REGS rejoins it
    assert v.handle.counters["KVM_SET_REGS"] == sets + 1
    run_to_tick(m, v)
    assert v.regs.r12 == 1001 and v.regs.r14 == 0x1000
    assert v.stats["writes"]["REGS"] == writes + 1
    assert v.stats["deferred_writes"].get("REGS", 0) == deferred


def test_a_fresh_vcpus_first_ioctl_write_is_counted_as_a_write() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        writes = v.stats["writes"].get("REGS", 0)
        deferred = v.stats["deferred_writes"].get("REGS", 0)
        v.regs.r12 = 1000
        v.flush()
        assert v.handle.get_regs().r12 == 1000
        assert v.cache.in_flight == 0 and v.stats["writes"]["REGS"] == writes + 1
        run_to_tick(m, v)
        assert v.stats["writes"]["REGS"] == writes + 1
        assert v.stats["deferred_writes"].get("REGS", 0) == deferred


def test_an_edit_after_close_is_refused_cleanly(counter) -> None:
    """After close the kvm_run page is gone: nothing may be queued in it; a flush fails
    with one error naming the group, by ioctl on the closed vCPU."""
    m, v = counter
    v.regs.r12
    v.close()
    assert not v.transport.use_sync_regs and v.transport.sync_mask == 0
    v.regs.r12 = 5
    with pytest.raises(RegisterWriteError) as ei:
        v.cache.flush()
    assert ei.value.group == "REGS" and ei.value.registers == ["r12"]
    assert v.regs.r12 == 5
    with pytest.raises(RegisterWriteError):
        v.flush()                                     # no I/O completion on a closed vCPU
    with pytest.raises(ValueError) as ei2:
        v.run()
    assert str(ei2.value) == "KVM_RUN: vCPU 0 is closed"


# --- KVM_GET_MSRS stopping short --------------------------------------------------------------
def test_an_msr_the_batch_read_refuses_reads_none_and_keeps_the_reason(counter, monkeypatch) -> None:
    m, v = counter
    real = v.handle.get_msrs

    def short(indices: list[int]) -> list[int]:
        if SYSENTER_CS in indices and len(indices) > 1:
            n = indices.index(SYSENTER_CS)
            raise MsrError("KVM_GET_MSRS", "vcpu 0", indices, n, read=real(indices[:n]))
        return real(indices)

    monkeypatch.setattr(v.handle, "get_msrs", short)
    v.cache.invalidate()
    d = v.regs.dump(BIT["MSRS"])
    assert d["sysenter_cs"] is None and d["star"] is not None
    assert "KVM would not read MSR 0x174" in v.transport.refused_msrs[SYSENTER_CS]


# --- LAPIC: an edit masks LVTs only where a guest write would (kvm_lapic_reg_write) --------
def test_an_svr_edit_that_keeps_the_apic_enabled_masks_nothing(counter) -> None:
    m, v = counter
    v.regs.lapic_svr = 0x1FF
    v.regs.lapic_lvt_error = 0x33
    v.flush()
    after = _edit_changes_only(v, "lapic.svr", 0x1FE)   # a new spurious vector, still enabled
    assert after["lapic.lvt_error"] == 0x33


def _edit_changes_only(v, name: str, value: int) -> dict:
    """Edit one LAPIC register and flush: it reads back as written and every other
    LAPIC register is unchanged. Returns the page after, as a dict."""
    before = _lapic(v)
    v.regs[name] = value
    v.flush()
    after = _lapic(v)
    assert after[name] == value
    assert {k: x for k, x in after.items() if k != name} == \
        {k: x for k, x in before.items() if k != name}
    return after


def _restore_disabled_apic_with_lvt_error_unmasked(v) -> None:
    """A state only a restore makes (a guest cannot unmask an LVT while its APIC is
    software-disabled): SVR disabled, LVT error unmasked, put back whole."""
    page = bytearray(v.cache.export(BIT["LAPIC"])["LAPIC"])
    page[0xF0:0xF4] = (0xFF).to_bytes(4, "little")
    page[0x370:0x374] = (0x33).to_bytes(4, "little")
    v.cache.put("LAPIC", bytes(page))
    v.cache.invalidate()
    assert (v.regs.lapic_svr, v.regs.lapic_lvt_error) == (0xFF, 0x33)


def test_an_edit_other_than_svr_while_the_apic_is_disabled_masks_nothing(counter) -> None:
    """A guest's TDCR write touches no LVT, whatever the APIC's state."""
    m, v = counter
    _restore_disabled_apic_with_lvt_error_unmasked(v)
    after = _edit_changes_only(v, "lapic.tdcr", 0xB)
    assert after["lapic.lvt_error"] == 0x33


def test_an_svr_edit_that_leaves_the_apic_disabled_masks_every_lvt(counter) -> None:
    m, v = counter
    _restore_disabled_apic_with_lvt_error_unmasked(v)
    v.regs.lapic_svr = 0xFE                           # still disabled: a guest write masks
    v.flush()
    assert v.regs.lapic_lvt_error == 0x33 | LVT_MASKED


def test_an_lvt_edit_while_the_apic_is_disabled_is_loaded_masked(counter) -> None:
    m, v = counter
    v.regs.lapic_svr = 0xFF                           # disable: every LVT masked
    v.flush()
    v.regs.lapic_lvt_error = 0x33                     # a guest write now stays masked
    v.flush()
    assert v.regs.lapic_lvt_error == 0x33 | LVT_MASKED


def test_ldr_is_refused_when_the_kernel_switched_to_x2apic_behind_the_cache() -> None:
    """The x2APIC check reads the mode from the kernel when SREGS is not held."""
    with Machine(smp=1, sync_regs=False) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        assert not v.regs.apic_base & (1 << 10)      # held, xAPIC
        sregs = v.handle.get_sregs()
        sregs.apic_base |= 1 << 10                   # x2APIC, not through the cache
        v.handle.set_sregs(sregs)
        v.cache.invalidate(BIT["SREGS"])
        v.regs.lapic_ldr = 1 << 24
        with pytest.raises(RegisterWriteError, match="read-only in x2APIC mode"):
            v.flush()


# --- a run that returns before applying kvm_dirty_regs (an AP waiting for INIT/SIPI) -------
def test_an_edit_queued_on_an_ap_waiting_for_sipi_outlives_the_run_that_did_not_apply_it() -> None:
    """x86.c kvm_arch_vcpu_ioctl_run: a vCPU in KVM_MP_STATE_UNINITIALIZED blocks, then
    returns (-EINTR on a signal) before sync_regs(), leaving the kvm_dirty_regs bits set
    and storing its own registers over the page. The queued edit stays dirty, reads back,
    and reaches the kernel at the next flush."""
    import signal
    import threading

    kick = {signal.SIGUSR1}
    with Machine(smp=2) as m:
        m.load("counter")
        ap = m.vcpus[1]
        if ap.regs.mp_state != ks.KVM_MP_STATE_UNINITIALIZED:
            pytest.skip(f"the AP starts in mp_state {ap.regs.mp_state}, not waiting for INIT")
        seen: dict = {}

        def on_its_own_thread() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, kick)       # as a vCPU thread does
            ap.handle.set_signal_mask(signal.pthread_sigmask(signal.SIG_BLOCK, ()) - kick)
            try:
                ap.regs.r12 = 1000
                ap.cache.flush()                                 # queued in kvm_dirty_regs
                seen["queued"] = ap.handle.run_page.kvm_dirty_regs
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)   # pending
                seen["exit"] = ap.run().kind                     # returns at once: EINTR
                seen["left"] = ap.handle.run_page.kvm_dirty_regs
                signal.sigtimedwait(kick, 0)
                seen["dirty"] = ap.cache.dirty_registers()
                seen["r12"] = ap.regs.r12
                seen["kernel_before"] = ap.handle.get_regs().r12
                ap.flush()
                seen["kernel_after"] = ap.handle.get_regs().r12
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                seen["error"] = e
            finally:
                ap.handle.set_signal_mask(None)

        t = threading.Thread(target=on_its_own_thread)
        t.start()
        t.join()
        assert "error" not in seen, seen.get("error")
        assert seen["queued"] == ks.KVM_SYNC_X86_REGS and seen["exit"] == "interrupted"
        assert seen["left"] == 0                                 # taken back, not re-queued
        assert seen["dirty"] == ["r12"] and seen["r12"] == 1000
        assert seen["kernel_before"] != 1000 and seen["kernel_after"] == 1000


# --- XSAVE: XSTATE_BV names every component with a non-zero edit, and keeps the others ------
def _cpuid_lists_avx_state(v) -> bool:
    """CPUID.(EAX=0DH, ECX=0):EAX bit 2: the vCPU was given the AVX state component."""
    cpuid = v.handle.get_cpuid2()
    return any(e.function == 0xD and e.index == 0 and e.eax & 4
               for e in cpuid.entries[:cpuid.nent])


def test_an_sse_edit_keeps_an_avx_component_edited_before(counter) -> None:
    m, v = counter
    if not _cpuid_lists_avx_state(v):
        pytest.skip("this vCPU's CPUID lists no AVX state component")
    v.regs.ymm0h = 0xAAAA_BBBB_CCCC_DDDD
    v.flush()
    v.cache.invalidate()
    assert v.regs.ymm0h == 0xAAAA_BBBB_CCCC_DDDD     # XSTATE_BV.AVX set by the edit
    v.regs.xmm1 = 0x1234
    v.flush()                                         # XSTATE_BV rewritten: AVX kept
    v.cache.invalidate()
    assert (v.regs.ymm0h, v.regs.xmm1) == (0xAAAA_BBBB_CCCC_DDDD, 0x1234)
    run_to_tick(m, v)
    assert v.regs.ymm0h == 0xAAAA_BBBB_CCCC_DDDD


# --- a refused KVM_SET_MSRS for another reason names both MSR groups ------------------------
def test_a_failed_msr_write_names_both_msr_groups_and_each_register(counter) -> None:
    m, v = counter
    v.regs.star, v.regs.tsc_adjust = v.regs.star, v.regs.tsc_adjust
    v.close()                                         # KVM_SET_MSRS: EBADF, not a short count
    with pytest.raises(RegisterWriteError) as ei:
        v.cache.flush()
    assert ei.value.group == "MSRS+MSRS_TIME" and ei.value.registers == ["star", "tsc_adjust"]


# --- riding kvm_run: each sync group decided on its own ------------------------------------
def test_each_sync_group_rides_unless_its_own_rule_says_no(counter) -> None:
    m, v = counter

    def sets(*edits: str) -> set[str]:
        def go() -> None:
            for n in edits:
                v.regs[n] = v.regs[n]
            v.cache.flush()
        delta = _ioctl_delta(v, go)
        run_to_tick(m, v)
        assert v.cache.dirty_registers() == []
        return {k for k in delta if k.startswith("KVM_SET_")}

    # SREGS waits for LAPIC (by ioctl): EVENTS after it still rides
    assert sets("cr8", "lapic.tdcr", "nmi.masked") == {"KVM_SET_SREGS", "KVM_SET_LAPIC"}
    # no REGS edit: SREGS and EVENTS ride all the same
    assert sets("cr8", "nmi.masked", "dr7") == {"KVM_SET_DEBUGREGS"}
    # apic_base with only MSRS_TIME edited: SREGS by ioctl before the MSR write
    assert sets("apic_base", "tsc_adjust") == {"KVM_SET_SREGS", "KVM_SET_MSRS"}
    # ... and EVENTS, after it in the order, still rides
    assert sets("apic_base", "star", "nmi.masked") == {"KVM_SET_SREGS", "KVM_SET_MSRS"}
    # apic_base with no MSR edit: rides
    assert sets("apic_base", "nmi.masked") == set()


def test_a_short_set_msrs_that_wrote_all_of_msrs_leaves_nothing_to_flush(counter, monkeypatch) -> None:
    """KVM wrote STAR and stopped at TSC_ADJUST: once tsc_adjust is discarded the vCPU is
    clean, and a flush costs no syscall (rule 7)."""
    m, v = counter
    real = v.handle.set_msrs

    def short(items: list[tuple[int, int]]) -> None:
        indices = [i for i, _ in items]
        n = indices.index(TSC_ADJUST)
        real(items[:n])
        raise MsrError("KVM_SET_MSRS", "vcpu 0", indices, n, value=items[n][1])

    monkeypatch.setattr(v.handle, "set_msrs", short)
    v.regs.star = STAR
    v.regs.tsc_adjust = 0
    with pytest.raises(RegisterWriteError):
        v.flush()
    monkeypatch.setattr(v.handle, "set_msrs", real)
    assert v.cache.dirty_registers() == ["tsc_adjust"]
    v.discard("MSRS_TIME")
    assert v.cache.dirty_registers() == [] and _ioctl_delta(v, v.flush) == {}
    run_to_tick(m, v)
    assert v.regs.r13 == STAR


# --- Vcpu.serve: the door to regsync.serving ------------------------------------------------
def test_serve_hands_each_exit_of_a_listed_port_to_its_handler_up_to_the_limit(counter) -> None:
    from regsync.devices.basic import TICK_PORT
    m, v = counter
    r12 = v.regs.r12
    seen: list[int] = []
    assert v.serve({TICK_PORT: lambda ex: seen.append(v.regs.r12)}, limit=3) is None
    assert seen == [r12 + 1, r12 + 2, r12 + 3]
    ex = v.serve({})                                  # no handler takes the next tick
    assert (ex.kind, ex.port) == ("io", TICK_PORT) and v.regs.r12 == r12 + 4



# --- Vcpu.run's inlined fast paths keep the cache's books -----------------------------------
def test_stats_count_every_exit_and_every_queued_write_a_run_applied(counter) -> None:
    m, v = counter
    io = v.handle.counters
    runs, exits0 = io["KVM_RUN"], v.stats["exits"]
    dw0 = v.stats["deferred_writes"].get("REGS", 0)
    for value in (1000, 2000, 3000):
        v.regs.r12 = value                            # queued, applied by the next run
        run_to_tick(m, v)
        assert v.regs.r12 == value + 1
    st = v.stats
    assert st["exits"] - exits0 == io["KVM_RUN"] - runs
    assert st["deferred_writes"]["REGS"] == dw0 + 3


def test_an_edit_after_a_put_of_a_group_that_cannot_ride_is_written_by_ioctl(counter) -> None:
    """put() leaves DEBUGREGS held with nothing fetched since the run: an edit of it
    still goes by KVM_SET_DEBUGREGS, never into kvm_dirty_regs."""
    m, v = counter
    saved = v.cache.export(BIT["DEBUGREGS"])["DEBUGREGS"]
    run_to_tick(m, v)
    v.cache.put("DEBUGREGS", saved)
    v.regs.dr0 = 0x2000
    delta = _ioctl_delta(v, lambda: run_to_tick(m, v))
    assert delta.get("KVM_SET_DEBUGREGS") == 1 and v.regs.r14 == 0x2000


def test_a_riding_edit_after_a_fetch_still_counts_the_writes_avoided(counter) -> None:
    m, v = counter
    avoided = v.stats["writes_avoided"]
    v.regs.dr7                                        # DEBUGREGS fetched, unchanged
    v.regs.r12 = 1000                                 # REGS rides kvm_run
    run_to_tick(m, v)
    assert v.stats["writes_avoided"] == avoided + 1 and v.regs.r12 == 1001


def test_a_group_queued_by_an_earlier_flush_still_rides_with_the_runs_own_edit(counter) -> None:
    m, v = counter
    masked = v.regs["nmi.masked"]
    v.regs["nmi.masked"] = masked ^ 1
    v.cache.flush()                                   # EVENTS queued in kvm_dirty_regs
    v.regs.r12 = 1000                                 # REGS queued by run() itself
    run_to_tick(m, v)
    assert v.cache.dirty_registers() == [] and v.regs.r12 == 1001
    assert v.regs["nmi.masked"] == masked ^ 1
    v.regs["nmi.masked"] = masked
    run_to_tick(m, v)


def test_an_ioctl_write_after_a_run_counts_at_once(counter) -> None:
    m, v = counter
    run_to_tick(m, v)
    writes = v.stats["writes"].get("REGS", 0)
    v.regs.r12 = 1000
    v.flush()                                         # by ioctl, now
    assert v.cache.in_flight == 0 and v.stats["writes"]["REGS"] == writes + 1
    run_to_tick(m, v)
    assert v.stats["writes"]["REGS"] == writes + 1 and v.regs.r12 == 1001



# --- the register file: MSR numbers reach the one home of each register ----------------------
def test_msr_numbers_of_catalog_registers_and_aliases_read_and_write_their_home(counter) -> None:
    """catalog.py: one home per register; regs.msr(i) of an alias (EFER, APIC base,
    FS/GS base) or of a catalog MSR is that register, pending edits included."""
    m, v = counter
    v.regs.fs_base = 0x1234_5000                      # SREGS home, not flushed
    assert v.regs.msr(0xC0000100) == 0x1234_5000
    v.regs.star = STAR + 0x10000                      # catalog MSR, not flushed
    assert v.regs.msr(0xC0000081) == STAR + 0x10000
    v.regs.set_msr(0xC0000101, 0x6789_0000)           # gs.base by its MSR number
    v.regs.set_msr(0xC0000081, STAR)
    assert sorted(v.cache.dirty_registers()) == ["fs.base", "gs.base", "star"]
    assert v.regs.gs_base == 0x6789_0000
    v.discard()


def test_refused_lapic_registers_read_like_any_other(counter) -> None:
    m, v = counter
    d = v.regs.dump(BIT["LAPIC"])
    for name in ("version", "apr", "icr", "isr", "tmcct"):
        value = getattr(v.regs, f"lapic_{name}")
        assert isinstance(value, int), name
    assert v.regs.lapic_version == d["lapic.version"] and v.regs.lapic_icr == d["lapic.icr"]


def test_a_lapic_edit_is_laid_on_the_page_as_the_kernel_has_it_at_the_flush(counter) -> None:
    """_store_lapic: the page moves while the vCPU is stopped, so it is fetched at the
    flush; a change the kernel made after the cache's last fetch is kept."""
    m, v = counter
    v.regs.lapic_tdcr                                 # the cache's copy of the page
    page = v.handle.get_lapic()
    old = int.from_bytes(page[0x360:0x364], "little")
    new = (old ^ 0x5) | LVT_MASKED                    # LINT1 changed behind the cache
    page[0x360:0x364] = new.to_bytes(4, "little")
    v.handle.set_lapic(page)
    v.regs.lapic_tdcr = 0xB
    v.flush()
    after = v.handle.get_lapic()
    assert int.from_bytes(after[0x360:0x364], "little") == new
    assert int.from_bytes(after[0x3E0:0x3E4], "little") == 0xB
