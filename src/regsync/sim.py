"""A simulated ONE_REG-only vCPU backend: the seed's PPC BookE target, no /dev/kvm.

Real KVM cannot show on demand what the cache must survive: a kernel timer that
fires between two transfers, a reset request that a fetch applies, a register the
kernel refuses. This module drives the same RegisterCache over a fake kernel
whose every transfer is counted, so tests assert exact counts and replay race
interleavings deterministically.

The architecture, "ppc-booke-sim", is the seed thread's PPC BookE target:

* Transfers are per register, as KVM_GET_ONE_REG / KVM_SET_ONE_REG move them
  (Documentation/virt/kvm/api.rst, "KVM_SET_ONE_REG": one id, one value): no
  whole-group structs. A cache group is the set of registers one *batch* of
  ONE_REG calls moves (``SimKernel.gets``/``sets`` count batches per group,
  ``one_reg_gets``/``one_reg_sets`` count the calls). A write sends only the
  dirty registers, so nothing untouched is ever written back.
* A kernel-side watchdog (arch/powerpc/kvm/booke.c, kvmppc_watchdog_func): each
  timeout sets TSR[ENW], the next TSR[WIS], the next is the final expiry (an exit
  to userspace when TCR[WRC] asks for a reset). The kernel does this while
  userspace is outside the run. DEC counts down on its own, sets TSR[DIS] at zero
  and reloads from DECAR when TCR[ARE] is set.
* TSR has the kernel's write-1-to-set and write-1-to-clear ids,
  KVM_REG_PPC_OR_TSR and KVM_REG_PPC_CLEAR_TSR (arch/powerpc/include/uapi/asm/
  kvm.h; booke.c kvm_vcpu_ioctl_set_one_reg: kvmppc_set_tsr_bits /
  kvmppc_clr_tsr_bits), beside the plain KVM_REG_PPC_TSR. The catalog flags TSR
  ``write_intent``: regsync writes it only through set_bits/clear_bits. QEMU does
  the same on real BookE (target/ppc/kvm.c kvmppc_or_tsr_bits /
  kvmppc_clear_tsr_bits; TSR has no ONE_REG id in target/ppc/cpu_init.c, so its
  put never writes it).

Groups (the seed's vocabulary; RUNTIME = GPRS+SPRS, RESET adds EVENTS and
MPSTATE, FULL adds TIMER):

  GPRS     r0..r7, pc, msr. The one concession to x86: handed back after every
           run like KVM_CAP_SYNC_REGS and writable through the run page like
           kvm_dirty_regs (BookE has neither), so the cache's deferred-write path
           is testable here. msr refuses its reserved bit (EINVAL).
  SPRS     srr0, srr1, dear, esr (+ sprg0/1, known to the kernel only).
  TIMER    tsr (write-intent), tcr, dec, decar: tsr and dec move on their own.
  EVENTS   pending_irq (the kernel raises it), irq_vector.
  MPSTATE  mp_state. Reading it first applies a pending reset request (as
           KVM_GET_MP_STATE processes INIT/SIPI): GPRS and SPRS are reset, so the
           group declares ``invalidates=("GPRS", "SPRS")``.

A run is one deterministic guest step: srr0 = pc, pc += 4, r0 += 1, r2 = r1
(srr0 is not handed back, so a cache that kept SPRS held across a run would go
stale).
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
    Group("TIMER", 1 << 2, "BookE timer: tsr (write-1-to-set/clear), tcr, dec, decar; "
          "tsr and dec move on their own", volatile=True),
    Group("EVENTS", 1 << 3, "pending interrupts; only edited registers are written",
          volatile=True),
    Group("MPSTATE", 1 << 4, "run state; a fetch applies a pending reset request",
          volatile=True, invalidates=("GPRS", "SPRS")),
)
# (name, group, volatile, write_intent)
_SPEC: tuple[tuple[str, str, bool, bool], ...] = (
    *((f"r{i}", "GPRS", False, False) for i in range(8)), ("pc", "GPRS", False, False),
    ("msr", "GPRS", False, False),
    ("srr0", "SPRS", False, False), ("srr1", "SPRS", False, False),
    ("dear", "SPRS", False, False), ("esr", "SPRS", False, False),
    ("tsr", "TIMER", True, True), ("tcr", "TIMER", False, False), ("dec", "TIMER", True, False),
    ("decar", "TIMER", False, False),
    ("pending_irq", "EVENTS", True, False), ("irq_vector", "EVENTS", False, False),
    ("mp_state", "MPSTATE", True, False),
)
_BITS = {g.name: g.bit for g in GROUPS}
CATALOG = Catalog(
    "ppc-booke-sim", GROUPS,
    tuple(Register(n, 32, g, n, volatile=v, write_intent=w) for n, g, v, w in _SPEC),
    {"RUNTIME": _BITS["GPRS"] | _BITS["SPRS"],
     "RESET": _BITS["GPRS"] | _BITS["SPRS"] | _BITS["EVENTS"] | _BITS["MPSTATE"],
     "FULL": sum(_BITS.values())})

# Dirty groups reach the kernel in this order: MPSTATE first (setting it can
# latch reset work that the run applies on top of what follows), EVENTS last
# (as KVM_SET_VCPU_EVENTS goes last on x86: earlier writes may queue events).
FLUSH_ORDER = ("MPSTATE", "GPRS", "SPRS", "TIMER", "EVENTS")

# ONE_REG ids (arch/powerpc/include/uapi/asm/kvm.h): KVM_REG_PPC | KVM_REG_SIZE_U32 | n.
# The timer ids are the kernel's; the others are this simulation's own numbers.
KVM_REG_PPC, KVM_REG_SIZE_U32 = 0x1000_0000_0000_0000, 0x0020_0000_0000_0000
ONE_REG_ID: dict[str, int] = {
    **{n: KVM_REG_PPC | KVM_REG_SIZE_U32 | (0x1000 + i) for i, (n, *_) in enumerate(_SPEC)},
    "sprg0": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x2000,
    "sprg1": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x2001,
    "or_tsr": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x87,     # KVM_REG_PPC_OR_TSR (write-only)
    "clear_tsr": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x88,  # KVM_REG_PPC_CLEAR_TSR (write-only)
    "tcr": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x89,        # KVM_REG_PPC_TCR
    "tsr": KVM_REG_PPC | KVM_REG_SIZE_U32 | 0x8A,        # KVM_REG_PPC_TSR
}
# The write-1-to-set / write-1-to-clear ids of each write-intent register.
INTENT_IDS = {"tsr": ("or_tsr", "clear_tsr")}

MSR_RESERVED = 0x8000_0000   # the kernel refuses an msr with this bit set (EINVAL)
# BookE TSR and TCR bits (Power ISA 2.06 Book III-E; booke.c uses TSR_ENW, TSR_WIS,
# TSR_DIS, TCR_WRC_MASK, TCR_ARE).
TSR_ENW = 0x8000_0000        # enable next watchdog: the first timeout sets it
TSR_WIS = 0x4000_0000        # watchdog interrupt status: the second timeout sets it
TSR_WRS = 0x3000_0000        # watchdog reset status: copied from TCR[WRC] at the final expiry
TSR_DIS = 0x0800_0000        # decrementer interrupt status
TCR_WRC = 0x3000_0000        # watchdog reset control: non-zero = the final expiry resets
TCR_ARE = 0x0040_0000        # auto-reload DEC from DECAR
RUNNABLE, HALTED, RESET_PENDING = 0, 1, 2
RESET_GPRS = {**{f"r{i}": 0 for i in range(8)}, "pc": 0xFFFF_FFFC, "msr": 0}
EXTRA_SPRS = ("sprg0", "sprg1")  # known to the kernel, not in the catalog (add_register)


class SimKernel:
    """The kernel side of one vCPU: authoritative values, counted ONE_REG transfers."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {r.name: 0 for r in CATALOG.registers}
        self.values |= {f"r{i}": 0x100 + i for i in range(8)}
        self.values |= {"pc": 0x1000, "msr": 0x0002_9000, "tcr": 0x0C00_0000,
                        "dec": 1_000_000, "decar": 1_000_000, "irq_vector": 0x20,
                        "sprg0": 0, "sprg1": 0}
        self.layout: dict[str, list[str]] = {g.name: [r.name for r in CATALOG.registers_of(g.name)]
                                             for g in GROUPS}
        self.layout["SPRS"] += EXTRA_SPRS
        self.gets: Counter[str] = Counter()        # group -> fetch batches
        self.sets: Counter[str] = Counter()        # group -> write batches
        self.one_reg_gets: Counter[str] = Counter()  # register -> KVM_GET_ONE_REG calls
        self.one_reg_sets: Counter[str] = Counter()  # id name -> KVM_SET_ONE_REG calls
        self.sync_applied: Counter[str] = Counter()  # groups taken from the run page by run()
        self.runs = 0
        self.log: list[tuple[str, str]] = []       # ("get"|"set"|"run", group), in order
        self.reset_requested = False
        self.watchdog_exits = 0                    # final expiries that asked for a reset
        # The kvm_run page: sync groups' copies and the kvm_dirty_regs set.
        self.run_page: dict[str, dict[str, int]] = {"GPRS": {}}
        self.dirty_regs: set[str] = set()
        self.waiting_for_sipi = False
        # Called after every batch as hook(op, group), and after every single
        # ONE_REG call as one_reg_hook(op, id name): lets a test change kernel
        # state between two transfers (a deterministic race).
        self.hook: Callable[[str, str], None] | None = None
        self.one_reg_hook: Callable[[str, str], None] | None = None

    @property
    def one_reg_calls(self) -> int:
        """Every KVM_GET_ONE_REG and KVM_SET_ONE_REG so far (the syscall count)."""
        return sum(self.one_reg_gets.values()) + sum(self.one_reg_sets.values())

    # --- the ONE_REG interface -------------------------------------------------------
    def _check(self, group: str, values: dict[str, int], op: str) -> None:
        for name in values:
            if name not in self.layout[group]:
                raise KvmError(op, "sim vcpu", errno.ENOENT, f"no register {name} in {group}")
        if values.get("msr", 0) & MSR_RESERVED:
            raise KvmError(op, "sim vcpu", errno.EINVAL, "msr: reserved bit set")

    def get_one_reg(self, name: str) -> int:
        """KVM_GET_ONE_REG. Reading mp_state first applies a pending reset request."""
        if name not in self.values:
            raise KvmError("KVM_GET_ONE_REG", "sim vcpu", errno.ENOENT, f"no readable id {name}")
        if name == "mp_state":
            self._apply_reset()
        self.one_reg_gets[name] += 1
        value = self.values[name]
        if self.one_reg_hook:
            self.one_reg_hook("get", name)
        return value

    def set_one_reg(self, name: str, value: int) -> None:
        """KVM_SET_ONE_REG: a value, or bits for the OR/CLEAR ids (booke.c semantics)."""
        self.one_reg_sets[name] += 1
        if name == "or_tsr":
            self.values["tsr"] |= value          # kvmppc_set_tsr_bits
        elif name == "clear_tsr":
            self.values["tsr"] &= ~value         # kvmppc_clr_tsr_bits
        else:
            self.values[name] = value
        if self.one_reg_hook:
            self.one_reg_hook("set", name)

    # --- batches: how the transport moves a cache group -------------------------------
    def get(self, group: str, names: list[str]) -> dict[str, int]:
        """One fetch batch: a KVM_GET_ONE_REG per name."""
        self._check(group, dict.fromkeys(names, 0), f"SIM_GET_{group}")
        if group == "MPSTATE":
            self._apply_reset()
        self.gets[group] += 1
        self.log.append(("get", group))
        out = {n: self.get_one_reg(n) for n in names}
        if self.hook:
            self.hook("get", group)
        return out

    def set(self, group: str, values: dict[str, int]) -> None:
        """One write batch: a KVM_SET_ONE_REG per value. Every value is checked
        before any is applied, so a refused batch changes nothing (KvmError): the
        cache reports refusals per group."""
        self._check(group, values, f"SIM_SET_{group}")
        self.sets[group] += 1
        self.log.append(("set", group))
        for name, value in values.items():
            self.set_one_reg(name, value)
        if self.hook:
            self.hook("set", group)

    # --- what the kernel does on its own -----------------------------------------------
    def tick(self, irq: int = 0) -> None:
        """A generic kernel-side change while the vCPU is stopped: WIS, DEC, an IRQ."""
        self.values["tsr"] |= TSR_WIS
        self.values["dec"] = (self.values["dec"] - 1000) & 0xFFFF_FFFF
        self.values["pending_irq"] |= 1 << irq

    def watchdog_timeout(self) -> None:
        """One watchdog period elapsed (booke.c kvmppc_watchdog_func): ENW if clear,
        else WIS if clear, else the final expiry -- an exit to userspace (counted in
        ``watchdog_exits``, TSR[WRS] = TCR[WRC]) when TCR[WRC] asks for a reset."""
        tsr = self.values["tsr"]
        if not tsr & TSR_ENW:
            self.values["tsr"] = tsr | TSR_ENW
        elif not tsr & TSR_WIS:
            self.values["tsr"] = tsr | TSR_WIS
            self.values["pending_irq"] |= 1        # KVM_REQ_PENDING_TIMER
        elif self.values["tcr"] & TCR_WRC:
            self.watchdog_exits += 1
            self.values["tsr"] = (tsr & ~TSR_WRS) | (self.values["tcr"] & TCR_WRC)

    def decrement(self, n: int) -> None:
        """DEC counts down by n; at zero TSR[DIS] is set and DEC reloads from DECAR
        if TCR[ARE], else stays at zero."""
        dec = self.values["dec"]
        if dec > n:
            self.values["dec"] = dec - n
            return
        self.values["tsr"] |= TSR_DIS
        self.values["dec"] = self.values["decar"] if self.values["tcr"] & TCR_ARE else 0

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

    def probe(self, reg: Register) -> int:
        """Read one register the catalog does not name (refused -> the kernel's error)."""
        return self.kernel.get(reg.group, [reg.field])[reg.field]

    def probe(self, reg: Register) -> int:
        """One KVM_GET_ONE_REG of a register outside the catalog (ENOENT if unknown)."""
        if reg.field not in self.kernel.layout[reg.group]:
            raise KvmError("KVM_GET_ONE_REG", "sim vcpu", errno.ENOENT,
                           f"no register {reg.field} in {reg.group}")
        return self.kernel.get_one_reg(reg.field)

    def fetch(self, group: Group) -> None:
        """Refresh the group's local copy (one counted transfer), in place."""
        self._locals[group.name].update(self.kernel.get(group.name, self.names[group.name]))

    def store(self, dirty: dict[str, dict[Register, int]], held: int, allow_defer: bool,
              set_fn: Callable[[Register, Any, int], None]) -> list[tuple[str, bool]]:
        """Write dirty groups in FLUSH_ORDER; returns (group, fetched first) pairs.

        ONE_REG: only the dirty registers are sent, one KVM_SET_ONE_REG each, so a
        write never carries a stale copy of a register the kernel moves (no
        fetch-fresh-and-overlay window, unlike whole-struct KVM_SET_LAPIC). The
        cache holds every group it wrote, so a group not held is fetched first to
        make the local copy complete (that costs ONE_REG gets, never a write).
        GPRS is deferred into the run when allowed and no later group goes now.
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
                if name != "MPSTATE" and not held & group.bit:
                    self.fetch(group)
                    fetched = True
                    for r, v in regs.items():
                        set_fn(r, local, v)
                if name == "GPRS" and can_defer and i > last_ioctl:
                    self.kernel.run_page["GPRS"].update({r.field: v for r, v in regs.items()})
                    self.kernel.dirty_regs.add(name)
                    self.deferred |= group.bit
                else:
                    self.kernel.set(name, {r.field: v for r, v in regs.items()})
            except KvmError as e:
                raise FlushError(name, [r.name for r in regs], e,
                                    [n for n, _ in written]) from None
            written.append((name, fetched))
        return written

    def update_bits(self, reg: Register, set_mask: int, clear_mask: int) -> None:
        """A write-intent register's change as the kernel's OR/CLEAR transfers: one
        KVM_SET_ONE_REG per non-empty mask, never the value (RegisterCache.set_bits)."""
        or_id, clear_id = INTENT_IDS[reg.field]
        if clear_mask:
            self.kernel.set_one_reg(clear_id, clear_mask)
        if set_mask:
            self.kernel.set_one_reg(or_id, set_mask)

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
