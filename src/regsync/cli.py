"""The ``regsync`` command: run | regs | qemu | snapshot | trace | info | list | bench.

Errors are one line on stderr (``regsync: error: …``) and exit status 2, never
a traceback. ``run`` exits with the guest's status; regsync's own statuses are
:data:`EXIT_STATUSES` (the README's table). Output meant for programs (``--json``)
is the only thing on stdout; the guest's serial output then goes to stderr or
``--serial FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, NoReturn, Sequence

from . import __version__
from . import exitstatus
from .bench import DEFAULT_OUT as DEFAULT_BENCH_OUT   # git-ignored; the tracked file needs --out
from .gdb.adapter import KILL_STATUS
from .guests import GUESTS
from .kvm.ioctls import moves_register_state
from .snapshot import cli as snapshot_cli
from .trace import cli as trace_cli
from .strategies import STRATEGIES
from .vmm import EXIT_FATAL, EXIT_WATCHDOG

DEMO_GUEST = "smp"
REGS_TIMEOUT = 10.0              # seconds `regs` waits for exit N by default

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141           # 128 + SIGPIPE: stdout's reader went away (`| head`)
EXIT_INTERRUPTED = 130           # 128 + SIGINT


#: Every status regsync itself returns (besides the guest's own 0-255), and why.
#: The README's exit-status table lists each (a test checks).
EXIT_STATUSES: dict[int, str] = {
    0: "the guest wrote 0, or stopped without a status (every vCPU halted with no "
       "in-kernel irqchip, a KVM shutdown event); or a command other than run succeeded",
    EXIT_BAD_INPUT: "bad input: one `regsync: error:` line (arguments, image, KVM limits, "
                    "`regs` not reaching exit N within --timeout)",
    exitstatus.GUEST_OUT_OF_BAND: "the guest wrote 2 or a code >= 123, which would read as one "
                                  "of regsync's own statuses (the code is on stderr)",
    EXIT_WATCHDOG: "--timeout expired, or the guest watchdog expired (with --watchdog-action "
                   "reset: after the third reset)",
    EXIT_FATAL: "fatal exit: triple fault, emulation failure, a vCPU error (the exit and a "
                "register dump are printed), or an internal error in regsync (a bug: the "
                "traceback is printed; not 1, which is a guest's code)",
    EXIT_INTERRUPTED: "Ctrl-C (SIGINT)",
    KILL_STATUS: "gdb's `kill` (128 + SIGKILL, as a shell reports it)",
    EXIT_BROKEN_PIPE: "stdout was closed early (`regsync info | head -1`); nothing more printed",
    # With --exit-status qemu a guest's code c gives the odd (c << 1) | 1, so regsync's
    # odd statuses move to the next even number there (regsync.exitstatus).
    **{exitstatus.own_status(s, "qemu"): f"--exit-status qemu: what {s} is otherwise"
       for s in (EXIT_FATAL, KILL_STATUS, EXIT_BROKEN_PIPE)},
}


class CliError(Exception):
    """Bad input found after parsing: printed as one error line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"regsync: error: {message} (see {self.prog} --help)\n")


# --- argument types: each says what it wants ---------------------------------------------
def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive(text: str) -> int:
    value = _number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _u64(text: str) -> int:
    value = _number(text)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0..2**64-1 (an unsigned 64-bit value)")
    return value


def _port(text: str) -> int:
    value = _number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1..65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="regsync", description="Drive KVM vCPUs from Python with a lazy, "
                "dirty-tracked register cache.")
    p.add_argument("--version", action="version", version=f"regsync {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", help="run a bundled guest or an image (default: the SMP demo)")
    r.add_argument("guest", nargs="?", default=DEMO_GUEST,
                   help="bundled guest name (see 'regsync list') or an image path: ELF64, "
                        "multiboot (ELF32 or a.out kludge) or flat")
    r.add_argument("--smp", type=_positive, default=2, help="number of vCPUs (default 2)")
    r.add_argument("--mem", type=_positive, default=64, metavar="MB",
                   help="guest RAM in MiB (default 64)")
    r.add_argument("--arg", type=_u64, default=0, metavar="N",
                   help="guest argument in the boot info (u64; 0 = the guest's default)")
    r.add_argument("--gdb", type=_port, metavar="PORT", help="serve gdb on 127.0.0.1:PORT")
    r.add_argument("--wait", action="store_true", help="with --gdb: stop before the first "
                   "instruction until gdb continues")
    r.add_argument("--stats", action="store_true", help="print what the register cache did, "
                   "setup (creation, load) apart from the run")
    r.add_argument("--json", action="store_true", help="the stats as JSON on stdout (implies "
                   "--stats; the guest's serial output goes to stderr unless --serial)")
    r.add_argument("--strategy", default="regsync",
                   choices=list(STRATEGIES),
                   help="register sync: the cache, or a comparison strategy")
    r.add_argument("--timeout", type=_seconds, default=0, metavar="SEC",
                   help="stop the guest after SEC seconds, exit 124 (0 = no limit)")
    r.add_argument("--watchdog-action", choices=["stop", "reset"], default="stop",
                   help="when the guest watchdog expires: stop (exit 124) or reset the guest "
                        "(at most 3 times, then stop)")
    r.add_argument("--serial", metavar="FILE", help="write the guest's serial output to FILE "
                   "instead of stdout")
    r.add_argument("--append", default="", metavar="ARGS",
                   help="multiboot: the kernel's command line after its path (QEMU's -append)")
    r.add_argument("--initrd", action="append", default=[], metavar="FILE",
                   help="multiboot: a module (\"FILE [ARGS]\"; repeat for more)")
    r.add_argument("--board", choices=["pc"], help="QEMU's pc devices and firmware tables "
                   "(fw_cfg, ACPI, PM timer, CMOS, PCI, PIC as SeaBIOS leaves it): regsync.board")
    r.add_argument("--testdev", action="store_true", help="with --board pc: QEMU's pc-testdev")
    r.add_argument("--exit-status", choices=["regsync", "qemu"], default="regsync",
                   help="how the guest's debug-exit code becomes the process status: regsync's "
                        "convention (codes that would read as regsync's own statuses become "
                        "123) or QEMU's (code << 1) | 1 (regsync.exitstatus)")
    r.add_argument("--cpu", metavar="host[,+FEAT|-FEAT...]",
                   help="filter KVM's CPUID as QEMU's -cpu host,-x2apic,+feature does")

    snapshot_cli.add_run_options(r)
    trace_cli.add_run_options(r)

    g = sub.add_parser("regs", help="dump the registers at the Nth exit of vCPU 0")
    g.add_argument("guest", help="bundled guest name or an image path (one vCPU)")
    g.add_argument("--exit", type=_positive, default=1, metavar="N", dest="nexit",
                   help="dump at vCPU 0's Nth exit to userspace (default 1)")
    g.add_argument("--level", default="FULL",
                   help="RUNTIME, RESET, FULL or a group name (any case; default FULL)")
    g.add_argument("--arg", type=_u64, default=0, metavar="N",
                   help="guest argument in the boot info (u64; 0 = the guest's default)")
    g.add_argument("--timeout", type=_seconds, default=REGS_TIMEOUT, metavar="SEC",
                   help=f"give up when exit N has not come after SEC seconds, exit 2 "
                        f"(default {REGS_TIMEOUT:g}; 0 = wait for ever)")
    g.add_argument("--json", action="store_true",
                   help="the exit and the registers as JSON on stdout")

    sub.add_parser("qemu", help="run a kernel with qemu-system-x86_64's arguments "
                   "(regsync-qemu -kernel FILE ...; see regsync qemu --help)", add_help=False)
    sub.add_parser("info", help="KVM capabilities, register groups and levels")
    sub.add_parser("list", help="the bundled guests")

    snapshot_cli.add_snapshot_parser(sub)
    trace_cli.add_trace_parser(sub)

    b = sub.add_parser("bench", help="run the benchmarks (table + JSON)")
    b.add_argument("--quick", action="store_true", help="fewer iterations")
    b.add_argument("--out", default=DEFAULT_BENCH_OUT, metavar="FILE",
                   help=f"where the JSON goes (default {DEFAULT_BENCH_OUT}, git-ignored; "
                        "the tracked benchmarks/results.json only when named here)")
    return p


def _stop_on_first_interrupt(signum: int, frame: object) -> None:
    """SIGINT: the first Ctrl-C stops the guest (KeyboardInterrupt, status 130); later
    ones are ignored, so a second cannot interrupt the shutdown or the interpreter's
    exit (which would end the process by SIGINT instead of 130)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _interrupt_once() -> Any:
    """Install _stop_on_first_interrupt over Python's default handler; the previous
    handler, to put back if no Ctrl-C came (None when nothing was installed)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _stop_on_first_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    previous = None
    try:
        previous = _interrupt_once()
        status = _main(argv)
        sys.stdout.flush()          # a closed pipe shows here, not at interpreter exit
        return status
    except KeyboardInterrupt:
        # Ctrl-C outside the command: before the handler above was in place (Python's
        # default raises too), or after the command returned. Still a clean 130.
        print("regsync: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and keep Python's exit
        # flush from failing again on the dead pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        # Interrupted: SIGINT stays ignored while the process exits with 130.
        if previous is not None and signal.getsignal(signal.SIGINT) is _stop_on_first_interrupt:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["qemu"]:           # QEMU's own argument syntax: its own parser
        from .board.qemu_cli import main as qemu_main
        return qemu_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"a command is required: {', '.join(_COMMANDS)}")
    from .kvm import KvmError, KvmUnavailable
    from .memory import GuestMemoryError
    try:
        return int(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print("regsync: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except (CliError, ValueError, TypeError, KvmError, KvmUnavailable, GuestMemoryError,
            OSError) as e:
        print(f"regsync: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:                # a bug in regsync: not status 1, a guest's code
        import traceback
        traceback.print_exc()
        return EXIT_FATAL


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --- run ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .machine import Machine
    snapshot_cli.shape_from_snapshot(args)      # --restore: vCPUs and memory from the file
    if args.wait and not args.gdb:
        raise CliError("--wait needs --gdb PORT")
    if args.json:
        args.stats = True            # --json is the stats' format: asking for it asks for them
    with contextlib.ExitStack() as stack:
        sink: Any = None
        if args.serial:
            try:
                sink = stack.enter_context(open(args.serial, "w"))
            except OSError as e:
                raise CliError(f"--serial {args.serial}: {e.strerror or e}") from None
        if sink is None and args.json:
            sink = sys.stderr        # stdout carries the JSON alone
        if args.testdev and not args.board:
            raise CliError("--testdev needs --board pc")
        m = stack.enter_context(Machine(mem_mb=args.mem, smp=args.smp, strategy=args.strategy,
                                        watchdog_action=args.watchdog_action, serial_out=sink,
                                        board=args.board, testdev=args.testdev, cpu=args.cpu))
        tracing = trace_cli.start(m, args, stack) if args.trace_sync else None
        return _run(m, args, tracing is not None)


def _run(m: Any, args: argparse.Namespace, tracing: bool = False) -> int:
    """Load, optionally serve gdb, run until the guest exits; the exit status."""
    if not snapshot_cli.restore_into(m, args):
        m.load(args.guest, arg=args.arg, cmdline=args.append, initrd=args.initrd)
    for v in m.vcpus:
        v.end_setup()                # what follows is the run (see --stats)
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
                m.stop(EXIT_WATCHDOG)
                status = EXIT_WATCHDOG
    except KeyboardInterrupt:
        print("regsync: interrupted; stopping the guest", file=sys.stderr)
        m.stop(EXIT_INTERRUPTED)
        status = EXIT_INTERRUPTED
    finally:
        if server is not None:
            server.close()
    snapshot_cli.save_on_exit(m, args)
    wall = time.perf_counter() - t0
    m.serial.drain()                 # a last line without its newline is still shown
    if args.stats:
        _print_stats(m, wall, args.json, tracing)
    from .exitstatus import process_status
    code = m.guest_code
    status = process_status(status, code, args.exit_status)
    wrote = f"it wrote code {code}; " if code is not None else ""
    print(f"regsync: guest {args.guest} exited with status {status} ({wrote}"
          f"{wall:.3f} s, {len(m.vcpus)} vCPU{'s' if len(m.vcpus) > 1 else ''})",
          file=sys.stderr)
    return status


def _minus(total: Any, base: Any, top: bool = True) -> Any:
    """total - base for stats: numbers subtract, dicts by key (in the per-name count
    dicts below the top, names whose count did not change are dropped), lists keep
    what was appended after base."""
    if isinstance(total, dict):
        out = {}
        for k, v in total.items():
            empty = type(v)() if isinstance(v, (dict, list)) else 0
            d = _minus(v, base.get(k, empty), top=False)
            if top or d:
                out[k] = d
        return out
    if isinstance(total, list):
        return total[len(base):]
    return total - base


def split_stats(v: Any) -> dict[str, Any]:
    """A vCPU's stats as {"setup", "run"}: setup = up to Vcpu.end_setup (creation's
    power-on snapshot, the guest load), run = everything since."""
    total = v.stats
    setup = v.setup_stats or _minus(total, total)
    return {"id": v.id, "setup": setup, "run": _minus(total, setup)}


def _print_stats(m: Any, wall: float, as_json: bool, tracing: bool = False) -> None:
    per_vcpu = [split_stats(v) for v in m.vcpus]
    if as_json:
        print(json.dumps({"wall_s": wall, "vcpus": per_vcpu}, indent=2))
        return
    for st in per_vcpu:
        setup, run = st["setup"], st["run"]
        io = run["ioctls"]
        runs = io.get("KVM_RUN", 0)
        others = sum(n for k, n in io.items() if k != "KVM_RUN")
        print(f"vCPU {st['id']}: {run['exits']} exits, {runs} KVM_RUN, {others} other ioctls "
              f"at run time ({others / max(runs, 1):.3f} per exit)")
        print(f"  setup: {_ioctls(setup)}  (creation's power-on snapshot and the load)")
        print(f"  run:   {_ioctls(run)}")
        print(f"         fetches: {run['fetches'] or '{}'}  writes: {run['writes'] or '{}'}"
              f"  via kvm_run: {run['deferred_writes'] or '{}'}")
        print(f"         local reads: {run['local_reads']}  fetches avoided: "
              f"{run['fetches_avoided']}  write-backs avoided: {run['writes_avoided']}")
        hint = trace_cli.stats_hint(sum(n for k, n in io.items() if moves_register_state(k)),
                                    tracing)
        if hint:
            print(hint)


def _ioctls(st: dict[str, Any]) -> str:
    io = st["ioctls"]
    return f"ioctls: {', '.join(f'{k}={n}' for k, n in sorted(io.items())) or 'none'}"


# --- regs --------------------------------------------------------------------------------
@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[list[bool]]:
    """A flag set after ``seconds``; SIGALRM also interrupts a KVM_RUN in progress
    (it returns EINTR). The timer repeats every 50 ms after that, so a signal that
    lands just before the ioctl starts is followed by one that lands inside it."""
    expired = [False]
    if not seconds:
        yield expired
        return

    def on_alarm(signum: int, frame: Any) -> None:
        expired[0] = True

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield expired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cmd_regs(args: argparse.Namespace) -> int:
    from .machine import Machine
    from .regdump import format_dump
    from .vcpu import to_mask
    mask = to_mask(args.level)
    # stdout carries the dump; the guest's serial output goes to stderr.
    with Machine(smp=1, serial_out=sys.stderr) as m:
        m.load(args.guest, arg=args.arg)
        v = m.vcpus[0]
        ex = None
        reached = 0
        with _alarm(args.timeout) as expired:
            while reached < args.nexit:
                if expired[0]:
                    raise CliError(f"vCPU 0 did not reach exit {args.nexit} within "
                                   f"{args.timeout:g} s ({reached} exits so far); --timeout "
                                   "SEC waits longer")
                ex = v.run()
                if ex.kind == "interrupted":
                    continue                 # our own alarm, not a guest exit
                reached += 1
                if ex.kind not in ("io", "mmio"):
                    break                    # hlt, debug, a fatal exit: nothing runs on
                m.dispatch(v, ex)
                if m.exit_status is not None:
                    break
        if reached < args.nexit:
            print(f"regsync: the guest stopped at exit {reached} ({ex!r}), before exit "
                  f"{args.nexit}", file=sys.stderr)
        values = v.regs.dump(mask)
        if args.json:
            print(json.dumps({"exit": repr(ex), "exits": reached, "registers": values}, indent=1))
        else:
            print(f"vCPU 0 at exit {reached}: {ex!r}")
            print(format_dump(values))
    return 0


# --- info, list, bench -------------------------------------------------------------------
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
             "bench": cmd_bench, "snapshot": snapshot_cli.cmd_snapshot,
             "trace": trace_cli.cmd_trace}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
