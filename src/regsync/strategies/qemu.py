"""QEMU's level-based sync, as QEMU did it in 2012, in the seed's patch, and today.

For comparison only. The lists each put writes live in qemu_plans.py, one per
version, with their QEMU sources. What differs between the three is kvm-all.c:

* ``qemu2012`` (QEMU v1.3, kvm-all.c do_kvm_cpu_synchronize_state / kvm_cpu_exec):
  ``kvm_vcpu_dirty`` is one flag. Any synchronize_state, whatever level it asks
  for, gets everything once and sets the flag; before every KVM_RUN the flag
  means kvm_arch_put_registers(KVM_PUT_RUNTIME_STATE). An edit to state outside
  the RUNTIME put (LAPIC, MP_STATE, TSC, kvmclock) never reaches the kernel: the
  seed's lost edit.
* ``qemu2013`` (the seed's patch as posted): ``kvm_vcpu_dirty`` holds a level. A
  synchronize at a wider level than the dirty one puts at the dirty level, then
  gets; the run puts at the dirty level. Nothing is lost any more, but after a
  FULL synchronize every run writes FULL back: TSC, LAPIC, MP_STATE and the NMI
  pending count as they were at the get.
* ``qemu`` (today: accel/kvm/kvm-all.c do_kvm_cpu_synchronize_state and
  kvm_cpu_exec; target/i386/kvm/kvm.c): one flag, ``vcpu_dirty = true`` after any
  get; every run after a get puts RUNTIME, which today includes TSC_ADJUST,
  TSC_DEADLINE (kvm_put_tscdeadline_msr on every put) and, where the host has
  SMM, the events' latched INIT (VALID_SMM).

QEMU's ``env`` always has a value, so reads return the local copy without
asking whether it is current; edits outside what the put writes are overwritten
by the next get, as in QEMU.

On the simulated BookE catalog (sim.py) the put at level L writes the groups of
L, and a write-intent register (TSR) is written back by value at the next put
once edited: the seed thread's SYNC_TIMER_REGS / kvm_sync_extra proposal (Alex
Graf, 4 Jan 2013: "timer regs will be synchronized later because kvm_sync_extra
has SYNC_TIMER_REGS set"). Real QEMU on BookE never did that: TSR has no ONE_REG
id in target/ppc/cpu_init.c and is written only through kvmppc_or_tsr_bits /
kvmppc_clear_tsr_bits (target/ppc/kvm.c), the "manually synchronized" option.
"""

from __future__ import annotations

import functools
from typing import Any

from ..cache import RegisterCache, Transport
from ..regdefs import Register
from . import qemu_plans as P
from .writeback import whole_group


@functools.lru_cache(maxsize=1)
def _host_msrs() -> frozenset[int]:
    """KVM_GET_MSR_INDEX_LIST, read once (QEMU's kvm_get_supported_msrs)."""
    from ..kvm.handles import System
    with System() as kvm:
        return frozenset(kvm.msr_index_list())


class QemuLevelCache(RegisterCache):
    """Common machinery: QEMU's env, get-everything, put-by-plan."""

    version = "qemu"

    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self.vcpu_dirty = 0              # 0, or the level the next put writes
        self.x86 = self.catalog.arch == "x86_64"
        self.plan = (P.X86_PLANS[self.version] if self.x86
                     else P.generic_plan(self.version, self.catalog))
        self._msr_regs: dict[int, Register] = {}
        self._intent = [r for r in self.catalog.registers if r.write_intent]
        if self.x86:
            self._add_plan_msrs()

    # --- QEMU's env: the MSRs its lists name ------------------------------------------
    def _add_plan_msrs(self) -> None:
        from ..arch.x86_64.catalog import MSR_BY_INDEX
        host = _host_msrs()
        wanted = {i for lv in (P.RUNTIME, P.RESET, P.FULL) for i in self.plan.msrs(lv)}
        wanted.add(P.MSR_TSC_DEADLINE)
        for index in sorted(wanted & host):
            reg = MSR_BY_INDEX.get(index)
            if reg is None:
                reg = Register(f"msr_{index:#x}", 64, "MSRS", f"msr:{index:#x}")
                try:
                    self.add_register(reg)
                except Exception:       # listed but not readable on this vCPU: QEMU
                    continue            # would fail its assert; the model skips it
            self._msr_regs[index] = reg

    # --- levels ------------------------------------------------------------------------
    def _level_of(self, mask: int) -> int:
        lv = self.catalog.levels
        if not mask & ~lv["RUNTIME"]:
            return P.RUNTIME
        return P.RESET if not mask & ~lv["RESET"] else P.FULL

    def _get_all(self) -> None:
        """kvm_arch_get_registers: every group, in QEMU's order, into env.

        Afterwards env is "the copy", whatever a later fetch's side effect did: a
        group fetched before KVM_GET_MP_STATE processed an INIT stays as fetched
        (2012's order, REGS before MP_STATE, had exactly that bug), and the put
        writes it without fetching again (QEMU never GETs before a SET)."""
        fetched = 0
        for name in self.plan.get_order:
            g = self.catalog.group_by_name.get(name)
            if g is not None and g.bit & self.transport.available_mask:
                self._fetch(g)
                fetched |= g.bit
        self.held |= fetched

    def synchronize_state(self, level: int) -> None:        # overridden per version
        if not self.vcpu_dirty:
            self._get_all()
            self.vcpu_dirty = P.RUNTIME

    def synchronize(self, mask: int) -> None:
        self.synchronize_state(self._level_of(mask))

    def read(self, reg: Register) -> int:
        self.synchronize_state(self._level_of(self.catalog.group_by_name[reg.group].bit))
        return self._get[reg](self.locals[reg.group])

    def write(self, reg: Register, value: int) -> None:
        self.synchronize_state(self._level_of(self.catalog.group_by_name[reg.group].bit))
        super().write(reg, value)

    def before_run(self) -> None:
        if self.vcpu_dirty:
            self.put(self._run_level())
            self.vcpu_dirty = 0
        self.discard()          # what the put did not write is overwritten by the next get

    def _run_level(self) -> int:
        return P.RUNTIME

    def synchronize_post_reset(self) -> None:
        """kvm_cpu_synchronize_post_reset: put RESET, vcpu_dirty = false."""
        self.put(P.RESET)
        self.vcpu_dirty = 0

    def synchronize_post_init(self) -> None:
        """kvm_cpu_synchronize_post_init: put FULL, vcpu_dirty = false."""
        self.put(P.FULL)
        self.vcpu_dirty = 0

    # --- kvm_arch_put_registers ---------------------------------------------------------
    def put(self, level: int) -> None:
        """Write what QEMU's kvm_arch_put_registers(level) writes, step by step."""
        avail = self.transport.available_mask
        for kind, arg in self.plan.steps[level]:
            if kind == "MSRS":
                self._put_registers([self._msr_regs[i] for i in arg  # type: ignore[attr-defined]
                                     if i in self._msr_regs])
            elif kind == "TSC_DEADLINE":
                if P.MSR_TSC_DEADLINE in self._msr_regs:
                    self._put_registers([self._msr_regs[P.MSR_TSC_DEADLINE]])
            elif kind == "EVENTS" and self.x86:
                self._put_x86_events(arg)  # type: ignore[arg-type]
            elif self.catalog.group_by_name[kind].bit & avail:
                self._put_registers(whole_group(self, kind))
        if not self.x86:
            # The seed's SYNC_TIMER_REGS: an edited write-intent register goes back
            # by value at the next put, whatever the level (see the module docstring).
            edited = [r for r in self._intent if r in self.dirty[r.group]]
            if edited:
                self._put_registers(edited)

    def _put_registers(self, regs: list[Register]) -> None:
        """Mark regs dirty with env's values and write their groups now, by ioctl."""
        mask = 0
        for r in regs:
            try:
                self.dirty[r.group][r] = self._get[r](self.locals[r.group])
            except KeyError:            # an MSR the last get did not return
                continue
            mask |= self.catalog.group_by_name[r.group].bit
        self.dirty_mask |= mask
        if mask:
            self.flush(mask, allow_defer=False)

    def _put_x86_events(self, how: P.EventsPut) -> None:
        """kvm_put_vcpu_events: env's kvm_vcpu_events with QEMU's valid-flags.

        Written here rather than through the transport: QEMU always writes the
        exception/interrupt/NMI-injected fields, and the SMM fields (with
        latched_init) whenever the host has SMM, which regsync's catalog never
        writes (it has no smi.* registers)."""
        from ..kvm import structs as s
        local: Any = self.locals["EVENTS"]
        ev = s.kvm_vcpu_events.from_buffer_copy(local)
        flags = 0
        if how.nmi_pending:
            flags |= s.KVM_VCPUEVENT_VALID_NMI_PENDING
        mp_state = self.locals["MP_STATE"].mp_state
        if how.sipi == "yes" or (how.sipi == "if-sipi-received"
                                 and mp_state == P.KVM_MP_STATE_SIPI_RECEIVED):
            flags |= s.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        if how.smm_if_smbase and P.MSR_SMBASE in _host_msrs():
            flags |= s.KVM_VCPUEVENT_VALID_SMM
        ev.flags = flags
        self.transport.vcpu.set_vcpu_events(ev)  # type: ignore[attr-defined]
        self.dirty["EVENTS"].clear()
        self.dirty_mask &= ~self.catalog.group_by_name["EVENTS"].bit
        self._stats.writes["EVENTS"] += 1


class Qemu2012Cache(QemuLevelCache):
    """QEMU v1.3: one dirty flag; a wider request after a get is ignored."""
    version = "qemu2012"


class Qemu2013Cache(QemuLevelCache):
    """The seed's patch: kvm_vcpu_dirty holds a level (kvm-all.c, as posted)."""
    version = "qemu2013"

    def synchronize_state(self, level: int) -> None:
        if not self.vcpu_dirty:
            self._get_all()
            self.vcpu_dirty = level
        elif level > self.vcpu_dirty:
            self.put(self.vcpu_dirty)
            self._get_all()
            self.vcpu_dirty = level

    def _run_level(self) -> int:
        return self.vcpu_dirty


class QemuCache(QemuLevelCache):
    """QEMU today: vcpu_dirty = true after any get; every run after it puts RUNTIME."""
    version = "qemu"
