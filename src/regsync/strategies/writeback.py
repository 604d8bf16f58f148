"""Whole-group write-back, the way the comparison strategies sync (not regsync)."""

from __future__ import annotations

from ..cache import RegisterCache
from ..regdefs import Register


def whole_group(cache: RegisterCache, group: str) -> list[Register]:
    """The registers to mark dirty so the transport writes ``group`` as the local copy has it.

    XSAVE (x86): only the components the local buffer holds (XSTATE_BV). The
    transport claims the component of every dirty register, and KVM refuses a
    component XCR0 does not enable (EINVAL); an absent component is in its init
    state either way, so leaving its registers out writes the same buffer.
    """
    regs = cache.registers_by_group[group]
    if group != "XSAVE" or cache.catalog.arch != "x86_64":
        return regs
    from ..arch.x86_64.catalog import xsave_component_bit
    from ..arch.x86_64.transport import XSTATE_BV_OFFSET, XSTATE_X87_SSE
    local = cache.locals["XSAVE"]
    bv = int.from_bytes(local[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little") | XSTATE_X87_SSE
    return [r for r in regs if bv >> xsave_component_bit(int(r.field[6:])) & 1]


def write_whole_groups(cache: RegisterCache, mask: int) -> None:
    """Mark every register of the groups in mask dirty with its local value, then flush.

    Stale volatile fields included: that is the behaviour being compared against.
    """
    for g in cache.catalog.groups_in(mask):
        local = cache.locals[g.name]
        dirty = cache.dirty[g.name]
        for r in whole_group(cache, g.name):
            try:
                dirty[r] = cache._get[r](local)
            except KeyError:        # an MSR the host does not have
                continue
        cache.dirty_mask |= g.bit
    cache.flush(mask, allow_defer=False)
