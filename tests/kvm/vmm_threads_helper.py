"""Programs that test_vmm_threads.py runs in a child process, because the failure
they look for takes the whole process down (a fatal signal, a hang), or because
they need a fresh interpreter's signal state.

    python tests/kvm/vmm_threads_helper.py other-thread
    python tests/kvm/vmm_threads_helper.py double-interrupt ROUNDS SEED

Each prints one line starting with "ok" when everything held.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

from regsync import Machine
from regsync.guests import symbols

SPIN = symbols("spin")


def _until(cond, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def _counter(m: Machine, vid: int) -> int:
    return m.memory.read_u64(SPIN["spin_counters"] + 8 * vid)


def other_thread() -> None:
    """A Machine created and started on a thread that is not the main one, then
    driven from that thread and from the main thread (issue 8, item 9)."""
    box: dict[str, Machine] = {}
    failure: list[BaseException] = []

    def owner() -> None:
        try:
            m = Machine(smp=2)
            m.load("spin")
            m.start()
            box["m"] = m
            _until(lambda: _counter(m, 1) > 0, "the AP to spin")
            for i in range(50):
                v = m.vcpus[i % 2]
                m.run_on_cpu(v, lambda v=v: v.regs.rip, timeout=10)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    t = threading.Thread(target=owner)
    t.start()
    t.join(60)
    if failure or "m" not in box:
        raise SystemExit(f"owner thread failed: {failure!r}")
    m = box["m"]
    for i in range(50):                                   # and from the main thread
        v = m.vcpus[i % 2]
        m.run_on_cpu(v, lambda v=v: v.regs.rip, timeout=10)
    m.pause_all()
    m.resume_all()
    m.memory.write_u64(SPIN["spin_stop"], 1)
    status = m.wait(60)
    m.close()
    print(f"ok status={status}", flush=True)


def double_interrupt(rounds: int, seed: int) -> None:
    """Ctrl-C twice, a random 0-50 ms apart, at a program that runs a Machine on
    its main thread with Python's default SIGINT handling (issue 8, item 10).

    The program's own code catches each KeyboardInterrupt wherever it lands; what
    is checked is that the machine never crashes, hangs or breaks a lock, and
    that it is fully closed in the end."""
    rng = random.Random(seed)
    pid = os.getpid()
    threads0 = threading.active_count()
    fds0 = len(os.listdir("/proc/self/fd"))
    for r in range(rounds):
        m = Machine(smp=2)
        m.load("spin")
        m.start()
        _until(lambda: _counter(m, 1) > 0, "the AP to spin")
        gap = rng.uniform(0.0, 0.05)
        go, sent = threading.Event(), threading.Event()

        def ctrl_c_twice() -> None:
            go.wait()
            os.kill(pid, signal.SIGINT)
            time.sleep(gap)
            os.kill(pid, signal.SIGINT)
            sent.set()

        sender = threading.Thread(target=ctrl_c_twice)
        interrupts = 0
        over = False
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: object) -> None:
            # The default handler's behaviour, until both signals are accounted for.
            nonlocal interrupts
            interrupts += 1
            if not over:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        sender.start()                   # before any signal: start() waits on a Condition
        try:
            stage = "running"
            go.set()
            while True:
                try:
                    if stage == "running":
                        while m.wait(0.05) is None:
                            pass
                    stage = "stopping"
                    m.stop(130)
                    m.close()
                    stage = "closed"
                    while not sent.is_set():
                        time.sleep(0.001)
                    break
                except KeyboardInterrupt:
                    if stage == "running":
                        stage = "stopping"
            over = True
        finally:
            over = True
            sender.join()
            signal.signal(signal.SIGINT, previous)
        bad = [v.id for v in m.vcpus if not v.handle.closed]
        if not m.closed or bad:
            raise SystemExit(f"round {r}: machine not fully closed (vCPUs open: {bad})")
    _until(lambda: threading.active_count() == threads0, "the machines' threads to end")
    fds = len(os.listdir("/proc/self/fd"))
    if fds != fds0:
        raise SystemExit(f"fds: {fds0} before, {fds} after")
    print(f"ok rounds={rounds}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "other-thread":
        other_thread()
    elif sys.argv[1] == "double-interrupt":
        double_interrupt(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown program {sys.argv[1]!r}")
