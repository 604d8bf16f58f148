"""A simulated ONE_REG-style vCPU backend: the register cache without /dev/kvm.

Real KVM cannot show on demand what the cache must survive: a kernel timer that
fires between two ioctls, a reset request that a fetch applies, a register the
kernel refuses. This module drives the same RegisterCache over a fake kernel
whose every transfer is counted, so tests assert exact syscall counts and
replay race interleavings deterministically.

The architecture, "ppc-booke-sim", is modelled on the seed discussion's PPC
BookE watchdog, where a kernel timer changes TSR/TCR behind QEMU's back:

  GPRS     r0..r7, pc, msr. sync: handed back after every run for free (like
           KVM_CAP_SYNC_REGS); a write may be deferred into the run (like
           kvm_dirty_regs). Whole-struct write; msr refuses its reserved bits.
  SPRS     srr0, srr1, dear, esr. Plain whole-struct group.
  TIMER    tsr, tcr, dec. The kernel sets tsr bits and counts dec down on its
           own (tick()): written by fetching fresh and overlaying the dirty
           fields, as KvmTransport does for the LAPIC.
  EVENTS   pending_irq (kernel raises it), irq_vector. Written with
           valid-flags semantics: only dirty registers reach the kernel.
  MPSTATE  mp_state. A fetch first applies a pending reset request (as
           KVM_GET_MP_STATE processes INIT/SIPI): GPRS and SPRS are reset, so
           the group declares ``invalidates=("GPRS", "SPRS")``.

The kernel stores one value per register id (a dict, as a ONE_REG arch does);
the VMM moves a group per transfer, and each transfer counts once. A run is
one deterministic guest step: srr0 = pc, pc += 4, r0 += 1, r2 = r1 (srr0 is
not handed back, so a cache that kept SPRS held across a run would go stale).
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import Any, Callable

from .cache import RegisterCache
from .kvm import KvmError
from .regdefs import Catalog, FlushError, Group, Register
from .regfile import make_register_file
from .strategies import make_cache

GROUPS = (
    Group("GPRS", 1 << 0, "r0..r7, pc, msr; handed back after every run", sync=True),
    Group("SPRS", 1 << 1, "exception SPRs: srr0, srr1, dear, esr"),
    Group("TIMER", 1 << 2, "BookE timer: tsr, tcr, dec; tsr/dec move on their own",
          volatile=True),
    Group("EVENTS", 1 << 3, "pending interrupts; written with valid-flags", volatile=True),
    Group("MPSTATE", 1 << 4, "run state; a fetch applies a pending reset request",
          volatile=True, invalidates=("GPRS", "SPRS")),
)
_SPEC: tuple[tuple[str, str, bool], ...] = (
    *((f"r{i}", "GPRS", False) for i in range(8)), ("pc", "GPRS", False), ("msr", "GPRS", False),
    ("srr0", "SPRS", False), ("srr1", "SPRS", False), ("dear", "SPRS", False),
    ("esr", "SPRS", False),
    ("tsr", "TIMER", True), ("tcr", "TIMER", False), ("dec", "TIMER", True),
    ("pending_irq", "EVENTS", True), ("irq_vector", "EVENTS", False),
    ("mp_state", "MPSTATE", True),
)
_BITS = {g.name: g.bit for g in GROUPS}
CATALOG = Catalog(
    "ppc-booke-sim", GROUPS,
    tuple(Register(n, 32, g, n, volatile=v) for n, g, v in _SPEC),
    {"RUNTIME": _BITS["GPRS"] | _BITS["SPRS"],
     "RESET": _BITS["GPRS"] | _BITS["SPRS"] | _BITS["EVENTS"] | _BITS["MPSTATE"],
     "FULL": sum(_BITS.values())})

# Dirty groups reach the kernel in this order: MPSTATE first (setting it can
# latch reset work that the run applies on top of what follows), EVENTS last
# (as KVM_SET_VCPU_EVENTS goes last on x86: earlier writes may queue events).
FLUSH_ORDER = ("MPSTATE", "GPRS", "SPRS", "TIMER", "EVENTS")

MSR_RESERVED = 0x8000_0000   # the kernel refuses an msr with this bit set (EINVAL)
TSR_WIS = 0x4000_0000        # watchdog interrupt status: tick() sets it
RUNNABLE, HALTED, RESET_PENDING = 0, 1, 2
RESET_GPRS = {**{f"r{i}": 0 for i in range(8)}, "pc": 0xFFFF_FFFC, "msr": 0}
EXTRA_SPRS = ("sprg0", "sprg1")  # known to the kernel, not in the catalog (add_register)


class SimKernel:
    """The kernel side of one vCPU: authoritative values, counted transfers."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {r.name: 0 for r in CATALOG.registers}
        self.values |= {f"r{i}": 0x100 + i for i in range(8)}
        self.values |= {"pc": 0x1000, "msr": 0x0002_9000, "tcr": 0x0C00_0000,
                        "dec": 1_000_000, "irq_vector": 0x20, "sprg0": 0, "sprg1": 0}
        self.layout: dict[str, list[str]] = {g.name: [r.name for r in CATALOG.registers_of(g.name)]
                                             for g in GROUPS}
        self.layout["SPRS"] += EXTRA_SPRS
        self.gets: Counter[str] = Counter()        # group -> fetch transfers
        self.sets: Counter[str] = Counter()        # group -> write transfers
        self.sync_applied: Counter[str] = Counter()  # groups taken from the run page by run()
        self.runs = 0
        self.log: list[tuple[str, str]] = []       # ("get"|"set"|"run", group), in order
        self.reset_requested = False
        # The kvm_run page: sync groups' copies and the kvm_dirty_regs set.
        self.run_page: dict[str, dict[str, int]] = {"GPRS": {}}
        self.dirty_regs: set[str] = set()
        self.waiting_for_sipi = False
        # Called after every transfer as hook(op, group): lets a test change
        # kernel state between two ioctls (a deterministic race).
        self.hook: Callable[[str, str], None] | None = None

    def _check(self, group: str, values: dict[str, int], op: str) -> None:
        for name in values:
            if name not in self.layout[group]:
                raise KvmError(op, "sim vcpu", errno.ENOENT, f"no register {name} in {group}")
        if values.get("msr", 0) & MSR_RESERVED:
            raise KvmError(op, "sim vcpu", errno.EINVAL, "msr: reserved bit set")

    def get(self, group: str, names: list[str]) -> dict[str, int]:
        """One fetch transfer. MPSTATE first applies a pending reset request."""
        self._check(group, dict.fromkeys(names, 0), f"SIM_GET_{group}")
        if group == "MPSTATE":
            self._apply_reset()
        self.gets[group] += 1
        self.log.append(("get", group))
        out = {n: self.values[n] for n in names}
        if self.hook:
            self.hook("get", group)
        return out

    def set(self, group: str, values: dict[str, int]) -> None:
        """One write transfer: all of ``values`` or, if refused, none (KvmError)."""
        self._check(group, values, f"SIM_SET_{group}")
        self.sets[group] += 1
        self.log.append(("set", group))
        self.values.update(values)
        if self.hook:
            self.hook("set", group)

    def tick(self, irq: int = 0) -> None:
        """Kernel-side change while the vCPU is stopped: the watchdog timer fires."""
        self.values["tsr"] |= TSR_WIS
        self.values["dec"] = (self.values["dec"] - 1000) & 0xFFFF_FFFF
        self.values["pending_irq"] |= 1 << irq

    def request_reset(self) -> None:
        """Another agent asks for a reset; the next MPSTATE fetch or run applies it."""
        self.reset_requested = True
        self.values["mp_state"] = RESET_PENDING

    def _apply_reset(self) -> None:
        if self.reset_requested:
            self.reset_requested = False
            self.values |= RESET_GPRS | {"srr0": 0, "srr1": 0, "dear": 0, "esr": 0}
            self.values["mp_state"] = RUNNABLE

    def run(self) -> None:
        """KVM_RUN: take queued sync groups (refusal raises EINVAL, nothing runs),
        apply a pending reset, step the guest once, hand sync groups back.

        With ``waiting_for_sipi`` set it returns at once, like KVM_RUN of an AP
        before its SIPI: nothing queued is applied, but the sync groups are handed
        back (KVM's store_regs), overwriting the page.
        """
        if self.waiting_for_sipi:
            self.run_page["GPRS"].update({n: self.values[n] for n in self.layout["GPRS"]})
            return
        for group in sorted(self.dirty_regs):
            self._check(group, self.run_page[group], "SIM_RUN")
        for group in sorted(self.dirty_regs):
            self.values.update(self.run_page[group])
            self.sync_applied[group] += 1
            self.log.append(("run", group))
        self.dirty_regs.clear()
        self._apply_reset()
        self.runs += 1
        v = self.values
        v["srr0"] = v["pc"]                      # the deterministic guest step; srr0 is
        v["pc"] = (v["pc"] + 4) & 0xFFFF_FFFF   # not handed back, so held must drop
        v["r0"] = (v["r0"] + 1) & 0xFFFF_FFFF
        v["r2"] = v["r1"]
        self.run_page["GPRS"].update({n: v[n] for n in self.layout["GPRS"]})


class SimTransport:
    """Moves sim groups between the cache and SimKernel (the Transport protocol)."""

    catalog: Catalog = CATALOG

    def __init__(self, kernel: SimKernel, use_sync: bool = True) -> None:
        self.kernel = kernel
        self.use_sync = use_sync
        self.sync_mask = _BITS["GPRS"] if use_sync else 0
        self.available_mask = CATALOG.all_mask     # every sim group exists
        self._locals: dict[str, dict[str, int]] = {g.name: {} for g in GROUPS}
        if use_sync:
            self._locals["GPRS"] = kernel.run_page["GPRS"]   # the local copy IS the run page
        self.names = {g.name: [r.name for r in CATALOG.registers_of(g.name)] for g in GROUPS}
        self.deferred = 0
        self.fast_defer_mask = self.sync_mask     # GPRS: held values are the run page

    def unconsumed(self, mask: int) -> int:
        """Deferred groups the last run did not apply (still queued)."""
        return _BITS["GPRS"] & mask if "GPRS" in self.kernel.dirty_regs else 0

    def defer(self, mask: int) -> None:
        """Queue the held sync group for the next run (like kvm_dirty_regs)."""
        self.kernel.dirty_regs.add("GPRS")
        self.deferred |= mask

    def local(self, group: Group) -> dict[str, int]:
        return self._locals[group.name]

    @staticmethod
    def accessors(reg: Register) -> tuple[Callable[[Any], int], Callable[[Any, int], None]]:
        key = reg.field
        def get(local: dict[str, int]) -> int:
            return local[key]
        def set_(local: dict[str, int], value: int) -> None:
            local[key] = value
        return get, set_

    def add_register(self, reg: Register) -> None:
        """Let the group's transfer carry a register id the catalog does not name."""
        if reg.field not in self.names[reg.group]:
            self.names[reg.group].append(reg.field)

    def fetch(self, group: Group) -> None:
        """Refresh the group's local copy (one counted transfer), in place."""
        self._locals[group.name].update(self.kernel.get(group.name, self.names[group.name]))

    def store(self, dirty: dict[str, dict[Register, int]], held: int, allow_defer: bool,
              set_fn: Callable[[Register, Any, int], None]) -> list[tuple[str, bool]]:
        """Write dirty groups in FLUSH_ORDER; returns (group, fetched first) pairs.

        The cache holds every group written, so a group not held is fetched
        first and the dirty values laid over. TIMER is always fetched fresh
        (window: a tick between that fetch and the write is lost, as
        KvmTransport._store_lapic documents); EVENTS sends only its dirty
        registers (valid-flags), so a kernel-raised pending_irq survives. GPRS
        is deferred into the run when allowed and no later group goes by ioctl.
        """
        names = [n for n in FLUSH_ORDER if n in dirty]
        can_defer = allow_defer and self.use_sync
        last_ioctl = max((i for i, n in enumerate(names) if n != "GPRS" or not can_defer),
                         default=-1)
        written: list[tuple[str, bool]] = []
        for i, name in enumerate(names):
            group, regs, local = CATALOG.group_by_name[name], dirty[name], self._locals[name]
            fetched = False
            try:
                if name == "TIMER" or (name != "MPSTATE" and not held & group.bit):
                    self.fetch(group)
                    fetched = True
                    for r, v in regs.items():
                        set_fn(r, local, v)
                if name == "EVENTS":
                    self.kernel.set(name, {r.field: v for r, v in regs.items()})
                elif name == "GPRS" and can_defer and i > last_ioctl:
                    self.kernel.dirty_regs.add(name)
                    self.deferred |= group.bit
                else:
                    self.kernel.set(name, {n: local[n] for n in self.names[name]})
            except KvmError as e:
                raise FlushError(name, [r.name for r in regs], e,
                                    [n for n, _ in written]) from None
            written.append((name, fetched))
        return written

    def cancel_deferred(self) -> int:
        """Forget groups queued for the run (discard, or a refused run)."""
        bits, self.deferred = self.deferred, 0
        self.kernel.dirty_regs.clear()
        return bits

    def detach(self) -> dict[str, Any]:
        """Move the sync group off the run page (the vCPU is closing)."""
        if self.use_sync:
            self._locals["GPRS"] = dict(self._locals["GPRS"])
            self.use_sync, self.sync_mask, self.fast_defer_mask = False, 0, 0
        return dict(self._locals)


SimRegisters = make_register_file(CATALOG, {r: SimTransport.accessors(r)
                                            for r in CATALOG.registers})


class SimVcpu:
    """kernel + transport + cache + ``regs``; run() follows vcpu.Vcpu.run()."""

    def __init__(self, *, strategy: str = "regsync", use_sync: bool = True,
                 kernel: SimKernel | None = None) -> None:
        self.kernel = kernel or SimKernel()
        self.transport = SimTransport(self.kernel, use_sync=use_sync)
        self.cache: RegisterCache = make_cache(strategy, self.transport)
        self.regs = SimRegisters(self.cache)

    def run(self) -> None:
        """Flush dirty registers, step the guest once (RegisterWriteError if refused)."""
        self.cache.before_run()
        try:
            self.kernel.run()
        except KvmError as e:
            if e.errno == errno.EINVAL and self.transport.deferred:
                self.cache.run_failed()     # raises RegisterWriteError naming the group
            raise
        self.cache.after_run(self.transport.unconsumed(self.cache.in_flight))

    def mask(self, *names: str) -> int:
        """A group mask from group or level names ("GPRS", "FULL")."""
        mask = 0
        for n in names:
            mask |= CATALOG.levels[n] if n in CATALOG.levels else _BITS[n]
        return mask
