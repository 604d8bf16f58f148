"""Moves x86_64 register groups between the register cache and KVM.

The cache knows groups and registers; this module knows ioctls. It turns the
catalog's field locators into accessors on the kernel structs (conversions
happen only here), fetches a group into its local copy, and writes dirty
groups back in FLUSH_ORDER with as few transfers as KVM allows.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from typing import Any, Callable

from ...kvm import KvmError, MsrError, Vcpu
from ...kvm import structs as s
from ...regdefs import Catalog, FlushError, Group, Register
from .catalog import CATALOG, SEG_ATTR_FIELDS, msr_index, xsave_component_bit

Getter = Callable[[Any], int]
Setter = Callable[[Any, int], None]

# The order dirty groups reach the kernel (Firecracker's restore order, checked
# against api.rst), with the reason each stands where it does:
FLUSH_ORDER: tuple[str, ...] = (
    # MP_STATE first: KVM_SET_MP_STATE can latch INIT/SIPI work that the run
    # would otherwise apply on top of the registers written below.
    "MP_STATE",
    # XSAVE/XCRS/DEBUGREGS are checked against the vCPU's CPUID, not against
    # CR4 or EFER, so they may precede the control registers.
    "XSAVE", "XCRS", "DEBUGREGS",
    "REGS",
    # SREGS holds apic_base: the LAPIC page is interpreted in the APIC mode
    # (xAPIC/x2APIC) that apic_base selects, so SREGS goes before LAPIC.
    "SREGS",
    "LAPIC",
    # MSRs after LAPIC: a TSC_DEADLINE write only arms the timer when the LVT
    # timer is already in TSC-deadline mode. Both MSR groups go in one
    # KVM_SET_MSRS, TSC before TSC_DEADLINE (the deadline is relative to it).
    "MSRS", "MSRS_TIME",
    # Events last: SET_SREGS/SET_LAPIC may queue or drop pending events.
    "EVENTS",
)
# Within the single KVM_SET_MSRS, these indices go last, in this order.
MSRS_LAST = (0x10, 0x3B, 0x6E0)  # TSC, TSC_ADJUST, TSC_DEADLINE

# Riding the kvm_run page. REGS, SREGS and EVENTS queued in kvm_dirty_regs are
# applied by KVM_RUN itself (arch/x86/kvm/x86.c sync_regs: regs, then sregs, then
# events), i.e. after every group written by ioctl in the same flush. That keeps
# FLUSH_ORDER wherever the group has no "must come before" on a later group:
# * REGS: nothing later depends on the GPRs, rip or rflags: always rides.
# * EVENTS: last in FLUSH_ORDER anyway: always rides.
# * SREGS: apic_base selects how KVM_SET_LAPIC reads the page (xAPIC/x2APIC) and
#   which MSRs exist (x2APIC MSRs 0x800-0x8ff): when LAPIC is written in the same
#   flush, or MSRs together with an edited apic_base, SREGS goes by ioctl first.
MUST_PRECEDE: dict[str, tuple[str, ...]] = {"SREGS": ("LAPIC",)}
SREGS_BEFORE_MSRS_WHEN_EDITED = "apic_base"

# How an edit of each LAPIC register reaches the kernel. KVM takes only the whole
# page (KVM_SET_LAPIC -> kvm_apic_set_state, arch/x86/kvm/lapic.c): it loads the
# registers raw, then re-derives its own state (apic_update_lvtt,
# apic_manage_nmi_watchdog, update_divide_count, __start_apic_timer(apic,
# APIC_TMCCT), kvm_recalculate_apic_map, apic_update_ppr). A guest's write of a
# register (kvm_lapic_reg_write) can do more. Per register, what an edit does:
#   "kernel"  KVM's re-derivation makes the load act as the guest's write would
#   "plain"   state with no side effect on a write: loaded as is
#   "overlay" regsync adds the side effect to the page before KVM_SET_LAPIC
#   "refuse"  no load can act as the guest's write: refused at assignment
#             (a snapshot restore puts the whole page back instead)
LAPIC_EDITS: dict[str, tuple[str, str]] = {
    "id": ("kernel", "kvm_apic_set_state rebuilds the APIC map from it (in x2APIC mode "
                     "KVM refuses an ID other than the vCPU's: RegisterWriteError)"),
    "version": ("refuse", "read-only; KVM recomputes it (kvm_apic_set_version)"),
    "apr": ("refuse", "read-only to the guest"),
    "ppr": ("refuse", "read-only, derived from TPR and ISR (apic_update_ppr); edit cr8"),
    "ldr": ("kernel", "the APIC map is rebuilt from it; in x2APIC mode KVM derives LDR "
                      "from the ID and the edit is refused at flush"),
    "dfr": ("kernel", "as ldr; does not exist in x2APIC mode (refused at flush)"),
    "svr": ("overlay", "a guest write with bit 8 (software enable) clear masks every LVT "
                       "(kvm_lapic_reg_write, APIC_SPIV), whether the APIC was enabled or "
                       "not; the load alone does not, so the mask bits are set in the page"),
    "isr": ("refuse", "read-only to the guest: a load would retire interrupts no EOI did"),
    "tmr": ("refuse", "read-only to the guest"),
    "irr": ("refuse", "read-only to the guest: a load would post interrupts no device sent"),
    "esr": ("refuse", "a guest write latches the internal error bits; a load sets any bits"),
    "icr": ("refuse", "a guest write sends an IPI; KVM_SET_LAPIC only stores the value"),
    "icr2": ("plain", "the IPI destination: no side effect until icr is written"),
    "lvt_timer": ("kernel", "apic_update_lvtt applies a mode change as a guest write does "
                            "(TMICT cleared when switching to or from TSC-deadline); loaded "
                            "masked while the APIC is software-disabled (APIC_LVTT)"),
    "lvt_thermal": ("overlay", "loaded masked while the APIC is software-disabled, as "
                             "kvm_lapic_reg_write (APIC_LVT*) masks a guest write then"),
    "lvt_pmc": ("overlay", "loaded masked while the APIC is software-disabled, as "
                             "kvm_lapic_reg_write (APIC_LVT*) masks a guest write then"),
    "lvt_lint0": ("kernel", "apic_manage_nmi_watchdog runs on the loaded value; loaded "
                            "masked while the APIC is software-disabled (APIC_LVT0)"),
    "lvt_lint1": ("overlay", "loaded masked while the APIC is software-disabled, as "
                             "kvm_lapic_reg_write (APIC_LVT*) masks a guest write then"),
    "lvt_error": ("overlay", "loaded masked while the APIC is software-disabled, as "
                             "kvm_lapic_reg_write (APIC_LVT*) masks a guest write then"),
    "tmict": ("overlay", "a guest write loads TMCCT with TMICT and starts the count; the "
                         "load restarts from the page's TMCCT, so TMCCT is set to TMICT"),
    "tmcct": ("refuse", "read-only: write lapic.tmict to (re)start the count"),
    "tdcr": ("kernel", "update_divide_count, then the count goes on from the fresh TMCCT "
                       "at the new rate, as after a guest write"),
}
# Not in the catalog on purpose: EOI (0xB0) is an action, not state; TPR (0x80)
# is the lapic.tpr alias of cr8 (see catalog.ALIASES).
_TMICT, _TMCCT, _SVR, _SVR_ENABLE = 0x380, 0x390, 0xF0, 1 << 8
_LVT_OFFSETS = (0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370)   # CMCI, timer .. error
_LVT_MASKED = 1 << 16
_X2APIC_ENABLE = 1 << 10           # IA32_APIC_BASE.EXTD


def write_refusals(catalog: Catalog) -> dict[Register, str]:
    """Registers an edit cannot reach the kernel as the guest's write would: why."""
    return {r: f"{r.name} cannot be edited: {LAPIC_EDITS[r.name[6:]][1]}"
            for r in catalog.registers_of("LAPIC") if LAPIC_EDITS[r.name[6:]][0] == "refuse"}

_SYNC_FLAG = {"REGS": s.KVM_SYNC_X86_REGS, "SREGS": s.KVM_SYNC_X86_SREGS,
              "EVENTS": s.KVM_SYNC_X86_EVENTS}
# KVM_SET_VCPU_EVENTS only touches these fields when their valid-flag is set:
# the kernel changes them on its own, so they are written only when dirty.
_EVENT_VALID_FLAG = {"nmi.pending": s.KVM_VCPUEVENT_VALID_NMI_PENDING,
                     "sipi_vector": s.KVM_VCPUEVENT_VALID_SIPI_VECTOR,
                     "interrupt.shadow": s.KVM_VCPUEVENT_VALID_SHADOW}
_DIRTY_REGS_AT = s.kvm_run.kvm_dirty_regs.offset
assert max(_SYNC_FLAG.values()) < 0x100
XSTATE_BV_OFFSET = 512   # XSAVE header: which components the area holds
XSTATE_X87_SSE = 0b11


class GroupUnavailable(KeyError):
    """The group does not exist on this VM (e.g. LAPIC without an in-kernel irqchip)."""

    def __str__(self) -> str:
        return str(self.args[0])


# --- accessors built from field locators ---------------------------------------------
def _segattr_get(seg: str) -> Getter:
    # Spelled out (SEG_ATTR_FIELDS order): a dump reads eight of these per stop.
    assert [f for f, _, _ in SEG_ATTR_FIELDS] == ["type", "s", "dpl", "present", "avl", "l",
                                                  "db", "g", "unusable"]
    def get(l: Any) -> int:
        sg = getattr(l, seg)
        return (sg.type | sg.s << 4 | sg.dpl << 5 | sg.present << 7 | sg.avl << 12
                | sg.l << 13 | sg.db << 14 | sg.g << 15 | sg.unusable << 16)
    return get


def _segattr_set(seg: str) -> Setter:
    def set_(l: Any, v: int) -> None:
        sg = getattr(l, seg)
        for f, sh, w in SEG_ATTR_FIELDS:
            setattr(sg, f, (v >> sh) & ((1 << w) - 1))
    return set_


def _bytes_get(off: int, n: int) -> Getter:
    return lambda l: int.from_bytes(l[off:off + n], "little")


def _bytes_set(off: int, n: int) -> Setter:
    def set_(l: Any, v: int) -> None:
        l[off:off + n] = v.to_bytes(n, "little")
    return set_


def _lapic256_get(off: int) -> Getter:
    return lambda l: sum(int.from_bytes(l[off + 0x10 * i:off + 0x10 * i + 4], "little") << (32 * i)
                         for i in range(8))


def _lapic256_set(off: int) -> Setter:
    def set_(l: Any, v: int) -> None:
        for i in range(8):
            l[off + 0x10 * i:off + 0x10 * i + 4] = ((v >> (32 * i)) & 0xFFFFFFFF).to_bytes(4, "little")
    return set_


def _xcr_get(n: int) -> Getter:
    def get(l: s.kvm_xcrs) -> int:
        for i in range(l.nr_xcrs):
            if l.xcrs[i].xcr == n:
                return l.xcrs[i].value
        return 0
    return get


def _xcr_set(n: int) -> Setter:
    def set_(l: s.kvm_xcrs, v: int) -> None:
        for i in range(l.nr_xcrs):
            if l.xcrs[i].xcr == n:
                l.xcrs[i].value = v
                return
        l.xcrs[l.nr_xcrs].xcr, l.xcrs[l.nr_xcrs].value = n, v
        l.nr_xcrs += 1
    return set_


def _attr_set(path: str) -> Setter:
    *parents, last = path.split(".")
    if not parents:
        def set_plain(l: Any, v: int) -> None:
            setattr(l, last, v)
        return set_plain
    def set_(l: Any, v: int) -> None:
        for p in parents:
            l = getattr(l, p)
        setattr(l, last, v)
    return set_


# The struct of each group's local copy that has plain fields (see accessors()).
_PLAIN_FIELD_STRUCT: dict[str, type[ctypes.Structure]] = {
    "REGS": s.kvm_regs, "SREGS": s.kvm_sregs, "DEBUGREGS": s.kvm_debugregs,
    "MP_STATE": s.kvm_mp_state}


@functools.lru_cache(maxsize=None)
def accessors(reg: Register) -> tuple[Getter, Setter]:
    """(get, set) on the group's local copy for one catalog register (built once)."""
    kind, _, rest = reg.field.partition(":")
    if not rest:                                   # plain struct field: rax, cr0, dr7, mp_state
        field = getattr(_PLAIN_FIELD_STRUCT.get(reg.group), kind, None)
        if field is not None:
            # The ctypes field descriptor's own __set__: C, no Python frame (the hot
            # path's edit, regs.rax = ...). The local copy is always of this type.
            return operator.attrgetter(kind), field.__set__
        return operator.attrgetter(kind), _attr_set(kind)
    if kind == "seg":
        seg, f = rest.split(":")
        return operator.attrgetter(f"{seg}.{f}"), _attr_set(f"{seg}.{f}")
    if kind == "segattr":
        return _segattr_get(rest), _segattr_set(rest)
    if kind == "dt":
        t, f = rest.split(":")
        return operator.attrgetter(f"{t}.{f}"), _attr_set(f"{t}.{f}")
    if kind == "ev":
        return operator.attrgetter(rest), _attr_set(rest)
    if kind == "xsave":
        off, n = int(rest), (reg.width + 7) // 8
        return _bytes_get(off, n), _bytes_set(off, n)
    if kind == "xcr":
        return _xcr_get(int(rest)), _xcr_set(int(rest))
    if kind == "db":
        i = int(rest)
        return (lambda l: l.db[i]), (lambda l, v: l.db.__setitem__(i, v))
    if kind == "lapic":
        off = int(rest, 16)
        if reg.width == 256:
            return _lapic256_get(off), _lapic256_set(off)
        return _bytes_get(off, 4), _bytes_set(off, 4)
    if kind == "msr":
        idx = int(rest, 16)
        def get_msr(l: dict[int, int]) -> int:
            try:
                return l[idx]
            except KeyError:
                raise KeyError(f"MSR {idx:#x} ({reg.name}) is not supported by this host") from None
        return get_msr, (lambda l, v: l.__setitem__(idx, v))
    raise ValueError(f"{reg.name}: unknown field locator {reg.field!r}")


class KvmTransport:
    """Group transfers for one vCPU. ``use_sync_regs`` picks the kvm_run path."""

    catalog: Catalog = CATALOG

    def __init__(self, vcpu: Vcpu, *, use_sync_regs: bool, supported_msrs: set[int],
                 has_lapic: bool = True) -> None:
        self.vcpu = vcpu
        # Without an in-kernel irqchip there is no LAPIC for KVM to hand over.
        self.unavailable = {} if has_lapic else {
            "LAPIC": "no in-kernel LAPIC (the machine was made with irqchip=False)"}
        self.available_mask = self.catalog.all_mask & ~sum(
            self.catalog.group_by_name[n].bit for n in self.unavailable)
        self.run = vcpu.run_page
        self.use_sync_regs = use_sync_regs
        g = self.catalog.group_by_name
        self.sync_mask = sum(g[n].bit for n in _SYNC_FLAG) if use_sync_regs else 0
        if use_sync_regs:
            # Ask KVM to hand these back after every exit.
            self.run.kvm_valid_regs = sum(_SYNC_FLAG.values())
            sync = self.run.s.regs
            self._locals: dict[str, Any] = {"REGS": sync.regs, "SREGS": sync.sregs,
                                            "EVENTS": sync.events}
        else:
            self._locals = {"REGS": s.kvm_regs(), "SREGS": s.kvm_sregs(),
                            "EVENTS": s.kvm_vcpu_events()}
        self._locals |= {"XSAVE": bytearray(vcpu.xsave2_size or 4096), "XCRS": s.kvm_xcrs(),
                         "DEBUGREGS": s.kvm_debugregs(), "LAPIC": bytearray(s.KVM_APIC_REG_SIZE),
                         "MP_STATE": s.kvm_mp_state(), "MSRS": {}, "MSRS_TIME": {}}
        # The MSRs each MSR group fetches: the catalog's that KVM saves, plus extras.
        self.msr_batches: dict[str, list[int]] = {
            name: [msr_index(r) for r in self.catalog.registers_of(name)
                   if msr_index(r) in supported_msrs]
            for name in ("MSRS", "MSRS_TIME")}
        # One transfer each way per whole-struct group (MP_STATE and MSRs are special).
        self._struct_get: dict[str, Callable[[Any], Any]] = {
            "REGS": vcpu.get_regs, "SREGS": vcpu.get_sregs, "EVENTS": vcpu.get_vcpu_events,
            "XSAVE": vcpu.get_xsave, "XCRS": vcpu.get_xcrs, "DEBUGREGS": vcpu.get_debugregs,
            "LAPIC": vcpu.get_lapic}
        self._struct_set: dict[str, Callable[[Any], None]] = {
            "REGS": vcpu.set_regs, "SREGS": vcpu.set_sregs, "EVENTS": vcpu.set_vcpu_events,
            "XSAVE": vcpu.set_xsave, "XCRS": vcpu.set_xcrs, "DEBUGREGS": vcpu.set_debugregs}
        self.deferred = 0  # group bits written through kvm_dirty_regs, applied by the next KVM_RUN
        self.refused_msrs: dict[int, str] = {}   # index -> why KVM_GET_MSRS stopped there
        self._page = memoryview((ctypes.c_uint8 * ctypes.sizeof(s.kvm_run)).from_address(
            ctypes.addressof(self.run))).cast("B")
        # REGS and SREGS need nothing but their kvm_dirty_regs bit once held (EVENTS
        # needs its valid-flags computed): the cache's no-syscall fast path.
        self.fast_defer_mask = (g["REGS"].bit | g["SREGS"].bit) if use_sync_regs else 0
        # kvm_dirty_regs flags for every combination of sync group bits.
        sync_bits = [(g[n].bit, f) for n, f in _SYNC_FLAG.items()]
        self._flag_pairs = sync_bits
        self._flags_for = {m: sum(f for b, f in sync_bits if m & b)
                           for m in range(self.catalog.all_mask + 1)
                           if not m & ~sum(b for b, _ in sync_bits)}

    def local(self, group: Group) -> Any:
        return self._locals[group.name]

    accessors = staticmethod(accessors)

    def add_register(self, reg: Register) -> None:
        """Let the MSRS batch carry an MSR the catalog does not name."""
        index = msr_index(reg)
        if index not in self.msr_batches[reg.group]:
            self.msr_batches[reg.group].append(index)

    # --- fetch -----------------------------------------------------------------------
    def fetch(self, group: Group) -> None:
        """Refresh the group's local copy from KVM (one ioctl)."""
        name, local, v = group.name, self._locals[group.name], self.vcpu
        if name in self.unavailable:
            raise GroupUnavailable(f"{name}: {self.unavailable[name]}")
        if name in self._struct_get:
            self._struct_get[name](local)
        elif name == "MP_STATE":
            local.mp_state = v.get_mp_state()
        elif name in self.msr_batches:
            local.clear()
            local.update(self._get_msrs(self.msr_batches[name]))
        else:  # pragma: no cover - catalog and transport out of step
            raise KeyError(name)

    def _get_msrs(self, batch: list[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS over the batch. KVM stops at the first MSR it will not read and
        returns how many it did: keep those, drop the refusing MSR from the batch for
        good (it then reads as unsupported) and go on with the rest."""
        got: list[tuple[int, int]] = []
        todo = list(batch)
        while todo:
            try:
                got += zip(todo, self.vcpu.get_msrs(todo))
                break
            except MsrError as e:
                n = e.processed
                got += zip(todo[:n], e.read)
                batch.remove(e.index)
                self.refused_msrs[e.index] = str(e)
                todo = todo[n + 1:]
        return got

    def probe(self, reg: Register) -> int:
        """Read one MSR outside the catalog; raises MsrError naming it if KVM refuses."""
        return self.vcpu.get_msrs([msr_index(reg)])[0]

    # --- store -----------------------------------------------------------------------
    def store(self, dirty: dict[str, dict[Register, int]], held: int, allow_defer: bool,
              set_fn: Callable[[Register, Any, int], None]) -> list[tuple[str, bool]]:
        """Write the dirty groups in FLUSH_ORDER. Returns (group, fetched first) pairs.

        ``held``: groups whose local copy is current apart from dirty overlays;
        others are fetched fresh first and the dirty values overlaid (set_fn).
        Volatile whole-struct groups are always fetched fresh: see _store_lapic.
        Sync groups ride kvm_dirty_regs (applied by the next KVM_RUN, after every
        ioctl here) when allow_defer and nothing later must follow them: see
        MUST_PRECEDE beside FLUSH_ORDER.
        """
        names = [n for n in FLUSH_ORDER if n in dirty]
        rides = self._rides(dirty) if allow_defer and self.use_sync_regs else set()
        written: list[tuple[str, bool]] = []
        msr_regs: list[Register] = []
        msr_groups: list[str] = []
        for i, name in enumerate(names):
            group = self.catalog.group_by_name[name]
            regs = dirty[name]
            local = self._locals[name]
            try:
                if name in ("MSRS", "MSRS_TIME"):
                    # Coalesced: one KVM_SET_MSRS after both groups are gathered.
                    msr_regs += regs
                    msr_groups.append(name)
                    nxt = names[i + 1] if i + 1 < len(names) else None
                    if nxt in ("MSRS", "MSRS_TIME"):
                        continue
                    msr_regs.sort(key=lambda r: MSRS_LAST.index(msr_index(r)) + 1
                                  if msr_index(r) in MSRS_LAST else 0)
                    msr_items = [(msr_index(r), dirty[r.group][r]) for r in msr_regs]
                    self.vcpu.set_msrs(msr_items)
                    written += [(g, False) for g in msr_groups]
                    continue
                fetched = False
                if name == "MP_STATE":
                    self.vcpu.set_mp_state(local.mp_state)
                elif name == "LAPIC":
                    self._store_lapic(regs, set_fn, held)
                    fetched = True
                else:
                    if not held & group.bit:
                        self.fetch(group)
                        fetched = True
                        for r, val in regs.items():
                            set_fn(r, local, val)
                    if name == "EVENTS":
                        local.flags = sum(_EVENT_VALID_FLAG.get(r.name, 0) for r in regs)
                    if name == "XSAVE":
                        # A component whose XSTATE_BV bit is clear is loaded in its init
                        # state (all zeros past x87/SSE): mark a component when an edit
                        # gives it a non-zero value. A zero needs no bit, so writing back
                        # zeros (reset, restore) never names a component the vCPU lacks,
                        # which KVM_SET_XSAVE refuses with EINVAL.
                        bv = int.from_bytes(local[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little")
                        bv |= XSTATE_X87_SSE
                        for r, val in regs.items():
                            if val:
                                bv |= 1 << xsave_component_bit(int(r.field[6:]))
                        local[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8] = bv.to_bytes(8, "little")
                    if name in rides:
                        self.run.kvm_dirty_regs |= _SYNC_FLAG[name]
                        self.deferred |= group.bit
                    else:
                        self._set_by_ioctl(name, local)
            except MsrError as e:
                # KVM_SET_MSRS stops at the MSR it refuses: those before it happened.
                done = msr_regs[:e.processed]
                raise FlushError("+".join(msr_groups), [msr_regs[e.processed].name], e,
                                 [n for n, _ in written], done) from None
            except (KvmError, ValueError) as e:
                failed = msr_groups if name in ("MSRS", "MSRS_TIME") else [name]
                regs_named = [r.name for g in failed for r in dirty[g]]
                raise FlushError("+".join(failed), regs_named, e,
                                 [n for n, _ in written]) from None
            written.append((name, fetched))
        return written

    def _rides(self, dirty: dict[str, dict[Register, int]]) -> set[str]:
        """The dirty sync groups that may go through kvm_dirty_regs in this flush."""
        out = set()
        for name in _SYNC_FLAG:
            if name not in dirty:
                continue
            if any(later in dirty for later in MUST_PRECEDE.get(name, ())):
                continue
            if name == "SREGS" and ("MSRS" in dirty or "MSRS_TIME" in dirty) and any(
                    r.name == SREGS_BEFORE_MSRS_WHEN_EDITED for r in dirty[name]):
                continue
            out.add(name)
        return out

    def _set_by_ioctl(self, name: str, local: Any) -> None:
        self._struct_set[name](local)

    def _store_lapic(self, regs: dict[Register, int], set_fn: Callable[[Register, Any, int], None],
                     held: int) -> None:
        """KVM only takes the whole LAPIC page, and IRR/ISR/the timer move while the
        vCPU is stopped: fetch it fresh, overlay only the dirty registers and the
        side effects LAPIC_EDITS lists, write.

        Window: an interrupt the in-kernel LAPIC accepts between the GET and the
        SET is overwritten by the SET. It is two back-to-back ioctls on the vCPU's
        own thread, so only a device interrupt or IPI from another thread arriving
        in those microseconds can hit it; QEMU's whole-state write-back has the
        same window widened to the time since the last fetch.
        """
        names = {r.name for r in regs}
        if names & {"lapic.ldr", "lapic.dfr"} and self._x2apic(held):
            raise ValueError(f"{' and '.join(sorted(names & {'lapic.ldr', 'lapic.dfr'}))}: "
                             "read-only in x2APIC mode (KVM derives LDR from the APIC ID)")
        local = self._locals["LAPIC"]
        self.vcpu.get_lapic(local)
        for r, val in regs.items():
            set_fn(r, local, val)
        if "lapic.tmict" in names:
            local[_TMCCT:_TMCCT + 4] = local[_TMICT:_TMICT + 4]
        if not int.from_bytes(local[_SVR:_SVR + 4], "little") & _SVR_ENABLE:
            # Software-disabled once the edits are in (LAPIC_EDITS, svr and lvt_*): an
            # SVR write masks every LVT, an LVT write is masked. Either order of those
            # guest writes ends with the same page.
            edited = {int(r.field[6:], 16) for r in regs}
            for off in _LVT_OFFSETS:
                if "lapic.svr" in names or off in edited:
                    lvt = int.from_bytes(local[off:off + 4], "little") | _LVT_MASKED
                    local[off:off + 4] = lvt.to_bytes(4, "little")
        self.vcpu.set_lapic(local)

    def _x2apic(self, held: int) -> bool:
        sregs = self.catalog.group_by_name["SREGS"]
        if not held & sregs.bit:
            self.fetch(sregs)
        return bool(self._locals["SREGS"].apic_base & _X2APIC_ENABLE)

    def defer(self, mask: int) -> None:
        """Queue held sync groups (values already in the kvm_run page) for the next run."""
        # The flags fit in kvm_dirty_regs' low byte: one byte of the page, not a
        # ctypes read-modify-write of the u64 field (this runs at every GPR edit).
        self._page[_DIRTY_REGS_AT] |= self._flags_for[mask]
        self.deferred |= mask

    def unconsumed(self, mask: int) -> int:
        """The deferred groups in mask whose kvm_dirty_regs bit KVM has not cleared."""
        flags = self.run.kvm_dirty_regs
        if not flags:               # the usual case: KVM applied everything
            return 0
        return sum(bit for bit, flag in self._flag_pairs if mask & bit and flags & flag)

    def detach(self) -> dict[str, Any]:
        """Before the kvm_run page is unmapped: move sync groups to private copies."""
        if self.use_sync_regs:
            for name, cls in (("REGS", s.kvm_regs), ("SREGS", s.kvm_sregs),
                              ("EVENTS", s.kvm_vcpu_events)):
                self._locals[name] = cls.from_buffer_copy(self._locals[name])
            self.use_sync_regs = False
            self.sync_mask = self.fast_defer_mask = 0
        # cancel_deferred() and defer() write kvm_dirty_regs: after the unmap that is
        # a private page (a flush after close fails by ioctl, it must not crash).
        self.run = s.kvm_run()
        self._page = memoryview((ctypes.c_uint8 * ctypes.sizeof(s.kvm_run)).from_address(
            ctypes.addressof(self.run))).cast("B")
        return self._locals

    def cancel_deferred(self) -> int:
        """Forget sync groups queued in kvm_dirty_regs (discard, or a failed run)."""
        bits, self.deferred = self.deferred, 0
        self.run.kvm_dirty_regs = 0
        return bits

    # --- whole groups as the kernel's bytes (snapshots) -------------------------------
    def export(self, group: Group) -> bytes:
        """The group's local copy as the kernel's bytes. The MSR groups become an
        array of kvm_msr_entry (index, reserved, data), as KVM_SET_MSRS takes them."""
        local = self._locals[group.name]
        if isinstance(local, dict):
            return b"".join(s.kvm_msr_entry(i, 0, v).to_bytes() for i, v in local.items())
        if isinstance(local, bytearray):
            return bytes(local)
        return bytes(local.to_bytes())

    def put(self, group: Group, data: bytes, defer: bool = False) -> bool:
        """Replace the whole group in KVM with ``data`` (from export). Returns True when
        it was queued in kvm_dirty_regs (``defer``, a sync group) rather than written.

        Sizes may drift between kernels: short data is padded with zeros, extra
        bytes dropped (shared/STYLE.md 8). EVENTS is written with every valid-flag
        the saved state carries plus NMI_PENDING, SIPI_VECTOR and SHADOW, which a
        restore sets whole (x86.c kvm_vcpu_ioctl_x86_set_vcpu_events: a field whose
        flag is clear is left as the kernel has it). MSRs go in one KVM_SET_MSRS
        with TSC, TSC_ADJUST, TSC_DEADLINE last; a short count raises naming the MSR.
        """
        name = group.name
        if name in self.unavailable:
            raise GroupUnavailable(f"{name}: {self.unavailable[name]}")
        local, v = self._locals[name], self.vcpu
        if isinstance(local, dict):
            entry = ctypes.sizeof(s.kvm_msr_entry)
            items = [(e.index, e.data) for e in (s.kvm_msr_entry.from_bytes(data[o:o + entry])
                                                  for o in range(0, len(data), entry))]
            items.sort(key=lambda it: MSRS_LAST.index(it[0]) + 1 if it[0] in MSRS_LAST else 0)
            v.set_msrs(items)
            local.clear()
            local.update(items)
            return False
        if isinstance(local, bytearray):
            local[:] = data[:len(local)].ljust(len(local), b"\0")
            if name == "LAPIC":
                v.set_lapic(local)
            else:
                v.set_xsave(local)
            return False
        size = ctypes.sizeof(local)
        ctypes.memmove(ctypes.addressof(local), bytes(data[:size]).ljust(size, b"\0"), size)
        if name == "EVENTS":
            local.flags |= (s.KVM_VCPUEVENT_VALID_NMI_PENDING | s.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                            | s.KVM_VCPUEVENT_VALID_SHADOW)
        if defer and name in _SYNC_FLAG and self.use_sync_regs:
            self.defer(group.bit)
            return True
        if name == "MP_STATE":
            v.set_mp_state(local.mp_state)
        else:
            self._set_by_ioctl(name, local)
        return False
