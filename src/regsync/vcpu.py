"""A vCPU as the VMM sees it: the kernel handle, its register cache, ``regs``, run().

``vcpu.regs.rax`` reads through the cache; ``vcpu.run()`` flushes dirty
registers (coalesced, most through the kvm_run page), enters the guest once and
returns a typed exit. Transfers happen on the thread that owns the vCPU (the
one that calls run()); machine.run_on_cpu() brings other threads there.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Iterable

from . import exits
from .arch.x86_64 import CATALOG, KvmTransport, Registers
from .cache import RegisterCache
from .kvm import KvmError
from .kvm import Vcpu as VcpuHandle
from .kvm import structs as ks
from .strategies import make_cache

if TYPE_CHECKING:
    from .cache import CacheStats

LEVELS = CATALOG.levels


def to_mask(what: int | str | Iterable[str]) -> int:
    """A group mask from a mask, a level or group name, or names ("REGS", "FULL")."""
    if isinstance(what, int):
        return what
    names = [what] if isinstance(what, str) else list(what)
    mask = 0
    for n in names:
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
        self.last_exit: exits.Exit | None = None

    # --- the run ---------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """Flush dirty registers, enter the guest once, return the decoded exit."""
        cache = self.cache
        if cache.dirty_mask and self._completion_pending():
            self._complete_pending_io()
        cache.before_run()
        try:
            rc = self.handle.run()
        except KvmError as e:
            if e.errno == errno.EINVAL and self.transport.deferred:
                cache.run_failed()        # raises RegisterWriteError naming the group
            cache.take_back_deferred()
            raise
        cache.after_run()
        if rc < 0:
            self._run_page.immediate_exit = 0
            ex: exits.Exit = exits.INTERRUPTED
        else:
            ex = exits.decode(self._run_page, self._run_addr)
        self.last_exit = ex
        return ex

    def _completion_pending(self) -> bool:
        ex = self.last_exit
        return (isinstance(ex, exits.IoExit) and ex.direction == "in") or \
            (isinstance(ex, exits.MmioExit) and not ex.is_write)

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
            self.handle.run()
        finally:
            self._run_page.immediate_exit = 0
        self.cache.after_run()
        self.last_exit = exits.INTERRUPTED

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

    @property
    def cache_stats(self) -> "CacheStats":
        return self.cache.stats

    def close(self) -> None:
        """Close the vCPU. Cached values stay readable; anything needing KVM raises."""
        self.cache.locals.update(self.transport.detach())
        self.handle.close()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} strategy={self.strategy}>"


__all__ = ["Vcpu", "to_mask", "LEVELS", "ks"]
