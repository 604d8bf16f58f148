"""A vCPU as the VMM sees it: the kernel handle, its register cache, ``regs``, run().

``vcpu.regs.rax`` reads through the cache; ``vcpu.run()`` flushes dirty
registers (coalesced, most through the kvm_run page), enters the guest once and
returns a typed exit. Transfers happen on the thread that owns the vCPU (the
one that calls run()); machine.run_on_cpu() brings other threads there.
"""

from __future__ import annotations

import ctypes
import errno
from threading import get_ident
from typing import Any, Callable, Iterable, Mapping

from . import exits, serving
from .arch.x86_64 import CATALOG, KvmTransport, Registers
from .cache import RegisterCache
from .kvm import KvmError
from .kvm import Vcpu as VcpuHandle
from .kvm import structs as ks
from .strategies import make_cache

LEVELS = CATALOG.levels
_IO_DIRECTION = ks.kvm_run.io.offset
_MMIO_IS_WRITE = ks.kvm_run.mmio.offset + ks._exit_mmio.is_write.offset
_DIRTY_REGS_AT = ks.kvm_run.kvm_dirty_regs.offset   # its flags all live in the low byte
# exit_reason is a u32; every KVM_EXIT_* fits its low byte (checked here), so the hot
# path reads one byte of the page instead of a ctypes field.
_EXIT_REASON_AT = ks.kvm_run.exit_reason.offset
_EXIT_IO, _EXIT_MMIO, _IO_IN = ks.KVM_EXIT_IO, ks.KVM_EXIT_MMIO, ks.KVM_EXIT_IO_IN
_IO_AT, _unpack_io = exits.IO_AT, exits.IO_FIELDS.unpack_from
_IO_WORD = _IO_AT // 8             # the I/O exit's fields as page words (serving.py)
assert _IO_AT % 8 == 0 and exits.IO_FIELDS.size == 16
assert max(v for k, v in vars(ks).items() if k.startswith("KVM_EXIT_") and isinstance(v, int)) < 256


def to_mask(what: int | str | Iterable[str]) -> int:
    """A group mask from a mask, a level or group name, or names ("REGS", "FULL")."""
    if isinstance(what, int):
        return what
    names = [what] if isinstance(what, str) else list(what)
    mask = 0
    for n in names:
        n = n.upper() if isinstance(n, str) else n     # names are case-insensitive
        if n in LEVELS:
            mask |= LEVELS[n]
        elif n in CATALOG.group_by_name:
            mask |= CATALOG.group_by_name[n].bit
        else:
            known = ", ".join([*LEVELS, *CATALOG.group_by_name])
            raise ValueError(f"unknown level or group {n!r} (known: {known})")
    return mask


class Vcpu:
    """One vCPU: ``regs``, ``run()``, ``synchronize()``, ``flush()``, ``discard()``, ``stats``."""

    def __init__(self, handle: VcpuHandle, *, strategy: str = "regsync", use_sync_regs: bool = True,
                 supported_msrs: set[int] | None = None, has_lapic: bool = True) -> None:
        self.handle = handle
        self.id = handle.id
        self.strategy = strategy
        self.transport = KvmTransport(handle, use_sync_regs=use_sync_regs,
                                      supported_msrs=supported_msrs or set(),
                                      has_lapic=has_lapic)
        self.cache: RegisterCache = make_cache(strategy, self.transport)
        self.regs = Registers(self.cache)
        self._run_page = handle.run_page
        self._run_addr = handle.run_page_addr
        self._kvm_run = handle.run
        # The cache's own before_run can be inlined; strategies override it.
        self._plain_cache = type(self.cache).before_run is RegisterCache.before_run
        self._run_view: memoryview | None = memoryview((ctypes.c_char * ctypes.sizeof(ks.kvm_run)).from_address(
            handle.run_page_addr)).cast("B")
        self._run_words: memoryview | None = self._run_view.cast("Q")   # as u64s (serving)
        self.last_exit: exits.AnyExit | None = None
        self._pending_exit: exits.AnyExit | None = None   # see _complete_pending_io
        self._io_exits: dict[tuple[int, ...], exits.IoExit] = {}   # see _new_io_exit
        # For run()'s inlined no-syscall flush (cache.flush's fast path).
        self._fast_defer_mask = self.transport.fast_defer_mask
        self._sync_mask = self.transport.sync_mask
        self._dirty_flags = self.transport._flags_for
        self.setup_stats: dict[str, Any] | None = None    # see end_setup

    # --- the run ---------------------------------------------------------------------
    def run(self) -> exits.AnyExit:
        """Flush dirty registers, enter the guest once, return the decoded exit.

        Written for the hot path (one exit of a hypercall loop: a rider of REGS in,
        REGS handed back): cache.flush()'s no-syscall case and cache.after_run()'s
        common case are inlined here and in serve() -- those two methods are the
        reference, and every other case goes through them.
        """
        cache = self.cache
        owner = cache.owner
        if owner != get_ident() and owner is not None:
            cache._check_thread()         # rule 9: raises WrongThreadError
        view = self._run_view
        if view is None:
            raise ValueError(f"KVM_RUN: vCPU {self.id} is closed")
        dirty = cache.dirty_mask
        if dirty:
            reason = view[_EXIT_REASON_AT]               # _completion_pending(), inlined
            if (reason == _EXIT_IO and view[_IO_DIRECTION] == _IO_IN) \
                    or (reason == _EXIT_MMIO and not view[_MMIO_IS_WRITE]):
                self._complete_pending_io()
                dirty = cache.dirty_mask
        if self._pending_exit is not None:
            pending, self._pending_exit = self._pending_exit, None
            return pending
        if dirty and self._plain_cache and not dirty & ~(self._fast_defer_mask & cache.held) \
                and not cache._fetched_since_run:
            # cache.flush()'s no-syscall path: held REGS/SREGS already sit in the
            # kvm_run page, so queuing them is their kvm_dirty_regs bits. (After a
            # fetch, before_run() also counts the writes avoided: not inlined.)
            view[_DIRTY_REGS_AT] |= self._dirty_flags[dirty]
            self.transport.deferred |= dirty
            cache.in_flight |= dirty
            cache.dirty_mask = 0
        elif dirty or not self._plain_cache or cache._fetched_since_run:
            cache.before_run()
        try:
            rc = self._kvm_run()
        except KvmError as e:
            if e.errno == errno.EINVAL and self.transport.deferred:
                cache.run_failed()        # raises RegisterWriteError naming the group
            cache.take_back_deferred()
            raise
        if view[_DIRTY_REGS_AT] or cache.dirty_mask:
            # A queued bit KVM did not clear was not applied (see cache.after_run).
            cache.after_run(self.transport.unconsumed(cache.in_flight)
                            if view[_DIRTY_REGS_AT] else 0)
        else:
            # cache.after_run()'s common case: KVM applied everything queued.
            self.transport.deferred = 0
            cache.held = self._sync_mask
            cache._fetched_since_run = 0
            cache.exits += 1
            flight = cache.in_flight
            if flight:
                cache._deferred_tally[flight] += 1
                one = cache._dirty_of_bit.get(flight)
                if one is not None:
                    one.clear()
                else:
                    cache.applied(flight)
                cache.in_flight = 0
        if rc < 0:
            self._run_page.immediate_exit = 0
            ex: exits.AnyExit = exits.INTERRUPTED
        elif view[_EXIT_REASON_AT] == _EXIT_IO:
            ex = self._io_exits.get(_unpack_io(view, _IO_AT)) or self._new_io_exit(view)
        else:
            ex = exits.decode(self._run_page, self._run_addr, view)
        self.last_exit = ex
        return ex

    def serve(self, handlers: Mapping[int, Callable[..., Any]],
              limit: int | None = None) -> exits.AnyExit | None:
        """Run the guest, answering its port I/O from ``handlers`` ({port: handler}),
        until an exit no handler takes (returned: handle it as a run() result) or
        ``limit`` handled exits (then None). A handler is ``fn(exit)`` using
        vcpu.regs, or one marked ``@regsync.serving.uses(...)`` that gets its
        registers as arguments (the faster form). See regsync.serving."""
        return serving.serve(self, handlers, limit)

    def _new_io_exit(self, view: memoryview) -> exits.IoExit:
        """Decode a port I/O exit not seen lately. IoExits are immutable, so the
        decoded ones are kept by their raw fields: a loop on one port decodes once."""
        ex = exits.decode_io(self._run_addr, view)
        if len(self._io_exits) >= 64:
            self._io_exits.clear()
        self._io_exits[_unpack_io(view, _IO_AT)] = ex
        return ex

    def _completion_pending(self) -> bool:
        """Did the last exit leave an IN or an MMIO read for the next KVM_RUN to finish?
        (The kvm_run page still describes the last exit until the next run.)"""
        if self._run_view is None:          # closed: nothing is pending any more
            return False
        reason = self._run_page.exit_reason
        if reason == ks.KVM_EXIT_IO:
            return self._run_view[_IO_DIRECTION] == ks.KVM_EXIT_IO_IN
        return reason == ks.KVM_EXIT_MMIO and not self._run_view[_MMIO_IS_WRITE]

    def _complete_pending_io(self) -> None:
        """Finish an IN/MMIO read before writing registers over it.

        api.rst: an I/O exit completes only when userspace re-enters KVM_RUN;
        register writes in between race with the completion (on this host a
        KVM_SET_REGS there makes the guest re-execute the IN forever). Re-entering
        with immediate_exit completes it without running another instruction;
        the edits stay dirty and are written right after.
        """
        self.cache.take_back_deferred()
        self._run_page.immediate_exit = 1
        try:
            rc = self.handle.run()
        finally:
            self._run_page.immediate_exit = 0
        self.cache.after_run()
        if rc < 0:
            self.last_exit = exits.INTERRUPTED   # the page now shows KVM_EXIT_INTR
        else:
            # Completing it produced an exit of its own (the next chunk of a rep
            # ins, say): the next run() returns it without entering the guest.
            self.last_exit = self._pending_exit = exits.decode(
                self._run_page, self._run_addr, self._run_view)

    def complete_pending_operation(self) -> bool:
        """Finish an I/O or MMIO exit that KVM completes only on re-entry, running no
        guest instruction (api.rst, KVM_RUN: "userspace should ensure that the
        operation is completed before performing a live migration"). Snapshots call
        this before taking or putting back state: otherwise an OUT is repeated, or
        the completion lands on the restored registers. True when a KVM_RUN was made;
        an exit that completion produced (a rep ins chunk) stays for run() to return.
        """
        reason = self._run_page.exit_reason
        if self._pending_exit is not None or reason not in (ks.KVM_EXIT_IO, ks.KVM_EXIT_MMIO):
            return False
        self._complete_pending_io()
        return True

    @property
    def has_pending_exit(self) -> bool:
        """An exit is waiting for run() to return it (see complete_pending_operation)."""
        return self._pending_exit is not None

    # --- sync vocabulary ---------------------------------------------------------------
    def synchronize(self, what: int | str | Iterable[str] = "FULL") -> None:
        """Make every register in the groups/level held or dirty (fetching what is not)."""
        self.cache.synchronize(to_mask(what))

    def synchronize_state(self, level: str = "FULL") -> None:
        """QEMU's cpu_synchronize_state(level), without the seed's lost-edit bug."""
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r} (known: {', '.join(LEVELS)})")
        self.cache.synchronize(LEVELS[level])

    def flush(self) -> None:
        """Write dirty registers now (run() does this too)."""
        self.cache._check_thread()
        if self.cache.dirty_mask and self._completion_pending():
            self._complete_pending_io()
        self.cache.flush(allow_defer=False)

    def discard(self, what: int | str | Iterable[str] = -1) -> None:
        """Drop local edits; the kernel's values apply again."""
        self.cache.discard(to_mask(what))

    def invalidate(self, what: int | str | Iterable[str] = -1) -> None:
        self.cache.invalidate(to_mask(what))

    # --- debugging support -----------------------------------------------------------
    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.handle.set_guest_debug(control, debugreg)

    @property
    def stats(self) -> dict[str, Any]:
        """ioctl counts by name plus what the cache did and avoided."""
        return {"ioctls": dict(self.handle.counters), **self.cache.stats.as_dict()}

    def end_setup(self) -> None:
        """Keep the counts so far as ``setup_stats`` (creation's power-on snapshot, the
        guest load): the CLI reports them apart from what the run transfers."""
        self.setup_stats = self.stats

    def close(self) -> None:
        """Close the vCPU. Cached values stay readable; anything needing KVM raises."""
        self._run_view = None            # the page is unmapped below: run() must not touch it
        self._run_words = None
        self.cache.locals.update(self.transport.detach())
        self.handle.close()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} strategy={self.strategy}>"


__all__ = ["Vcpu", "to_mask", "LEVELS"]
