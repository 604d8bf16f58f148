"""Text for the x86 monitor commands: page-table views, the local APIC, ``xp`` dumps.

Pure functions over plain values (catalog register values, :class:`Mapping`
records, bytes), so they test without KVM. The layouts follow QEMU's HMP
where one exists, so a kernel developer's habits (and scripts) carry over:

* ``info mem``/``info tlb``: target/i386/monitor.c ``mem_print`` and
  ``print_pte`` (16-digit addresses; ``-rw`` rights; flags ``XGPDACTUW``).
* ``xp /fmt addr``: monitor/hmp-cmds-target.c ``memory_dump`` (count, format
  and size letters; 16 bytes per line, each line led by its address).

The LAPIC decode names fields from the Intel SDM vol. 3A, 11.5 (LVT), 11.5.4
(divide configuration), 11.6.1 (ICR) and 11.9 (SVR).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping as MappingT

from .pagewalk import PTE_NX, Mapping

__all__ = ["format_lapic", "format_mem", "format_tlb", "format_xp", "parse_xp"]

_PTE_FLAGS = ((PTE_NX, "X"), (1 << 8, "G"), (1 << 7, "P"), (1 << 6, "D"), (1 << 5, "A"),
              (1 << 4, "C"), (1 << 3, "T"), (1 << 2, "U"), (1 << 1, "W"))


def format_tlb(maps: Iterable[Mapping]) -> str:
    """One line per present leaf: ``vaddr: paddr flags`` (QEMU's print_pte)."""
    lines = []
    for mp in maps:
        flags = "".join(c if mp.pte & bit else "-" for bit, c in _PTE_FLAGS)
        lines.append(f"{mp.vaddr & (1 << 64) - 1:016x}: {mp.paddr:016x} {flags}")
    return "\n".join(lines) + "\n" if lines else "no present mappings\n"


def format_mem(maps: Iterable[Mapping]) -> str:
    """Contiguous ranges with the same effective rights: ``start-end size urw``."""
    lines = []
    start = end = None
    rights = ""
    for mp in list(maps) + [None]:       # type: ignore[list-item]
        r = None if mp is None else ("u" if mp.user else "-") + "r" + ("w" if mp.writable else "-")
        if mp is not None and start is not None and mp.vaddr == end and r == rights:
            end = mp.vaddr + mp.size
            continue
        if start is not None and end is not None:
            lines.append(f"{start & (1 << 64) - 1:016x}-{end & (1 << 64) - 1:016x} "
                         f"{end - start:016x} {rights}")
        if mp is not None and r is not None:
            start, end, rights = mp.vaddr, mp.vaddr + mp.size, r
    return "\n".join(lines) + "\n" if lines else "no present mappings\n"


# --- xp ---------------------------------------------------------------------------------

_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}
_FMT = re.compile(r"/(\d*)([xduo]?)([bhwg]?)([xduo]?)$")


def parse_xp(fmt: str | None) -> tuple[int, str, int]:
    """QEMU's ``/[count][format][size]`` (either letter order); default ``/1xw``.
    ValueError names a format it does not take."""
    if fmt is None:
        return 1, "x", 4
    m = _FMT.match(fmt)
    if m is None or (m.group(2) and m.group(4)):
        raise ValueError(f"bad format '{fmt}' (want /[count][x|d|u|o][b|h|w|g])")
    count = int(m.group(1) or 1)
    if not 0 < count <= 4096:
        raise ValueError(f"bad count in '{fmt}' (1..4096)")
    return count, m.group(2) or m.group(4) or "x", _SIZES[m.group(3) or "w"]


def format_xp(addr: int, data: bytes, letter: str, size: int) -> str:
    """``data`` read at physical ``addr`` as units of ``size`` bytes, 16 bytes a line."""
    lines = []
    for off in range(0, len(data), 16):
        units = []
        for u in range(off, min(off + 16, len(data)), size):
            v = int.from_bytes(data[u:u + size], "little")
            if letter == "x":
                units.append(f"{v:#0{2 + 2 * size}x}")
            elif letter == "o":
                units.append(f"{v:#o}")
            elif letter == "d" and v >> (8 * size - 1):
                units.append(str(v - (1 << 8 * size)))
            else:
                units.append(str(v))
        lines.append(f"{addr + off:016x}: " + " ".join(units))
    return "\n".join(lines) + "\n"


# --- LAPIC ------------------------------------------------------------------------------

_DELIVERY = {0: "Fixed", 1: "LowPri", 2: "SMI", 4: "NMI", 5: "INIT", 6: "StartUp", 7: "ExtINT"}
_TIMER_MODE = {0: "one-shot", 1: "periodic", 2: "TSC-deadline", 3: "reserved"}
_SHORTHAND = {0: "no shorthand", 1: "self", 2: "all", 3: "all but self"}
_LVTS = (("LVT0", "lvt_lint0", True), ("LVT1", "lvt_lint1", True), ("Timer", "lvt_timer", False),
         ("Thermal", "lvt_thermal", False), ("PMC", "lvt_pmc", False),
         ("Error", "lvt_error", False))


def _lvt(name: str, value: int, lint: bool) -> str:
    parts = ["masked" if value >> 16 & 1 else "unmasked"]
    if name == "Timer":
        parts.append(_TIMER_MODE[value >> 17 & 3])
    elif name != "Error":
        parts.append(_DELIVERY.get(value >> 8 & 7, f"mode {value >> 8 & 7}"))
    if lint:
        parts.append("active-low" if value >> 13 & 1 else "active-high")
        parts.append("level" if value >> 15 & 1 else "edge")
        if value >> 14 & 1:
            parts.append("remote-IRR")
    if value >> 12 & 1:
        parts.append("send-pending")
    parts.append(f"vector {value & 0xFF:#04x}")
    return f"{name:<8} {value:#010x}  " + " ".join(parts)


def _vectors(bitmap: int) -> str:
    vecs = [f"{i:#04x}" for i in range(256) if bitmap >> i & 1]
    return " ".join(vecs) if vecs else "(none)"


def format_lapic(vid: int, regs: MappingT[str, int | None]) -> str:
    """Decode the catalog's ``lapic.*`` registers (and ``lapic.tpr``) of one vCPU."""
    def get(name: str) -> int:
        value = regs.get(f"lapic.{name}")
        return 0 if value is None else value

    version = get("version")
    svr = get("svr")
    out = [f"local APIC of vCPU {vid} (version {version & 0xFF:#04x}, "
           f"{(version >> 16 & 0xFF) + 1} LVT entries)",
           f"ID       {get('id') >> 24}",
           f"SVR      {svr:#010x}  APIC {'enabled' if svr >> 8 & 1 else 'disabled'}, focus "
           f"checking {'off' if svr >> 9 & 1 else 'on'}, spurious vector {svr & 0xFF:#04x}"]
    for name, reg, lint in _LVTS:
        out.append(_lvt(name, get(reg), lint))
    dcr = get("tdcr")
    code = (dcr >> 1 & 4) | (dcr & 3)
    out.append(f"{'':<8} timer: divide by {1 if code == 7 else 2 << code}, initial count "
               f"{get('tmict')}, current count {get('tmcct')}")
    icr, icr2 = get("icr"), get("icr2")
    out.append(f"ICR      {icr:#010x} {icr2:#010x}  "
               f"{_DELIVERY.get(icr >> 8 & 7, 'mode %d' % (icr >> 8 & 7))} vector "
               f"{icr & 0xFF:#04x}, {'logical' if icr >> 11 & 1 else 'physical'} destination "
               f"{icr2 >> 24}, {_SHORTHAND[icr >> 18 & 3]}, "
               f"{'level' if icr >> 15 & 1 else 'edge'} {'assert' if icr >> 14 & 1 else 'de-assert'}"
               + (", send pending" if icr >> 12 & 1 else ""))
    out.append(f"ESR      {get('esr'):#010x}")
    out.append(f"ISR      {_vectors(get('isr'))}")
    out.append(f"IRR      {_vectors(get('irr'))}")
    out.append(f"TMR      {_vectors(get('tmr'))}")
    out.append(f"TPR      {get('tpr') & 0xFF:#04x}  PPR {get('ppr') & 0xFF:#04x}  "
               f"APR {get('apr') & 0xFF:#04x}  LDR {get('ldr') >> 24:#04x}  "
               f"DFR {get('dfr') >> 28:#x} ({'flat' if get('dfr') >> 28 == 0xF else 'cluster'})")
    return "\n".join(out) + "\n"
