"""Model-based test of the register cache on the simulated backend (regsync.sim).

A hypothesis state machine drives a SimVcpu with reads, writes, synchronize,
flush, run, kernel ticks, reset requests and discard, and keeps a reference
model of its own:

* ``K``: what the kernel must hold (its truth), register by register;
* ``E``: local edits not yet known to be in the kernel.

The model does not predict *when* the cache writes a group early (a fetch of
MPSTATE flushes GPRS/SPRS first; a deferred GPRS write may be taken back and
written by ioctl): it watches the kernel's per-group write counters, and when
a group was written, its edits move from E to K. Everything else is predicted:
runs apply what is left of E, then the sim's guest step; ticks and resets
change K as the sim kernel does. Invariants:

(a) nothing lost: after a run the kernel equals K (every edit applied, then the
    guest step);
(b) nothing stale written back: the kernel equals K after every step, so a
    kernel-side tick survives any flush;
(c) a read returns the edit if edited, else (non-volatile) the kernel's value;
(d) a flush with no edits costs zero transfers; a second flush always does.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from regsync.cache import EditContradicted
from regsync.sim import (CATALOG, MSR_RESERVED, RESET_GPRS, RESET_PENDING, RUNNABLE, TSR_WIS,
                         SimVcpu)

NAMES = [r.name for r in CATALOG.registers]
GROUP_OF = {r.name: r.group for r in CATALOG.registers}
VOLATILE = {r.name for r in CATALOG.registers if r.volatile}
INTENT = {r.name for r in CATALOG.registers if r.write_intent}
BIT = {g.name: g.bit for g in CATALOG.groups}
M32 = 0xFFFF_FFFF
# Half the draws come from a few registers per group, so sequences revisit
# the same groups often enough to interleave deferrals, fetches and edits.
HOT = ["r1", "r3", "pc", "srr1", "esr", "tsr", "tcr", "pending_irq", "irq_vector", "mp_state"]
names = st.one_of(st.sampled_from(HOT), st.sampled_from(NAMES))
masks = st.one_of(st.sampled_from(sorted(CATALOG.levels.values())),
                  st.integers(0, CATALOG.all_mask))


# The sim kernel's behaviour, written out again for the model.
def model_step(K: dict[str, int]) -> None:
    K["srr0"] = K["pc"]
    K["pc"] = (K["pc"] + 4) & M32
    K["r0"] = (K["r0"] + 1) & M32
    K["r2"] = K["r1"]


def model_tick(K: dict[str, int], irq: int) -> None:
    K["tsr"] |= TSR_WIS
    K["dec"] = (K["dec"] - 1000) & M32
    K["pending_irq"] |= 1 << irq


def model_reset(K: dict[str, int]) -> None:
    K.update(RESET_GPRS, srr0=0, srr1=0, dear=0, esr=0, mp_state=RUNNABLE)


def machine(names: st.SearchStrategy[str], masks: st.SearchStrategy[int]) -> type:
    """The state machine, its rules drawing registers from ``names``."""

    class CacheMachine(RuleBasedStateMachine):
        strategy = "regsync"
        use_sync = True

        def __init__(self) -> None:
            super().__init__()
            self.vcpu = SimVcpu(strategy=self.strategy, use_sync=self.use_sync)
            self.kernel = self.vcpu.kernel
            self.cache = self.vcpu.cache
            self.K = {n: self.kernel.values[n] for n in NAMES}
            self.E: dict[str, int] = {}
            self.sets_seen: Counter[str] = Counter()

        def observe_writes(self, *, dropped: tuple[str, ...] = ()) -> None:
            """Groups the cache wrote since the last look: their edits are in K now
            (or, for ``dropped`` groups, were overwritten by a reset)."""
            for group, n in self.kernel.sets.items():
                if n > self.sets_seen[group]:
                    for name in [x for x in self.E if GROUP_OF[x] == group]:
                        value = self.E.pop(name)
                        if group not in dropped:
                            self.K[name] = value
            self.sets_seen = Counter(self.kernel.sets)

        def transfers(self) -> int:
            return sum(self.kernel.gets.values()) + sum(self.kernel.sets.values())

        # --- rules ----------------------------------------------------------------------
        @rule(name=names)
        def read(self, name: str) -> None:
            value = self.vcpu.regs[name]
            self.observe_writes()
            if name in self.E:
                assert value == self.E[name], f"read of edited {name}"
            elif name not in VOLATILE:
                assert value == self.K[name], f"read of {name}"

        @rule(name=names)
        def read_fresh(self, name: str) -> None:
            """Invalidate the group, then read: even a volatile register is the kernel's."""
            self.cache.invalidate(BIT[GROUP_OF[name]])
            value = self.vcpu.regs[name]
            self.observe_writes()
            assert value == self.E.get(name, self.K[name]), f"fresh read of {name}"

        @rule(name=names, value=st.integers(0, M32))
        def write(self, name: str, value: int) -> None:
            if name == "msr":
                value &= ~MSR_RESERVED          # refusals are tested in test_cache_unit
            if name in INTENT:
                # A write-1-to-set/clear register takes no plain value: the bits that
                # differ become OR/CLEAR transfers, sent at once (test_onereg_watchdog).
                set_, clear = value & ~self.K[name], ~value & self.K[name] & M32
                self.vcpu.regs.clear_bits(name, clear)
                self.vcpu.regs.set_bits(name, set_)
                self.K[name] = (self.K[name] & ~clear) | set_
                return
            self.vcpu.regs[name] = value
            self.E[name] = value
            self.observe_writes()

        @rule(mask=masks)
        def synchronize(self, mask: int) -> None:
            self.cache.synchronize(mask)
            self.observe_writes()

        @rule(allow_defer=st.booleans())
        def flush(self, allow_defer: bool) -> None:
            before, clean = self.transfers(), not self.E
            untouched = {n: self.kernel.values[n] for n in NAMES if n not in self.E}
            self.cache.flush(allow_defer=allow_defer)
            if clean:
                assert self.transfers() == before, "(d) flush with no edits made transfers"
            assert {n: self.kernel.values[n] for n in untouched} == untouched, \
                "(b) a flush wrote back a register that was not edited"
            before = self.transfers()
            self.cache.flush(allow_defer=allow_defer)
            assert self.transfers() == before, "(d) a second flush made transfers"
            self.observe_writes()

        @rule()
        def run(self) -> None:
            self.vcpu.run()
            self.observe_writes()
            self.K.update(self.E)               # what went through the run page
            self.E.clear()
            model_step(self.K)
            assert not self.cache.dirty_registers()

        @rule(irq=st.integers(0, 7))
        def tick(self, irq: int) -> None:
            self.kernel.tick(irq)
            model_tick(self.K, irq)

        @rule()
        def reset(self) -> None:
            """A reset request, then a fetch of MPSTATE (which applies it)."""
            self.kernel.request_reset()
            self.K["mp_state"] = RESET_PENDING
            self.cache.invalidate(BIT["MPSTATE"])
            reported = len(self.cache.stats.contradicted)
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                self.cache.synchronize(BIT["MPSTATE"])
            overwritten = {n: v for n, v in self.E.items() if GROUP_OF[n] in ("GPRS", "SPRS")}
            for name in overwritten:
                assert self.kernel.sets[GROUP_OF[name]] > self.sets_seen[GROUP_OF[name]], \
                    f"edit of {name} not flushed before the MPSTATE fetch"
            self.observe_writes(dropped=("GPRS", "SPRS"))
            model_reset(self.K)
            # An edit the reset changed is reported (stats and one warning), never hidden.
            changed = {n for n, v in overwritten.items() if self.K[n] != v}
            assert {c.register for c in self.cache.stats.contradicted[reported:]} == changed
            assert len([w for w in warned if issubclass(w.category, EditContradicted)]) == \
                (1 if changed else 0)
            assert self.vcpu.regs.mp_state == self.E.get("mp_state", RUNNABLE)
            assert self.vcpu.regs.pc == self.E.get("pc", RESET_GPRS["pc"])

        @rule(mask=masks)
        def invalidate(self, mask: int) -> None:
            """Forget what is held (vcpu.invalidate): costs nothing, loses nothing, even
            while a write is deferred into the run (test_cache_unit.py::
            test_invalidate_while_a_sync_write_is_deferred_keeps_it)."""
            before = self.transfers()
            self.cache.invalidate(mask)
            assert self.transfers() == before

        @rule(mask=masks)
        def discard(self, mask: int) -> None:
            self.cache.discard(mask)
            for name in [n for n in self.E if BIT[GROUP_OF[n]] & mask]:
                del self.E[name]

        # --- invariants -------------------------------------------------------------------
        @invariant()
        def kernel_matches_model(self) -> None:
            wrong = {n: (self.kernel.values[n], self.K[n]) for n in NAMES
                     if self.kernel.values[n] != self.K[n]}
            assert not wrong, f"kernel != model (kernel, model): {wrong}"

        @invariant()
        def edits_are_dirty_or_in_flight(self) -> None:
            pending = set(self.cache.dirty_registers())   # in-flight edits stay listed
            assert set(self.E) <= pending

    return CacheMachine


CacheMachine = machine(names, masks)
# The same rules on the sync group and MPSTATE alone: denser interleavings of
# deferred writes, invalidation and side-effect fetches.
FOCUS = ["r1", "r2", "r3", "pc", "mp_state"]
SyncFocusMachine = machine(st.sampled_from(FOCUS),
                           st.sampled_from([0, BIT["GPRS"], BIT["MPSTATE"],
                                            BIT["GPRS"] | BIT["MPSTATE"], -1]))


class NoSyncMachine(CacheMachine):
    use_sync = False


class EagerMachine(CacheMachine):
    strategy = "eager"


# 200 interleavings each in CI; REGSYNC_HYPOTHESIS=deep: 10,000 (tests/conftest.py).
SETTINGS = settings.get_profile(os.environ.get("REGSYNC_HYPOTHESIS", "quick") + "-sim")
TestCacheModelSync = CacheMachine.TestCase
TestCacheModelSync.settings = SETTINGS
TestCacheModelNoSync = NoSyncMachine.TestCase
TestCacheModelNoSync.settings = SETTINGS
TestCacheModelSyncFocus = SyncFocusMachine.TestCase
TestCacheModelSyncFocus.settings = SETTINGS


def test_DEMONSTRATION_eager_writes_back_a_stale_tick() -> None:
    """Not a property of regsync: documents the bug class the model catches.

    Eager full sync fetches every group on the first read, then writes every
    fetched group back before the run once anything is dirty, so a watchdog
    tick that happened in between is overwritten: invariant (b) breaks.
    """
    m = EagerMachine()
    m.read("r1")                # eager: fetches every group, TIMER and EVENTS too
    m.tick(3)                   # the kernel timer fires while the vCPU is stopped
    m.write("r1", 0x42)         # any edit makes eager write everything back
    m.run()
    with pytest.raises(AssertionError, match="kernel != model") as ei:
        m.kernel_matches_model()
    for lost in ("tsr", "dec", "pending_irq"):
        assert lost in str(ei.value)
    assert m.kernel.values["r1"] == 0x42                  # the edit itself did land
    assert not m.kernel.values["tsr"] & TSR_WIS           # ...but the tick is gone


def test_same_sequence_keeps_the_tick_under_regsync() -> None:
    m = CacheMachine()
    m.read("r1")
    m.read("tsr")
    m.tick(3)
    m.write("r1", 0x42)
    m.run()
    m.kernel_matches_model()
    assert m.kernel.values["tsr"] & TSR_WIS
