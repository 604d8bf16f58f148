"""vCPU threads, run_on_cpu, pause/resume, reset and exit dispatch.

Each vCPU runs on its own thread as a small state machine driven by messages:

    RUNNING --pause--> PAUSED --resume--> RUNNING
       |                  |
       +------stop--------+----> STOPPED

Other threads never touch a vCPU's kernel state: they post a message (a call,
pause, resume or stop) and *kick* the thread out of KVM_RUN by setting
kvm_run.immediate_exit and sending it SIGUSR1. immediate_exit covers the race
where the kick lands before KVM_RUN starts (KVM checks it on entry); the signal
covers a vCPU inside KVM_RUN, spinning in the guest or halted in the in-kernel
LAPIC. The poster appends the message before kicking and the thread drains its
inbox after every KVM_RUN, so no request is missed.
"""

from __future__ import annotations

import collections
import functools
import enum
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from . import exits
from .devices import PortBus
from .devices.basic import (DEBUG_EXIT_PORT, HYPERCALL_PORT, SERIAL_PORT, TICK_PORT, DebugExit,
                            Hypercalls, Serial, Tick)
from .devices.watchdog import Watchdog
from .kvm import structs as ks
from .vcpu import Vcpu

T = TypeVar("T")
KICK_SIGNAL = signal.SIGUSR1
EXIT_FATAL = 125          # process status when the guest dies (triple fault, emulation failure)
EXIT_WATCHDOG = 124       # process status when the watchdog stops the guest


def _report(text: str) -> None:
    """Best effort to stderr: a closed pipe must not take a vCPU thread down with it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VcpuStopped(RuntimeError):
    """A request reached a vCPU thread that has stopped."""


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_signal_installed = False


def install_kick_handler() -> bool:
    """A no-op SIGUSR1 handler, so the kick interrupts KVM_RUN instead of killing us.

    Only the main thread may install it; without it kicks rely on immediate_exit
    alone (a vCPU halted in the kernel would then not notice).
    """
    global _signal_installed
    if _signal_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _signal_installed = True
    return True


class VcpuThread:
    """Runs one vCPU: KVM_RUN, dispatch the exit, drain messages, repeat."""

    def __init__(self, vcpu: Vcpu, dispatch: Callable[[Vcpu, exits.AnyExit], None],
                 on_error: Callable[[Vcpu, BaseException], None], paused: bool = False) -> None:
        self.vcpu = vcpu
        self.dispatch = dispatch
        self.on_error = on_error
        self.state = RunState.PAUSED if paused else RunState.RUNNING
        self._inbox: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self.paused = threading.Event()
        if paused:
            self.paused.set()
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)
        self.kicks = 0

    def start(self) -> None:
        self.thread.start()

    # --- other threads -------------------------------------------------------------
    def post(self, msg: Any) -> None:
        with self._cond:
            if self.state is RunState.STOPPED:
                raise VcpuStopped(f"vCPU {self.vcpu.id} has stopped")
            self._inbox.append(msg)
            self._cond.notify()
            # A paused thread waits on the condition and sees the message; a kick
            # would only leave immediate_exit set and cost a spurious KVM_RUN later.
            running = self.state is RunState.RUNNING
        if running:
            self.kick()

    def kick(self) -> None:
        if self.state is RunState.STOPPED or self.thread.ident is None:
            return
        self.kicks += 1
        self.vcpu.handle.run_page.immediate_exit = 1
        try:
            signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
        except (ProcessLookupError, OSError):
            pass

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run fn on this vCPU's thread and return its result (run_on_cpu)."""
        if threading.get_ident() == self.thread.ident or not self.thread.is_alive():
            return fn()
        c = _Call(fn)
        self.post(c)
        if not c.done.wait(timeout):
            raise TimeoutError(f"vCPU {self.vcpu.id} did not answer within {timeout} s")
        if c.error is not None:
            raise c.error
        return c.result  # type: ignore[no-any-return]

    # --- the vCPU's own thread ------------------------------------------------------------
    def _main(self) -> None:
        cache = self.vcpu.cache
        cache.owner = threading.get_ident()
        try:
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
                if ex.kind != "interrupted":
                    self.dispatch(self.vcpu, ex)
        except BaseException as e:      # noqa: BLE001 - reported to the machine, thread ends
            try:
                self.on_error(self.vcpu, e)
            except BaseException:       # noqa: BLE001 - nothing left to report to
                pass
        finally:
            with self._cond:
                self.state = RunState.STOPPED
                pending = list(self._inbox)
                self._inbox.clear()
            for msg in pending:
                if isinstance(msg, _Call):
                    msg.error = VcpuStopped(f"vCPU {self.vcpu.id} stopped before the call ran")
                    msg.done.set()
            cache.owner = None          # no thread owns it now: callers may transfer directly
            self.paused.set()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._inbox:
                    return
                msg = self._inbox.popleft()
            if isinstance(msg, _Call):
                try:
                    msg.result = msg.fn()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    msg.error = e
                msg.done.set()
            elif msg == "pause":
                self.state = RunState.PAUSED
                self.paused.set()
            elif msg == "resume":
                if self.state is RunState.PAUSED:
                    self.paused.clear()
                    self.state = RunState.RUNNING
            elif msg == "stop":
                self.state = RunState.STOPPED


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
        self.watchdog = Watchdog(self._watchdog_expired)
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
        self._lifecycle = threading.Lock()
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
                t.state = RunState.STOPPED
            if len(self.halted) == len(self.vcpus):
                self._finish(0)
        elif isinstance(ex, exits.SystemEventExit):
            if ex.type == ks.KVM_SYSTEM_EVENT_RESET and self.reboot:
                threading.Thread(target=self.reset, name="reset", daemon=True).start()
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
        first = self.exit_status is None
        if first:
            self.exit_status = status
        self._stopped.set()
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
        """Start one thread per vCPU (kicks need the SIGUSR1 handler: call from main)."""
        if self.threads:
            raise RuntimeError("the machine's vCPU threads are already started")
        install_kick_handler()
        self._stopped.clear()
        self.exit_status = None
        self.guest_code = None
        self.threads = [VcpuThread(v, self.dispatch, self._vcpu_error, paused) for v in self.vcpus]
        for t in self.threads:
            t.start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to exit; returns the exit status (None on timeout)."""
        if not self._stopped.wait(timeout):
            return None
        self.join_threads()
        return self.exit_status

    def stop(self, status: int = 0) -> None:
        """Stop every vCPU and join the threads."""
        self._finish(status)
        self.join_threads()

    def join_threads(self, timeout: float = 10.0) -> None:
        for t in self.threads:
            if t.thread.is_alive():
                t.thread.join(timeout)
                if t.thread.is_alive():
                    t.kick()
                    t.thread.join(timeout)

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
        """Run fn on the vCPU's own thread (kicking it out of KVM_RUN) and return its result."""
        v = self.vcpus[vcpu] if isinstance(vcpu, int) else vcpu
        t = self.thread_of(v)
        return fn() if t is None else t.call(fn, timeout)

    @staticmethod
    def _ask_pause(threads: Iterable[VcpuThread]) -> None:
        # Always queue a pause, even to a thread that looks paused: a "resume" may
        # be queued ahead of it, and the thread must end up paused, not running.
        for t in threads:
            if t.state is not RunState.STOPPED:
                t.paused.clear()
                try:
                    t.post("pause")
                except VcpuStopped:
                    t.paused.set()

    def pause(self, vcpus: Iterable[int] | None = None, timeout: float = 10.0) -> None:
        """Bring these vCPUs (by id; default all) out of the guest and hold them there."""
        threads = self._threads(vcpus)
        self._ask_pause(threads)
        for t in threads:
            if not t.paused.wait(timeout):
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
        own.state = RunState.PAUSED
        own.paused.set()
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
            was_running = bool(self.threads) and not self.paused
            if self.threads:
                self.pause_all()
            for v in self.vcpus:
                self.run_on_cpu(v, functools.partial(self._reset_vcpu, v))
            if reload:
                # Memory from here, the BSP's entry state on its own thread.
                self.run_on_cpu(self.vcpus[0], self.reload)  # type: ignore[attr-defined]
            self.halted.clear()
            self.resets += 1
            if was_running:
                self.resume_all()

    def _reset_vcpu(self, v: Vcpu) -> None:
        v.discard()
        for name, value in self._power_on[v.id].items():  # type: ignore[attr-defined]
            v.regs[name] = value
        v.flush()

    def _watchdog_expired(self, vcpu_id: int) -> None:
        v = self.vcpus[vcpu_id]
        try:
            state = self.run_on_cpu(v, lambda: v.regs.dump(), timeout=10)
        except (VcpuStopped, TimeoutError) as e:
            state = {"error": str(e)}
        self.watchdog_records.append({"vcpu": vcpu_id, "registers": state})
        _report(f"regsync: watchdog expired on vCPU {vcpu_id} (rip={state.get('rip', 0):#x}); "
                f"{'resetting' if self.watchdog_action == 'reset' else 'stopping'} the guest")
        if self.watchdog_action == "reset" and self.resets < 3:
            self.reset()
        else:
            self._finish(EXIT_WATCHDOG)

    def shutdown_vmm(self) -> None:
        if self.threads:
            self._finish(self.exit_status if self.exit_status is not None else 0)
            self.join_threads()
        self.watchdog.close()
