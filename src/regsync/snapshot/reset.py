"""The fast reset: ``snap = m.snapshot()`` in memory, ``m.reset_to(snap)`` puts back only what changed.

Memory: KVM's dirty log (memory.collect_dirty) names the pages the guest wrote
since the snapshot, plus the pages regsync itself wrote (the memory layer
records those: KVM logs only guest writes). Only those pages are copied back.
The log counts from the last snapshot taken or reset to on that machine
(state.BASELINE); resetting to any other snapshot restores everything.

Registers: per group, the cheapest way that still leaves the VM exactly as a
full restore would (RESET_POLICY, measured on this host; see the table):

* "compare": the group came back in the kvm_run page at the exit (SYNC_REGS),
  so comparing costs no syscall; written only when it differs -- REGS and
  EVENTS through kvm_dirty_regs (no syscall), SREGS too unless its apic_base
  changes while the LAPIC is written (RESTORE_ORDER: SREGS before LAPIC).
* "check": one GET; the SET only when it differs. For groups a run rarely
  changes and whose SET costs more than the GET here.
* "blind": the SET without a look. For state that always moves (TSC, kvmclock,
  and the PIT, whose counts run from a load time KVM_SET_PIT2 re-bases to now:
  i8254.c kvm_pit_load_count) and for MP_STATE, whose GET processes INIT/SIPI and so would make the cache
  drop the free kvm_run copies of REGS/SREGS/EVENTS (catalog: MP_STATE
  invalidates them); its SET costs no more than the GET.

Measured with ``python benchmarks/reset_loop.py --costs`` (µs per ioctl, GET/SET;
two runs on this host, which other sessions loaded, so they drift): MP_STATE 40/32,
35/37; XSAVE 32/49, 9/43; XCRS 26/40, 11/10; DEBUGREGS 8/43, 67/24; LAPIC 8/39, 9/73;
MSRS 28/85, 61/150; MSRS_TIME 14/44, 82/112; PIT 2/4, 10/33; PICs and IOAPIC 3-18 each
way; clock 6/5. A SET mostly costs more than a GET, and where the two are level the
check still wins for a group a run rarely changes: an unchanged group is then not
written at all (a SET is not free of effects: KVM_SET_LAPIC restarts the timer).

``assume_unchanged`` names groups (and VM parts) the caller vouches the guest
does not change -- a harness for code that touches only general registers and
memory, say: they are neither checked nor written. That is the caller's
promise, not the cache's proof: a wrong one leaves that state as the run left it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from ..arch.x86_64 import CATALOG
from ..kvm import structs as ks
from ..memory import PAGE, PAGE_SHIFT
from .order import RESTORE_ORDER, VM_RESTORE_ORDER
from .state import (BASELINE, MachineState, SnapshotError, after_restore, apply, capture,
                    get_vm_part, on_each_vcpu, paused, put_devices, put_group, put_vm_part,
                    settle)

if TYPE_CHECKING:
    from ..machine import Machine
    from ..vcpu import Vcpu

RESET_POLICY: dict[str, str] = {
    "MP_STATE": "blind", "REGS": "compare", "SREGS": "compare", "XSAVE": "check",
    "XCRS": "check", "DEBUGREGS": "check", "LAPIC": "check", "MSRS": "check",
    "MSRS_TIME": "blind", "EVENTS": "compare",
    "pit": "blind", "clock": "blind", "pic_master": "check", "pic_slave": "check",
    "ioapic": "check",
}
# What a guest that touches only general registers, flags, segments and memory leaves alone.
REGS_AND_MEMORY_ONLY: tuple[str, ...] = (
    "MP_STATE", "XSAVE", "XCRS", "DEBUGREGS", "LAPIC", "MSRS", "MSRS_TIME", *VM_RESTORE_ORDER)
_KNOWN = set(RESET_POLICY)
_SYNC_DEFER = ("REGS", "SREGS", "EVENTS")
_APIC_BASE = slice(ks.kvm_sregs.apic_base.offset, ks.kvm_sregs.apic_base.offset + 8)
_ZERO = bytes(PAGE)


@dataclass
class Snapshot:
    """A machine's state in memory, with each saved page at hand for the reset."""
    state: MachineState
    pages: list[dict[int, memoryview]] = field(default_factory=list, repr=False)
    resets: int = 0

    def __post_init__(self) -> None:
        self.pages = []
        for img in self.state.memory:
            index: dict[int, memoryview] = {}
            for off, data in img.extents:
                view = memoryview(data)
                for p in range(0, len(view), PAGE):
                    index[(off + p) >> PAGE_SHIFT] = view[p:p + PAGE]
            self.pages.append(index)


def take(m: "Machine") -> Snapshot:
    """The machine's state in memory; the dirty log counts from here."""
    if m.memory.dirty_mode is None:
        m.memory.track_dirty(m.vm)
    st = capture(m, before_memory=m.memory.collect_dirty)
    snap = Snapshot(st)
    BASELINE[m] = snap
    return snap


def reset_to(m: "Machine", snap: Snapshot, *, assume_unchanged: Iterable[str] = ()) -> None:
    """Put the machine back to snap, writing only what changed (see the module docstring)."""
    skip = frozenset(assume_unchanged)
    unknown = skip - _KNOWN
    if unknown:
        raise ValueError(f"assume_unchanged: unknown group(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(RESET_POLICY)})")
    st = snap.state
    if BASELINE.get(m) is not snap:
        # The log does not count from this snapshot: everything goes back.
        apply(m, st)
        if m.memory.dirty_mode is None:
            m.memory.track_dirty(m.vm)
        m.memory.collect_dirty()
        BASELINE[m] = snap
        snap.resets += 1
        return
    with paused(m):
        on_each_vcpu(m, settle)        # an unfinished I/O would land on the restored state
        _reset_vm(m, st, skip)
        _reset_memory(m, snap)
        for v, vs in zip(m.vcpus, st.vcpus):
            if m.threads:
                m.run_on_cpu(v, functools.partial(_reset_vcpu, v, vs.groups, skip))
            else:
                _reset_vcpu(v, vs.groups, skip)
        put_devices(m, st.devices)
        m.halted.clear()
    after_restore(m, st)
    snap.resets += 1


def _reset_memory(m: "Machine", snap: Snapshot) -> None:
    mem = m.memory
    for page in mem.collect_dirty():
        gpa = page << PAGE_SHIFT
        for i, s in enumerate(mem.slots):
            if s.gpa <= gpa < s.gpa + s.size:
                off = gpa - s.gpa
                src = snap.pages[i].get((off >> PAGE_SHIFT))
                s.mem[off:off + PAGE] = src if src is not None else _ZERO
                break
    mem.user_dirty.clear()            # the copies above are the snapshot's, not new writes



def _reset_vm(m: "Machine", st: MachineState, skip: frozenset[str]) -> None:
    if not st.vm:
        return
    for name in VM_RESTORE_ORDER:
        if name not in st.vm or name in skip:
            continue
        if RESET_POLICY[name] == "check" and get_vm_part(m, name) == st.vm[name]:
            continue
        put_vm_part(m, name, st.vm[name])


_XSTATE_BV = slice(512, 520)


def _same(name: str, now: bytes, saved: bytes) -> bool:
    """Is the group's state the same? Bytes, except XSAVE's XSTATE_BV: KVM fills a
    component in its init state with the init values (arch/x86/kernel/fpu/xstate.c
    __copy_xstate_to_uabi_buf copies it from init_fpstate), and only the header bit
    says whether the CPU had it in init state -- it flips with the host's XSAVE
    init optimization while the registers stay the same (seen here: SSE's bit)."""
    if name == "XSAVE":
        return now[:512] == saved[:512] and now[520:] == saved[520:]
    return now == saved


def _reset_vcpu(v: "Vcpu", groups: dict[str, bytes], skip: frozenset[str]) -> None:
    """On v's own thread: each group compared, checked or written per RESET_POLICY."""
    c, t = v.cache, v.transport
    c.discard()
    writes: list[str] = []
    for name in RESTORE_ORDER:
        g = CATALOG.group_by_name[name]
        if name in skip or name not in groups or not g.bit & t.available_mask:
            continue
        policy = RESET_POLICY[name]
        if c.held & g.bit:
            if not _same(name, t.export(g), groups[name]):
                writes.append(name)
        elif policy == "check":
            if not _same(name, c.export(g.bit)[name], groups[name]):
                writes.append(name)
        else:
            writes.append(name)
    deferrable = set(_SYNC_DEFER) if t.use_sync_regs else set()
    if "SREGS" in writes and "LAPIC" in writes and \
            t.export(CATALOG.group_by_name["SREGS"])[_APIC_BASE] != groups["SREGS"][_APIC_BASE]:
        deferrable.discard("SREGS")
    for name in writes:
        put_group(v, name, groups[name], defer=name in deferrable)


__all__ = ["Snapshot", "take", "reset_to", "RESET_POLICY", "REGS_AND_MEMORY_ONLY",
           "SnapshotError"]
