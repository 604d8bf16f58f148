"""Issue 3 on real KVM: the seed's sequence, read-only dumps, MP_STATE, refused writes."""

from __future__ import annotations

import threading

import pytest

from regsync import Machine, RegisterWriteError
from regsync.guests import symbols
from ticks import run_to_tick  # tests/kvm/ticks.py

STAR = 0x0023_0010_0000_0000
SET_IOCTLS = ("KVM_SET_REGS", "KVM_SET_SREGS", "KVM_SET_MSRS", "KVM_SET_LAPIC",
              "KVM_SET_MP_STATE", "KVM_SET_VCPU_EVENTS", "KVM_SET_XSAVE", "KVM_SET_XCRS",
              "KVM_SET_DEBUGREGS")


def sets(v) -> int:
    io = v.stats["ioctls"]
    return sum(io.get(k, 0) for k in SET_IOCTLS)


LINT1_EDIT = 0x10400        # LVT LINT1: NMI delivery, masked (power-on value 0x10000)
COUNTER_LAPIC_OBSERVED = 1  # counter.S: r11 = LVT LINT1 at every tick


def seed_sequence(strategy: str) -> tuple[int, int]:
    """The seed's sequence: synchronize RUNTIME, edit r12, synchronize FULL, edit a
    register only FULL covers (lapic.lvt_lint1: LAPIC is outside RESET), run.
    Returns the guest's r12 and its read of LVT LINT1 (r11) at the next tick."""
    with Machine(smp=1, strategy=strategy) as m:
        m.load("counter", arg=COUNTER_LAPIC_OBSERVED)
        v = m.vcpus[0]
        run_to_tick(m, v)
        v.synchronize_state("RUNTIME")
        v.regs.r12 = 1000
        v.synchronize_state("FULL")
        v.regs["lapic.lvt_lint1"] = LINT1_EDIT
        run_to_tick(m, v)
        v.synchronize_state("RUNTIME")
        return v.regs.r12, v.regs.r11


def test_seed_sequence_edits_a_register_outside_reset() -> None:
    """The FULL-only edit of the seed's sequence is one no lower level covers."""
    from regsync.arch.x86_64 import CATALOG
    lapic = CATALOG.group_by_name[CATALOG.by_name["lapic.lvt_lint1"].group].bit
    assert lapic & CATALOG.levels["FULL"] and not lapic & CATALOG.levels["RESET"]


def test_seed_sequence_keeps_both_edits() -> None:
    r12, r11 = seed_sequence("regsync")
    assert r12 == 1001          # the guest incremented our GPR edit
    assert r11 == LINT1_EDIT    # the guest read our LAPIC edit from its LVT LINT1


def test_seed_sequence_loses_data_under_qemu2012() -> None:
    r12, r11 = seed_sequence("qemu2012")
    assert r12 == 1001          # the RUNTIME edit survives...
    assert r11 == 0x10000       # ...the FULL-only edit is lost: the seed's bug


@pytest.mark.parametrize("strategy", ["regsync", "qemu"])
def test_read_only_dumps_between_exits(strategy: str) -> None:
    """Dump ALL (LAPIC included) between every exit of the LAPIC timer guest."""
    rounds = 40
    limit = 20_000 if strategy == "regsync" else 3_000
    with Machine(smp=1, strategy=strategy) as m:
        m.load("timer", arg=rounds)
        v = m.vcpus[0]
        v.run()                                  # boot state flushed; count from here
        m.dispatch(v, v.last_exit)
        m_sets = sets(v)
        dumps = 0
        for _ in range(limit):
            ex = v.run()
            assert ex.kind == "io", (ex, m.serial.text)
            m.dispatch(v, ex)
            if m.exit_status is not None:
                break
            v.regs.dump()
            dumps += 1
        writes = sets(v) - m_sets
        print(f"{strategy}: {dumps} dumps, {writes} SET ioctls, guest status {m.exit_status}, "
              f"serial {m.serial.text.strip()!r}")
        if strategy == "regsync":
            assert writes == 0                      # a read never writes
            assert m.exit_status == 0, m.serial.text  # every irq seen exactly once
        else:
            # QEMU marks the vCPU dirty on any read and writes its RUNTIME groups
            # back before every run. Its put list has no LAPIC, so the timer
            # survives, but on this host the REGS write-back between an IN exit
            # and the re-entry that completes it makes the guest re-execute the IN
            # (its serial LSR poll) forever: the guest never reaches its exit.
            assert writes >= dumps


def test_mp_state_ap_always_wakes_while_dumped() -> None:
    """vCPU0 wakes vCPU1 (INIT/SIPI, then IPIs) while the VMM keeps dumping vCPU1."""
    with Machine(smp=2) as m:
        m.load("smp")
        m.start()
        stop = threading.Event()
        dumps = [0]

        def monitor() -> None:
            v1 = m.vcpus[1]
            while not stop.is_set():
                try:
                    m.run_on_cpu(v1, lambda: v1.regs.dump(), timeout=10)
                except Exception:
                    return
                dumps[0] += 1

        t = threading.Thread(target=monitor)
        t.start()
        status = m.wait(120)
        stop.set()
        t.join(10)
        assert status == 0, m.serial.text
        assert "smp: all 2 cpus done" in m.serial.text
        io = m.vcpus[1].stats["ioctls"]
        assert dumps[0] > 0
        assert io.get("KVM_SET_MP_STATE", 0) == 0 and io.get("KVM_SET_LAPIC", 0) == 0


@pytest.mark.parametrize("reg,value", [("cr0", 0x8000_0000), ("efer", 1 << 1)])
def test_refused_write_keeps_value_and_discard_restores(reg: str, value: int) -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        before = getattr(v.regs, reg)
        counter = symbols("counter")["counter_value"]
        n = m.memory.read_u64(counter)
        setattr(v.regs, reg, value)
        with pytest.raises(RegisterWriteError) as ei:
            v.run()
        assert ei.value.group == "SREGS" and reg in ei.value.registers
        assert reg in str(ei.value) and "SREGS" in str(ei.value)
        assert m.memory.read_u64(counter) == n          # the guest did not run
        assert getattr(v.regs, reg) == value            # nothing lost
        with pytest.raises(RegisterWriteError):
            v.run()                                     # still refused, still there
        v.discard()
        assert getattr(v.regs, reg) == before           # the kernel's value again
        run_to_tick(m, v)
        assert m.memory.read_u64(counter) == n + 1


def test_msr_edits_go_in_one_batch_and_a_refused_value_names_the_msr() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        v.regs.star, v.regs.lstar, v.regs.sfmask = STAR, 0xFFFF_8000_0000_1000, 0x4700
        before = v.stats["ioctls"].get("KVM_SET_MSRS", 0)
        run_to_tick(m, v)
        assert v.stats["ioctls"]["KVM_SET_MSRS"] == before + 1       # three MSRs, one ioctl
        assert v.regs.r13 == STAR
        v.regs.lstar = 1 << 63                                         # not canonical
        with pytest.raises(RegisterWriteError) as ei:
            v.run()
        assert ei.value.group == "MSRS" and ei.value.registers == ["lstar"]
        assert "0xc0000082" in str(ei.value)
        assert v.regs.lstar == 1 << 63                                 # kept, not lost
        v.discard("MSRS")
        run_to_tick(m, v)


def test_msr_by_index_and_aliases() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        assert v.regs.msr(0xC0000080) == v.regs.efer                   # alias of the SREGS home
        assert v.regs.msr(0xC0000081) == v.regs.star
        v.regs.set_msr(0xC0000081, STAR)
        run_to_tick(m, v)
        assert v.regs.r13 == STAR
        from regsync import KvmError
        with pytest.raises((KvmError, RegisterWriteError)) as ei:
            v.regs.msr(0x1234_5678)                                    # no such MSR
        assert "0x12345678" in str(ei.value)
