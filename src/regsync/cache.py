"""The register cache: lazy, dirty-tracked vCPU state.

Theory of operation
-------------------
KVM owns a vCPU's registers; a VMM keeps a local copy. Crossing into the kernel
costs a syscall, and part of the kernel's state moves on its own while the vCPU
sits outside KVM_RUN (LAPIC timer/IRR, MP_STATE on INIT/SIPI, pending NMIs,
the TSC). The cache keeps the copy honest with two sets of bits, as Linux's
kvm_cache_regs.h does:

* ``held`` (per group): the local copy of the group is current as of its fetch,
  apart from registers that are dirty.
* ``dirty`` (per register, kept per group): changed locally, not yet in KVM.

Rules (docs/DESIGN.md):
1. A read returns the newest value: a dirty register, or a non-volatile register
   of a held group, answers locally; otherwise its group is fetched and the dirty
   registers of that group are laid back over the copy (a fetch never overwrites
   an edit).
2. A write makes the register dirty (and its value local). Reads never dirty.
   A register whose edit cannot reach the kernel as the guest's own write would
   (transport: LAPIC_EDITS) is refused at assignment, before anything is queued.
3. Before the vCPU runs, dirty registers reach KVM, coalesced per group in the
   transport's order; nothing that is not dirty is written. Groups KVM_RUN can
   apply itself (kvm_dirty_regs) ride the kvm_run page wherever the order allows.
4. Volatile whole-struct groups are fetched fresh at flush and overlaid (the
   transport documents the remaining window beside the code).
5. synchronize(mask) fetches ``mask & ~held`` keeping every edit, plus every
   volatile group in the mask; asking again for non-volatile groups already held
   is a no-op. This is the seed's synchronize_state with its data-integrity bug
   fixed: widening the level never loses local edits.
6. After KVM_RUN, held = the groups KVM handed back in the kvm_run page.
7. A flush with nothing dirty, or a read of a held non-volatile register, costs
   no syscall.
8. If KVM refuses a write, the vCPU does not run, RegisterWriteError names the
   group and registers, and the dirty values stay (correct them or discard()).
   Of a partly processed batch (KVM_SET_MSRS stops at the first MSR it refuses)
   the registers the kernel took are clean, the refused one and the rest dirty.
9. Every transfer and every mutation of the cache (read miss, write, flush, run,
   synchronize, discard, invalidate) happens on the owner thread (``owner``, the
   vCPU thread while it runs; any thread when there is none); others use
   run_on_cpu. WrongThreadError otherwise.

Volatile values
---------------
A register marked volatile in the catalog (LAPIC IRR/ISR/TMCCT/PPR/ESR,
mp_state, pending NMI and SIPI vector, the TSC MSRs) changes in the kernel while
this vCPU is stopped: other vCPUs send IPIs, the in-kernel irqchip and timers
deliver, INIT/SIPI arrive. A fetched copy of it is a sample, trusted for the
call that fetched it and no longer: every read() of a volatile register fetches
its group, and every synchronize()/dump() fetches the volatile groups in its mask
again (a dump is one consistent sample). Non-volatile registers of the same group
still answer from the copy.

Fetches with side effects
-------------------------
Groups whose fetch has side effects (KVM_GET_MP_STATE processes a pending
INIT/SIPI) list the groups they make stale. Before such a fetch the cache writes
the dirty registers of those groups (by ioctl, as the run would have), then
fetches and drops ``held`` for them; synchronize() fetches them again, so a dump
after a SIPI shows the kernel's registers. An edit the side effect then
overwrote is reported, never hidden: the edited groups are read back just before
and just after the fetch, and each edited register whose value changed becomes a
Contradiction in ``stats.contradicted`` and an EditContradicted warning.
"""

from __future__ import annotations

import warnings
from threading import get_ident
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .regdefs import Catalog, FlushError, Group, Register


class RegisterWriteError(Exception):
    """KVM refused a write. The dirty values stay in the cache."""

    def __init__(self, group: str, registers: list[str], cause: Exception) -> None:
        self.group, self.registers, self.cause = group, registers, cause
        super().__init__(f"KVM refused the write of group {group} "
                         f"(dirty: {', '.join(registers)}): {cause}; the values stay in the "
                         f"cache: correct them or discard()")


class EditContradicted(UserWarning):
    """A fetch with side effects (KVM_GET_MP_STATE processing INIT/SIPI) changed a
    register the caller had edited: the edit reached the kernel, then the kernel
    overwrote it, as hardware would. Reported, never hidden (stats.contradicted)."""


class WrongThreadError(RuntimeError):
    """A kernel transfer was attempted off the vCPU's own thread (use run_on_cpu)."""


class Transport(Protocol):
    catalog: Catalog
    sync_mask: int
    deferred: int
    available_mask: int     # groups this vCPU has (LAPIC needs an in-kernel irqchip)
    fast_defer_mask: int    # sync groups whose held local copy can simply be queued

    def defer(self, mask: int) -> None: ...
    def unconsumed(self, mask: int) -> int: ...

    def local(self, group: Group) -> Any: ...
    def fetch(self, group: Group) -> None: ...
    def store(self, dirty: dict[str, dict[Register, int]], held: int, allow_defer: bool,
              set_fn: Callable[[Register, Any, int], None]) -> list[tuple[str, bool]]: ...
    def cancel_deferred(self) -> int: ...
    def probe(self, reg: Register) -> int: ...
    def accessors(self, reg: Register) -> tuple[Callable[[Any], int], Callable[[Any, int], None]]: ...
    def add_register(self, reg: Register) -> None: ...


@dataclass
class CacheStats:
    """What the cache did, and what it saved."""
    fetches: Counter[str] = field(default_factory=Counter)       # group -> kernel fetches
    writes: Counter[str] = field(default_factory=Counter)        # group -> kernel writes
    deferred_writes: Counter[str] = field(default_factory=Counter)  # via kvm_dirty_regs
    local_reads: int = 0          # reads answered without a syscall
    fetches_avoided: int = 0      # synchronize() requests already satisfied
    writes_avoided: int = 0       # fetched groups not written back because unchanged
    exits: int = 0
    # Edits a fetch with side effects overwrote (INIT/SIPI processed by
    # KVM_GET_MP_STATE): reported here and as an EditContradicted warning.
    contradicted: list["Contradiction"] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"exits": self.exits, "fetches": dict(self.fetches), "writes": dict(self.writes),
                "deferred_writes": dict(self.deferred_writes), "local_reads": self.local_reads,
                "fetches_avoided": self.fetches_avoided, "writes_avoided": self.writes_avoided,
                "contradicted": [c.as_dict() for c in self.contradicted]}


@dataclass(frozen=True)
class Contradiction:
    """An edit that reached the kernel and was then overwritten by a side effect."""
    register: str
    written: int          # the edit, as the kernel held it after the write
    now: int              # the kernel's value after the side effect
    cause: str            # the fetch that had the side effect

    def as_dict(self) -> dict[str, Any]:
        return {"register": self.register, "written": self.written, "now": self.now,
                "cause": self.cause}


def _submasks(mask: int) -> list[int]:
    """Every non-empty mask made of bits of ``mask``."""
    out, m = [], mask
    while m:
        out.append(m)
        m = (m - 1) & mask
    return out


class RegisterCache:
    """Per-vCPU cache over a transport. See the module docstring for the rules."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.catalog = transport.catalog
        self.groups = self.catalog.groups
        self.held = 0
        self.dirty_mask = 0
        self.dirty: dict[str, dict[Register, int]] = {g.name: {} for g in self.groups}
        self.locals: dict[str, Any] = {g.name: transport.local(g) for g in self.groups}
        self._get: dict[Register, Callable[[Any], int]] = {}
        self._set: dict[Register, Callable[[Any, int], None]] = {}
        self._stats = CacheStats()
        self.owner: int | None = None      # thread ident allowed to transfer; None = any
        self._fetched_since_run = 0
        # Groups handed to KVM through kvm_dirty_regs, applied by the next KVM_RUN.
        # Their dirty dicts are kept until then (a refused run must not lose them).
        self.in_flight = 0
        # The dirty dicts keep their identity (cleared, never replaced), so they can
        # also be reached by group bit on the hot path.
        self._dirty_of_bit = {g.bit: self.dirty[g.name] for g in self.groups}
        # Writes KVM applied from kvm_dirty_regs, counted by mask of groups and folded
        # into stats when read. Every combination of the groups that can ride (sync
        # groups) is a key from the start: the hot path's count is then a plain dict
        # increment (an exact dict: CPython specializes it, not a defaultdict).
        riders = sum(g.bit for g in self.groups if g.sync)
        self._deferred_tally: dict[int, int] = {m: 0 for m in _submasks(riders)}
        self.exits = 0                     # KVM_RUN returns seen (stats.exits)
        # Strategies that override write() opt out of regfile's inlined write.
        self.plain_writes = type(self).write is RegisterCache.write
        # Catalog registers plus any added by index (MSRs), per group.
        self.registers_by_group: dict[str, list[Register]] = {g.name: [] for g in self.groups}
        for reg in self.catalog.registers:
            self._get[reg], self._set[reg] = transport.accessors(reg)
            self.registers_by_group[reg.group].append(reg)
        # Groups holding a register the kernel changes while the vCPU is stopped:
        # synchronize() fetches them every time (see "Volatile values" above).
        self.volatile_mask = sum(g.bit for g in self.groups
                                 if any(r.volatile for r in self.registers_by_group[g.name]))
        self._stale_of = {g.bit: self.catalog.group_mask(*g.invalidates) for g in self.groups}

    @property
    def stats(self) -> CacheStats:
        """The counters, with the writes KVM applied from kvm_dirty_regs folded in."""
        self._stats.exits = self.exits
        tally = self._deferred_tally
        for mask, n in tally.items():
            if n:
                for g in self.catalog.groups_in(mask):
                    self._stats.writes[g.name] += n
                    self._stats.deferred_writes[g.name] += n
                tally[mask] = 0
        return self._stats

    # --- accessors ----------------------------------------------------------------

    def add_register(self, reg: Register) -> None:
        """A register outside the catalog (an MSR by index), added once the kernel has
        shown it can read it: a refusal raises naming it and leaves nothing behind."""
        self._check_thread()
        value = self.transport.probe(reg)           # raises before anything is added
        self._get[reg], self._set[reg] = self.transport.accessors(reg)
        self.registers_by_group[reg.group].append(reg)
        self.transport.add_register(reg)
        self._set[reg](self.locals[reg.group], value)

    def _check_thread(self) -> None:
        # Rule 9, and no torn reads of a kvm_run page the vCPU is running on.
        if self.owner is not None and get_ident() != self.owner:
            raise WrongThreadError("a running vCPU's registers are accessed on its own thread: "
                                   "use machine.run_on_cpu(vcpu, fn)")

    def read(self, reg: Register) -> int:
        self._check_thread()
        g = self.catalog.group_by_name[reg.group]
        if reg in self.dirty[g.name] or (self.held & g.bit and not reg.volatile):
            self._stats.local_reads += 1
        else:
            self._fetch(g)
        return self._get[reg](self.locals[g.name])

    def write(self, reg: Register, value: int) -> None:
        self._check_thread()
        if not isinstance(value, int):
            raise TypeError(f"{reg.name}: register values are ints, got {type(value).__name__}")
        if value < 0:
            if value < -(1 << (reg.width - 1)):
                raise ValueError(f"{reg.name}: {value} does not fit in {reg.width} bits")
            value &= reg.mask
        elif value > reg.mask:
            raise ValueError(f"{reg.name}: {value:#x} does not fit in {reg.width} bits")
        g = self.catalog.group_by_name[reg.group]
        self._set[reg](self.locals[g.name], value)
        self.dirty[g.name][reg] = value
        self.dirty_mask |= g.bit

    # --- fetch ----------------------------------------------------------------------
    def _fetch(self, g: Group) -> None:
        self._check_thread()
        stale = self._stale_of[g.bit]
        # Edits of the groups a side effect may overwrite: they reach the kernel
        # first, as the run would have written them (writes queued in kvm_dirty_regs
        # would land after this fetch, and a fetch into the kvm_run page would
        # overwrite them, so those are taken back and written too).
        pending = (self.dirty_mask | self.in_flight) & stale & self.transport.available_mask
        edited = [r for grp in self.catalog.groups_in(pending) for r in self.dirty[grp.name]]
        if (stale | g.bit) & self.in_flight:
            self._undefer(ioctl=False)
        if stale & self.dirty_mask:
            self.flush(stale, allow_defer=False)
        before = self._kernel_view(pending, edited) if edited else {}
        self.transport.fetch(g)
        local = self.locals[g.name]
        for reg, val in self.dirty[g.name].items():
            self._set[reg](local, val)
        self.held = (self.held & ~stale) | g.bit
        self._fetched_since_run |= g.bit
        self.stats.fetches[g.name] += 1
        if before:
            self._report_contradictions(g, pending, before)

    def _kernel_view(self, mask: int, regs: list[Register]) -> dict[Register, int]:
        """The kernel's values of just-written edits (it may normalise one, e.g. rflags
        bit 1), fetched so that a side effect's change can be told from that."""
        for grp in self.catalog.groups_in(mask):
            self.transport.fetch(grp)
            self.stats.fetches[grp.name] += 1
        return {r: self._get[r](self.locals[r.group]) for r in regs}

    def _report_contradictions(self, cause: Group, mask: int,
                               before: dict[Register, int]) -> None:
        """Fetch the edited groups again after the side effect; an edit it changed is
        reported (stats.contradicted and an EditContradicted warning), never hidden."""
        for grp in self.catalog.groups_in(mask):
            self.transport.fetch(grp)
            self.stats.fetches[grp.name] += 1
            self.held |= grp.bit
        changed = [Contradiction(r.name, v, now, f"KVM_GET_{cause.name} (INIT/SIPI processed)")
                   for r, v in before.items() if (now := self._get[r](self.locals[r.group])) != v]
        if changed:
            self.stats.contradicted.extend(changed)
            what = ", ".join(f"{c.register} {c.written:#x} -> {c.now:#x}" for c in changed)
            warnings.warn(EditContradicted(
                f"a pending INIT/SIPI processed by KVM_GET_{cause.name} overwrote edited "
                f"registers after they reached the kernel: {what}"), stacklevel=4)

    def synchronize(self, mask: int) -> None:
        """Make every register in ``mask`` (groups or a level) held or dirty.

        Volatile groups are fetched every time (their copy is a sample, see the
        module docstring); a group a side-effect fetch made stale is fetched again.
        """
        self._check_thread()
        mask &= self.transport.available_mask
        todo = mask & (~self.held | self.volatile_mask)
        if not todo:
            self.stats.fetches_avoided += 1
            return
        # Groups with fetch side effects first, so later fetches see their result.
        done = 0
        for g in sorted(self.catalog.groups_in(todo), key=lambda g: not g.invalidates):
            if not self.held & g.bit or (g.bit & self.volatile_mask and not done & g.bit):
                self._fetch(g)
                done |= g.bit
        # A side effect (INIT/SIPI) made groups stale that were held before: again.
        for g in self.catalog.groups_in(mask & ~self.held):
            self._fetch(g)

    # --- flush ----------------------------------------------------------------------
    def flush(self, mask: int = -1, *, allow_defer: bool = True) -> None:
        """Write dirty registers (of groups in mask) to KVM. Zero syscalls when clean."""
        if self.owner is not None and get_ident() != self.owner:
            self._check_thread()
        todo = self.dirty_mask & mask
        if not todo:
            return
        t = self.transport
        if allow_defer and not todo & ~(t.fast_defer_mask & self.held):
            # The common case (GPR edits at an exit): the values are already in the
            # kvm_run page; the next KVM_RUN applies them. No syscall, no ordering.
            t.defer(todo)
            self.in_flight |= todo
            self.dirty_mask &= ~todo
            return
        if self.in_flight:
            # Writes queued in kvm_dirty_regs by an earlier flush rejoin this one, so
            # FLUSH_ORDER holds across calls and a re-fetch cannot overwrite them.
            t.cancel_deferred()
            self.dirty_mask |= self.in_flight
            todo |= self.in_flight
            self.in_flight = 0
        dirty = {g.name: self.dirty[g.name] for g in self.groups if g.bit & todo}
        try:
            written = t.store(dirty, self.held, allow_defer, self._overlay)
        except FlushError as e:
            # Rule 8: the vCPU does not run, nothing is lost. Groups written by ioctl
            # are clean; the registers of the refused group that did reach the kernel
            # (a short KVM_SET_MSRS) too; groups queued in kvm_dirty_regs are taken
            # back and stay dirty with the rest.
            queued = t.cancel_deferred()
            for name in e.written:
                if not queued & self.catalog.group_by_name[name].bit:
                    self._clean(name)
            for reg in e.done:
                self.dirty[reg.group].pop(reg, None)
                self.stats.writes[reg.group] += 1
                if not self.dirty[reg.group]:
                    self.dirty_mask &= ~self.catalog.group_by_name[reg.group].bit
            raise RegisterWriteError(e.group, e.registers, e.cause) from None
        for name, fetched in written:
            if fetched:
                self.stats.fetches[name] += 1
            bit = self.catalog.group_by_name[name].bit
            if t.deferred & bit:
                self.in_flight |= bit
                self.dirty_mask &= ~bit
            else:
                self._clean(name)
            self.held |= bit

    def _overlay(self, reg: Register, local: Any, value: int) -> None:
        self._set[reg](local, value)

    def _clean(self, name: str) -> None:
        bit = self.catalog.group_by_name[name].bit
        if self.dirty[name]:
            self.stats.writes[name] += 1
        self.dirty[name].clear()
        self.dirty_mask &= ~bit

    def _undefer(self, ioctl: bool) -> None:
        """Take back writes queued in kvm_dirty_regs; optionally write them by ioctl."""
        self.transport.cancel_deferred()
        for g in self.catalog.groups_in(self.in_flight):
            # A refused KVM_RUN may have stored the kernel's registers over the page.
            local = self.locals[g.name]
            for reg, val in self.dirty[g.name].items():
                self._set[reg](local, val)
        self.dirty_mask |= self.in_flight
        self.in_flight = 0
        if ioctl:
            self.flush(allow_defer=False)

    # --- around KVM_RUN -------------------------------------------------------------
    def before_run(self) -> None:
        if self.dirty_mask:
            self.flush()
        if self._fetched_since_run:
            self.stats.writes_avoided += (self._fetched_since_run & ~self.in_flight).bit_count()

    def after_run(self, unapplied: int = 0) -> None:
        """KVM_RUN returned (an exit or EINTR): only what KVM handed back is held.

        ``unapplied``: queued groups the run did not apply (the caller asks the
        transport only when the kvm_run page still shows queued bits). KVM clears a
        kvm_dirty_regs bit as it applies the group; an AP waiting for SIPI returns
        before applying any, then stores its own registers over the page: those
        edits stay dirty and are laid back on top below.
        """
        t = self.transport
        if unapplied:
            t.cancel_deferred()
            self.dirty_mask |= unapplied
        t.deferred = 0
        self.held = t.sync_mask
        self._fetched_since_run = 0
        self.exits += 1
        flight = self.in_flight
        if flight:
            done = flight & ~self.dirty_mask
            if done:
                # KVM applied the queued writes at entry: they are in the kernel now.
                # (Tallied by mask here, per group in stats: a dict op per exit, not three.)
                self._deferred_tally[done] += 1
                one = self._dirty_of_bit.get(done)      # the usual case: one group (REGS)
                if one is not None:
                    one.clear()
                else:
                    self.applied(done)
            self.in_flight = 0
        if self.dirty_mask & self.held:
            # KVM rewrote the kvm_run page under edits made before a run that did
            # not flush them (the I/O completion run): lay the edits back on top.
            for g in self.catalog.groups_in(self.dirty_mask & self.held):
                local = self.locals[g.name]
                for reg, val in self.dirty[g.name].items():
                    self._set[reg](local, val)

    def applied(self, mask: int) -> None:
        """The queued groups in mask reached the kernel: their edits are done."""
        while mask:
            bit = mask & -mask
            mask ^= bit
            self._dirty_of_bit[bit].clear()

    def take_back_deferred(self) -> None:
        """Writes queued in kvm_dirty_regs become plain dirty registers again (a KVM_RUN
        failed for another reason, or a run must not apply them)."""
        if self.in_flight or self.transport.deferred:
            self._undefer(ioctl=False)

    def run_failed(self) -> None:
        """KVM_RUN refused the queued sync writes: find the group by writing each by ioctl.

        Raises RegisterWriteError naming it; the values stay dirty.
        """
        self.held &= ~self.transport.sync_mask
        self._undefer(ioctl=True)

    def discard(self, mask: int = -1) -> None:
        """Drop local edits (of groups in mask): the kernel's values apply again."""
        self._check_thread()
        self.take_back_deferred()
        for g in self.groups:
            if g.bit & mask & self.dirty_mask:
                self.dirty[g.name].clear()
                self.dirty_mask &= ~g.bit
                self.held &= ~g.bit   # the local copy still carries the edits

    def invalidate(self, mask: int = -1) -> None:
        """Forget what is held (the kernel state changed behind the cache, e.g. a reset)."""
        self._check_thread()
        self.held &= ~mask

    # --- write intent: w1s/w1c registers (Register.write_intent) --------------------
    def set_bits(self, reg: Register, mask: int) -> None:
        """Set the bits of ``mask`` in the kernel's register, keeping every other bit
        as the kernel has it now (a write-1-to-set transfer, e.g. KVM_REG_PPC_OR_TSR)."""
        self._update_bits(reg, mask, 0)

    def clear_bits(self, reg: Register, mask: int) -> None:
        """Clear the bits of ``mask`` (a write-1-to-clear transfer, KVM_REG_PPC_CLEAR_TSR)."""
        self._update_bits(reg, 0, mask)

    def _update_bits(self, reg: Register, set_mask: int, clear_mask: int) -> None:
        # Sent at once, not queued: the kernel applies the bits to its own current
        # value, so nothing is gained by waiting and nothing can go stale. The local
        # copy is then unknown (the kernel may have set other bits): the group is no
        # longer held, and the next read fetches it.
        self._check_thread()
        if not reg.write_intent:
            raise ValueError(f"{reg.name} is written by value (assign it); set_bits/"
                             f"clear_bits are for write-1-to-set/clear registers")
        for m in (set_mask, clear_mask):
            if not isinstance(m, int) or not 0 <= m <= reg.mask:
                raise ValueError(f"{reg.name}: bit mask {m!r} does not fit in {reg.width} bits")
        update = getattr(self.transport, "update_bits", None)
        if update is None:
            raise ValueError(f"{reg.name}: this backend has no write-1-to-set/clear transfers")
        update(reg, set_mask, clear_mask)
        self.held &= ~self.catalog.group_by_name[reg.group].bit
        self._stats.writes[reg.group] += 1

    def dirty_registers(self) -> list[str]:
        return [r.name for d in self.dirty.values() for r in d]


    # --- whole groups, for snapshots (snapshot/ is the one caller) --------------------
    def export(self, mask: int) -> dict[str, bytes]:
        """Every available group in ``mask`` as the kernel's bytes, local edits included.

        Fetches what is not held (synchronize: side-effect groups first); writes
        nothing back, so taking a snapshot never disturbs the vCPU.
        """
        mask &= self.transport.available_mask
        self.synchronize(mask)
        return {g.name: self.transport.export(g) for g in self.catalog.groups_in(mask)}

    def put(self, name: str, data: bytes, *, defer: bool = False) -> None:
        """Replace a whole group in the kernel with ``data`` (bytes from export): a restore.

        Edits of the group are dropped; afterwards the group is held and clean.
        Written now by ioctl, or -- ``defer`` and a kvm_run sync group -- queued in
        kvm_dirty_regs for the next KVM_RUN (no syscall). The caller owns the order
        across groups. A refusal raises the transport's error naming the ioctl and
        leaves the group not held.
        """
        self._check_thread()
        g = self.catalog.group_by_name[name]
        if self.in_flight & g.bit and not defer:
            self._undefer(ioctl=False)      # a queued write of it must not land after this one
        self.dirty[name].clear()
        self.dirty_mask &= ~g.bit
        try:
            deferred = self.transport.put(g, data, defer)
        except BaseException:
            self.held &= ~g.bit
            raise
        if deferred:
            self.in_flight |= g.bit         # counted by after_run when KVM applies it
        else:
            self._stats.writes[name] += 1
        self.held |= g.bit
