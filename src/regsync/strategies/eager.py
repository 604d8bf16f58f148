"""Eager full sync: what most small VMMs do. Kept only to compare against."""

from __future__ import annotations

from ..cache import RegisterCache
from .writeback import write_whole_groups
from ..regdefs import Register


class EagerCache(RegisterCache):
    """First access after an exit fetches every group; any change writes every group back."""

    def _all(self) -> None:
        everything = self.transport.available_mask
        if self.held & everything != everything:
            RegisterCache.synchronize(self, everything)

    def read(self, reg: Register) -> int:
        self._all()
        return self._get[reg](self.locals[reg.group])

    def write(self, reg: Register, value: int) -> None:
        self._all()
        super().write(reg, value)

    def synchronize(self, mask: int) -> None:
        self._all()

    def before_run(self) -> None:
        if self.dirty_mask:
            write_whole_groups(self, self.held)
