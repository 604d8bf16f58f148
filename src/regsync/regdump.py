"""A readable register dump, laid out from the catalog (one table per group)."""

from __future__ import annotations

from .arch.x86_64 import CATALOG


def _fmt(value: int | None, width: int) -> str:
    if value is None:
        return "n/a"
    digits = max(1, (width + 3) // 4)
    return f"{value:#0{digits + 2}x}"


def format_dump(values: dict[str, int | None], columns: int = 3) -> str:
    """Group by group, ``name = value`` cells in columns; only registers present in values."""
    out: list[str] = []
    for g in CATALOG.groups:
        regs = [r for r in CATALOG.registers_of(g.name) if r.name in values]
        if not regs:
            continue
        out.append(f"[{g.name}] {g.doc}")
        cells = [f"{r.name:>16} = {_fmt(values[r.name], r.width)}" for r in regs]
        wide = [c for c, r in zip(cells, regs) if r.width > 64]
        narrow = [c for c, r in zip(cells, regs) if r.width <= 64]
        for i in range(0, len(narrow), columns):
            out.append("  ".join(narrow[i:i + columns]))
        out.extend(wide)
    return "\n".join(out)
