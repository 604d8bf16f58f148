"""The KVM transport's flush order, MSR batching and event valid-flags, on plain data
(a fake vCPU handle that records calls; no /dev/kvm)."""

from __future__ import annotations

from typing import Any

import pytest

from regsync.arch.x86_64 import CATALOG, KvmTransport
from regsync.arch.x86_64.transport import FLUSH_ORDER, FlushError
from regsync.kvm import KvmError
from regsync.kvm import structs as ks

R = CATALOG.by_name


class FakeHandle:
    def __init__(self, refuse_msr: int | None = None) -> None:
        self.run_page = ks.kvm_run()
        self.xsave2_size = None
        self.calls: list[tuple[str, Any]] = []
        self.refuse_msr = refuse_msr

    def __getattr__(self, name: str) -> Any:
        if name.startswith("get_"):
            def get(into: Any = None) -> Any:
                self.calls.append((name, None))
                return into
            return get
        if name.startswith("set_"):
            def set_(value: Any) -> None:
                self.calls.append((name, value))
            return set_
        raise AttributeError(name)

    def get_mp_state(self) -> int:
        self.calls.append(("get_mp_state", None))
        return 0

    def get_msrs(self, indices: list[int]) -> list[int]:
        self.calls.append(("get_msrs", list(indices)))
        return [0] * len(indices)

    def set_msrs(self, items: list[tuple[int, int]]) -> None:
        self.calls.append(("set_msrs", list(items)))
        if self.refuse_msr is not None and any(i == self.refuse_msr for i, _ in items):
            raise KvmError("KVM_SET_MSRS", "vCPU 0", 22, f"MSR {self.refuse_msr:#x} refused")


def _store(t: KvmTransport, edits: dict[str, int], held: int) -> list[tuple[str, bool]]:
    dirty: dict[str, dict[Any, int]] = {}
    for name, value in edits.items():
        reg = R[name]
        dirty.setdefault(reg.group, {})[reg] = value
        t.accessors(reg)[1](t.local(CATALOG.group_by_name[reg.group]), value)
    set_fn = lambda reg, local, v: t.accessors(reg)[1](local, v)  # noqa: E731
    return t.store(dirty, held, allow_defer=False, set_fn=set_fn)


def test_flush_order_is_the_documented_constant() -> None:
    assert set(FLUSH_ORDER) == {g.name for g in CATALOG.groups}
    assert FLUSH_ORDER.index("SREGS") < FLUSH_ORDER.index("LAPIC") < FLUSH_ORDER.index("MSRS")
    assert FLUSH_ORDER[0] == "MP_STATE" and FLUSH_ORDER[-1] == "EVENTS"


def test_groups_reach_kvm_in_order_msrs_in_one_batch_tsc_deadline_last() -> None:
    h = FakeHandle()
    t = KvmTransport(h, use_sync_regs=False, supported_msrs={0x10, 0x6E0, 0xC0000081})
    held = CATALOG.all_mask
    written = _store(t, {"tsc_deadline": 5, "nmi.pending": 1, "lapic.tmict": 7, "star": 3,
                         "cr4": 0x20, "tsc": 9, "mp_state": 0}, held)
    sets = [c for c in h.calls if c[0].startswith("set_")]
    assert [c[0] for c in sets] == ["set_mp_state", "set_sregs", "set_lapic", "set_msrs",
                                    "set_vcpu_events"]
    msrs = dict(sets)["set_msrs"]
    assert [i for i, _ in msrs] == [0xC0000081, 0x10, 0x6E0]     # TSC, then its deadline
    # The LAPIC page is fetched fresh right before it is written (volatile).
    i = h.calls.index(("get_lapic", None))
    assert h.calls[i + 1][0] == "set_lapic"
    # Only the edited event field is flagged valid: untouched ones are not written.
    events = dict(sets)["set_vcpu_events"]
    assert events.flags == ks.KVM_VCPUEVENT_VALID_NMI_PENDING
    assert [n for n, _ in written] == ["MP_STATE", "SREGS", "LAPIC", "MSRS", "MSRS_TIME",
                                       "EVENTS"]


def test_a_group_not_held_is_fetched_and_overlaid_before_the_write() -> None:
    h = FakeHandle()
    t = KvmTransport(h, use_sync_regs=False, supported_msrs=set())
    written = _store(t, {"dr0": 0x1000}, held=0)
    assert h.calls[:2] == [("get_debugregs", None), ("set_debugregs", t.local(
        CATALOG.group_by_name["DEBUGREGS"]))]
    assert written == [("DEBUGREGS", True)]
    assert t.local(CATALOG.group_by_name["DEBUGREGS"]).db[0] == 0x1000


def test_refused_msr_names_the_group_registers_and_what_was_written() -> None:
    h = FakeHandle(refuse_msr=0x277)
    t = KvmTransport(h, use_sync_regs=False, supported_msrs={0x277})
    with pytest.raises(FlushError) as ei:
        _store(t, {"pat": 0x0202020202020202, "cr0": 0x11}, CATALOG.all_mask)
    e = ei.value
    assert e.group == "MSRS" and e.registers == ["pat"] and e.written == ["SREGS"]
    assert "0x277" in str(e)
