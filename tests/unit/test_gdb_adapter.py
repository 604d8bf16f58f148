"""MachineTarget's logic against a fake machine (no KVM): classification of
debug exits, re-injection, debug-register encoding, slots, stepping plans."""

from __future__ import annotations

import errno
import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from regsync.exits import DebugExit
from regsync.gdb.adapter import DebugCaps, MachineTarget, StopRecord
from regsync.gdb.target import SIGINT, SIGTRAP, TargetError, Unsupported
from regsync.gdb.targetxml import X86_64_LAYOUT
from regsync.kvm import structs as ks
from regsync.vmm import RunState

HW_ONLY = DebugCaps(False, "probe got internal_error", True, "ok", False, "no exit")
ALL = DebugCaps(True, "intercepted", True, "ok", True, "fired")


class Regs(dict):
    def __missing__(self, name: str) -> int:
        return 0

    def __getattr__(self, name: str) -> int:
        return self[name]

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value


class FakeVcpu:
    def __init__(self, vid: int) -> None:
        self.id = vid
        self.regs = Regs(rip=0x1000 + vid, rsp=0x8000, rbp=0x9000, cr0=0x80000011, cr3=0,
                         cr4=0x20, efer=0x500, rax=0, rflags=2)
        self.regs["cs.attr"] = 1 << 13
        self.debug: list[tuple[int, list[int]]] = []
        self.handle = SimpleNamespace(counters=Counter())

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.debug.append((control, list(debugreg or [])))
        self.handle.counters["KVM_SET_GUEST_DEBUG"] += 1


class FakeThread:
    def __init__(self, vcpu: FakeVcpu) -> None:
        self.vcpu = vcpu
        self.state = RunState.PAUSED
        self.paused = threading.Event()
        self.paused.set()
        self.posted: list[str] = []

    def post(self, msg: str) -> None:
        self.posted.append(msg)
        if msg == "pause":
            self.paused.set()


class FakeMachine:
    def __init__(self, n: int = 2) -> None:
        self.vcpus = [FakeVcpu(i) for i in range(n)]
        self.threads = [FakeThread(v) for v in self.vcpus]
        self.memory = SimpleNamespace(read=lambda gpa, n: bytes(n), write=lambda gpa, d: None)
        self.fatal = None
        self.stopped_from: list[int] = []
        self.stopped_with: int | None = None
        self.paused = True              # the usual --wait start: nothing ran yet

    def run_on_cpu(self, v: Any, fn: Callable[[], Any], timeout: float = 0) -> Any:
        return fn()

    def thread_of(self, v: Any) -> Any:
        return self.threads[v.id]

    def pause(self, vids: Any = None, timeout: float = 0) -> None:
        for t in self.threads:
            if vids is None or t.vcpu.id in vids:
                t.post("pause")

    def resume(self, vids: Any = None) -> None:
        for t in self.threads:
            if vids is None or t.vcpu.id in vids:
                t.post("resume")

    def resume_all(self) -> None:
        self.resume()

    def stop_all_from(self, v: Any) -> None:
        self.stopped_from.append(v.id)

    def stop(self, status: int = 0) -> None:
        self.stopped_with = status


def make(caps: DebugCaps = HW_ONLY, n: int = 2) -> tuple[MachineTarget, FakeMachine, list]:
    m = FakeMachine(n)
    records: list[StopRecord] = []
    t = MachineTarget(m, caps, notify=records.append)  # type: ignore[arg-type]
    t.attach()
    for th in m.threads:
        th.posted.clear()                  # attach paused everyone
    return t, m, records


def test_z0_falls_back_to_a_hardware_slot_and_dr7_encodes_it() -> None:
    t, m, _ = make()
    t.insert_breakpoint(0, 0x1234, 1)
    t.insert_breakpoint(1, 0x5678, 1)
    t.resume({}, ("c", None))
    control, drs = m.vcpus[0].debug[-1]
    assert control == ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP
    assert drs[:2] == [0x1234, 0x5678]
    assert drs[7] == 0x400 | 0x200 | 0b10 | 0b1000          # G0, G1, exec, len 1
    assert "break (Z0, hardware fallback) at 0x1234" in t.monitor("info bp")
    assert "not intercepted" in t.monitor("info bp")
    assert [th.posted for th in m.threads] == [["resume"], ["resume"]]


def test_slots_run_out_and_duplicates_share_one() -> None:
    t, _, _ = make()
    t.insert_breakpoint(1, 0x10, 1)
    t.insert_breakpoint(1, 0x10, 1)                     # same point again: refcount
    for addr in (0x20, 0x30, 0x40):
        t.insert_breakpoint(0, addr, 1)
    with pytest.raises(TargetError) as e:
        t.insert_breakpoint(1, 0x50, 1)
    assert e.value.errno_value == errno.ENOSPC
    t.remove_breakpoint(1, 0x10, 1)
    assert t.slots[0] is not None                       # still referenced once
    t.remove_breakpoint(1, 0x10, 1)
    assert t.slots[0] is None


def test_watchpoints_refused_without_the_probe_and_encoded_with_it() -> None:
    t, _, _ = make(HW_ONLY)
    said: list[str] = []
    t.say = said.append
    with pytest.raises(TargetError, match="data breakpoints do not fire on this host") as e:
        t.insert_breakpoint(2, 0x1000, 8)
    assert e.value.errno_value == errno.EOPNOTSUPP
    assert said and "watchpoint at 0x1000 refused" in said[0]     # the VMM's console
    t, m, _ = make(ALL)
    with pytest.raises(Unsupported):
        t.insert_breakpoint(3, 0x1000, 8)               # x86 has no read-only watch
    with pytest.raises(TargetError):
        t.insert_breakpoint(2, 0x1004, 8)               # misaligned
    t.insert_breakpoint(2, 0x1000, 8)
    t.insert_breakpoint(4, 0x2000, 2)
    t.resume({}, ("c", None))
    drs = m.vcpus[0].debug[-1][1]
    assert drs[7] == 0x600 | 0b1010 | (0b01 | 0b10 << 2) << 16 | (0b11 | 0b01 << 2) << 20


def test_step_alone_runs_only_the_stepping_vcpu_and_skips_unchanged_debug_state() -> None:
    t, m, recs = make()
    t.resume({2: ("s", None)}, ("c", None))
    assert [th.posted for th in m.threads] == [[], ["resume"]]
    flags = ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_SINGLESTEP
    assert m.vcpus[1].debug == [(flags, [0] * 8)]
    # the step completes: a #DB with DR6.BS
    t.on_debug_exit(m.vcpus[1], DebugExit(1, 0x1001, 0xFFFF4FF0, 0))  # type: ignore[arg-type]
    assert m.stopped_from == [1] and len(recs) == 1 and recs[0].tid == 2
    ev = t.complete_stop(recs[0], X86_64_LAYOUT)
    assert ev is not None and ev.signal == SIGTRAP and ev.reason is None
    assert ev.expedite[16] == (0x1001).to_bytes(8, "little")    # rip
    t.resume({2: ("s", None)}, ("c", None))
    assert len(m.vcpus[1].debug) == 1                  # same state: no second ioctl
    t.on_debug_exit(m.vcpus[1], DebugExit(1, 0x1002, 0xFFFF4FF0, 0))  # type: ignore[arg-type]
    assert t.complete_stop(recs[-1], X86_64_LAYOUT) is not None
    t.monitor("step-mode all")
    for th in m.threads:
        th.posted.clear()
    t.resume({2: ("s", None)}, ("c", None))
    assert [th.posted for th in m.threads] == [["resume"], ["resume"]]
    assert m.vcpus[0].debug == []                      # vCPU 0 just continues: no debug


def test_foreign_debug_exceptions_are_reinjected_not_reported() -> None:
    t, m, recs = make()
    t.insert_breakpoint(1, 0x4000, 1)
    t.resume({}, ("c", None))
    v = m.vcpus[0]
    control = v.debug[-1][0]
    t.on_debug_exit(v, DebugExit(1, 0x1000, 0xFFFF4FF0, 0))  # TF trap we did not ask for
    assert v.debug[-1][0] == control | ks.KVM_GUESTDBG_INJECT_DB
    t.on_debug_exit(v, DebugExit(3, 0x1000, 0, 0))           # the guest's own int3
    assert v.debug[-1][0] == control | ks.KVM_GUESTDBG_INJECT_BP
    assert recs == [] and m.stopped_from == [] and t.stats.injected == 2
    # then our breakpoint: DR6.B0
    t.on_debug_exit(v, DebugExit(1, 0x4000, 0xFFFF0FF1, 0))
    assert [r.reason for r in recs] == ["hwbreak"]
    # a second vCPU hitting it while the stop is being reported is held, not reported
    t.on_debug_exit(m.vcpus[1], DebugExit(1, 0x4000, 0xFFFF0FF1, 0))
    assert len(recs) == 1 and m.stopped_from == [0, 1] and t.stats.dropped == 1


def test_interrupt_reports_sigint_for_the_current_thread_and_stale_records_drop() -> None:
    t, m, recs = make()
    t.current_thread = lambda: 2
    t.interrupt()                                       # stopped: nothing to do
    assert recs == []
    t.resume({}, ("c", None))
    t.interrupt()
    t.interrupt()
    assert len(recs) == 1 and recs[0].signal == SIGINT and recs[0].tid == 2
    t.detach()                                          # the record is now stale
    assert t.complete_stop(recs[0], X86_64_LAYOUT) is None
    assert all(th.posted[-1] == "resume" for th in m.threads)


def test_detach_clears_guest_debug_and_kill_stops_the_vm() -> None:
    t, m, _ = make()
    t.insert_breakpoint(1, 0x4000, 1)
    t.resume({}, ("c", None))
    t.interrupt()
    t.detach()
    assert all(v.debug[-1] == (0, [0] * 8) for v in m.vcpus)
    assert t.slots == [None] * 4 and t.state == "detached"
    t.kill()
    assert m.stopped_with == 137


def test_thread_info_layout_and_registers() -> None:
    t, m, _ = make()
    assert t.threads() == [1, 2]
    assert t.thread_extra_info(2) == "vCPU 1 rip=0x1001 long4"
    assert t.register_layout(1) is X86_64_LAYOUT
    m.vcpus[0].regs["cr0"] = 0x10
    t._forget()
    assert t.register_layout(1).arch == "i8086"
    regs = t.read_registers(1, X86_64_LAYOUT)
    assert len(regs) == 24                              # rax..gs: free with every exit
    t.write_register(1, X86_64_LAYOUT.by_name("rax"), (7).to_bytes(8, "little"))
    assert m.vcpus[0].regs["rax"] == 7
    assert "info sync" in t.monitor("help")


def test_late_hit_of_a_removed_breakpoint_is_not_reinjected() -> None:
    """A vCPU that still ran with an old DR7 (gdb removed the breakpoint while
    it was stopping) must not get the #DB: it is ours, held and dropped."""
    t, m, recs = make()
    t.insert_breakpoint(1, 0x4000, 1)
    t.resume({}, ("c", None))
    t.on_debug_exit(m.vcpus[0], DebugExit(1, 0x4000, 0xFFFF0FF1, 0))
    assert t.complete_stop(recs[0], X86_64_LAYOUT) is not None
    assert m.threads[1].posted[-1] == "pause"          # resumed vCPUs are paused for sure
    t.remove_breakpoint(1, 0x4000, 1)                  # gdb lifts breakpoints at a stop
    t.on_debug_exit(m.vcpus[1], DebugExit(1, 0x4000, 0xFFFF0FF1, 0))
    assert t.stats.injected == 0 and m.stopped_from == [0, 1] and len(recs) == 1
