"""Issue 4 on real KVM: SMP, run_on_cpu, reset, the watchdog, SIGINT, CLI errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from regsync import Machine
from regsync.guests import symbols
from regsync.kvm.structs import KVM_MP_STATE_UNINITIALIZED

SPIN = symbols("spin")


@pytest.mark.parametrize("n", [1, 2, 4])
def test_smp_demo_completes(n: int) -> None:
    with Machine(smp=n) as m:
        m.load("smp")
        m.start()
        assert m.wait(60) == 0, m.serial.text
        for i in range(n):
            assert f"cpu {i} online" in m.serial.lines
        assert m.serial.lines[-1] == f"smp: all {n} cpus done"


def _spin_code_range() -> tuple[int, int]:
    return SPIN["spin_loop"], SPIN["_edata"]


def _until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll cond() until true (no fixed sleeps: CI machines are slower and busier)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _bsp_counter(m: Machine) -> int:
    return m.memory.read_u64(SPIN["spin_counters"])


def _ap_counter(m: Machine) -> int:
    return m.memory.read_u64(SPIN["spin_counters"] + 8)


def _stop_spin(m: Machine) -> int | None:
    m.memory.write_u64(SPIN["spin_stop"], 1)
    return m.wait(60)


def test_run_on_cpu_on_spinning_vcpus() -> None:
    """1,000 run_on_cpu calls into a 2-vCPU guest that never exits on its own."""
    lo, hi = _spin_code_range()
    with Machine(smp=2) as m:
        m.load("spin")
        m.start()
        # Both vCPUs in the loop: each counter moves only from spin_loop on (the
        # BSP's leaves 0 after start_aps returns, the AP's after ap_signal_online).
        _until(lambda: _bsp_counter(m) > 0 and _ap_counter(m) > 0)
        last_count = [0, 0]
        for i in range(1000):
            v = m.vcpus[i % 2]
            rip, count = m.run_on_cpu(
                v, lambda v=v: (v.regs.rip, m.memory.read_u64(SPIN["spin_counters"] + 8 * v.id)),
                timeout=5)
            assert lo <= rip < hi + 0x1000, f"vCPU {v.id} rip {rip:#x} outside the guest's code"
            assert count >= last_count[v.id]        # the guest keeps making progress
            last_count[v.id] = count
        assert last_count[1] > 0                     # the AP ran
        assert _stop_spin(m) == 0, m.serial.text
        assert "spin: stopped" in m.serial.lines


def test_run_on_cpu_from_the_vcpu_thread_and_errors_propagate() -> None:
    with Machine(smp=1) as m:
        m.load("spin")
        m.start()
        v = m.vcpus[0]
        assert m.run_on_cpu(v, lambda: m.run_on_cpu(v, lambda: 42)) == 42
        with pytest.raises(ZeroDivisionError):
            m.run_on_cpu(v, lambda: 1 // 0)
        assert _stop_spin(m) == 0


def test_reset_mid_run_brings_every_vcpu_back() -> None:
    with Machine(smp=2) as m:
        m.load("spin")
        m.start()
        _until(lambda: _ap_counter(m) > 0)           # the AP was running
        m.pause_all()
        m.reset()                                   # paused machine: stays paused
        bsp, ap = m.vcpus
        assert m.run_on_cpu(bsp, lambda: bsp.regs.rip) == SPIN["entry64"]
        assert m.run_on_cpu(ap, lambda: ap.regs.mp_state) == KVM_MP_STATE_UNINITIALIZED
        assert m.run_on_cpu(ap, lambda: (ap.regs["cs.selector"], ap.regs.rip)) == (0xF000, 0xFFF0)
        assert m.memory.read_u64(SPIN["spin_counters"] + 8) == 0      # memory reloaded
        m.resume_all()
        _until(lambda: _ap_counter(m) > 0)           # the AP started again
        assert _stop_spin(m) == 0, m.serial.text
        assert m.resets == 1


def test_reset_while_running_then_runs_to_completion() -> None:
    with Machine(smp=2) as m:
        m.load("smp")
        m.start(paused=True)
        m.reset()
        m.resume_all()
        assert m.wait(60) == 0, m.serial.text
        assert m.serial.lines[-1] == "smp: all 2 cpus done"


def test_watchdog_fires_when_not_petted() -> None:
    with Machine(smp=1) as m:
        m.load("watchdog", arg=0xFFFF)
        m.start()
        assert m.wait(30) == 124
        assert m.watchdog.expiries == 1
        rec = m.watchdog_records[0]
        assert rec["vcpu"] == 0
        wd = symbols("watchdog")                    # state recorded: rip in the guest's code
        assert wd["_image_start"] <= rec["registers"]["rip"] < wd["_edata"], rec["registers"]


def test_watchdog_quiet_when_petted() -> None:
    with Machine(smp=1) as m:
        m.load("watchdog", arg=20)
        m.start()
        assert m.wait(30) == 0, m.serial.text
        assert m.watchdog.expiries == 0 and m.watchdog.pets == 20
        assert "watchdog: petted 0x14 times" in m.serial.text


def test_watchdog_reset_path_runs_the_guest_again() -> None:
    with Machine(smp=1, watchdog_action="reset") as m:
        m.load("watchdog", arg=0xFFFF)
        m.start()
        assert m.wait(30) == 124               # reset up to 3 times, then stop
        assert m.resets == 3 and m.watchdog.expiries == 4
        assert m.serial.lines.count("watchdog: not petting") == 4


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sigint_leaves_no_threads_or_fds() -> None:
    # Python's own Ctrl-C handler, whatever this process inherited: a shell's background
    # job starts with SIGINT ignored, and the loop below would then spin for ever.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threads0, fds0 = threading.active_count(), _fds()
        m = Machine(smp=2)
        m.load("spin")
        m.start()
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        deadline = time.monotonic() + 30
        with pytest.raises(KeyboardInterrupt):
            while m.wait(0.05) is None:
                assert time.monotonic() < deadline, "SIGINT never raised KeyboardInterrupt"
        m.stop(130)
        m.close()
        timer.join()
        assert threading.active_count() == threads0
        assert _fds() == fds0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cli_sigint_exits_130() -> None:
    p = subprocess.Popen([sys.executable, "-m", "regsync.cli", "run", "spin", "--smp", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt once the vCPU threads run (main + watchdog + 2 vCPUs).
    _until(lambda: len(os.listdir(f"/proc/{p.pid}/task")) >= 4)
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-guest"], "no such guest image"),
    (["run", "/no/such/file.bin"], "no such guest image"),
    (["run", "hello", "--smp", "0"], "must be at least 1"),
    (["run", "hello", "--bogus"], "unrecognized arguments: --bogus"),
    (["regs", "hello", "--level", "NOPE"], "unknown level or group"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line(args: list[str], needle: str) -> None:
    p = subprocess.run([sys.executable, "-m", "regsync.cli", *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("regsync"), p.stderr


def test_cli_corrupt_image_is_a_clear_error(tmp_path) -> None:
    from regsync.guests import load_image
    img = bytearray(load_image("hello"))
    img[8] ^= 0xFF                                  # multiboot checksum
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(img))
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "run", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "checksum" in p.stderr and "Traceback" not in p.stderr


def test_fatal_exit_prints_the_exit_and_a_register_dump(tmp_path) -> None:
    """int3 at CPL0: upstream KVM delivers #BP (no IDT: triple fault -> shutdown);
    this host's emulator fails on it (internal error). Either way: fatal, status 125."""
    img = tmp_path / "int3.bin"
    img.write_bytes(b"\x48\xc7\xc0\x34\x12\x00\x00" + b"\xcc" + b"\xf4")  # mov $0x1234,%rax; int3
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "run", str(img), "--smp", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 125, p.stderr
    assert "fatal exit" in p.stderr and "Traceback" not in p.stderr
    assert re.search(r"rax = 0x0*1234", p.stderr), p.stderr       # the dump shows the state
    assert "[REGS]" in p.stderr and "[SREGS]" in p.stderr


def test_cli_regs_info_list() -> None:
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "regs", "counter", "--exit", "3",
                        "--level", "RUNTIME"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert re.search(r"r12 = 0x0*3\b", p.stdout), p.stdout            # three ticks, r12 == 3
    assert "[XSAVE]" in p.stdout and "[LAPIC]" not in p.stdout
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "info"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "SYNC_REGS" in p.stdout and "RUNTIME" in p.stdout
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "list"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.splitlines()[0].startswith("counter")
    from regsync.guests import GUESTS
    assert len(p.stdout.splitlines()) == len(GUESTS)          # one line per bundled guest


def test_stats_are_reported() -> None:
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "run", "hypercall", "--smp", "1",
                        "--arg", "500", "--stats"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "KVM_RUN=" in p.stdout and "via kvm_run" in p.stdout


def test_cli_serial_to_file(tmp_path) -> None:
    out = tmp_path / "serial.txt"
    p = subprocess.run([sys.executable, "-m", "regsync.cli", "run", "hello", "--smp", "1",
                        "--serial", str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == ""
    assert out.read_text() == "Hello from the regsync guest!\n"


def test_run_on_cpu_reaches_a_vcpu_halted_in_the_kernel_and_a_paused_one(tmp_path) -> None:
    """cli; hlt with the in-kernel LAPIC: KVM_RUN blocks in the kernel, no exit comes."""
    img = tmp_path / "halt.bin"
    img.write_bytes(b"\x49\xc7\xc0\x2a\x00\x00\x00" + b"\xfa\xf4" + b"\xeb\xfc")  # mov $42,%r8; cli; hlt
    with Machine(smp=1) as m:
        m.load(str(img))
        m.start()
        v = m.vcpus[0]
        _until(lambda: m.run_on_cpu(v, lambda: v.regs.mp_state, timeout=5) == 3)
        t0 = time.monotonic()
        state, r8 = m.run_on_cpu(v, lambda: (v.regs.mp_state, v.regs.r8), timeout=5)
        assert time.monotonic() - t0 < 5
        assert (state, r8) == (3, 42)                 # KVM_MP_STATE_HALTED, guest progress seen
        m.pause_all()
        assert m.run_on_cpu(v, lambda: v.regs.r8, timeout=5) == 42
        m.resume_all()
        assert m.run_on_cpu(v, lambda: v.regs.mp_state, timeout=5) == 3
        m.stop()


def test_edit_to_an_ap_waiting_for_sipi_is_not_lost() -> None:
    """KVM_RUN of an AP before SIPI returns without applying kvm_dirty_regs (and
    stores the kernel's registers over the page): the edit must survive."""
    with Machine(smp=2) as m:
        m.load("counter")                          # the BSP never starts the AP
        m.start()
        ap = m.vcpus[1]
        assert m.run_on_cpu(ap, lambda: ap.regs.mp_state, timeout=5) == KVM_MP_STATE_UNINITIALIZED
        m.run_on_cpu(ap, lambda: setattr(ap.regs, "r8", 0x5151), timeout=5)
        for _ in range(5):                         # each call kicks the AP through KVM_RUN
            assert m.run_on_cpu(ap, lambda: ap.regs.r8, timeout=5) == 0x5151
        m.stop()
