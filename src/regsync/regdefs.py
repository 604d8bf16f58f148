"""Arch-neutral vocabulary of the register catalog: registers, groups, levels.

An architecture declares its catalog with these types (see
arch/x86_64/catalog.py); the cache, the transports, the gdb layout and the CLI
dump all read that one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Group:
    """The registers one kernel transfer moves together. Bits are mutually exclusive."""
    name: str
    bit: int
    doc: str
    volatile: bool = False        # the kernel may change part of it while the vCPU is stopped
    sync: bool = False            # handed back in the kvm_run page after every exit (SYNC_REGS)
    invalidates: tuple[str, ...] = ()  # groups a fetch of this one makes stale (side effects)


@dataclass(frozen=True, eq=False)
class Register:
    """One named value. ``field`` tells the transport where it lives in the group's struct.

    Compared and hashed by identity: each register is one catalog object, and the
    cache's dirty dicts are keyed by it on the hot path.
    """
    name: str
    width: int                    # bits
    group: str
    field: str
    volatile: bool = False
    aliases: tuple[str, ...] = ()
    doc: str = ""
    # --- write intent (w1s/w1c registers) ---------------------------------------
    # The kernel sets bits of this register on its own and offers write-1-to-set /
    # write-1-to-clear transfers for it (PPC BookE TSR: KVM_REG_PPC_OR_TSR and
    # KVM_REG_PPC_CLEAR_TSR). A plain value write would overwrite bits the kernel set
    # since the value was read, so the register file refuses it: regs.set_bits() /
    # regs.clear_bits() say which bits change, and the transport's update_bits()
    # moves them. No x86_64 register has this shape (README, "Comparison strategies").
    write_intent: bool = False

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1


@dataclass(frozen=True)
class Alias:
    """A second kernel path to a register whose home is elsewhere (EFER via MSR 0xc0000080)."""
    name: str
    home: str
    shift: int = 0                # value = home << shift (lapic.tpr = cr8 << 4)
    width: int = 64
    doc: str = ""                 # why the low ``shift`` bits cannot be kept (refused)


@dataclass
class Catalog:
    arch: str
    groups: tuple[Group, ...]
    registers: tuple[Register, ...]
    levels: dict[str, int]
    aliases: tuple[Alias, ...] = ()
    by_name: dict[str, Register] = field(default_factory=dict, init=False)
    group_by_name: dict[str, Group] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.group_by_name = {g.name: g for g in self.groups}
        bits = [g.bit for g in self.groups]
        assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits), \
            "group bits must be distinct single bits"
        for r in self.registers:
            assert r.group in self.group_by_name, f"{r.name}: unknown group {r.group}"
            assert r.name not in self.by_name, f"duplicate register {r.name}"
            self.by_name[r.name] = r
        for r in self.registers:
            for a in r.aliases:
                assert a not in self.by_name, f"alias {a} clashes"
                self.by_name[a] = r

    def group_mask(self, *names: str) -> int:
        m = 0
        for n in names:
            m |= self.group_by_name[n].bit
        return m

    def groups_in(self, mask: int) -> list[Group]:
        return [g for g in self.groups if g.bit & mask]

    @property
    def all_mask(self) -> int:
        return self.group_mask(*(g.name for g in self.groups))

    def registers_of(self, group: str) -> list[Register]:
        return [r for r in self.registers if r.group == group]


class FlushError(Exception):
    """A transport's kernel refused a group. ``written`` lists the groups that did
    reach the kernel (or were queued for the next run) before it; the cache marks
    the ones written clean and keeps the rest dirty."""

    def __init__(self, group: str, registers: list[str], cause: Exception,
                 written: list[str], done: list[Register] | None = None) -> None:
        self.group, self.registers, self.cause, self.written = group, registers, cause, written
        # Registers of the failed group that did reach the kernel before the refusal
        # (KVM_SET_MSRS processes entries in order and stops at the first it refuses).
        self.done = done or []
        super().__init__(f"the kernel refused {group} ({', '.join(registers)}): {cause}")

