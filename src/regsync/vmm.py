"""vCPU threads, run_on_cpu, pause/resume, reset and exit dispatch.

Each vCPU runs on its own thread as a small state machine driven by messages:

    RUNNING --pause--> PAUSED --resume--> RUNNING
       |                  |
       +------stop--------+----> STOPPED

Other threads never touch a vCPU's kernel state: they post a message (a call,
pause, resume or stop) and *kick* the thread out of KVM_RUN with SIGUSR1.

The kick rule (the design QEMU used before KVM_CAP_IMMEDIATE_EXIT: accel/kvm/
kvm-all.c, kvm_init_cpu_signals with a signal mask and kvm_eat_signals; the same
one Paolo Bonzini asked of the KVM selftests' dirty_log_test):

* A vCPU thread is born with SIGUSR1 blocked (VcpuThread.start blocks it around
  the thread's creation) and keeps it blocked in Python for its whole life.
* KVM_SET_SIGNAL_MASK gives KVM the thread's mask minus SIGUSR1, which KVM
  installs only for the duration of KVM_RUN (api.rst 4.21 "This signal mask
  temporarily overrides the threads signal mask ... will cause KVM_RUN to return
  with -EINTR"; virt/kvm/kvm_main.c kvm_sigset_activate keeps the thread's own
  mask in real_blocked, which kernel/signal.c complete_signal consults: a
  SIGUSR1 with no handler is therefore never fatal, and no Python handler is
  needed, so machines work from any thread).
* A kick sent while the thread is outside KVM_RUN stays pending; the next
  KVM_RUN sees it at once and returns -EINTR, so no kick is lost between the
  poster's append and the thread's entry (this is what immediate_exit did
  before; kicks no longer write to the kvm_run page from another thread).
* After -EINTR the thread consumes the pending kick (sigtimedwait with a zero
  timeout, as kvm_eat_signals), then drains its inbox.
* pthread_kill is only sent while the thread is known to be alive (a flag the
  thread clears under the same lock before it exits), never to a thread id
  that may have been reused.

Lifetime: close() stops every thread and waits until each has left KVM_RUN for
good (the thread has exited) before anything is unmapped; a vCPU thread cannot
close its own machine. SIGINT arriving during stop()/close() on the main thread
is held until they are done (interrupts_deferred), so a second Ctrl-C cannot
leave a lock half-released or the kvm_run page unmapped under a running vCPU.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

from . import exits
from .devices import PortBus
from .devices.basic import (DEBUG_EXIT_PORT, HYPERCALL_PORT, SERIAL_PORT, TICK_PORT, DebugExit,
                            Hypercalls, Serial, Tick)
from .devices.watchdog import Watchdog
from .kvm import structs as ks
from .vcpu import Vcpu

T = TypeVar("T")
KICK_SIGNAL = signal.SIGUSR1
_KICK_SET = frozenset({KICK_SIGNAL})
EXIT_FATAL = 125          # process status when the guest dies (triple fault, emulation failure)
EXIT_WATCHDOG = 124       # process status when the watchdog stops the guest
STOP_TIMEOUT = 10.0       # how long close() waits for a vCPU thread to leave KVM_RUN


def _report(text: str) -> None:
    """Best effort to stderr: a closed pipe must not take a vCPU thread down with it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block is done, then deliver it.

    Python runs signal handlers on the main thread between bytecodes; a
    KeyboardInterrupt raised inside threading's own cleanup (Condition.wait's
    finally, a lock's __exit__) leaves a lock held or released twice. Teardown
    paths run under this so a second Ctrl-C lands after the machine is
    consistent. Elsewhere than on the main thread, or when SIGINT has no Python
    handler (ignored, default), there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[-1])    # KeyboardInterrupt, now that it is safe


def _eat_kick() -> None:
    """Consume a pending kick (QEMU accel/kvm/kvm-all.c, kvm_eat_signals): blocked
    outside KVM_RUN it stays pending, and would end the next KVM_RUN at once."""
    signal.sigtimedwait(_KICK_SET, 0)


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VcpuStopped(RuntimeError):
    """A request reached a vCPU thread that has stopped (or a closed machine)."""


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class VcpuThread:
    """Runs one vCPU: KVM_RUN, dispatch the exit, drain messages, repeat.

    ``state`` is what the thread is doing (only the thread changes it, under the
    lock); ``requested`` is what the last pause/resume asked for, queued or not.
    """

    def __init__(self, vcpu: Vcpu, dispatch: Callable[[Vcpu, exits.AnyExit], None],
                 on_error: Callable[[Vcpu, BaseException], None], paused: bool = False) -> None:
        self.vcpu = vcpu
        self.dispatch = dispatch
        self.on_error = on_error
        self.state = RunState.PAUSED if paused else RunState.RUNNING
        self.requested = self.state
        self._inbox: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self.paused = threading.Event()        # set while the thread is paused or stopped
        if paused:
            self.paused.set()
        self._kickable = False                 # the thread exists and blocks the kick
        self._pauses_asked = 0                 # pause tickets handed out ...
        self._pauses_done = 0                  # ... and the last one the thread acted on
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)
        self.kicks = 0

    def start(self) -> None:
        # Born with the kick blocked (a new thread inherits its creator's mask):
        # there is no instant at which a kick could take SIGUSR1's default action.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _KICK_SET)
        try:
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # --- other threads -------------------------------------------------------------
    def post(self, msg: Any) -> None:
        with self._cond:
            self._post_locked(msg)

    def _post_locked(self, msg: Any) -> None:
        if self.state is RunState.STOPPED:
            raise VcpuStopped(f"vCPU {self.vcpu.id} has stopped")
        self._inbox.append(msg)
        if msg == "resume":
            self.requested = RunState.RUNNING
        self._cond.notify_all()        # the paused thread, and pause() waiters
        # A paused thread waits on the condition and sees the message; a kick
        # would only leave a pending signal and cost a spurious KVM_RUN later.
        if self.state is RunState.RUNNING:
            self._kick_locked()

    def request_pause(self) -> tuple[int, RunState]:
        """Queue a pause; returns its ticket and what had been requested before it."""
        with self._cond:
            before = self.requested
            self._pauses_asked += 1
            ticket = self._pauses_asked
            self._post_locked(("pause", ticket))
            self.requested = RunState.PAUSED
            return ticket, before

    def wait_paused(self, ticket: int, timeout: float | None) -> bool:
        """Until the thread has acted on pause ``ticket`` (or stopped). A later
        resume from another thread may already have released it again."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pauses_done >= ticket or self.state is RunState.STOPPED, timeout)

    def kick(self) -> None:
        with self._cond:
            self._kick_locked()

    def _kick_locked(self) -> None:
        # Under the lock with the thread marked alive: its id cannot have been reused.
        if self._kickable:
            self.kicks += 1
            signal.pthread_kill(self.thread.ident, KICK_SIGNAL)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run fn on this vCPU's thread and return its result (run_on_cpu).
        Raises VcpuStopped if the thread has stopped (before or while waiting)."""
        if threading.get_ident() == self.thread.ident:
            return fn()
        c = _Call(fn)
        self.post(c)
        if not c.done.wait(timeout):
            raise TimeoutError(f"vCPU {self.vcpu.id} did not answer within {timeout} s")
        if c.error is not None:
            raise c.error
        return c.result  # type: ignore[no-any-return]

    # --- the vCPU's own thread ------------------------------------------------------------
    def hold(self) -> None:
        """On this thread: pause after the current exit's handler returns."""
        with self._cond:
            self.state = self.requested = RunState.PAUSED
            self.paused.set()

    def halt(self) -> None:
        """On this thread: leave the loop after the current exit (HLT with no irqchip)."""
        with self._cond:
            self.state = RunState.STOPPED

    def _main(self) -> None:
        cache = self.vcpu.cache
        cache.owner = threading.get_ident()
        handle = self.vcpu.handle
        try:
            # KVM_SET_SIGNAL_MASK: this thread's mask without the kick, for KVM_RUN only.
            handle.set_signal_mask(signal.pthread_sigmask(signal.SIG_BLOCK, ()) - _KICK_SET)
            with self._cond:
                self._kickable = True
            while True:
                self._drain()
                if self.state is RunState.STOPPED:
                    break
                if self.state is RunState.PAUSED:
                    with self._cond:
                        if not self._inbox and self.state is RunState.PAUSED:
                            self._cond.wait()
                    continue
                ex = self.vcpu.run()
                if ex.kind == "interrupted":
                    _eat_kick()
                else:
                    self.dispatch(self.vcpu, ex)
        except BaseException as e:      # noqa: BLE001 - reported to the machine, thread ends
            try:
                self.on_error(self.vcpu, e)
            except BaseException:       # noqa: BLE001 - nothing left to report to
                pass
        finally:
            with self._cond:
                self._kickable = False
                self.state = RunState.STOPPED
                pending = list(self._inbox)
                self._inbox.clear()
                self._cond.notify_all()
            for msg in pending:
                if isinstance(msg, _Call):
                    msg.error = VcpuStopped(f"vCPU {self.vcpu.id} stopped before the call ran")
                    msg.done.set()
            try:
                # Whoever runs this vCPU next (a direct run()) keeps its own mask.
                handle.set_signal_mask(None)
            except (OSError, ValueError):
                pass
            cache.owner = None          # no thread owns it now: callers may transfer directly
            self.paused.set()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._inbox:
                    return
                msg = self._inbox.popleft()
                if not isinstance(msg, _Call):
                    self._control(msg)
                    continue
            try:
                msg.result = msg.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                msg.error = e
            msg.done.set()

    def _control(self, msg: Any) -> None:
        """A pause/resume/stop message, under the lock (posters read state under it).
        Stop is final: a pause or resume queued behind it must not revive the loop."""
        if self.state is RunState.STOPPED:
            return
        if isinstance(msg, tuple) and msg[0] == "pause":
            self.state = RunState.PAUSED
            self._pauses_done = max(self._pauses_done, msg[1])
            self.paused.set()
            self._cond.notify_all()
        elif msg == "resume":
            if self.state is RunState.PAUSED:
                self.paused.clear()
                self.state = RunState.RUNNING
        elif msg == "stop":
            self.state = RunState.STOPPED


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """A callback that does not keep method's object alive (the watchdog's thread
    would otherwise hold the Machine for ever and its finaliser would never run)."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)
    return call


class VmmMixin:
    """Threads, devices and lifecycle for Machine (machine.py owns the resources)."""

    vcpus: list[Vcpu]

    def _init_vmm(self, serial_out: Any = None, watchdog_action: str = "stop") -> None:
        if watchdog_action not in ("stop", "reset"):
            raise ValueError(f"watchdog_action={watchdog_action!r}: 'stop' or 'reset'")
        self.bus = PortBus()
        self.serial = Serial(serial_out)
        self.hypercalls = Hypercalls()
        self.tick = Tick()
        self.watchdog = Watchdog(_weakly(self._watchdog_expired))
        self.watchdog.attach(self.hypercalls)
        self.watchdog_action = watchdog_action
        self.watchdog_records: list[dict[str, Any]] = []
        self.bus.register(self.serial, SERIAL_PORT, 8)
        self.bus.register(DebugExit(self._guest_exit), DEBUG_EXIT_PORT)
        self.bus.register(self.hypercalls, HYPERCALL_PORT)
        self.bus.register(self.tick, TICK_PORT)
        self.threads: list[VcpuThread] = []
        self.exit_status: int | None = None
        self.fatal: str | None = None
        self.resets = 0
        self._stopped = threading.Event()
        # Released once by _finish: wait() blocks on a plain lock, which Ctrl-C
        # interrupts cleanly (Event.wait's Condition can be left broken by two).
        self._exit_gate = threading.Lock()
        self._exit_gate.acquire()
        self._finish_lock = threading.Lock()
        self._lifecycle = threading.Lock()
        self._close_lock = threading.Lock()      # one close() at a time
        self._direct_lock = threading.RLock()    # a direct call on a threadless vCPU vs. close
        self._closing = False
        self.debug_handler: Callable[[Vcpu, exits.DebugExit], None] | None = None
        self.exit_listeners: list[Callable[[int], None]] = []   # called once with the status
        self.halted: set[int] = set()
        # MMIO outside RAM: each handler(addr, data or None for a read, length) answers
        # bytes (a read), b"" (a write it took) or None (not its address).
        self.mmio_handlers: list[Callable[[int, bytes | None, int], bytes | None]] = []
        self.guest_code: int | None = None      # what the guest wrote to the debug-exit port
        self.reboot = True       # False: a guest's reset request ends the run (QEMU -no-reboot)

    # --- dispatch (runs on vCPU threads) ------------------------------------------------
    def dispatch(self, vcpu: Vcpu, ex: exits.AnyExit) -> None:
        if type(ex) is exits.IoExit:
            self.bus.dispatch(vcpu, ex)
        elif isinstance(ex, exits.MmioExit):
            data = ex.data if ex.is_write else None
            for handler in self.mmio_handlers:
                answer = handler(ex.addr, data, ex.length)
                if answer is not None:
                    if data is None:
                        ex.respond(answer)
                    return
            if not ex.is_write:
                ex.respond(b"\xff" * ex.length)       # nothing is mapped there
        elif isinstance(ex, exits.DebugExit):
            if self.debug_handler is not None:
                self.debug_handler(vcpu, ex)
        elif isinstance(ex, exits.HltExit):
            # Without an in-kernel irqchip nothing can wake a halted vCPU.
            self.halted.add(vcpu.id)
            t = self.thread_of(vcpu)
            if t is not None:
                t.halt()
            if len(self.halted) == len(self.vcpus):
                self._finish(0)
        elif isinstance(ex, exits.SystemEventExit):
            if ex.type == ks.KVM_SYSTEM_EVENT_RESET and self.reboot:
                threading.Thread(target=self._guest_reset, name="reset", daemon=True).start()
            else:
                self._finish(0)
        elif not isinstance(ex, exits.InterruptedExit):
            self._fatal_exit(vcpu, ex)

    def _fatal_exit(self, vcpu: Vcpu, ex: exits.AnyExit) -> None:
        from .regdump import format_dump
        detail = repr(ex)
        if isinstance(ex, exits.InternalErrorExit):
            detail += f" — {ex.description}"
        try:
            dump = format_dump(vcpu.regs.dump())
        except Exception as e:  # noqa: BLE001 - the dump is best effort on a dying vCPU
            dump = f"(register dump failed: {e})"
        self.fatal = f"vCPU {vcpu.id}: fatal exit {ex.kind}: {detail}\n{dump}"
        _report(self.fatal)
        self._finish(EXIT_FATAL)

    def _guest_exit(self, vcpu_id: int, status: int) -> None:
        if self.exit_status is None:
            self.guest_code = status
        self._finish(status)

    def _vcpu_error(self, vcpu: Vcpu, e: BaseException) -> None:
        if self.fatal is None:
            self.fatal = f"vCPU {vcpu.id}: {type(e).__name__}: {e}"
        self._finish(EXIT_FATAL)   # first: a report that cannot be written must not hang us
        _report(self.fatal)

    def _finish(self, status: int) -> None:
        with self._finish_lock:
            first = self.exit_status is None
            if first:
                self.exit_status = status
                self._stopped.set()
                self._exit_gate.release()
        if first:
            for listener in list(self.exit_listeners):
                listener(status)
        for t in self.threads:
            if t.state is not RunState.STOPPED:
                try:
                    t.post("stop")
                except VcpuStopped:
                    pass

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start one thread per vCPU. Works from any thread: kicks need no handler."""
        if self.threads:
            raise RuntimeError("the machine's vCPU threads are already started")
        if self._closing:
            raise VcpuStopped("the machine is closed")
        # A Ctrl-C meanwhile is raised once every thread runs (the caller's stop() then
        # finds them all): inside threading's own code (Thread.start waits on an Event,
        # rearm clears one) it would leave a Condition's lock released twice or held for
        # ever, and a thread started that stop() cannot see.
        with interrupts_deferred():
            self.rearm()
            self.threads = [VcpuThread(v, self.dispatch, self._vcpu_error, paused)
                            for v in self.vcpus]
            for t in self.threads:
                t.start()

    def rearm(self) -> None:
        """The guest is to run again: no exit status, and wait() blocks until the next
        exit (start() does this; so may a restore of a finished guest)."""
        with self._finish_lock:
            self._stopped.clear()
            self.exit_status = None
            self.guest_code = None
            self._exit_gate.acquire(blocking=False)    # held again if an exit released it

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to exit; returns the exit status (None on timeout)."""
        if not self._stopped.is_set():
            if self._exit_gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                self._exit_gate.release()             # let the next waiter through
            if not self._stopped.is_set():
                return None
        with interrupts_deferred():
            self.join_threads()
        return self.exit_status

    def stop(self, status: int = 0) -> None:
        """Stop every vCPU and wait until their threads have ended (on a vCPU thread:
        the others; this one ends when its handler returns)."""
        with interrupts_deferred():
            self._finish(status)
            self.join_threads()

    def join_threads(self, timeout: float = STOP_TIMEOUT) -> list[VcpuThread]:
        """Wait until every vCPU thread (but the caller's own) has exited, kicking it
        again now and then; returns those still alive after timeout."""
        deadline = time.monotonic() + timeout
        me = threading.get_ident()
        for t in self.threads:
            while t.thread.is_alive() and t.thread.ident != me:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                t.kick()
                t.thread.join(min(left, 0.1))
        return [t for t in self.threads if t.thread.is_alive() and t.thread.ident != me]

    def on_vcpu_thread(self) -> Vcpu | None:
        """The vCPU whose thread is calling (None on any other thread)."""
        me = threading.get_ident()
        for t in self.threads:
            if t.thread.ident == me and t.thread.is_alive():
                return t.vcpu
        return None

    def thread_of(self, vcpu: Vcpu) -> VcpuThread | None:
        """The thread running vcpu (None before start())."""
        for t in self.threads:
            if t.vcpu is vcpu:
                return t
        return None

    def _threads(self, vcpus: Iterable[int] | None) -> list[VcpuThread]:
        ids = None if vcpus is None else set(vcpus)
        return [t for t in self.threads if ids is None or t.vcpu.id in ids]

    def run_on_cpu(self, vcpu: Vcpu | int, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run fn on the vCPU's own thread (kicking it out of KVM_RUN) and return its result.

        From any thread. A vCPU whose thread has ended (or that never had one) runs fn
        on the caller; a closed machine raises VcpuStopped.
        """
        v = self.vcpus[vcpu] if isinstance(vcpu, int) else vcpu
        t = self.thread_of(v)
        if t is not None:
            try:
                return t.call(fn, timeout)
            except VcpuStopped:
                if self._closing:
                    raise
                t.thread.join(STOP_TIMEOUT)      # it is ending: let it release the cache
        # No thread drives this vCPU: run here, but never alongside close() releasing it.
        with self._direct_lock:
            if self._closing:
                raise VcpuStopped(f"vCPU {v.id}: the machine is closed")
            return fn()

    @staticmethod
    def _ask_pause(threads: Iterable[VcpuThread]) -> dict[VcpuThread, tuple[int, RunState]]:
        """Queue a pause on each (even one that looks paused: a "resume" may be queued
        ahead of it). Returns each thread's ticket and what it had been asked before."""
        asked = {}
        for t in threads:
            try:
                asked[t] = t.request_pause()
            except VcpuStopped:
                pass
        return asked

    def pause(self, vcpus: Iterable[int] | None = None, timeout: float = 10.0) -> None:
        """Bring these vCPUs (by id; default all) out of the guest and hold them there.
        Returns once each has paused for this request (a resume from another thread
        may already have let it go again)."""
        self._wait_paused(self._ask_pause(self._threads(vcpus)), timeout)

    @staticmethod
    def _wait_paused(asked: dict[VcpuThread, tuple[int, RunState]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t, (ticket, _) in asked.items():
            if not t.wait_paused(ticket, max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"vCPU {t.vcpu.id} did not pause within {timeout} s")

    def pause_all(self, timeout: float = 10.0) -> None:
        self.pause(None, timeout)

    def stop_all_from(self, vcpu: Vcpu) -> None:
        """Called on vCPU's own thread (e.g. from debug_handler): this vCPU pauses
        after the handler returns and every other vCPU is asked to pause (all-stop).
        Does not wait for the others; pause() can be used afterwards to wait."""
        own = self.thread_of(vcpu)
        if own is None:
            raise KeyError(f"vCPU {vcpu.id} has no thread (start() first)")
        own.hold()
        self._ask_pause(t for t in self.threads if t is not own)

    def resume(self, vcpus: Iterable[int] | None = None) -> None:
        """Let these vCPUs (by id; default all) run again. Queued after any pause, so
        the last request wins even if the thread has not drained the pause yet."""
        for t in self._threads(vcpus):
            if t.state is not RunState.STOPPED:
                try:
                    t.post("resume")
                except VcpuStopped:
                    pass

    def resume_all(self) -> None:
        self.resume()

    @property
    def paused(self) -> bool:
        return bool(self.threads) and all(t.state is not RunState.RUNNING for t in self.threads)

    # --- reset and the watchdog ----------------------------------------------------------
    def reset(self, reload: bool = True) -> None:
        """Every vCPU back to its power-on state (RESET level + LAPIC), memory reloaded.

        Runs the writes on each vCPU's own thread while all are paused; the guest
        then runs again from its entry.
        """
        with self._lifecycle:
            # What each vCPU was last asked to do, drained or still queued: a
            # resume_all() just before reset() means "running" even if no thread
            # has seen it yet. Read and replaced by the pause in one step.
            asked = self._ask_pause(self.threads)
            self._wait_paused(asked, 10.0)
            for v in self.vcpus:
                self.run_on_cpu(v, functools.partial(self._reset_vcpu, v))
            if reload:
                # Memory from here, the BSP's entry state on its own thread.
                self.run_on_cpu(self.vcpus[0], self.reload)  # type: ignore[attr-defined]
            self.halted.clear()
            self.resets += 1
            self.resume(t.vcpu.id for t, (_, before) in asked.items()
                        if before is RunState.RUNNING)

    def _guest_reset(self) -> None:
        """KVM_SYSTEM_EVENT_RESET, on a thread of its own: a machine stopping or closed
        meanwhile simply is not reset."""
        try:
            self.reset()
        except VcpuStopped:
            pass

    def _reset_vcpu(self, v: Vcpu) -> None:
        v.discard()
        for name, value in self._power_on[v.id].items():  # type: ignore[attr-defined]
            v.regs[name] = value
        v.flush()                       # SREGS (apic_base) before the LAPIC page
        lapic = self._power_on_lapic.get(v.id)  # type: ignore[attr-defined]
        if lapic is not None:
            v.cache.put("LAPIC", lapic)

    def _watchdog_expired(self, vcpu_id: int) -> None:
        v = self.vcpus[vcpu_id]
        try:
            state = self.run_on_cpu(v, lambda: v.regs.dump(), timeout=10)
        except Exception as e:          # noqa: BLE001 - the record is best effort; the stop is not
            state = {"error": f"{type(e).__name__}: {e}"}
        self.watchdog_records.append({"vcpu": vcpu_id, "registers": state})
        _report(f"regsync: watchdog expired on vCPU {vcpu_id} (rip={state.get('rip', 0):#x}); "
                f"{'resetting' if self.watchdog_action == 'reset' else 'stopping'} the guest")
        if self.watchdog_action == "reset" and self.resets < 3:
            try:
                self.reset()
            except VcpuStopped:
                pass                    # stopped or closed meanwhile: nothing to reset
        else:
            self._finish(EXIT_WATCHDOG)

    def shutdown_vmm(self) -> None:
        """Stop the threads and wait until every one has left KVM_RUN for good; from
        here on run_on_cpu and start raise VcpuStopped. Raises TimeoutError (with
        nothing released) if a vCPU thread does not end."""
        with self._direct_lock:
            self._closing = True
        if self.threads:
            self._finish(self.exit_status if self.exit_status is not None else 0)
            stuck = self.join_threads()
            if stuck:
                ids = ", ".join(str(t.vcpu.id) for t in stuck)
                raise TimeoutError(f"vCPU {ids} still running {STOP_TIMEOUT} s after the stop "
                                   "request (stuck in an exit handler?); nothing was released")
        self.watchdog.close()

    def refuse_on_vcpu_thread(self, what: str) -> None:
        """A vCPU thread cannot wait for itself to leave KVM_RUN."""
        v = self.on_vcpu_thread()
        if v is not None:
            raise RuntimeError(f"{what} called on the thread of vCPU {v.id}: a vCPU thread "
                               "cannot wait for itself to stop; call it from another thread "
                               "(stop() works here)")
