"""The trace's command-line parts: ``regsync run --trace-sync FILE`` and ``regsync trace``.

cli.py registers these in a few lines; everything about the trace stays here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

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
    t.add_argument("file", help="the trace (JSON lines from regsync run --trace-sync)")
    t.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    t.add_argument("--chrome", metavar="OUT",
                   help="also write Chrome/Perfetto trace-event JSON to OUT "
                        "(open in chrome://tracing or ui.perfetto.dev)")
    t.add_argument("--top", type=int, default=10, metavar="N",
                   help="rows per table for registers and callers (default 10)")


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        records = load(args.file)
    except OSError as e:
        raise ValueError(f"{args.file}: {e.strerror or e}") from None
    s = summary(records, top=max(1, args.top))
    if args.chrome:
        try:
            with open(args.chrome, "w") as f:
                json.dump(to_chrome(records), f)
        except OSError as e:
            raise ValueError(f"--chrome {args.chrome}: {e.strerror or e}") from None
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s))
    if args.chrome:
        print(f"regsync: wrote {args.chrome} ({len(records)} events)", file=sys.stderr)
    return 0
