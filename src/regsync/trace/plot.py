"""Transfers per exit over time, as an SVG line chart (no plotting library needed).

One line per trace (a strategy, a run): the x axis is the vCPU exits seen so far,
the y axis the register transfers per exit, averaged over buckets of exits. Where a
table gives totals, this shows when transfers happen: a boot-time burst, a steady
cost per exit, a monitor's periodic dump. ``regsync trace A B --svg OUT`` writes it.
"""

from __future__ import annotations

from typing import Any, Sequence
from xml.sax.saxutils import escape

from .summary import RUN

WIDTH, HEIGHT, MARGIN = 720, 360, 56
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def series(records: list[dict[str, Any]], buckets: int = 100) -> list[tuple[float, float]]:
    """(exit, register transfers per exit) at the middle of each bucket of exits.

    Exits are counted as the KVM_RUN records; a transfer belongs to the exit count
    its record carries (transfers before the first run fall in the first bucket)."""
    runs = sum(1 for r in records if r["ioctl"] == RUN)
    if runs == 0:
        return []
    size = max(1, -(-runs // buckets))                      # exits per bucket, rounded up
    moved = [0] * (-(-runs // size))
    for r in records:
        if r["ioctl"] != RUN:
            moved[min(len(moved) - 1, max(0, int(r.get("exit") or 0)) // size)] += 1
    out = []
    for i, n in enumerate(moved):
        width = min(size, runs - i * size)
        out.append((i * size + width / 2, n / width))
    return out


def svg(traces: Sequence[tuple[str, list[dict[str, Any]]]], title: str = "") -> str:
    """The chart of several named traces (see the module docstring)."""
    lines = [(name, series(recs)) for name, recs in traces]
    xmax = max((p[0] for _, pts in lines for p in pts), default=1.0) or 1.0
    ymax = max((p[1] for _, pts in lines for p in pts), default=1.0) or 1.0
    ymax = _nice(ymax)
    sx = (WIDTH - 2 * MARGIN) / xmax
    sy = (HEIGHT - 2 * MARGIN) / ymax

    def xy(x: float, y: float) -> str:
        return f"{MARGIN + x * sx:.1f},{HEIGHT - MARGIN - y * sy:.1f}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">'
           f'{escape(title or "register transfers per exit")}</text>',
           f'<polyline fill="none" stroke="black" points="{xy(0, ymax)} {xy(0, 0)} {xy(xmax, 0)}"/>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{MARGIN - 6}" y="{HEIGHT - MARGIN - y * sy + 4:.1f}" '
                   f'text-anchor="end">{y:g}</text>')
    for i in range(5):
        x = xmax * i / 4
        out.append(f'<text x="{MARGIN + x * sx:.1f}" y="{HEIGHT - MARGIN + 16}" '
                   f'text-anchor="middle">{x:,.0f}</text>')
    out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">exits</text>')
    for k, (name, pts) in enumerate(lines):
        colour = COLOURS[k % len(COLOURS)]
        if pts:
            out.append(f'<polyline class="series" data-name="{escape(name)}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.5" '
                       f'points="{" ".join(xy(x, y) for x, y in pts)}"/>')
        out.append(f'<text x="{WIDTH - MARGIN}" y="{40 + 16 * k}" text-anchor="end" '
                   f'fill="{colour}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice(v: float) -> float:
    """A round top for the y axis: the smallest of 1, 2, 2.5, 5 × 10^k at or above v."""
    step = 1.0
    while step < v:
        step *= 10
    while step / 10 >= v > 0:
        step /= 10
    for m in (0.1, 0.2, 0.25, 0.5, 1.0):
        if step * m >= v:
            return step * m
    return step


__all__ = ["series", "svg"]
