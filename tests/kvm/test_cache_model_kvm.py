"""Stateful model test of the cache on real KVM (hypothesis).

Random interleavings of reads, writes, synchronize (levels and masks), flush,
runs of the counter guest, full dumps and a LAPIC timer that the kernel counts
down on its own, checked against a reference model:

* nothing lost: every edit reaches the guest (it reads STAR, DR0, CR8 and XMM0
  back into r13/r14/r15/rbx) or stays readable until the run;
* nothing stale written back: TMCCT, which only the kernel changes, never
  moves up again (a stale KVM_SET_LAPIC would restart the count from an old
  value), and untouched registers keep the kernel's values.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from regsync import Machine

# Registers the counter guest never writes, with value ranges KVM accepts.
SAFE = {
    "r8": st.integers(0, 2**64 - 1), "r9": st.integers(0, 2**64 - 1),
    "r10": st.integers(0, 2**64 - 1), "rsi": st.integers(0, 2**64 - 1),
    "star": st.integers(0, 2**64 - 1), "lstar": st.integers(0, 2**47 - 1),
    "dr0": st.integers(0, 2**47 - 1), "dr1": st.integers(0, 2**47 - 1),
    "cr8": st.integers(0, 15), "xmm0": st.integers(0, 2**128 - 1),
    "xmm5": st.integers(0, 2**128 - 1), "lapic.lvt_lint1": st.sampled_from([0x10000, 0x10700]),
}
OBSERVED = {"star": "r13", "dr0": "r14", "cr8": "r15"}   # the guest copies these each loop
LEVEL_OR_MASK = st.one_of(st.sampled_from(["RUNTIME", "RESET", "FULL"]),
                          st.integers(1, 0x3FF))


class KvmCacheModel(RuleBasedStateMachine):
    @initialize()
    def boot(self) -> None:
        self.m = Machine(smp=1)
        self.m.load("counter")
        self.v = self.m.vcpus[0]
        regs = self.v.regs
        # A one-shot LAPIC timer, masked (no interrupt), divide by 128: TMCCT
        # counts down on its own while we watch.
        regs["lapic.svr"] = 0x1FF
        regs["lapic.lvt_timer"] = 0x10040
        regs["lapic.tdcr"] = 0xA
        regs["lapic.tmict"] = 0xFFFF_FFFF
        self.run_tick()
        self.model = {name: self.v.regs[name] for name in SAFE}
        self.edited: set[str] = set()
        self.last_tmcct = self.v.regs["lapic.tmcct"]

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self.m.close()

    def run_tick(self) -> None:
        while True:
            ex = self.v.run()
            assert ex.kind == "io", ex
            if ex.port == 0x501:
                return

    @rule(data=st.data(), name=st.sampled_from(sorted(SAFE)))
    def write(self, data: st.DataObject, name: str) -> None:
        value = data.draw(SAFE[name])
        self.v.regs[name] = value
        self.model[name] = value
        self.edited.add(name)

    @rule(name=st.sampled_from(sorted(SAFE)))
    def read(self, name: str) -> None:
        assert self.v.regs[name] == self.model[name], name

    @rule(what=LEVEL_OR_MASK)
    def synchronize(self, what: object) -> None:
        self.v.synchronize(what)  # type: ignore[arg-type]

    @rule()
    def flush(self) -> None:
        self.v.flush()
        self.edited.clear()

    @rule()
    def dump_all(self) -> None:
        d = self.v.regs.dump()
        for name in SAFE:
            assert d[name] == self.model[name], name

    @rule()
    def run(self) -> None:
        self.run_tick()
        self.edited.clear()
        regs = self.v.regs
        for src, dst in OBSERVED.items():
            assert regs[dst] == self.model[src], f"guest saw {dst}={regs[dst]:#x}, {src} edit lost"
        assert regs.rbx == self.model["xmm0"] & (2**64 - 1)

    @precondition(lambda self: not self.edited)
    @rule()
    def dirty_is_empty_after_run_costs_nothing(self) -> None:
        before = sum(self.v.stats["ioctls"].values())
        self.v.flush()
        assert sum(self.v.stats["ioctls"].values()) == before

    @invariant()
    def kernel_owned_timer_never_rewound(self) -> None:
        if not hasattr(self, "v"):
            return
        self.v.synchronize("LAPIC")
        now = self.v.regs["lapic.tmcct"]
        assert now <= self.last_tmcct, f"TMCCT went back up {self.last_tmcct:#x} -> {now:#x}"
        self.last_tmcct = now
        self.v.invalidate("LAPIC")   # next check fetches the kernel's current count


TestKvmCacheModel = KvmCacheModel.TestCase
TestKvmCacheModel.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                      suppress_health_check=list(HealthCheck))
