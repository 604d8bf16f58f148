"""The monitor command table and the x86 text it prints (pure, no KVM)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from regsync.gdb import monitor
from regsync.gdb.adapter import StubStats
from regsync.gdb.monitor import COMMANDS, MonitorError, monitor_command, run_monitor
from regsync.gdb.pagewalk import Mapping
from regsync.gdb.x86info import format_lapic, format_mem, format_tlb, format_xp, parse_xp


def fake_target() -> Any:
    return SimpleNamespace(step_mode="alone", stats=StubStats(), m=SimpleNamespace(vcpus=[]),
                           current_thread=lambda: 1)


@pytest.mark.parametrize("line,message", [
    ("bogus", "unknown monitor command 'bogus'"),
    ("info bogus", "unknown monitor command 'info bogus'"),
    ("info sync now", "info sync: unexpected argument 'now'"),
    ("step-mode sideways", "step-mode: unknown argument 'sideways' (alone or all)"),
    ("step-mode all extra", "step-mode: unexpected argument 'extra'"),
    ("xp", "xp: missing address"),
    ("xp /3z 0", "xp: bad format '/3z'"),
    ("xp /4 zz", "xp: 'zz' is not an address"),
])
def test_bad_input_is_an_error_naming_it(line: str, message: str) -> None:
    t = fake_target()
    with pytest.raises(MonitorError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        run_monitor(t, line)
    assert t.step_mode == "alone"                          # nothing half-applied


def test_good_commands_run_and_aliases_share_an_entry() -> None:
    t = fake_target()
    assert run_monitor(t, "info sync") == run_monitor(t, "sync")
    assert run_monitor(t, "sync").startswith("stub: 0 stops")
    assert run_monitor(t, "step-mode all").startswith("step-mode all")
    assert t.step_mode == "all"
    assert COMMANDS["info breakpoints"] is COMMANDS["info bp"]
    text = run_monitor(t, "help")
    assert text == run_monitor(t, "")
    for name in ("info mem", "info tlb", "info lapic", "info registers", "xp", "nmi",
                 "system_reset", "step-mode", "info sync"):
        assert f"  {name}" in text, name


def test_a_new_command_is_one_entry() -> None:
    name = "unit-test-command"             # not a name any package registers
    assert name not in COMMANDS

    @monitor_command(name, usage="NAME", max_args=1, help="says NAME back")
    def echo(target: Any, args: list[str]) -> str:
        return f"said {args[0]}\n"
    try:
        assert run_monitor(fake_target(), f"{name} one") == "said one\n"
        assert f"{name} NAME" in run_monitor(fake_target(), "help")
        with pytest.raises(ValueError, match="already registered"):
            monitor_command(name, help="again")(echo)
    finally:
        del COMMANDS[name]
    assert monitor.COMMANDS is COMMANDS


def m(vaddr: int, paddr: int, size: int, pte: int, w: bool, u: bool = False) -> Mapping:
    return Mapping(vaddr, paddr, size, pte, w, u)


def test_info_mem_merges_contiguous_ranges_with_the_same_rights() -> None:
    maps = [m(0, 0, 0x20_0000, 0x83, True), m(0x20_0000, 0x20_0000, 0x20_0000, 0x83, True),
            m(0x40_0000, 0x1000, 0x1000, 0x1, False),            # rights change
            m(0x50_0000, 0x2000, 0x1000, 0x7, True, True),       # a hole before it
            m(-0x8000_0000, 0x3000, 0x1000, 0x3, True)]          # upper half, canonical
    assert format_mem(maps) == (
        "0000000000000000-0000000000400000 0000000000400000 -rw\n"
        "0000000000400000-0000000000401000 0000000000001000 -r-\n"
        "0000000000500000-0000000000501000 0000000000001000 urw\n"
        "ffffffff80000000-ffffffff80001000 0000000000001000 -rw\n")
    assert format_mem([]) == "no present mappings\n"


def test_info_tlb_prints_qemus_flag_letters() -> None:
    pte = (1 << 63) | 0x100 | 0x80 | 0x40 | 0x20 | 0x10 | 0x8 | 0x4 | 0x2 | 0x1
    assert format_tlb([m(0x20_0000, 0x40_0000, 0x20_0000, pte, True),
                       m(0x1000, 0x2000, 0x1000, 0x1, False)]) == (
        "0000000000200000: 0000000000400000 XGPDACTUW\n"
        "0000000000001000: 0000000000002000 ---------\n")


def test_xp_formats_like_qemu() -> None:
    assert parse_xp(None) == (1, "x", 4)
    assert parse_xp("/4bx") == parse_xp("/4xb") == (4, "x", 1)
    assert parse_xp("/2g") == (2, "x", 8)
    assert parse_xp("/3dh") == (3, "d", 2)
    data = bytes(range(0x10, 0x28))
    assert format_xp(0x1000, data, "x", 8) == (
        "0000000000001000: 0x1716151413121110 0x1f1e1d1c1b1a1918\n"
        "0000000000001010: 0x2726252423222120\n")
    assert format_xp(0, b"\xff\xff\x01\x00", "d", 2) == "0000000000000000: -1 1\n"
    assert format_xp(0, b"\xff\xff", "u", 2) == "0000000000000000: 65535\n"


def test_info_lapic_decodes_the_registers() -> None:
    regs = {"lapic.id": 2 << 24, "lapic.version": 0x50014, "lapic.svr": 0x1FF,
            "lapic.lvt_lint0": 0x700, "lapic.lvt_lint1": 0x400, "lapic.lvt_timer": 0x200EF,
            "lapic.lvt_error": 0x10000, "lapic.tdcr": 0xB, "lapic.tmict": 1000,
            "lapic.tmcct": 10, "lapic.icr": 0xC4500, "lapic.icr2": 0,
            "lapic.isr": 1 << 0xEF, "lapic.irr": (1 << 0x30) | (1 << 0xEF), "lapic.tmr": 0,
            "lapic.tpr": 0x20, "lapic.ppr": 0x20, "lapic.dfr": 0xFFFFFFFF, "lapic.ldr": 0}
    text = format_lapic(3, regs)
    assert text.startswith("local APIC of vCPU 3 (version 0x14, 6 LVT entries)\n")
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}
    assert lines["ID"].split()[1] == "2"
    assert "APIC enabled, focus checking on, spurious vector 0xff" in lines["SVR"]
    assert "unmasked ExtINT active-high edge vector 0x00" in lines["LVT0"]
    assert "unmasked NMI" in lines["LVT1"]
    assert "unmasked periodic vector 0xef" in lines["Timer"]
    assert "divide by 1, initial count 1000, current count 10" in text
    assert "INIT vector 0x00, physical destination 0, all but self, edge assert" in lines["ICR"]
    assert lines["ISR"].split()[1:] == ["0xef"]
    assert lines["IRR"].split()[1:] == ["0x30", "0xef"]
    assert lines["TMR"].endswith("(none)")
    assert "TPR      0x20  PPR 0x20" in text and "DFR 0xf (flat)" in text


def test_every_command_drops_what_the_stop_cached() -> None:
    """loadvm (the snapshot package) changes the machine under the stub; so may others."""
    t = fake_target()
    forgot: list[int] = []
    t.forget = lambda: forgot.append(1)
    run_monitor(t, "step-mode")
    with pytest.raises(MonitorError):
        run_monitor(t, "step-mode sideways")
    assert len(forgot) == 2


def test_info_mem_and_tlb_say_when_paging_is_off() -> None:
    from regsync.gdb.pagewalk import Paging
    t = fake_target()
    t.m.vcpus = [SimpleNamespace(id=0)]
    t._vcpu = lambda tid: t.m.vcpus[tid - 1]
    t.paging_of = lambda tid: Paging(cr0=1, cr3=0, cr4=0, efer=0)
    t.phys_reader = lambda: (lambda gpa, n: 0)
    for cmd in ("info mem", "info tlb 0"):
        assert run_monitor(t, cmd) == ("vCPU 0 runs with paging off (flat): virtual addresses "
                                       "are physical\n")
