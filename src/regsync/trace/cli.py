"""The trace's command-line parts: ``regsync run --trace-sync FILE`` and ``regsync trace``.

cli.py registers these in a few lines; everything about the trace stays here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from .plot import svg
from .recorder import SyncTrace
from .summary import format_summary, load, summary, to_chrome


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--trace-sync", metavar="FILE",
                     help="record every register transfer (ioctl or kvm_run), with its reason "
                          "and caller, as JSON lines in FILE (see 'regsync trace FILE')")


def start(m: Any, args: argparse.Namespace, stack: contextlib.ExitStack) -> SyncTrace | None:
    """Attach a trace to every vCPU for the run (before the vCPU threads start)."""
    path = getattr(args, "trace_sync", None)
    if not path:
        return None
    try:
        out = stack.enter_context(open(path, "w"))
    except OSError as e:
        raise ValueError(f"--trace-sync {path}: {e.strerror or e}") from None
    tr = SyncTrace(out)
    for v in m.vcpus:
        tr.attach(v)
    stack.callback(tr.detach)
    return tr


def stats_hint(register_ioctls: int, tracing: bool) -> str | None:
    """One line for --stats when the trace would explain the numbers."""
    if register_ioctls and not tracing:
        return (f"  {register_ioctls} register ioctls at run time: to see why each happened "
                f"and who asked, add --trace-sync FILE, then: regsync trace FILE")
    return None


def add_trace_parser(sub: Any) -> None:
    t = sub.add_parser("trace", help="summarize a sync trace written by run --trace-sync")
    t.add_argument("file", nargs="+",
                   help="the trace (JSON lines from regsync run --trace-sync); several: a "
                        "summary each, and --svg draws them side by side")
    t.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    t.add_argument("--chrome", metavar="OUT",
                   help="also write Chrome/Perfetto trace-event JSON to OUT "
                        "(open in chrome://tracing or ui.perfetto.dev)")
    t.add_argument("--svg", metavar="OUT",
                   help="also write an SVG chart of register transfers per exit over time, "
                        "one line per trace (e.g. one run per --strategy)")
    t.add_argument("--top", type=int, default=10, metavar="N",
                   help="rows per table for registers and callers (default 10)")


def cmd_trace(args: argparse.Namespace) -> int:
    traces = []
    for path in args.file:
        try:
            traces.append((path, load(path)))
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror or e}") from None
    summaries = {path: summary(records, top=max(1, args.top)) for path, records in traces}
    for option, path, write in (("--chrome", args.chrome, _write_chrome),
                                ("--svg", args.svg, _write_svg)):
        if path:
            try:
                write(path, traces)
            except OSError as e:
                raise ValueError(f"{option} {path}: {e.strerror or e}") from None
    if args.json:
        one = len(traces) == 1
        print(json.dumps(summaries[args.file[0]] if one else summaries, indent=2))
    else:
        for i, (path, s) in enumerate(summaries.items()):
            if len(summaries) > 1:
                print(("\n" if i else "") + f"== {path}")
            print(format_summary(s))
    if args.chrome:
        print(f"regsync: wrote {args.chrome} ({sum(len(r) for _, r in traces)} events)",
              file=sys.stderr)
    if args.svg:
        print(f"regsync: wrote {args.svg} ({len(traces)} line{'s' * (len(traces) > 1)})",
              file=sys.stderr)
    return 0


def _write_chrome(path: str, traces: list[tuple[str, list[dict[str, Any]]]]) -> None:
    records = [r for _, recs in traces for r in recs]
    with open(path, "w") as f:
        json.dump(to_chrome(records), f)


def _write_svg(path: str, traces: list[tuple[str, list[dict[str, Any]]]]) -> None:
    with open(path, "w") as f:
        f.write(svg([(Path(p).stem, recs) for p, recs in traces]))
