"""Stateful model test of the cache on real KVM (hypothesis), two vCPUs.

The counter guest (src/regsync/guests/src/counter.S, flags LAPIC|TIMER|SMP)
copies STAR, DR0, CR8, LVT LINT1 and XMM0 into r13/r14/r15/r11/rbx at every
tick exit, counts NMIs per CPU, runs a periodic LAPIC timer on the BSP and,
when asked through memory, sends INIT/SIPI/SIPI to the AP. Random interleavings
of reads, writes, synchronize (levels and masks), flush, dumps, runs of either
vCPU, NMIs (KVM_NMI behind the cache's back, or an edit of nmi.pending) and AP
starts are checked against a reference model:

* nothing lost: every edit reaches the guest (it reads them back) or stays
  readable until the run; every NMI is counted by the guest exactly once;
  an edit an INIT overwrites is reported (stats["contradicted"]), never hidden;
* nothing stale: after the AP's INIT/SIPI is processed the cache shows the
  kernel's new state (rip 0, cs 0x0800), mp_state follows the kernel; the
  BSP's TMCCT, which only the kernel changes, is never written back from an
  old page: every KVM_GET_LAPIC and KVM_SET_LAPIC on it is watched, and a SET
  that restarts the count from above where the kernel had already counted
  down to is a stale write-back (test_stale_lapic_write_back_is_caught shows
  the model catching one).

Depth: REGSYNC_HYPOTHESIS=deep runs 500 interleavings (tests/conftest.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from regsync import Machine
from regsync.cache import RegisterCache
from regsync.guests import symbols
from regsync.kvm.structs import KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED
from regsync.strategies import STRATEGIES

COUNTER = symbols("counter")
LAPIC_OBSERVED, TIMER, SMP = 1, 2, 4           # counter.S argument flags
TMCCT = 0x390
PORT_TICK = 0x501
BSP, AP = 0, 1

# Registers the counter guest never writes, with value ranges KVM accepts.
SAFE = {
    "r8": st.integers(0, 2**64 - 1), "r9": st.integers(0, 2**64 - 1),
    "r10": st.integers(0, 2**64 - 1), "rsi": st.integers(0, 2**64 - 1),
    "star": st.integers(0, 2**64 - 1), "lstar": st.integers(0, 2**47 - 1),
    "dr0": st.integers(0, 2**47 - 1), "dr1": st.integers(0, 2**47 - 1),
    "cr8": st.integers(0, 15), "xmm0": st.integers(0, 2**128 - 1),
    "xmm5": st.integers(0, 2**128 - 1), "lapic.lvt_lint1": st.sampled_from([0x10000, 0x10700]),
}
# What the guest copies each iteration: register -> (where, mask).
OBSERVED = {"star": ("r13", 2**64 - 1), "dr0": ("r14", 2**64 - 1), "cr8": ("r15", 2**64 - 1),
            "lapic.lvt_lint1": ("r11", 2**32 - 1), "xmm0": ("rbx", 2**64 - 1)}
LEVEL_OR_MASK = st.one_of(st.sampled_from(["RUNTIME", "RESET", "FULL"]), st.integers(1, 0x3FF))
CPU = st.sampled_from([BSP, AP])


def tmcct_of(page: Any) -> int:
    return int.from_bytes(bytes(page[TMCCT:TMCCT + 4]), "little")


class LapicWatch:
    """Every KVM_GET_LAPIC and KVM_SET_LAPIC on one vCPU, with the TMCCT it carried.

    The BSP's timer is periodic with a 549 s period, so within one example TMCCT
    only counts down. A SET whose page restarts the count from above the lowest
    count any GET has already seen writes back a page fetched before that GET:
    stale. (Hooked on the handle's ioctl method, under every path the cache
    and its transport use.)
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.lowest: int | None = None
        self.stale: list[str] = []
        io = handle._io

        def watched(name: str, arg: Any = 0) -> int:
            if name == "KVM_SET_LAPIC":
                count = tmcct_of(arg)
                if self.lowest is not None and count > self.lowest:
                    self.stale.append(f"KVM_SET_LAPIC restarted TMCCT from {count:#x}, but the "
                                      f"kernel had already counted down to {self.lowest:#x}: "
                                      f"a stale LAPIC page was written back")
            ret = io(name, arg)
            if name == "KVM_GET_LAPIC":
                count = tmcct_of(arg)
                self.lowest = count if self.lowest is None else min(self.lowest, count)
            return ret
        handle._io = watched

    def sample(self) -> int:
        """The kernel's TMCCT now (a GET outside the cache: the cache is not disturbed)."""
        return tmcct_of(self.handle.get_lapic())


class KvmCacheModel(RuleBasedStateMachine):
    strategy = "regsync"

    @initialize()
    def boot(self) -> None:
        self.m = Machine(smp=2, strategy=self.strategy)
        self.m.load("counter", arg=LAPIC_OBSERVED | TIMER | SMP)
        self.v = self.m.vcpus
        self.watch = LapicWatch(self.v[BSP].handle)
        self.ticks = [0, 0]                  # the guest's r12 at its last tick
        self.run_to_tick(BSP)                # the BSP armed its timer before this tick
        assert self.watch.sample() != 0, "the guest's LAPIC timer is not running"
        self.exp: list[dict[str, int]] = [{n: self.v[BSP].regs[n] for n in SAFE}, {}]
        self.exp[AP] = {n: self.v[AP].regs[n] for n in SAFE}
        self.edited: list[set[str]] = [set(), set()]   # edits since the last flush/run
        self.nmis = [0, 0]                   # NMIs the guest must have counted
        self.nmi_pending = [False, False]
        self.ap = "off"                      # off, start_requested, init_sent, sipi_done, running
        self.ap_mp = KVM_MP_STATE_UNINITIALIZED    # until its first INIT/SIPI is processed

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self.m.close()

    # --- helpers ---------------------------------------------------------------------
    def run_to_tick(self, cpu: int) -> None:
        v = self.v[cpu]
        while True:
            ex = v.run()
            assert ex.kind == "io", ex
            if ex.port == PORT_TICK:
                break
            self.m.dispatch(v, ex)
        r12 = v.regs.r12
        assert r12 == self.ticks[cpu] + 1, f"vCPU {cpu}: r12 {r12} after {self.ticks[cpu]}"
        self.ticks[cpu] = r12

    def ap_started(self) -> bool:
        return self.ap in ("sipi_done", "running")

    def on(self, cpu: int, action: Callable[[Any], object]) -> object:
        """Run ``action(vcpu)``; on the AP, account for an INIT/SIPI it made KVM process.

        KVM processes a pending INIT/SIPI in KVM_GET_MP_STATE (kvm_apic_accept_events),
        so any action that fetches MP_STATE may reset the AP. Edits pending in the
        cache at that moment are flushed first; each must still read back, or be
        reported as contradicted.
        """
        v = self.v[cpu]
        if cpu != AP or self.ap != "init_sent":
            return action(v)
        gets = v.stats["ioctls"].get("KVM_GET_MP_STATE", 0)
        pending = {n: v.regs[n] for n in v.cache.dirty_registers() if n in SAFE}
        reported = len(v.stats.get("contradicted", ()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # checked through stats below
            result = action(v)
        if v.stats["ioctls"].get("KVM_GET_MP_STATE", 0) == gets:
            return result                            # INIT still pending
        self.ap, self.ap_mp = "sipi_done", KVM_MP_STATE_RUNNABLE
        contradicted = {c["register"] for c in v.stats.get("contradicted", ())[reported:]}
        for name, value in pending.items():
            assert v.regs[name] == value or name in contradicted, \
                f"AP edit of {name} overwritten by INIT and not reported"
        # The cache must show the state the SIPI left, not what it held before.
        assert (v.regs.rip, v.regs["cs.selector"], v.regs["cs.base"]) == (0, 0x0800, 0x8000)
        assert v.regs.mp_state == KVM_MP_STATE_RUNNABLE
        self.exp[AP] = {n: v.regs[n] for n in SAFE}   # INIT's values, surviving edits
        self.edited[AP].clear()
        self.ticks[AP] = 0
        return result

    # --- rules -----------------------------------------------------------------------
    @rule(cpu=CPU, data=st.data(), name=st.sampled_from(sorted(SAFE)))
    def write(self, cpu: int, data: st.DataObject, name: str) -> None:
        value = data.draw(SAFE[name])
        self.on(cpu, lambda v: v.regs.__setitem__(name, value))
        self.exp[cpu][name] = value
        self.edited[cpu].add(name)

    @rule(cpu=CPU, name=st.sampled_from(sorted(SAFE)))
    def read(self, cpu: int, name: str) -> None:
        assert self.on(cpu, lambda v: v.regs[name]) == self.exp[cpu][name], (cpu, name)

    @rule(cpu=CPU, what=LEVEL_OR_MASK)
    def synchronize(self, cpu: int, what: object) -> None:
        self.on(cpu, lambda v: v.synchronize(what))  # type: ignore[arg-type]

    @rule(cpu=CPU)
    def flush(self, cpu: int) -> None:
        self.on(cpu, lambda v: v.flush())
        self.edited[cpu].clear()

    @rule(cpu=CPU)
    def dump_all(self, cpu: int) -> None:
        d: Any = self.on(cpu, lambda v: v.regs.dump())
        for name in SAFE:
            assert d[name] == self.exp[cpu][name], (cpu, name)
        if self.ap == "sipi_done" and cpu == AP:
            assert (d["rip"], d["cs.selector"]) == (0, 0x0800), "dump shows the AP before SIPI"

    @rule(cpu=CPU)
    def mp_state(self, cpu: int) -> None:
        state = self.on(cpu, lambda v: v.regs.mp_state)
        expected = self.ap_mp if cpu == AP else KVM_MP_STATE_RUNNABLE
        assert state == expected, (cpu, self.ap, state)

    @rule()
    def run_bsp(self) -> None:
        before = self.watch.sample()
        self.run_to_tick(BSP)
        self.no_stale_lapic_written_back()
        assert self.watch.sample() < before, "the BSP's LAPIC timer stood still during a run"
        self.after_run(BSP)
        if self.ap == "start_requested":
            assert self.m.memory.read_u64(COUNTER["counter_start_ap"]) == 0
            self.ap = "init_sent"

    @precondition(lambda self: self.ap_started())
    @rule()
    def run_ap(self) -> None:
        state = self.v[AP].regs.mp_state
        assert state == KVM_MP_STATE_RUNNABLE, f"AP mp_state {state} after its SIPI was processed"
        self.run_to_tick(AP)
        self.ap = "running"
        self.after_run(AP)

    def after_run(self, cpu: int) -> None:
        self.edited[cpu].clear()
        regs = self.v[cpu].regs
        for src, (dst, mask) in OBSERVED.items():
            assert regs[dst] == self.exp[cpu][src] & mask, \
                f"vCPU {cpu}: guest saw {dst}={regs[dst]:#x}, {src} edit lost"
        if self.nmi_pending[cpu]:
            self.nmis[cpu] += 1
            self.nmi_pending[cpu] = False
        counted = self.m.memory.read_u64(COUNTER["counter_nmis"] + 8 * cpu)
        assert counted == self.nmis[cpu], f"vCPU {cpu}: guest counted {counted} NMIs, not {self.nmis[cpu]}"

    @precondition(lambda self: self.ap in ("off", "running") and not self.nmi_pending[AP])
    @rule()
    def start_ap(self) -> None:
        """Ask the BSP (through memory) to send INIT, SIPI, SIPI to the AP at its next run."""
        self.m.memory.write_u64(COUNTER["counter_start_ap"], 1)
        self.ap = "start_requested"

    @precondition(lambda self: self.ap in ("off", "running") and not self.nmi_pending[AP])
    @rule()
    def ap_cycle(self) -> None:
        """The AP's (re)start in one step, so that short sequences reach a running AP."""
        self.start_ap()
        self.run_bsp()
        self.mp_state(AP)
        self.run_ap()

    @rule(cpu=CPU, through_events=st.booleans())
    def nmi(self, cpu: int, through_events: bool) -> None:
        """An NMI: KVM_NMI (the kernel's state changes behind the cache) or an edit."""
        if self.nmi_pending[cpu] or (cpu == AP and self.ap != "running"):
            return
        v = self.v[cpu]
        if through_events:
            v.regs["nmi.pending"] = 1
            self.edited[cpu].add("nmi.pending")
        else:
            v.handle.nmi()
            assert v.regs["nmi.pending"] == 1, "a volatile read answered from a stale copy"
        self.nmi_pending[cpu] = True

    @precondition(lambda self: not self.edited[BSP])
    @rule()
    def dirty_is_empty_after_run_costs_nothing(self) -> None:
        v = self.v[BSP]
        before = sum(v.stats["ioctls"].values())
        v.flush()
        assert sum(v.stats["ioctls"].values()) == before

    @invariant()
    def no_stale_lapic_written_back(self) -> None:
        if hasattr(self, "watch"):
            self.watch.sample()
            assert not self.watch.stale, self.watch.stale[0]


TestKvmCacheModel = KvmCacheModel.TestCase
TestKvmCacheModel.settings = settings.get_profile(
    os.environ.get("REGSYNC_HYPOTHESIS", "quick") + "-kvm")


# --- the guard can fail ---------------------------------------------------------------
class StaleLapicCache(RegisterCache):
    """Writes the held LAPIC page back before a run whenever anything is dirty, as a
    whole-state write-back does (QEMU's kvm_put_apic at a FULL put): TMCCT and IRR
    from the time of the fetch go back into the kernel."""

    def before_run(self) -> None:
        lapic = self.catalog.group_by_name["LAPIC"].bit
        if self.held & lapic and self.dirty_mask:
            self.transport.vcpu.set_lapic(self.locals["LAPIC"])
        super().before_run()


class StaleLapicModel(KvmCacheModel):
    strategy = "stale-lapic"

    @initialize()
    def boot(self) -> None:
        STRATEGIES[self.strategy] = StaleLapicCache
        try:
            super().boot()
        finally:
            del STRATEGIES[self.strategy]


def stale_sequence(model: KvmCacheModel) -> None:
    """Fetch the LAPIC, let the kernel count on, edit a GPR, run."""
    model.boot()
    model.no_stale_lapic_written_back()
    model.dump_all(BSP)                  # the LAPIC page is fetched and held
    model.no_stale_lapic_written_back()  # the kernel counts down past it
    model.write(BSP, _Fixed(1), "r8")    # type: ignore[arg-type]
    model.run_bsp()
    model.no_stale_lapic_written_back()


class _Fixed:
    """A stand-in for hypothesis' data object when a rule is called by hand."""

    def __init__(self, value: int) -> None:
        self.value = value

    def draw(self, _strategy: object) -> int:
        return self.value


def test_stale_lapic_write_back_is_caught() -> None:
    model = StaleLapicModel()
    try:
        with pytest.raises(AssertionError, match="stale LAPIC page was written back"):
            stale_sequence(model)
    finally:
        model.teardown()


def test_same_sequence_writes_no_stale_lapic_under_regsync() -> None:
    model = KvmCacheModel()
    try:
        stale_sequence(model)
        assert model.watch.lowest is not None and model.watch.lowest > 0
    finally:
        model.teardown()

