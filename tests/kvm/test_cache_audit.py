"""Issue 8, items 1-8: the cache's promises, each shown on real KVM.

Every test here was written before its fix and failed against the wave-1 cache;
the failure each one caught is noted in its docstring.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest

from regsync import KvmError, Machine, RegisterWriteError
from regsync.kvm import MsrError
from regsync.cache import EditContradicted, WrongThreadError
from regsync.guests import symbols
from ticks import run_to_tick  # tests/kvm/ticks.py

STAR = 0x0023_0010_0000_0000
BAD_MSR = 0x1234_5678
LVT_MASKED = 1 << 16


@pytest.fixture
def counter():
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        yield m, v


# --- 1. a refused MSR leaves nothing behind ---------------------------------------------

def test_refused_msr_read_names_it_and_leaves_nothing_behind(counter) -> None:
    """Before: the index stayed in the MSRS batch; every later dump() failed."""
    m, v = counter
    for _ in range(2):
        with pytest.raises((KvmError, KeyError, ValueError)) as ei:
            v.regs.msr(BAD_MSR)
        assert f"{BAD_MSR:#x}" in str(ei.value)
    with pytest.raises((KvmError, KeyError, ValueError)):
        v.regs.set_msr(BAD_MSR, 1)
    assert v.regs.dump()["star"] is not None            # the batch is not poisoned
    v.synchronize_state("FULL")
    v.discard()
    v.regs.star = STAR
    run_to_tick(m, v)
    assert v.regs.r13 == STAR


def test_short_kvm_set_msrs_count_keeps_only_the_failed_msr_dirty(counter) -> None:
    """Before: both MSRs stayed dirty and the error named both, though STAR was written."""
    m, v = counter
    v.regs.star = STAR
    v.regs.lstar = 1 << 63                               # not canonical: refused
    with pytest.raises(RegisterWriteError) as ei:
        v.run()
    assert ei.value.registers == ["lstar"]
    assert "0xc0000082" in str(ei.value)
    assert v.cache.dirty_registers() == ["lstar"]        # STAR did reach the kernel
    v.discard("MSRS")
    assert v.regs.star == STAR
    run_to_tick(m, v)
    assert v.regs.r13 == STAR


def test_short_kvm_get_msrs_count_drops_only_the_refusing_msr(counter, monkeypatch) -> None:
    """A catalog MSR KVM lists but will not read: the others still arrive, it reads None."""
    m, v = counter
    real = v.handle.get_msrs
    refused = 0xC0000083                                  # cstar

    def short(indices: list[int]) -> list[int]:
        if refused in indices:
            n = indices.index(refused)
            raise MsrError("KVM_GET_MSRS", "vcpu 0", indices, n, read=real(indices[:n]))
        return real(indices)

    monkeypatch.setattr(v.handle, "get_msrs", short)
    d = v.regs.dump()
    assert d["cstar"] is None and d["star"] is not None and d["lstar"] is not None
    with pytest.raises(KeyError) as ei:
        v.regs.cstar
    assert "0xc0000083" in str(ei.value)
    assert v.regs.dump()["sfmask"] is not None            # and it stays dropped


# --- 2. LAPIC edits act as the guest's write would ----------------------------------------

def test_tmict_edit_loads_the_current_count(counter) -> None:
    """Before: KVM_SET_LAPIC restarted the count from the fetched TMCCT (0): tmcct read 0."""
    m, v = counter
    v.regs.lapic_tdcr = 0xB                               # divide by 1
    v.regs.lapic_lvt_timer = LVT_MASKED | 0x40           # one-shot, masked
    v.regs.lapic_tmict = 0xF000_0000
    v.flush()
    tmcct = v.regs.lapic_tmcct
    assert 0 < tmcct <= 0xF000_0000


def test_disabling_the_apic_in_svr_masks_every_lvt(counter) -> None:
    """Before: lapic.svr with bit 8 clear left the LVTs unmasked (a guest write masks them)."""
    m, v = counter
    v.regs.lapic_svr = 0x1FF
    v.regs.lapic_lvt_error = 0x33
    v.flush()
    assert v.regs.lapic_lvt_error == 0x33
    v.regs.lapic_svr = 0xFF
    v.flush()
    for name in ("lvt_timer", "lvt_error", "lvt_lint0", "lvt_lint1"):
        assert v.regs[f"lapic.{name}"] & LVT_MASKED, name


@pytest.mark.parametrize("name", ["lapic.tmcct", "lapic.icr", "lapic.ppr", "lapic.version",
                                  "lapic.isr", "lapic.irr", "lapic.tmr", "lapic.apr"])
def test_lapic_registers_a_write_cannot_reproduce_are_refused(counter, name: str) -> None:
    m, v = counter
    with pytest.raises(ValueError) as ei:
        v.regs[name] = 1
    assert name in str(ei.value)
    assert not v.cache.dirty_registers()


# --- 3. the lapic.tpr alias ----------------------------------------------------------------

def test_tpr_alias_is_lossless_or_refuses(counter) -> None:
    """Before: writing 0x25 read back 0x20."""
    m, v = counter
    with pytest.raises(ValueError) as ei:
        v.regs["lapic.tpr"] = 0x25
    assert "TPR[3:0]" in str(ei.value)
    v.regs["lapic.tpr"] = 0x20
    assert v.regs["lapic.tpr"] == 0x20 and v.regs.cr8 == 2
    run_to_tick(m, v)
    assert v.regs.r15 == 2                                # the guest's mov %cr8


# --- 4-6. INIT/SIPI between two vCPUs ------------------------------------------------------

def _bsp_sent_init_sipi(m: Machine) -> None:
    """Let vCPU 0 run (vCPU 1 stays paused) until it waits for the AP to come online."""
    sym = symbols("smp")
    lo, hi = sym["start_aps"], sym["trampoline_start"]
    m.resume([0])
    for _ in range(500):
        time.sleep(0.01)
        m.pause([0])
        rip = m.run_on_cpu(m.vcpus[0], lambda: m.vcpus[0].regs.rip)
        aps = m.memory.read_u64(sym["aps_online"])
        if lo <= rip < hi and "cpu 0 online" in m.serial.text and aps == 0:
            # The wait loop runs only after INIT, SIPI, SIPI have been sent.
            return
        m.resume([0])
    raise AssertionError(f"BSP never reached the AP wait loop: {m.serial.text!r}")


@pytest.fixture
def smp_pending():
    with Machine(smp=2) as m:
        m.load("smp")
        m.start(paused=True)
        ap = m.vcpus[1]
        assert m.run_on_cpu(ap, lambda: ap.regs.mp_state) == 1     # uninitialized
        _bsp_sent_init_sipi(m)
        yield m, ap
        m.resume()
        assert m.wait(60) == 0, m.serial.text


def test_volatile_mp_state_is_fetched_again_on_a_stopped_vcpu(smp_pending) -> None:
    """Before: the AP's mp_state stayed 1 (held since creation) after INIT/SIPI."""
    m, ap = smp_pending
    assert m.run_on_cpu(ap, lambda: ap.regs.mp_state) == 0          # runnable after SIPI


def test_dump_after_sipi_shows_the_kernels_registers(smp_pending) -> None:
    """Before: a dump after the MP_STATE fetch showed rip 0xfff0, cs 0xf000 (stale copies)."""
    m, ap = smp_pending
    d = m.run_on_cpu(ap, lambda: ap.regs.dump())
    assert d["mp_state"] == 0
    assert (d["cs.selector"], d["cs.base"], d["rip"]) == (0x0800, 0x8000, 0)


def test_an_edit_init_contradicts_is_reported(smp_pending) -> None:
    """Before: the edit was written, then INIT silently overwrote it."""
    m, ap = smp_pending

    def edit_then_look() -> tuple[int, list]:
        ap.regs.r12 = 0x1234
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = ap.regs.mp_state
        return state, [w.message for w in caught if isinstance(w.message, EditContradicted)]

    state, caught = m.run_on_cpu(ap, edit_then_look)
    assert state == 0
    assert len(caught) == 1 and "r12" in str(caught[0]) and "INIT" in str(caught[0])
    assert [c.register for c in ap.cache.stats.contradicted] == ["r12"]
    assert m.run_on_cpu(ap, lambda: ap.regs.r12) == 0               # the kernel's value


# --- 7. every transfer and mutation checks the owner ---------------------------------------

@pytest.mark.parametrize("call", ["run", "flush", "discard", "invalidate", "synchronize"])
def test_cache_mutations_off_the_owner_thread_are_refused(call: str) -> None:
    """Before: run() entered KVM_RUN from the main thread; discard/invalidate mutated freely."""
    with Machine(smp=1) as m:
        m.load("spin")
        m.start()
        v = m.vcpus[0]
        out: list[BaseException | None] = []

        def attempt() -> None:
            try:
                if call == "synchronize":
                    v.synchronize("FULL")
                else:
                    getattr(v, call)()
                out.append(None)
            except BaseException as e:      # noqa: BLE001 - inspected below
                out.append(e)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(10)
        m.stop()
        assert out and isinstance(out[0], WrongThreadError), out


# --- 8. kvm_dirty_regs whenever the kernel's order allows it --------------------------------

def test_gpr_edit_rides_kvm_run_beside_an_msr_write(counter) -> None:
    """Before: rax + star cost KVM_SET_REGS + KVM_SET_MSRS."""
    m, v = counter
    io = v.handle.counters
    regs0, msrs0 = io["KVM_SET_REGS"], io["KVM_SET_MSRS"]
    v.regs.r12 = 1000
    v.regs.star = STAR
    run_to_tick(m, v)
    assert (io["KVM_SET_REGS"] - regs0, io["KVM_SET_MSRS"] - msrs0) == (0, 1)
    assert (v.regs.r12, v.regs.r13) == (1001, STAR)


def test_a_refused_msr_does_not_lose_a_gpr_edit_queued_beside_it(counter) -> None:
    m, v = counter
    v.regs.r12 = 1000
    v.regs.lstar = 1 << 63
    with pytest.raises(RegisterWriteError):
        v.run()
    v.discard("MSRS")
    run_to_tick(m, v)
    assert v.regs.r12 == 1001


def test_watchdog_stops_the_guest_even_when_its_register_record_fails(monkeypatch) -> None:
    """Before: a dump() that raised (a poisoned MSR batch) killed the watchdog thread with a
    traceback and the guest was never stopped."""
    with Machine(smp=1) as m:
        m.load("watchdog", arg=0xFFFF)
        v = m.vcpus[0]

        def broken(*a, **k):
            raise KvmError("KVM_GET_MSRS", "vcpu 0", 22, "injected")

        monkeypatch.setattr(type(v.regs), "dump", broken)
        m.start()
        assert m.wait(60) == 124
        assert m.watchdog.expiries == 1
        assert "KVM_GET_MSRS" in m.watchdog_records[0]["registers"]["error"]
