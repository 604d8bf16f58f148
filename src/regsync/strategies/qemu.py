"""QEMU's level-based sync, before (2012) and after the seed's patch. For comparison only."""

from __future__ import annotations

from ..cache import RegisterCache
from .writeback import write_whole_groups
from ..regdefs import Register

# What QEMU's kvm_arch_put_registers(KVM_PUT_RUNTIME_STATE) writes on x86:
# regs, xsave, xcrs, sregs, the runtime MSRs, vcpu events and debug registers.
QEMU_RUNTIME_PUT = ("REGS", "SREGS", "XSAVE", "XCRS", "MSRS", "EVENTS", "DEBUGREGS")


class Qemu2012Cache(RegisterCache):
    """kvm_vcpu_dirty as one flag: the first synchronize_state wins, later wider
    requests are ignored, and only RUNTIME is written back before the run — so an
    edit to a FULL-only register after a RUNTIME sync is lost (the seed's bug)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.vcpu_dirty = 0

    def read(self, reg: Register) -> int:
        return self._get[reg](self.locals[reg.group])   # QEMU's env always "has" a value

    def synchronize(self, mask: int) -> None:
        if not self.vcpu_dirty:
            RegisterCache.synchronize(self, mask)
            self.vcpu_dirty = mask

    def before_run(self) -> None:
        if self.vcpu_dirty:
            write_whole_groups(self, self.catalog.levels["RUNTIME"] & self.held)
            self.vcpu_dirty = 0
        self.discard()          # edits outside RUNTIME never reach KVM


class QemuCache(RegisterCache):
    """QEMU today: any synchronize fetches FULL and marks the vCPU dirty; before
    the next run the RUNTIME put writes those groups back, read-only or not."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.vcpu_dirty = False
        known = self.catalog.group_by_name
        # Another architecture (the simulated backend) has no x86 put list: RUNTIME.
        self.put_mask = (self.catalog.group_mask(*QEMU_RUNTIME_PUT)
                         if all(n in known for n in QEMU_RUNTIME_PUT)
                         else self.catalog.levels["RUNTIME"])

    def synchronize(self, mask: int) -> None:
        if not self.vcpu_dirty:
            RegisterCache.synchronize(self, self.catalog.all_mask)
            self.vcpu_dirty = True

    def read(self, reg: Register) -> int:
        self.synchronize(0)
        return self._get[reg](self.locals[reg.group])

    def write(self, reg: Register, value: int) -> None:
        self.synchronize(0)
        super().write(reg, value)

    def before_run(self) -> None:
        if self.vcpu_dirty:
            write_whole_groups(self, self.put_mask)
            self.vcpu_dirty = False
        self.discard()
