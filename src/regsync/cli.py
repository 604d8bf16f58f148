"""The ``regsync`` command: run | regs | info | list | gdb | bench.

Errors are one line on stderr (``regsync: error: …``) and exit status 2, never
a traceback. ``run`` exits with the guest's status (125 fatal exit, 124 watchdog,
130 interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any, NoReturn, Sequence

from . import __version__
from .guests import GUESTS

DEMO_GUEST = "smp"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="regsync", description="Drive KVM vCPUs from Python with a lazy, "
                "dirty-tracked register cache.")
    p.add_argument("--version", action="version", version=f"regsync {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", help="run a bundled guest or an image (default: the SMP demo)")
    r.add_argument("guest", nargs="?", default=DEMO_GUEST,
                   help="bundled guest name (see 'regsync list') or an image path")
    r.add_argument("--smp", type=_positive, default=2, help="number of vCPUs (default 2)")
    r.add_argument("--mem", type=_positive, default=64, metavar="MB", help="guest RAM in MiB")
    r.add_argument("--arg", type=_int, default=0, help="guest argument (boot info), 0 = default")
    r.add_argument("--gdb", type=_positive, metavar="PORT", help="serve gdb on 127.0.0.1:PORT")
    r.add_argument("--wait", action="store_true", help="with --gdb: stop before the first "
                   "instruction until gdb continues")
    r.add_argument("--stats", action="store_true", help="print what the register cache did")
    r.add_argument("--json", action="store_true", help="with --stats: as JSON")
    r.add_argument("--strategy", default="regsync",
                   choices=["regsync", "eager", "qemu", "qemu2012"], help="register sync")
    r.add_argument("--timeout", type=float, default=0, metavar="SEC",
                   help="stop the guest after SEC seconds (0 = no limit)")
    r.add_argument("--watchdog-action", choices=["stop", "reset"], default="stop")
    r.add_argument("--serial", metavar="FILE", help="write the guest's serial output to FILE "
                   "instead of stdout")

    g = sub.add_parser("regs", help="dump the registers at the Nth exit of vCPU 0")
    g.add_argument("guest")
    g.add_argument("--exit", type=_positive, default=1, metavar="N", dest="nexit")
    g.add_argument("--level", default="FULL", help="RUNTIME, RESET, FULL or a group name")
    g.add_argument("--arg", type=_int, default=0)
    g.add_argument("--json", action="store_true")

    sub.add_parser("info", help="KVM capabilities, register groups and levels")
    sub.add_parser("list", help="the bundled guests")

    b = sub.add_parser("bench", help="run the benchmarks (table + JSON)")
    b.add_argument("--quick", action="store_true", help="fewer iterations")
    b.add_argument("--out", default="benchmarks/results.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    from .kvm import KvmError, KvmUnavailable
    from .memory import GuestMemoryError
    try:
        return int(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print("regsync: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KvmError,
            KvmUnavailable, GuestMemoryError, OSError) as e:
        print(f"regsync: error: {e}", file=sys.stderr)
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    from .machine import Machine
    if args.wait and not args.gdb:
        raise ValueError("--wait needs --gdb PORT")
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(args.serial, "w")) if args.serial else None
        m = stack.enter_context(Machine(mem_mb=args.mem, smp=args.smp, strategy=args.strategy,
                                        watchdog_action=args.watchdog_action, serial_out=sink))
        return _run(m, args)


def _run(m: Any, args: argparse.Namespace) -> int:
    """Load, optionally serve gdb, run until the guest exits; the exit status."""
    m.load(args.guest, arg=args.arg)
    server = None
    if args.gdb:
        from .gdb.server import attach_gdb
        server = attach_gdb(m, args.gdb, wait=args.wait)
    t0 = time.perf_counter()
    status: int | None = None
    try:
        m.start(paused=bool(server and args.wait))
        deadline = t0 + args.timeout if args.timeout else None
        while status is None:
            status = m.wait(0.2)
            if status is None and deadline and time.perf_counter() > deadline:
                print(f"regsync: timeout after {args.timeout} s; stopping", file=sys.stderr)
                m.stop(124)
                status = 124
    except KeyboardInterrupt:
        print("regsync: interrupted; stopping the guest", file=sys.stderr)
        m.stop(130)
        status = 130
    finally:
        if server is not None:
            server.close()
    wall = time.perf_counter() - t0
    if args.stats:
        _print_stats(m, wall, args.json)
    print(f"regsync: guest {args.guest} exited with status {status} "
          f"({wall:.3f} s, {len(m.vcpus)} vCPU{'s' if len(m.vcpus) > 1 else ''})",
          file=sys.stderr)
    return status


def _print_stats(m: Any, wall: float, as_json: bool) -> None:
    per_vcpu = [v.stats for v in m.vcpus]
    if as_json:
        print(json.dumps({"wall_s": wall, "vcpus": per_vcpu}, indent=2))
        return
    for v, st in zip(m.vcpus, per_vcpu):
        io = st["ioctls"]
        runs = io.get("KVM_RUN", 0)
        others = sum(n for k, n in io.items() if k != "KVM_RUN")
        print(f"vCPU {v.id}: {st['exits']} exits, {runs} KVM_RUN, {others} other ioctls "
              f"({others / max(runs, 1):.3f} per exit)")
        print(f"  ioctls: {', '.join(f'{k}={n}' for k, n in sorted(io.items()))}")
        print(f"  fetches: {dict(st['fetches']) or '{}'}  writes: {dict(st['writes']) or '{}'}"
              f"  via kvm_run: {dict(st['deferred_writes']) or '{}'}")
        print(f"  local reads: {st['local_reads']}  fetches avoided: {st['fetches_avoided']}"
              f"  write-backs avoided: {st['writes_avoided']}")


def cmd_regs(args: argparse.Namespace) -> int:
    from .machine import Machine
    from .regdump import format_dump
    from .vcpu import to_mask
    mask = to_mask(args.level)
    with Machine(smp=1) as m:
        m.load(args.guest, arg=args.arg)
        v = m.vcpus[0]
        ex = None
        for _ in range(args.nexit):
            ex = v.run()
            if ex.kind not in ("io", "mmio", "interrupted"):
                break
            m.dispatch(v, ex)
            if m.exit_status is not None:
                break
        values = v.regs.dump(mask)
        if args.json:
            print(json.dumps({"exit": repr(ex), "registers": values}, indent=1))
        else:
            print(f"vCPU 0 at exit {v.cache.stats.exits}: {ex!r}")
            print(format_dump(values))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .arch.x86_64 import CATALOG
    from .kvm import System
    from .kvm.ioctls import CAPS
    with System() as kvm:
        print("KVM capabilities:")
        for name in ("SYNC_REGS", "ONE_REG", "XSAVE2", "IMMEDIATE_EXIT", "SET_GUEST_DEBUG",
                     "GUEST_DEBUG_HW_BPS", "GUEST_DEBUG_HW_WPS", "NR_VCPUS", "MAX_VCPUS",
                     "MAX_VCPU_ID", "IRQCHIP", "PIT2", "VCPU_EVENTS", "DEBUGREGS", "XCRS",
                     "SREGS2", "TSC_DEADLINE_TIMER", "MP_STATE"):
            print(f"  {name:<22} {kvm.check_extension(CAPS[name])}")
        print(f"  MSRs KVM saves: {len(kvm.msr_index_list())}")
    print("Register groups (bit, registers, flags):")
    for g in CATALOG.groups:
        flags = [f for f, on in (("sync", g.sync), ("volatile", g.volatile)) if on]
        if g.invalidates:
            flags.append("fetch invalidates " + "+".join(g.invalidates))
        print(f"  {g.name:<10} {g.bit:#06x} {len(CATALOG.registers_of(g.name)):>3}  "
              f"{', '.join(flags) or '-'}: {g.doc}")
    print("Levels:")
    for name, mask in CATALOG.levels.items():
        print(f"  {name:<8} {mask:#06x} = {' | '.join(g.name for g in CATALOG.groups_in(mask))}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name, doc in sorted(GUESTS.items()):
        print(f"{name:<10} {doc}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main
    return bench_main(quick=args.quick, out=args.out)


_COMMANDS = {"run": cmd_run, "regs": cmd_regs, "info": cmd_info, "list": cmd_list,
             "bench": cmd_bench}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
