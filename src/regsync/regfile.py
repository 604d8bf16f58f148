"""``vcpu.regs``: attribute and item access to every catalog register.

Each register (and alias) becomes a descriptor on a class generated from the
catalog, so ``regs.rax`` costs one bit test and one C-level attrgetter when the
group is held. Dotted names are items (``regs["cs.base"]``) and also attributes
with ``_`` for ``.`` (``regs.cs_base``). Unknown names suggest close ones.
"""

from __future__ import annotations

import difflib
from threading import get_ident
from typing import Any, Callable

from .cache import RegisterCache
from .regdefs import Alias, Catalog, Register


class _RegisterAttr:
    __slots__ = ("reg", "bit", "read_bit", "group", "get", "set", "mask")

    def __init__(self, reg: Register, bit: int, get: Callable[[Any], int],
                 set_: Callable[[Any, int], None]) -> None:
        self.reg, self.bit, self.group, self.get, self.set = reg, bit, reg.group, get, set_
        self.mask = reg.mask
        # A volatile register never answers from a held group on the fast path:
        # its copy is a sample (cache docstring, "Volatile values").
        self.read_bit = 0 if reg.volatile else bit

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        c: RegisterCache = obj._cache
        # Hot path: a held group on the owning thread (or no owner): no syscall.
        if c.held & self.read_bit and (c.owner is None or c.owner == get_ident()):
            return self.get(c.locals[self.group])
        return c.read(self.reg)

    # Writes go through RegisterFileBase.__setattr__ (one frame, with suggestions).


# --- write intent: w1s/w1c registers (Register.write_intent) ------------------------
class _IntentAttr(_RegisterAttr):
    """A register the kernel sets bits of on its own: reads as any register, but a
    plain assignment is refused (not _RegisterAttr exactly, so __setattr__'s fast
    path never takes it): it would overwrite the bits the kernel set since the
    value was read, the seed's TSR/watchdog race."""
    __slots__ = ()

    def __set__(self, obj: Any, value: int) -> None:
        raise ValueError(f"{self.reg.name} is a write-1-to-set/clear register: a plain value "
                         f"would overwrite bits the kernel sets on its own; use "
                         f"regs.set_bits({self.reg.name!r}, mask) or "
                         f"regs.clear_bits({self.reg.name!r}, mask)")


class _RefusedAttr(_RegisterAttr):
    """A register whose edit cannot reach the kernel as the guest's own write would
    (the transport says why, e.g. lapic.icr: KVM_SET_LAPIC sends no IPI): readable,
    refused at assignment, before anything is queued."""
    __slots__ = ("why",)

    def __set__(self, obj: Any, value: int) -> None:
        raise ValueError(self.why)


class _AliasAttr:
    __slots__ = ("alias", "home")

    def __init__(self, alias: Alias, home: Register) -> None:
        self.alias, self.home = alias, home

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._cache.read(self.home) << self.alias.shift

    def __set__(self, obj: Any, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value < (1 << self.alias.width):
            raise ValueError(f"{self.alias.name}: {value!r} does not fit in {self.alias.width} bits")
        if value & ((1 << self.alias.shift) - 1):
            # Lossless or refused: the home cannot keep the low bits.
            raise ValueError(f"{self.alias.name}={value:#x}: {self.alias.doc}")
        obj._cache.write(self.home, value >> self.alias.shift)


class RegisterFileBase:
    """Base of the generated class; see make_register_file()."""
    __slots__ = ("_cache", "_extra")
    _catalog: Catalog
    _names: dict[str, Register | Alias]
    _writers: dict[str, Any]
    _getters: dict[Register, Callable[[Any], int]]
    _plans: dict[int, list[tuple[str, str, Callable[[Any], int]]]]
    _msr_aliases: dict[int, str] = {}
    _msr_by_index: dict[int, Register] = {}

    def __init__(self, cache: RegisterCache) -> None:
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_extra", {})

    def _lookup(self, name: str) -> Register | Alias:
        try:
            return self._names[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no register named {name!r}{hint}") from None

    def __getitem__(self, name: str) -> int:
        entry = self._lookup(name)
        return getattr(self, _attr_name(entry.name))

    def __setitem__(self, name: str, value: int) -> None:
        entry = self._lookup(name)
        setattr(self, _attr_name(entry.name), value)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not registers (descriptors win).
        close = difflib.get_close_matches(name, [_attr_name(n) for n in self._names], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AttributeError(f"no register named {name!r}{hint}")


    def __setattr__(self, name: str, value: Any) -> None:
        # One Python frame, like a descriptor's __set__ would cost, but an unknown
        # name gets suggestions. The plain cache's write() is inlined (hot path).
        try:
            attr = self._writers[name]
        except KeyError:
            self.__getattr__(name)          # raises AttributeError with suggestions
            raise
        if type(attr) is _RegisterAttr:
            c = self._cache
            if c.plain_writes and type(value) is int and 0 <= value <= attr.mask \
                    and (c.owner is None or c.owner == get_ident()):
                attr.set(c.locals[attr.group], value)
                c.dirty[attr.group][attr.reg] = value
                c.dirty_mask |= attr.bit
                return
            c.write(attr.reg, value)
        else:
            attr.__set__(self, value)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __dir__(self) -> list[str]:
        return sorted({_attr_name(n) for n in self._names})

    # --- write intent: w1s/w1c registers (Register.write_intent) --------------------
    def set_bits(self, name: str, mask: int) -> None:
        """Set ``mask``'s bits of a write-1-to-set/clear register (one OR transfer, now)."""
        self._cache.set_bits(self._intent_register(name), mask)

    def clear_bits(self, name: str, mask: int) -> None:
        """Clear ``mask``'s bits of a write-1-to-set/clear register (one CLEAR transfer)."""
        self._cache.clear_bits(self._intent_register(name), mask)

    def _intent_register(self, name: str) -> Register:
        entry = self._lookup(name)
        if not isinstance(entry, Register) or not entry.write_intent:
            raise ValueError(f"{name} is written by value (assign it); set_bits/clear_bits "
                             f"are for write-1-to-set/clear registers")
        return entry

    # --- MSRs by index ------------------------------------------------------------
    def _msr_register(self, index: int) -> Register:
        if not 0 <= index < 1 << 32:
            raise KeyError(f"MSR index {index:#x} is out of range")
        if index in self._msr_aliases:
            return self._catalog.by_name[self._msr_aliases[index]]
        if index in self._msr_by_index:
            return self._msr_by_index[index]
        extra: dict[int, Register] = self._extra
        if index not in extra:
            reg = Register(f"msr_{index:#x}", 64, "MSRS", f"msr:{index:#x}")
            self._cache.add_register(reg)
            extra[index] = reg
        return extra[index]

    def msr(self, index: int) -> int:
        """Read MSR ``index`` through the cache (aliases go to their home register)."""
        return self._cache.read(self._msr_register(index))

    def set_msr(self, index: int, value: int) -> None:
        self._cache.write(self._msr_register(index), value)

    # --- bulk -------------------------------------------------------------------------
    def dump(self, mask: int | None = None) -> dict[str, int | None]:
        """Every register in the groups of mask (default: all), fetched as needed.

        A register the host does not support (an MSR KVM does not save) is None.
        After synchronize() every group in the mask is held (edits included, as
        local copies are written through), so values come straight off the local
        copies without a per-register read().
        """
        c = self._cache
        cat = self._catalog
        mask = cat.all_mask if mask is None else mask
        mask &= c.transport.available_mask
        c._check_thread()
        c.synchronize(mask)
        locals_ = c.locals
        out: dict[str, int | None] = {}
        for name, group, get in self._dump_plan(mask):
            try:
                out[name] = get(locals_[group])
            except KeyError:
                out[name] = None
        return out

    @classmethod
    def _dump_plan(cls, mask: int) -> list[tuple[str, str, Callable[[Any], int]]]:
        plan = cls._plans.get(mask)
        if plan is None:
            cat = cls._catalog
            plan = [(r.name, r.group, cls._getters[r]) for r in cat.registers
                    if cat.group_by_name[r.group].bit & mask]
            cls._plans[mask] = plan
        return plan


def _attr_name(name: str) -> str:
    return name.replace(".", "_")


def make_register_file(catalog: Catalog,
                       accessors: dict[Register, tuple[Callable[[Any], int],
                                                       Callable[[Any, int], None]]],
                       msr_aliases: dict[int, str] | None = None,
                       msr_by_index: dict[int, Register] | None = None,
                       refusals: dict[Register, str] | None = None) -> type:
    """A RegisterFileBase subclass with one descriptor per register and alias.

    ``refusals``: registers an edit cannot reach the kernel as a guest write
    would, with the reason (refused at assignment). Volatile registers get no
    held-group fast path: every read outside a dump fetches (cache docstring).
    """
    refusals = refusals or {}
    ns: dict[str, Any] = {"__slots__": (), "_catalog": catalog,
                          "_msr_aliases": msr_aliases or {}, "_msr_by_index": msr_by_index or {}}
    names: dict[str, Register | Alias] = {}
    for reg in catalog.registers:
        bit = catalog.group_by_name[reg.group].bit
        if reg in refusals:
            attr = _RefusedAttr(reg, bit, *accessors[reg])
            attr.why = refusals[reg]
        else:
            attr = (_IntentAttr if reg.write_intent else _RegisterAttr)(reg, bit, *accessors[reg])
        for n in (reg.name, *reg.aliases):
            names[n] = reg
            ns[_attr_name(n)] = attr
    for alias in catalog.aliases:
        names[alias.name] = alias
        ns[_attr_name(alias.name)] = _AliasAttr(alias, catalog.by_name[alias.home])
    ns["_names"] = names
    ns["_getters"] = {r: accessors[r][0] for r in catalog.registers}
    ns["_plans"] = {}
    ns["_writers"] = {k: v for k, v in ns.items() if isinstance(v, (_RegisterAttr, _AliasAttr))}
    return type(f"{catalog.arch}Registers", (RegisterFileBase,), ns)
