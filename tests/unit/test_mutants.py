"""Promises of the cache that mutation testing found unguarded (issue 8 item 21).

Each test checks a rule of the contract (shared/DESIGN.md, cache.py's docstring)
on the simulated backend, where every kernel transfer is counted; docs/mutation.md
lists the mutants they kill and the ones that are equivalent. No /dev/kvm needed.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest

from regsync.cache import (CacheStats, EditContradicted, RegisterCache, RegisterWriteError,
                           WrongThreadError)
from regsync.regdefs import Register
from regsync.sim import CATALOG, MSR_RESERVED, RESET_GPRS, SimKernel, SimTransport, SimVcpu

BIT = {g.name: g.bit for g in CATALOG.groups}
R = CATALOG.by_name
KERNEL_R1, KERNEL_SRR0, KERNEL_DECAR = 0x101, 0, 1_000_000   # srr0 moves at each run


@pytest.fixture(params=[True, False], ids=["sync", "nosync"])
def vcpu(request: pytest.FixtureRequest) -> SimVcpu:
    return SimVcpu(use_sync=request.param)


# --- stats: every count is what the kernel saw -------------------------------------------
def assert_stats_match_the_kernel(v: SimVcpu) -> CacheStats:
    st = v.cache.stats
    k = v.kernel
    assert dict(st.fetches) == dict(k.gets)
    assert dict(st.writes) == dict(k.sets + k.sync_applied)
    assert dict(st.deferred_writes) == dict(k.sync_applied)
    assert st.exits == k.runs
    return st


def test_stats_count_the_kernels_transfers_reads_and_what_was_avoided(vcpu: SimVcpu) -> None:
    v, regs, k = vcpu, vcpu.regs, vcpu.kernel
    assert regs.r1 == KERNEL_R1 and regs.srr0 == KERNEL_SRR0       # two fetches
    assert regs.r1 == KERNEL_R1 and regs.r2 == 0x102               # held: local
    v.cache.read(R["r3"])                                           # held: local
    v.cache.read(R["r4"])
    assert v.cache.stats.local_reads == 2                           # regfile's hot path uncounted
    v.cache.synchronize(CATALOG.levels["RUNTIME"])                  # held already: avoided
    v.cache.synchronize(CATALOG.levels["RUNTIME"])
    assert v.cache.stats.fetches_avoided == 2
    v.run()                                   # GPRS and SPRS fetched, neither written back
    assert v.cache.stats.writes_avoided == 2
    v.run()                                   # nothing fetched since the last run
    assert v.cache.stats.writes_avoided == 2
    regs.srr0 = 5
    regs.r1 = 6
    v.run()
    regs.r1 = 7
    v.run()
    sets = k.sets.copy()
    regs.decar = 7                            # not held: fetched, overlaid, written
    v.cache.flush(allow_defer=False)
    assert k.sets - sets == {"TIMER": 1}      # that group alone
    v.run()
    st = assert_stats_match_the_kernel(v)
    assert st.exits == 5
    assert v.cache.stats.as_dict() == {
        "exits": st.exits, "fetches": dict(st.fetches), "writes": dict(st.writes),
        "deferred_writes": dict(st.deferred_writes), "local_reads": st.local_reads,
        "fetches_avoided": st.fetches_avoided, "writes_avoided": st.writes_avoided,
        "contradicted": []}


def test_writes_avoided_counts_the_groups_fetched_since_the_run() -> None:
    v = SimVcpu(use_sync=False)
    assert v.regs.srr1 == 0
    v.run()
    assert v.cache.stats.writes_avoided == 1


def test_each_run_that_applies_a_queued_write_counts_one_deferred_write() -> None:
    """Stats read only at the end: every run that applied the queued GPRS counts."""
    v = SimVcpu(use_sync=True)
    for value in (5, 6, 7):
        v.regs.r1 = value
        v.run()
    st = assert_stats_match_the_kernel(v)
    assert st.deferred_writes["GPRS"] == 3 and v.kernel.values["r1"] == 7


def test_a_queued_write_rejoining_an_ioctl_flush_is_not_counted_twice() -> None:
    v = SimVcpu(use_sync=True)
    v.regs.r1 = 5
    v.cache.flush()                           # queued in the run page
    v.regs.srr1 = 6
    v.regs.decar = 7
    v.cache.flush(BIT["SPRS"], allow_defer=False)   # the queued GPRS rejoins, by ioctl
    assert v.kernel.values["r1"] == 5 and v.kernel.values["srr1"] == 6
    assert v.cache.dirty_registers() == ["decar"]
    v.run()
    assert v.kernel.values["decar"] == 7
    assert_stats_match_the_kernel(v)


def test_an_ioctl_write_after_a_run_is_not_counted_as_deferred() -> None:
    """After a run nothing is queued: a group written by ioctl is a plain write."""
    v = SimVcpu(use_sync=True)
    v.run()
    v.regs.r1 = 5
    v.regs.srr1 = 6                           # SPRS after GPRS: GPRS goes by ioctl too
    v.cache.flush(allow_defer=False)
    assert not v.cache.dirty_registers() and v.kernel.values["r1"] == 5
    v.run()
    assert_stats_match_the_kernel(v)
    assert not v.cache.stats.deferred_writes


# --- rule 8: a refusal is one line naming the group and each register -------------------
def test_refused_write_error_names_the_group_and_each_register() -> None:
    v = SimVcpu(use_sync=False)
    v.regs.r1 = 5
    v.regs.msr = MSR_RESERVED
    with pytest.raises(RegisterWriteError) as ei:
        v.run()
    text = str(ei.value)
    assert "\n" not in text
    assert "group GPRS (dirty: r1, msr)" in text


# --- widths (rule 2: a write is checked before it becomes dirty) --------------------------
def test_negative_values_are_twos_complement_down_to_the_signed_minimum() -> None:
    v = SimVcpu()
    v.cache.write(R["r1"], -(1 << 31))                   # the most negative 32-bit value
    v.cache.write(R["r2"], -2)
    v.cache.write(R["r3"], 0)
    assert (v.regs.r1, v.regs.r2, v.regs.r3) == (0x8000_0000, 0xFFFF_FFFE, 0)
    with pytest.raises(ValueError, match=r"^r4: -2147483649 does not fit in 32 bits$"):
        v.cache.write(R["r4"], -(1 << 31) - 1)
    with pytest.raises(TypeError, match=r"^r4: register values are ints, got float$"):
        v.cache.write(R["r4"], 1.0)  # type: ignore[arg-type]
    assert v.cache.dirty_registers() == ["r1", "r2", "r3"]


def test_writes_through_the_cache_to_two_groups_both_reach_the_kernel(vcpu: SimVcpu) -> None:
    vcpu.cache.write(R["r1"], -2)                        # negative: the cache's own write()
    vcpu.cache.write(R["srr1"], -3)
    vcpu.run()
    assert vcpu.kernel.values["r1"] == 0xFFFF_FFFE
    assert vcpu.kernel.values["srr1"] == 0xFFFF_FFFD


# --- invalidate / discard: forget only what was asked ------------------------------------
def test_invalidate_forgets_only_the_groups_asked(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    assert regs.r1 == KERNEL_R1 and regs.srr0 == KERNEL_SRR0
    k.values["srr0"] = 0x77                               # behind the cache
    k.values["decar"] = 0x55                              # TIMER was never fetched
    vcpu.invalidate = vcpu.cache.invalidate
    vcpu.cache.invalidate(BIT["SPRS"])
    gets = dict(k.gets)
    assert regs.r1 == KERNEL_R1 and k.gets["GPRS"] == gets["GPRS"]    # still held
    assert regs.srr0 == 0x77 and k.gets["SPRS"] == gets["SPRS"] + 1
    assert regs.decar == 0x55                             # still not held: fetched


def test_discard_drops_only_the_groups_asked(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    assert regs.r1 == KERNEL_R1 and regs.srr1 == 0
    k.values["decar"] = 0x55                              # TIMER was never fetched
    regs.r1 = 0x11
    regs.srr1 = 0x22
    gets = dict(k.gets)
    vcpu.cache.discard(BIT["SPRS"])
    assert regs.srr1 == 0                       # the kernel's value again
    assert regs.r1 == 0x11 and k.gets["GPRS"] == gets["GPRS"]   # edit kept, still held
    assert regs.decar == 0x55
    sets = k.sets.copy()
    vcpu.run()
    assert k.values["r1"] == 0x11 and k.values["srr1"] == 0
    assert set(k.sets - sets) <= {"GPRS"}                 # nothing that is not dirty


def test_discard_drops_a_write_queued_in_the_run_page_and_keeps_other_edits() -> None:
    v = SimVcpu(use_sync=True)
    k, regs = v.kernel, v.regs
    regs.r1 = 0x11
    v.cache.flush()                                       # queued in the run page
    assert v.transport.deferred
    regs.srr1 = 0x22
    v.cache.discard(BIT["GPRS"])
    assert not k.sets                                     # the queued edit is not written
    assert regs.r1 == KERNEL_R1
    v.run()
    assert k.values["r1"] == KERNEL_R1 and k.values["srr1"] == 0x22
    assert k.sets == {"SPRS": 1} and not k.sync_applied


def test_a_partial_flush_keeps_the_other_groups_dirty(vcpu: SimVcpu) -> None:
    vcpu.regs.r1 = 0x11
    vcpu.regs.srr0 = 0x22
    vcpu.cache.flush(BIT["SPRS"], allow_defer=False)
    assert vcpu.kernel.values["srr0"] == 0x22 and vcpu.cache.dirty_registers() == ["r1"]
    vcpu.run()
    assert vcpu.kernel.values["r1"] == 0x11


def test_a_refused_run_keeps_what_was_held_and_nothing_else() -> None:
    """run_failed drops only the run page's groups: a held group stays held, a group
    never fetched is still fetched (a refused run must not invent held copies)."""
    v = SimVcpu(use_sync=True)
    k, regs = v.kernel, v.regs
    assert regs.srr0 == KERNEL_SRR0
    k.values["decar"] = 0x55
    regs.msr = MSR_RESERVED
    with pytest.raises(RegisterWriteError):
        v.run()
    gets = dict(k.gets)
    assert regs.srr0 == KERNEL_SRR0 and k.gets["SPRS"] == gets["SPRS"]
    assert regs.decar == 0x55
    assert regs.msr == MSR_RESERVED


def test_a_refusal_leaves_the_groups_written_before_it_clean() -> None:
    v = SimVcpu(use_sync=False)
    v.regs.mp_state = 0                                   # MPSTATE is written first
    v.regs.msr = MSR_RESERVED                             # GPRS is refused
    with pytest.raises(RegisterWriteError):
        v.run()
    assert v.cache.dirty_registers() == ["msr"]


# --- side-effect fetches: contradictions are reported where the caller can see them ----
def test_contradictions_are_reported_whole_and_point_at_the_caller() -> None:
    v = SimVcpu(use_sync=False)
    k, regs = v.kernel, v.regs
    v.cache.synchronize(CATALOG.levels["FULL"])
    regs.r1 = 0xE1
    regs.r3 = 0xE3
    k.request_reset()
    timer_gets = k.gets["TIMER"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v.cache.read(R["mp_state"])
    [w] = [w for w in caught if issubclass(w.category, EditContradicted)]
    assert "r1 0xe1 -> 0x0, r3 0xe3 -> 0x0" in str(w.message)
    cause = "KVM_GET_MPSTATE (INIT/SIPI processed)"
    assert v.cache.stats.as_dict()["contradicted"] == [
        {"register": "r1", "written": 0xE1, "now": 0, "cause": cause},
        {"register": "r3", "written": 0xE3, "now": 0, "cause": cause}]
    assert regs.decar == 1_000_000 and k.gets["TIMER"] == timer_gets   # still held
    assert regs.pc == RESET_GPRS["pc"]
    assert_stats_match_the_kernel(v)


def test_a_side_effect_fetch_writes_only_the_groups_it_makes_stale() -> None:
    """cache.py: "Before such a fetch the cache flushes the dirty registers of those
    groups"; the others wait for the run, in FLUSH_ORDER."""
    v = SimVcpu(use_sync=True)
    k = v.kernel
    v.regs.r1 = 5
    v.cache.flush()                                       # GPRS queued in the run page
    v.regs.decar = 7                                      # TIMER: not made stale by MPSTATE
    del k.log[:]
    v.cache.read(R["mp_state"])
    assert ("set", "TIMER") not in k.log and ("set", "GPRS") in k.log
    v.run()
    assert k.values["decar"] == 7 and k.values["r1"] == 5


# --- write intent ------------------------------------------------------------------------
def test_set_bits_takes_every_bit_of_the_width_and_counts_one_write(vcpu: SimVcpu) -> None:
    k, regs = vcpu.kernel, vcpu.regs
    assert regs.decar == KERNEL_DECAR                     # TIMER held
    assert regs.r1 == KERNEL_R1                           # GPRS held
    regs.set_bits("tsr", 0xFFFF_FFFF)
    regs.clear_bits("tsr", 0xFFFF_FFFF)
    assert k.values["tsr"] == 0
    gets = dict(k.gets)
    k.values["decar"] = 0x55                              # TIMER is no longer held
    assert regs.decar == 0x55 and k.gets["TIMER"] == gets["TIMER"] + 1
    assert regs.r1 == KERNEL_R1 and k.gets["GPRS"] == gets["GPRS"]
    assert regs.srr1 == 0 and k.gets["SPRS"] == gets.get("SPRS", 0) + 1   # never held
    assert vcpu.cache.stats.writes["TIMER"] == 2


def test_set_bits_refusals_name_the_register() -> None:
    v = SimVcpu()
    with pytest.raises(ValueError, match="^decar is written by value"):
        v.cache.set_bits(R["decar"], 1)
    with pytest.raises(ValueError, match="^tsr: bit mask"):
        v.cache.set_bits(R["tsr"], 1 << 32)


class _NoIntentTransport:
    """A backend without write-1-to-set/clear transfers (no update_bits attribute)."""

    def __init__(self, inner: SimTransport) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        if name == "update_bits":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


def test_set_bits_on_a_backend_without_them_is_refused_naming_the_register() -> None:
    cache = RegisterCache(_NoIntentTransport(SimTransport(SimKernel())))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^tsr: this backend has no write-1-to-set/clear"):
        cache.set_bits(R["tsr"], 1)


# --- registers added by index --------------------------------------------------------------
def test_eager_write_back_includes_a_register_added_outside_the_catalog() -> None:
    """The eager strategy writes every register of a group back: an added one too."""
    v = SimVcpu(strategy="eager", use_sync=False)
    sprg0 = Register("sprg0", 32, "SPRS", "sprg0")
    v.cache.add_register(sprg0)
    v.regs.srr0 = 1
    v.run()
    assert v.kernel.one_reg_sets["sprg0"] >= 1


# --- rule 9 --------------------------------------------------------------------------------
def test_every_cache_entry_point_refuses_another_thread() -> None:
    import threading

    v = SimVcpu()
    errors: list[BaseException] = []

    def owner() -> None:
        v.cache.owner = threading.get_ident()

    t = threading.Thread(target=owner)
    t.start()
    t.join()
    calls = {
        "read": lambda: v.cache.read(R["r1"]),
        "write": lambda: v.cache.write(R["r1"], -1),
        "attr read": lambda: v.regs.r1,
        "attr write": lambda: setattr(v.regs, "r1", 1),
        "synchronize": lambda: v.cache.synchronize(BIT["GPRS"]),
        "flush": lambda: v.cache.flush(),
        "discard": lambda: v.cache.discard(),
        "invalidate": lambda: v.cache.invalidate(),
        "set_bits": lambda: v.cache.set_bits(R["tsr"], 1),
        "add_register": lambda: v.cache.add_register(Register("sprg1", 32, "SPRS", "sprg1")),
        "dump": lambda: v.regs.dump(),
    }
    for name, call in calls.items():
        with pytest.raises(WrongThreadError, match=r"^a running vCPU's registers are accessed "
                           r"on its own thread: use machine\.run_on_cpu\(vcpu, fn\)$"):
            call()
        errors.append(name)  # type: ignore[arg-type]
    assert not v.kernel.gets and not v.kernel.sets and not v.cache.dirty_registers()


# --- the register file: names, suggestions, dump --------------------------------------------
def test_unknown_names_get_at_most_three_suggestions_or_none() -> None:
    regs = SimVcpu().regs
    with pytest.raises(KeyError) as ei:
        regs["srr"]                                       # five names are close
    assert re.search(r"; did you mean \w+, \w+, \w+\?$", ei.value.args[0]), ei.value
    with pytest.raises(AttributeError) as ai:
        regs.srr
    hint = re.search(r"; did you mean (\w+), (\w+), (\w+)\?$", str(ai.value))
    assert hint and set(hint.groups()) <= {r.name for r in CATALOG.registers}, ai.value
    with pytest.raises(KeyError) as ei:
        regs["zzz"]
    assert ei.value.args[0] == "no register named 'zzz'"
    with pytest.raises(AttributeError) as ai:
        regs.zzz
    assert str(ai.value) == "no register named 'zzz'"


def test_dir_lists_every_register_and_alias_attribute() -> None:
    regs = SimVcpu().regs
    assert dir(regs) == sorted(r.name for r in CATALOG.registers)


def test_dump_of_a_mask_has_exactly_its_groups_registers() -> None:
    v = SimVcpu()
    mask = BIT["TIMER"] | BIT["EVENTS"]
    want = [r.name for r in CATALOG.registers if r.group in ("TIMER", "EVENTS")]
    for _ in range(2):                                    # the plan is built, then reused
        d = v.regs.dump(mask)
        assert list(d) == want
        assert d["decar"] == KERNEL_DECAR
    assert list(v.regs.dump()) == [r.name for r in CATALOG.registers]


def test_a_held_register_read_off_the_owner_thread_is_refused() -> None:
    """The hot path answers a held group locally only on the owner's thread (rule 9)."""
    import threading

    v = SimVcpu()
    assert v.regs.r1 == KERNEL_R1                         # GPRS held
    t = threading.Thread(target=lambda: setattr(v.cache, "owner", threading.get_ident()))
    t.start()
    t.join()
    with pytest.raises(WrongThreadError):
        v.regs.r1


# --- vcpu.to_mask: the sync vocabulary's names -----------------------------------------------
def test_to_mask_takes_levels_and_groups_in_any_case_and_combines_them() -> None:
    from regsync.arch.x86_64 import CATALOG as X86
    from regsync.vcpu import to_mask

    bit = {g.name: g.bit for g in X86.groups}
    assert to_mask(0x5) == 0x5
    assert to_mask("full") == X86.levels["FULL"]
    assert to_mask(["lapic", "RUNTIME"]) == X86.levels["RUNTIME"] | bit["LAPIC"]
    assert to_mask(("REGS", "sregs", "Msrs")) == bit["REGS"] | bit["SREGS"] | bit["MSRS"]
    assert to_mask(["RESET", "RUNTIME"]) == X86.levels["RESET"]
    known = ", ".join([*X86.levels, *X86.group_by_name])
    with pytest.raises(ValueError) as ei:
        to_mask(["REGS", "nope"])
    assert str(ei.value) == f"unknown level or group 'NOPE' (known: {known})"
    with pytest.raises(ValueError, match=r"^unknown level or group 1 "):
        to_mask([1])  # type: ignore[list-item]


# --- x86_64 accessors: each catalog locator reads and writes its own bytes ------------------
# The catalog's docstring defines the locators; this decodes them independently of
# transport.py (struct offsets from ctypes, byte ranges from the locator) and checks the
# accessors built at import time against it. No /dev/kvm: the locals are plain buffers.
import ctypes  # noqa: E402

from regsync.arch.x86_64 import CATALOG as X86  # noqa: E402
from regsync.arch.x86_64 import LAPIC_EDITS, Registers  # noqa: E402
from regsync.arch.x86_64.transport import accessors, write_refusals  # noqa: E402
from regsync.kvm import structs as ks  # noqa: E402

_SEG_LAYOUT = (("type", 0, 4), ("s", 4, 1), ("dpl", 5, 2), ("present", 7, 1), ("avl", 12, 1),
               ("l", 13, 1), ("db", 14, 1), ("g", 15, 1), ("unusable", 16, 1))  # VMX AR
_KSEG = {"ldt": "ldt"}
_BACKGROUND = 0xEE


def _x86_locals() -> dict[str, Any]:
    return {"REGS": ks.kvm_regs(), "SREGS": ks.kvm_sregs(), "EVENTS": ks.kvm_vcpu_events(),
            "XSAVE": bytearray([_BACKGROUND]) * 4096, "XCRS": ks.kvm_xcrs(),
            "DEBUGREGS": ks.kvm_debugregs(), "LAPIC": bytearray([_BACKGROUND]) * 0x400,
            "MP_STATE": ks.kvm_mp_state(), "MSRS": {}, "MSRS_TIME": {}}


def _field_bytes(obj: Any, path: str) -> int:
    """The little-endian integer at a (dotted) ctypes field, located by its offset."""
    base, cls = 0, type(obj)
    for part in path.split("."):
        f = getattr(cls, part)
        base += f.offset
        cls = dict(cls._fields_)[part]
    raw = (ctypes.c_char * ctypes.sizeof(obj)).from_address(ctypes.addressof(obj)).raw
    return int.from_bytes(raw[base:base + f.size], "little")


def _raw(reg: Register, local: Any) -> int:
    """The register's value decoded from its locator, as the catalog docstring states it."""
    kind, _, rest = reg.field.partition(":")
    if kind == "seg":
        seg, f = rest.split(":")
        return _field_bytes(local, f"{seg}.{f}")
    if kind == "segattr":
        return sum(_field_bytes(local, f"{rest}.{f}") << sh for f, sh, _ in _SEG_LAYOUT)
    if kind == "dt":
        t, f = rest.split(":")
        return _field_bytes(local, f"{t}.{f}")
    if kind == "ev":
        return _field_bytes(local, rest)
    if kind == "xsave":
        off = int(rest)
        return int.from_bytes(local[off:off + (reg.width + 7) // 8], "little")
    if kind == "xcr":
        hits = [local.xcrs[i].value for i in range(local.nr_xcrs) if local.xcrs[i].xcr == int(rest)]
        assert len(hits) <= 1
        return hits[0] if hits else 0
    if kind == "db":
        return local.db[int(rest)]
    if kind == "lapic":
        off = int(rest, 16)
        words = reg.width // 32
        return sum(int.from_bytes(local[off + 0x10 * i:off + 0x10 * i + 4], "little") << (32 * i)
                   for i in range(words))
    if kind == "msr":
        return local[int(rest, 16)]
    return _field_bytes(local, kind)                 # a plain field: rax, cr0, dr7, mp_state


def _value_for(reg: Register, seed: int) -> int:
    """A value that fills the register's width with a pattern unique to seed."""
    if reg.field.startswith("segattr:"):
        v = 0
        for i, (_, sh, w) in enumerate(_SEG_LAYOUT):
            v |= ((seed + i) % (1 << w) or 1) << sh
        return v
    pattern = int.from_bytes(bytes((seed * 37 + 11 + 13 * i) & 0xFF | 1 for i in range(64)),
                             "little")
    return (pattern & reg.mask) | (1 << (reg.width - 1))


def test_every_x86_accessor_reads_and_writes_exactly_its_locator() -> None:
    """Written in catalog order, every register of a group reads back its own value, sits
    where its locator says, and no write moves a byte outside it (the locals keep their
    size; the bytes between the 0x10-strided LAPIC words keep their background)."""
    locals_ = _x86_locals()
    values: dict[Register, int] = {}
    for seed, reg in enumerate(X86.registers):
        get, set_ = accessors(reg)
        local = locals_[reg.group]
        values[reg] = _value_for(reg, seed)
        set_(local, values[reg])
        assert get(local) == values[reg], reg.name
    for reg, value in values.items():
        get, _ = accessors(reg)
        local = locals_[reg.group]
        assert (get(local), _raw(reg, local)) == (value, value), reg.name
    assert len(locals_["XSAVE"]) == 4096 and len(locals_["LAPIC"]) == 0x400
    page = locals_["LAPIC"]
    used = set()
    for reg in X86.registers_of("LAPIC"):
        off = int(reg.field[6:], 16)
        for i in range(reg.width // 32):
            used |= set(range(off + 0x10 * i, off + 0x10 * i + 4))
    assert all(page[b] == _BACKGROUND for b in range(0x400) if b not in used)
    assert locals_["XCRS"].nr_xcrs == 1
    for seed, reg in enumerate(reversed(X86.registers), start=1000):   # and the other way
        values[reg] = _value_for(reg, seed)
        accessors(reg)[1](locals_[reg.group], values[reg])
    for reg, value in values.items():
        local = locals_[reg.group]
        assert (accessors(reg)[0](local), _raw(reg, local)) == (value, value), reg.name


def test_segment_attributes_pack_as_vmx_access_rights_and_drop_bits_8_to_11() -> None:
    reg = X86.by_name["cs.attr"]
    get, set_ = accessors(reg)
    sregs = ks.kvm_sregs()
    set_(sregs, 0x1FFFF)
    assert get(sregs) == 0x1F0FF
    assert [getattr(sregs.cs, f) for f, _, _ in _SEG_LAYOUT] == [0xF, 1, 3, 1, 1, 1, 1, 1, 1]
    set_(sregs, 0)
    assert get(sregs) == 0 and [getattr(sregs.cs, f) for f, _, _ in _SEG_LAYOUT] == [0] * 9
    for f, sh, w in _SEG_LAYOUT:                     # each field alone, at its own bits
        set_(sregs, 1 << sh)
        assert getattr(sregs.cs, f) == 1 and get(sregs) == 1 << sh, f
    sregs.cs.type, sregs.cs.s, sregs.cs.present, sregs.cs.l, sregs.cs.g = 0xB, 1, 1, 1, 1
    sregs.cs.dpl, sregs.cs.avl, sregs.cs.db, sregs.cs.unusable = 0, 0, 0, 0
    assert get(sregs) == 0xA09B                       # a 64-bit code segment


def test_xcr_accessors_find_the_entry_by_number_and_append_a_missing_one() -> None:
    get, set_ = accessors(X86.by_name["xcr0"])
    xcrs = ks.kvm_xcrs()
    assert get(xcrs) == 0                             # absent: reads 0
    xcrs.nr_xcrs = 2
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 1, 0x55    # XCR1 first, XCR0 second
    xcrs.xcrs[1].xcr, xcrs.xcrs[1].value = 0, 0x7
    assert get(xcrs) == 0x7
    set_(xcrs, 0xE7)
    assert xcrs.nr_xcrs == 2 and (xcrs.xcrs[0].value, xcrs.xcrs[1].value) == (0x55, 0xE7)
    other = ks.kvm_xcrs()
    other.nr_xcrs, other.xcrs[0].xcr, other.xcrs[0].value = 1, 1, 0x55   # XCR1 alone
    set_(other, 0x7)                                  # XCR0 appended after it
    assert other.nr_xcrs == 2 and (other.xcrs[1].xcr, other.xcrs[1].value) == (0, 0x7)
    assert other.xcrs[0].value == 0x55 and get(other) == 0x7
    fresh = ks.kvm_xcrs()
    set_(fresh, 0x3)
    set_(fresh, 0x7)                                  # the second write finds the first
    assert fresh.nr_xcrs == 1 and (fresh.xcrs[0].xcr, fresh.xcrs[0].value) == (0, 0x7)
    assert get(fresh) == 0x7


def test_exactly_the_lapic_registers_the_edit_table_refuses_are_refused_saying_why() -> None:
    refused = {r.name: why for r, why in write_refusals(X86).items()}
    expected = {f"lapic.{n}" for n, (how, _) in LAPIC_EDITS.items() if how == "refuse"}
    assert set(refused) == expected and "lapic.icr" in expected
    for name in expected:
        assert refused[name] == f"{name} cannot be edited: {LAPIC_EDITS[name[6:]][1]}"
    regs = Registers(None)                            # refused before the cache is asked
    for name in expected:
        with pytest.raises(ValueError) as ei:
            regs[name] = 0
        assert str(ei.value) == refused[name]
