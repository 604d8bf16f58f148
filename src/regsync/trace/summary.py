"""Reading a sync trace back: summaries as tables, and the Chrome trace-event export.

The summary answers "why did registers cross the kernel boundary, and who asked":
transfers per reason, per register, per caller, and per exit. The export writes
Chrome's trace-event JSON (the format chrome://tracing and ui.perfetto.dev open):
one instant event per transfer on a track per vCPU.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

RUN = "KVM_RUN"


def load(path: str | Path) -> list[dict[str, Any]]:
    """The records of a trace file (JSON lines); a bad line is an error naming it."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "ioctl" not in rec or "vcpu" not in rec:
                    raise ValueError("not a sync-trace record")
            except ValueError as e:
                raise ValueError(f"{path}: line {n} is not a sync-trace record ({e})") from None
            out.append(rec)
    return out


def transfers(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Register transfers only (the KVM_RUN markers left out)."""
    return [r for r in records if r["ioctl"] != RUN]


def summary(records: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    moved = transfers(records)
    exits = sum(1 for r in records if r["ioctl"] == RUN)
    syscalls = [r for r in moved if r["ioctl"] != "kvm_run"]
    by_caller: Counter[str] = Counter(r["caller"] for r in moved)
    costly: Counter[str] = Counter(r["caller"] for r in syscalls)
    return {
        "runs": exits,
        "transfers": len(moved),
        "syscalls": len(syscalls),
        "via_kvm_run": len(moved) - len(syscalls),
        "transfers_per_run": round(len(moved) / exits, 3) if exits else None,
        "syscalls_per_run": round(len(syscalls) / exits, 3) if exits else None,
        "by_reason": dict(Counter(r["reason"] for r in moved).most_common()),
        "by_ioctl": dict(Counter(r["ioctl"] for r in moved).most_common()),
        "by_register": dict(Counter(n for r in moved for n in r["registers"]).most_common(top)),
        "by_caller": dict(by_caller.most_common(top)),
        "costliest_callers": dict(costly.most_common(top)),
        "by_vcpu": dict(sorted(Counter(r["vcpu"] for r in moved).items())),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary as plain-text tables."""
    lines = [f"{s['runs']} KVM_RUN, {s['transfers']} register transfers "
             f"({s['syscalls']} ioctls, {s['via_kvm_run']} through kvm_run's kvm_dirty_regs)"]
    if s["runs"]:
        lines.append(f"per run: {s['transfers_per_run']} transfers, {s['syscalls_per_run']} ioctls")
    for title, key in (("reason", "by_reason"), ("ioctl", "by_ioctl"),
                       ("register", "by_register"), ("caller", "by_caller"),
                       ("costliest caller (ioctls)", "costliest_callers"), ("vcpu", "by_vcpu")):
        table = s[key]
        if not table:
            continue
        width = max(len(str(k)) for k in table)
        lines.append("")
        lines.append(f"{title:<{width}}  transfers")
        lines += [f"{str(k):<{width}}  {v:>9}" for k, v in table.items()]
    return "\n".join(lines)


def to_chrome(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Chrome trace-event JSON: an instant event per record, one track per vCPU."""
    events: list[dict[str, Any]] = [
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": v, "args": {"name": f"vCPU {v}"}}
        for v in sorted({r["vcpu"] for r in records})]
    for r in records:
        name = r["ioctl"] if r["group"] is None else f"{r['ioctl']} {r['group']}"
        events.append({"name": name, "cat": r["reason"], "ph": "i", "s": "t", "pid": 1,
                       "tid": r["vcpu"], "ts": r["t_us"],
                       "args": {"registers": r["registers"], "caller": r["caller"],
                                "exit": r["exit"]}})
    return {"traceEvents": events, "displayTimeUnit": "ns"}
