"""Programs that test_vmm_threads.py runs in a child process, because the failure
they look for takes the whole process down (a fatal signal, a hang), or because
they need a fresh interpreter's signal state.

    python tests/kvm/vmm_threads_helper.py other-thread
    python tests/kvm/vmm_threads_helper.py double-interrupt ROUNDS SEED
    python tests/kvm/vmm_threads_helper.py sigint-at-each-line HALT_IMAGE FILE... [-- RUN_ARGS]

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


def sigint_at_each_line(image: str, files: list[str], run_args: list[str]) -> None:
    """`regsync run IMAGE --smp 2` in this process, once per line event that the main
    thread runs in FILES (file name endings, e.g. threading.py) between main()'s start
    and the first Machine.wait(): the K-th run gets SIGINT exactly at the K-th such
    line. signal.raise_signal runs the installed Python handler at once, in the traced
    frame, as a real Ctrl-C landing there would. Each run must return 130, print no
    traceback and leave no thread behind (an unclosed Machine's finaliser may end its
    watchdog after a collection); a run that hangs ends the process after 60 s with
    every thread's stack (faulthandler). A run whose SIGINT was never due stops the
    guest itself and ends the loop."""
    import contextlib
    import faulthandler
    import gc
    import io
    from regsync import cli, vmm

    wait = vmm.VmmMixin.wait
    at = {"line": 0, "due": 0, "where": ""}

    def first_wait(m: vmm.VmmMixin, timeout: float | None = None) -> int | None:
        sys.settrace(None)                  # the guest runs from here: the count is done
        if not at["where"]:
            m._finish(0)                    # no SIGINT was due: end the halted guest
        return wait(m, timeout)

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line" and frame.f_code.co_filename.endswith(tuple(files)):
            at["line"] += 1
            if at["line"] == at["due"]:
                at["where"] = f"{os.path.basename(frame.f_code.co_filename)}:" \
                              f"{frame.f_lineno} ({frame.f_code.co_name})"
                signal.raise_signal(signal.SIGINT)
        return tracer

    vmm.VmmMixin.wait = first_wait  # type: ignore[method-assign]
    threads0, failures, due = threading.active_count(), [], 0
    while True:
        due += 1
        at.update(line=0, due=due, where="")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        err = io.StringIO()
        # A hang (a lock left held) ends the process with every thread's stack.
        faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__)
        with contextlib.redirect_stderr(err):
            sys.settrace(tracer)
            try:
                status: object = cli.main(["run", image, "--smp", "2", *run_args])
            except BaseException as e:      # noqa: BLE001 - what escaped main() is the failure
                status = repr(e)
            finally:
                sys.settrace(None)
        faulthandler.cancel_dump_traceback_later()
        if not at["where"]:
            break
        deadline = time.monotonic() + 10
        while threading.active_count() != threads0 and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        left = [t.name for t in threading.enumerate()][threads0:]
        if status != 130 or "Traceback" in err.getvalue() or left:
            failures.append(f"SIGINT at {at['where']}: returned {status}, threads left {left}, "
                            f"stderr: {err.getvalue()[-700:].strip()}")
            if len(failures) == 5 or left:
                break                      # a thread left behind spoils the runs after it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if failures:
        raise SystemExit(f"{len(failures)} of {due} runs failed:\n" + "\n".join(failures))
    print(f"ok runs={due - 1}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "other-thread":
        other_thread()
    elif sys.argv[1] == "double-interrupt":
        double_interrupt(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "sigint-at-each-line":
        # FILE... then, after "--", more arguments for `regsync run` (e.g. --gdb PORT)
        rest = sys.argv[3:]
        cut = rest.index("--") if "--" in rest else len(rest)
        sigint_at_each_line(sys.argv[2], rest[:cut], rest[cut + 1:])
    else:
        raise SystemExit(f"unknown program {sys.argv[1]!r}")
