"""The fast reset on real KVM: 10,000 resets give identical results, a reset leaves the VM
exactly as a full restore would, and it writes only what changed."""

from __future__ import annotations

import hashlib
import io
import random
from typing import Any

import pytest

from regsync import Machine
from regsync.guests import symbols
from regsync.snapshot import REGS_AND_MEMORY_ONLY, apply
from regsync.vcpu import LEVELS

FULL = LEVELS["FULL"]
SYM = symbols("reset")
MASK64 = (1 << 64) - 1
# Moves with time on its own; the TSC cannot be written on this host (writes ignored).
MOVES_WITH_TIME = {"tsc", "lapic.tmcct"}


def expected(seed: int, k: int) -> int:
    c = seed
    for i in range(k):
        c = (c * 31 + seed + i) & MASK64
    return c


def ready_machine(**kw: Any) -> Machine:
    """The reset guest stopped at its tick at reset_ready (where harnesses snapshot)."""
    m = Machine(smp=1, serial_out=io.StringIO(), **kw)
    m.load("reset")
    v = m.vcpus[0]
    ex = v.run()
    assert ex.kind == "io" and ex.port == 0x501, ex
    return m


def run_once(m: Machine, seed: int, k: int) -> int:
    """Write the input, run to the debug exit, return the guest's checksum (rbx)."""
    m.memory.write(SYM["reset_input"], seed.to_bytes(8, "little") + k.to_bytes(8, "little"))
    v = m.vcpus[0]
    ex = v.run()
    if ex.kind == "io" and ex.port == 0x501:     # not reset since the last run: back at the tick
        ex = v.run()
    assert ex.kind == "io" and ex.port == 0xF4, ex
    return v.regs.rbx


def memory_digest(m: Machine) -> str:
    """Of the pages the host has populated (the rest are zero and stay unmapped)."""
    from regsync.snapshot.state import resident_runs
    h = hashlib.sha256()
    for s in m.memory.slots:
        for off, n in resident_runs(s.mem, s.host_addr, s.size):
            for p in range(off, off + n, 4096):
                page = s.mem[p:p + 4096]
                if page.count(0) != 4096:
                    h.update(p.to_bytes(8, "little") + page)
    return h.hexdigest()


def whole_state(m: Machine) -> tuple[dict[str, Any], str, dict[str, bytes]]:
    from regsync.snapshot.state import capture_vm
    v = m.vcpus[0]
    dump = {k: val for k, val in v.regs.dump(FULL).items() if k not in MOVES_WITH_TIME}
    vm = {k: b for k, b in capture_vm(m).items() if k != "clock"}
    # A PIT channel's count_load_time is a host timestamp (KVM_SET_PIT2 sets it to now).
    pit = bytearray(vm["pit"])
    for ch in range(3):
        pit[24 * ch + 16:24 * ch + 24] = bytes(8)
    vm["pit"] = bytes(pit)
    return dump, memory_digest(m), vm


def test_reset_loop_10000_times_identical() -> None:
    """The fuzzing loop: reset (the guest touches only registers and memory, as the
    harness promises), write an input, run. Every 1,000 resets the whole state --
    every register group, memory, the VM-wide devices -- is compared with the
    snapshot, so the promise is checked too; every 100th reset is a full one."""
    with ready_machine() as m:
        snap = m.snapshot()
        at_snapshot = whole_state(m)
        rng = random.Random(11)
        for i in range(10_000):
            m.reset_to(snap, assume_unchanged=() if i % 100 == 0 else REGS_AND_MEMORY_ONLY)
            if i % 1000 == 0:
                assert whole_state(m) == at_snapshot, i
            seed, k = rng.getrandbits(64), rng.choice((0, 1, 2, 10, 100))
            assert run_once(m, seed, k) == expected(seed, k), i
        m.reset_to(snap)
        assert whole_state(m) == at_snapshot
        assert snap.resets == 10_001


def _disturb(m: Machine, rng: random.Random) -> None:
    """A random run: guest work plus edits regsync makes in groups the guest leaves alone."""
    v = m.vcpus[0]
    run_once(m, rng.getrandbits(64), rng.choice((1, 7, 64, 300)))
    choices = [
        lambda: setattr(v.regs, "r13", rng.getrandbits(64)),
        lambda: v.regs.__setitem__("xmm3", rng.getrandbits(128)),
        lambda: v.regs.__setitem__("dr1", rng.getrandbits(32) << 4),
        lambda: v.regs.__setitem__("lapic.tdcr", rng.choice((0, 1, 2, 3, 8, 9, 0xA, 0xB))),
        lambda: v.regs.set_msr(0xC0000081, rng.getrandbits(32) << 32),      # STAR
        lambda: v.regs.__setitem__("cr2", rng.getrandbits(48)),
        lambda: m.memory.write(rng.randrange(0x200000, 0x3000000, 8), rng.randbytes(8)),
    ]
    for fn in rng.sample(choices, rng.randint(1, len(choices))):
        fn()
    v.flush()


@pytest.mark.parametrize("seed", range(6))
def test_reset_leaves_the_vm_as_a_full_restore(seed: int) -> None:
    rng = random.Random(seed)
    with ready_machine() as m:
        snap = m.snapshot()
        at_snapshot = whole_state(m)
        for _ in range(rng.randint(1, 4)):
            _disturb(m, rng)
        m.reset_to(snap)
        after_reset = whole_state(m)
        for _ in range(rng.randint(1, 4)):
            _disturb(m, rng)
        apply(m, snap.state)                       # the full restore: every group, all memory
        after_restore = whole_state(m)
        assert after_reset == after_restore == at_snapshot
        # and both go on alike
        m.reset_to(snap)
        assert run_once(m, 5, 3) == expected(5, 3)


def test_reset_writes_only_what_changed() -> None:
    with ready_machine() as m:
        v = m.vcpus[0]
        snap = m.snapshot()
        run_once(m, 1, 1)
        before = dict(v.handle.counters)
        vm_before = dict(m.vm.counters)
        m.reset_to(snap)
        io = {k: n - before.get(k, 0) for k, n in v.handle.counters.items() if n != before.get(k, 0)}
        vm_io = {k: n - vm_before.get(k, 0) for k, n in m.vm.counters.items()
                 if n != vm_before.get(k, 0)}
        # Compared for free in the kvm_run page; REGS differs and goes back through
        # kvm_dirty_regs: no KVM_SET_REGS. Groups the run left alone are checked, not written.
        for name in ("KVM_SET_REGS", "KVM_SET_SREGS", "KVM_SET_VCPU_EVENTS", "KVM_SET_XSAVE",
                     "KVM_SET_XCRS", "KVM_SET_DEBUGREGS", "KVM_SET_LAPIC", "KVM_GET_REGS",
                     "KVM_GET_SREGS"):
            assert name not in io, (name, io)
        assert io.get("KVM_RUN") == 1              # completing the OUT to the debug exit
        assert io.get("KVM_SET_MSRS") == 1         # the TSC moves: written blindly
        assert vm_io.get("KVM_GET_DIRTY_LOG") == 1
        assert "KVM_SET_IRQCHIP" not in vm_io and vm_io.get("KVM_GET_IRQCHIP") == 3
        assert vm_io.get("KVM_SET_PIT2") == 1 and vm_io.get("KVM_SET_CLOCK") == 1  # they move
        # The caller's promise: only general registers and memory change.
        run_once(m, 2, 1)
        before, vm_before = dict(v.handle.counters), dict(m.vm.counters)
        m.reset_to(snap, assume_unchanged=REGS_AND_MEMORY_ONLY)
        total = sum(n - before.get(k, 0) for k, n in v.handle.counters.items()) + \
            sum(n - vm_before.get(k, 0) for k, n in m.vm.counters.items())
        assert total == 2                          # one KVM_RUN (completion), one dirty log
        assert run_once(m, 3, 2) == expected(3, 2)


def test_pages_regsync_writes_are_reset_too() -> None:
    with ready_machine() as m:
        snap = m.snapshot()
        far = 0x2F00000                           # a page the guest never touches
        m.memory.write(far, b"regsync was here")
        run_once(m, 9, 2)
        m.reset_to(snap)
        assert m.memory.read(far, 16) == bytes(16)
        assert m.memory.read(SYM["reset_input"], 16) == bytes(16)


def test_reset_to_an_older_snapshot_restores_everything() -> None:
    with ready_machine() as m:
        first = m.snapshot()
        state0 = whole_state(m)
        run_once(m, 4, 5)
        m.reset_to(first)
        run_once(m, 6, 9)
        m.snapshot()                               # the dirty log now counts from here
        run_once(m, 8, 3)
        m.reset_to(first)                          # not the baseline: every page goes back
        assert whole_state(m) == state0
        m.reset_to(first)                          # and now it is the baseline again
        assert run_once(m, 4, 5) == expected(4, 5)


def test_unknown_group_is_refused() -> None:
    with ready_machine() as m:
        snap = m.snapshot()
        with pytest.raises(ValueError, match="unknown group"):
            m.reset_to(snap, assume_unchanged=("REGZ",))


@pytest.mark.parametrize("mode", ["get", "manual"])
def test_dirty_log_modes_report_guest_and_regsync_writes(mode: str) -> None:
    """KVM_GET_DIRTY_LOG alone, or with KVM_CLEAR_DIRTY_LOG (MANUAL_DIRTY_LOG_PROTECT2,
    probed: a host without it falls back to "get", which is then what is tested)."""
    with ready_machine() as m:
        used = m.memory.track_dirty(m.vm, mode)
        if mode == "manual" and used != "manual":
            print(f"host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: tested '{used}'")
        m.memory.collect_dirty()
        m.memory.write(0x2F00000, b"x")                   # regsync's own write
        run_once(m, 1, 3)                                  # the guest: 3 pages of reset_area
        area = SYM["reset_area"] >> 12
        pages = m.memory.collect_dirty()
        assert {area, area + 1, area + 2, 0x2F00, SYM["reset_input"] >> 12} <= set(pages)
        assert area + 3 not in pages
        assert m.memory.collect_dirty() == []              # the log starts afresh
        run_once(m, 2, 1)
        assert area in m.memory.collect_dirty()            # and pages are logged again


def test_snapshot_and_reset_with_running_vcpu_threads() -> None:
    """The threaded VMM: snapshot and reset pause the running vCPUs, work on their own
    threads and resume them; a paused machine stays paused (so it can be inspected)."""
    import time
    spin = symbols("spin")
    with Machine(smp=2, serial_out=io.StringIO()) as m:
        m.load("spin")
        m.start()
        counters = lambda: [m.memory.read_u64(spin["spin_counters"] + 8 * i) for i in range(2)]

        def wait_until(cond: Any) -> bool:
            end = time.monotonic() + 20
            while time.monotonic() < end:
                if cond():
                    return True
                time.sleep(0.005)
            return False
        assert wait_until(lambda: min(counters()) > 50)
        snap = m.snapshot()                      # running: paused, taken, resumed
        page = snap.pages[0][spin["spin_counters"] >> 12]
        off = spin["spin_counters"] & 0xFFF
        back = [int.from_bytes(page[off + 8 * i:off + 8 * i + 8], "little") for i in range(2)]
        assert wait_until(lambda: min(c - b for c, b in zip(counters(), back)) > 1000)
        m.pause_all()
        m.reset_to(snap)                         # paused: stays paused
        assert counters() == back
        m.resume_all()
        assert wait_until(lambda: all(c > b for c, b in zip(counters(), back)))
        m.reset_to(snap)                         # running: paused, reset, resumed
        assert wait_until(lambda: all(c > b for c, b in zip(counters(), back)))
        m.memory.write_u64(spin["spin_stop"], 1)
        assert m.wait(20) == 0, m.fatal
