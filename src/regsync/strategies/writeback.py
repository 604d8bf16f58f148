"""Whole-struct write-back, the way the comparison strategies sync (not regsync)."""

from __future__ import annotations

from ..cache import RegisterCache


def write_whole_groups(cache: RegisterCache, mask: int) -> None:
    """Mark every register of the groups in mask dirty with its local value, then flush.

    Stale volatile fields included: that is the behaviour being compared against.
    """
    for g in cache.catalog.groups_in(mask):
        local = cache.locals[g.name]
        dirty = cache.dirty[g.name]
        for r in cache.registers_by_group[g.name]:
            try:
                dirty[r] = cache._get[r](local)
            except KeyError:        # an MSR the host does not have
                continue
        cache.dirty_mask |= g.bit
    cache.flush(mask, allow_defer=False)
