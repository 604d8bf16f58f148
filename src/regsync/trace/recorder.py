"""Records every register transfer of a vCPU with why it happened and who asked.

Nothing here runs while tracing is off: attaching a SyncTrace to a vCPU swaps
three instance attributes (the handle's ioctl choke point ``_io``, the cache's
``transport`` and the vCPU's bound KVM_RUN) for recording wrappers, and detaching
puts the originals back. The cache, the transport and the run loop carry no
tracing code and no "is tracing on?" test on the hot path.

What a record says (one JSON object per line in a trace file):

    vcpu      the vCPU id
    t_us      microseconds since the trace started
    ioctl     the ioctl, or "kvm_run" for a group KVM_RUN applied from
              kvm_dirty_regs (no syscall of its own)
    group     the register group moved (None for an ioctl outside any group)
    registers the registers that caused it: the ones read (a read miss), the
              dirty ones written; empty when a whole level was asked for
    reason    read miss | synchronize | flush before run | flush() |
              write before side-effect fetch | side-effect check |
              I/O completion | restore | probe | bit update | other
    caller    the first frame outside regsync ("file:line function"), or the
              component inside it that asked (gdb stub, watchdog, device,
              snapshot, reset, vcpu thread)
    exit      how many KVM_RUN exits this vCPU had seen at that point

A KVM_RUN itself is recorded as {"ioctl": "KVM_RUN", "reason": "run"}, so a
summary can count transfers per exit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

from ..kvm.ioctls import moves_register_state

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # .../regsync
_THREADING = os.path.abspath(threading.__file__)

# Components inside regsync that count as the caller (outermost match wins).
_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("gdb" + os.sep, "gdb stub"), ("snapshot" + os.sep, "snapshot"),
    ("devices" + os.sep + "watchdog.py", "watchdog"), ("devices" + os.sep, "device"),
    ("board" + os.sep, "board"),
)


Frame = tuple[str, int, str, str]      # file, line, function, qualified name


_abspath = functools.lru_cache(maxsize=None)(os.path.abspath)
_relpath = functools.lru_cache(maxsize=None)(os.path.relpath)


def _frames() -> list[Frame]:
    out = []
    f = sys._getframe(2)
    while f is not None:
        c = f.f_code
        out.append((_abspath(c.co_filename), f.f_lineno, c.co_name, c.co_qualname))
        f = f.f_back
    return out


def _reason(frames: list[Frame]) -> str:
    """Why a transfer happened, from the regsync functions on the stack (inner first)."""
    funcs = [(os.path.basename(fn), func) for fn, _, func, _ in frames
             if fn.startswith(_PKG) and os.sep + "trace" + os.sep not in fn]
    has = set(funcs)
    if ("vcpu.py", "_complete_pending_io") in has:
        return "I/O completion"
    if has & {("cache.py", "_kernel_view"), ("cache.py", "_report_contradictions")}:
        return "side-effect check"
    for key, reason in ((("cache.py", "put"), "restore"), (("cache.py", "add_register"), "probe"),
                        (("cache.py", "_update_bits"), "bit update")):
        if key in has:
            return reason
    at = {f: i for i, f in reversed(list(enumerate(funcs)))}       # innermost index
    flush, fetch = at.get(("cache.py", "flush")), at.get(("cache.py", "_fetch"))
    if flush is not None and fetch is not None and flush < fetch:
        return "write before side-effect fetch"
    if has & {("cache.py", "synchronize"), ("cache.py", "export")}:
        return "synchronize"
    if ("cache.py", "read") in has:
        return "read miss"
    if has & {("vcpu.py", "run"), ("cache.py", "before_run"), ("cache.py", "run_failed")}:
        return "flush before run"
    if flush is not None:
        return "flush()"
    if ("cache.py", "write") in has:
        return "read miss"
    return "other"


def _caller(frames: list[Frame]) -> str:
    """The first frame outside regsync, or the regsync component that asked."""
    comp = None
    for fn, _, _, qual in frames:               # inner to outer: the outermost component wins
        if fn.startswith(_PKG):
            rel = fn[len(_PKG):]
            for part, name in _COMPONENTS:
                if part in rel:
                    comp = name
                    break
            else:
                if rel.endswith("vmm.py"):
                    # Work a vmm component queued to the vCPU thread (run_on_cpu).
                    for key, name in (("_watchdog", "watchdog"), ("reset", "reset")):
                        if key in qual:
                            comp = name
                    if comp is None:
                        comp = "vcpu thread"
    if comp is not None:
        return comp
    for fn, line, func, _ in frames:
        if not fn.startswith(_PKG) and fn != _THREADING:
            return f"{_relpath(fn)}:{line} {func}"
    return "regsync"


# Which group each register ioctl moves, for a store() that writes several groups
# (x86_64's kernel interface; a fetch names its group itself).
_IOCTL_GROUPS: dict[str, tuple[str, ...]] = {
    "REGS": ("REGS",), "SREGS": ("SREGS",), "SREGS2": ("SREGS",), "VCPU_EVENTS": ("EVENTS",),
    "XSAVE": ("XSAVE",), "XSAVE2": ("XSAVE",), "XCRS": ("XCRS",), "DEBUGREGS": ("DEBUGREGS",),
    "LAPIC": ("LAPIC",), "MP_STATE": ("MP_STATE",), "MSRS": ("MSRS", "MSRS_TIME"),
    "FPU": ("XSAVE",)}


class _Context:
    """What the transport is moving right now (set by the transport proxy)."""
    __slots__ = ("group", "registers", "dirty")

    def __init__(self) -> None:
        self.group: str | None = None               # a fetch: its group
        self.registers: list[str] = []
        self.dirty: dict[str, list[str]] = {}        # a store: dirty registers per group

    def of(self, ioctl: str) -> tuple[str | None, list[str]]:
        if self.group is not None or not self.dirty:
            return self.group, self.registers
        groups = [g for g in _IOCTL_GROUPS.get(ioctl.split("_", 2)[-1], ()) if g in self.dirty]
        return ("+".join(groups) or None), [n for g in groups for n in self.dirty[g]]


class SyncTrace:
    """Collects records from any number of vCPUs; writes JSON lines if given a file."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._attached: list[tuple[Any, dict[str, Any]]] = []

    # --- recording ------------------------------------------------------------------
    def record(self, vcpu: Any, ioctl: str, group: str | None, registers: list[str],
               reason: str | None = None, frames: list[Frame] | None = None
               ) -> None:
        frames = frames if frames is not None else _frames()
        rec = {"vcpu": vcpu.id, "t_us": round((time.perf_counter() - self.t0) * 1e6, 1),
               "ioctl": ioctl, "group": group, "registers": list(registers),
               "reason": reason or _reason(frames), "caller": _caller(frames),
               "exit": vcpu.cache.exits}
        with self._lock:
            self.records.append(rec)
            if self.out is not None:
                self.out.write(json.dumps(rec) + "\n")

    # --- attaching ------------------------------------------------------------------
    def attach(self, vcpu: Any) -> None:
        """Start recording vcpu's transfers (on the vCPU's owner thread, or paused)."""
        cache, handle = vcpu.cache, vcpu.handle
        saved = {"io": handle.__dict__.get("_io"), "transport": cache.transport,
                 "kvm_run": vcpu.__dict__.get("_kvm_run")}
        ctx = _Context()
        real_io = handle._io
        real_run = vcpu._kvm_run
        trace = self

        def io(name: str, arg: Any = 0) -> int:
            if moves_register_state(name):
                trace.record(vcpu, name, *ctx.of(name))
            return real_io(name, arg)

        def run() -> int:
            flags = vcpu.handle.run_page.kvm_dirty_regs
            frames = _frames()
            if flags:
                # The groups KVM_RUN applies from kvm_dirty_regs (no ioctl of their own).
                for g in cache.catalog.groups_in(cache.in_flight):
                    regs = [r.name for r in cache.dirty[g.name]]
                    trace.record(vcpu, "kvm_run", g.name, regs, "flush before run", frames)
            trace.record(vcpu, "KVM_RUN", None, [], "run", frames)
            return real_run()

        handle._io = io
        cache.transport = _TransportProxy(saved["transport"], ctx)
        vcpu._kvm_run = run
        self._attached.append((vcpu, saved))

    def detach(self) -> None:
        """Stop recording: the original choke point, transport and run come back."""
        for vcpu, saved in self._attached:
            if saved["io"] is None:
                vcpu.handle.__dict__.pop("_io", None)
            else:
                vcpu.handle._io = saved["io"]
            vcpu.cache.transport = saved["transport"]
            vcpu._kvm_run = saved["kvm_run"] if saved["kvm_run"] is not None \
                else vcpu.handle.run
        self._attached.clear()
        if self.out is not None:
            self.out.flush()

    @property
    def attached(self) -> bool:
        return bool(self._attached)


class _TransportProxy:
    """Forwards everything to the real transport; around each transfer it tells the
    ioctl recorder which group and registers are moving."""

    def __init__(self, real: Any, ctx: _Context) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    def _around(self, group: str | None, registers: list[str], fn: Callable[..., Any],
                *args: Any, dirty: dict[str, list[str]] | None = None) -> Any:
        ctx = self._ctx
        saved = (ctx.group, ctx.registers, ctx.dirty)
        ctx.group, ctx.registers, ctx.dirty = group, registers, dirty or {}
        try:
            return fn(*args)
        finally:
            ctx.group, ctx.registers, ctx.dirty = saved

    def fetch(self, group: Any) -> None:
        asked = _asked_registers()
        return self._around(group.name, asked, self._real.fetch, group)

    def store(self, dirty: dict[str, dict[Any, int]], *args: Any) -> Any:
        per_group = {g: [r.name for r in d] for g, d in dirty.items() if d}
        return self._around(None, [], self._real.store, dirty, *args, dirty=per_group)

    def put(self, group: Any, *args: Any) -> Any:
        return self._around(group.name, [], self._real.put, group, *args)

    def probe(self, reg: Any) -> Any:
        return self._around(reg.group, [reg.name], self._real.probe, reg)


def _asked_registers() -> list[str]:
    """The register a read miss was for (the ``reg`` argument of cache.read)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "read" and f.f_code.co_filename.endswith("cache.py"):
            reg = f.f_locals.get("reg")
            return [reg.name] if reg is not None else []
        f = f.f_back
    return []
