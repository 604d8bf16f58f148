"""gdb's ``monitor`` commands as a table: one :class:`MonitorCommand` per entry.

A command is a name of one or two words (``"nmi"``, ``"info mem"``), a usage
line, a help line and a function ``run(target, args) -> str`` over the
:class:`~regsync.gdb.adapter.MachineTarget` (which is stopped: all-stop).
Adding a command is one decorated function, in this module or in the package
that owns the feature (import it once so it registers)::

    @monitor_command("savevm", usage="NAME", max_args=1,
                     help="save the machine's state as NAME")
    def _savevm(target: MachineTarget, args: list[str]) -> str: ...

After every command the stub forgets what it cached at the stop (register
snapshot, translations), so a command that changes the machine (``loadvm``)
needs nothing more. Bad input never falls through to something else: an unknown command, a
surplus or malformed argument raises :class:`MonitorError` naming it, which
the protocol core sends as an error (gdb prints the message, then fails the
command). Names follow QEMU's HMP where it has the command (``xp``, ``info
mem``, ``info tlb``, ``info lapic``, ``info registers -a``, ``system_reset``,
``nmi``), so habits carry over.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..arch.x86_64 import CATALOG
from ..regdump import format_dump
from .pagewalk import mappings
from .target import TargetError
from .x86info import format_lapic, format_mem, format_tlb, format_xp, parse_xp

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .adapter import MachineTarget

__all__ = ["COMMANDS", "MonitorCommand", "MonitorError", "monitor_command", "run_monitor",
           "stats_dict"]

Runner = Callable[["MachineTarget", list[str]], str]


class MonitorError(TargetError):
    """A monitor command refused its input; the message names what was wrong."""

    def __init__(self, message: str, errno_value: int = errno.EINVAL) -> None:
        super().__init__(errno_value, message)


@dataclass(frozen=True)
class MonitorCommand:
    name: str
    usage: str
    help: str
    run: Runner
    max_args: int = 0


#: Every command by name (aliases map to the same entry).
COMMANDS: dict[str, MonitorCommand] = {}


def monitor_command(name: str, *, usage: str = "", help: str, max_args: int = 0,
                    aliases: tuple[str, ...] = ()) -> Callable[[Runner], Runner]:
    """Register ``run`` as the monitor command ``name`` (see the module docstring)."""
    def register(run: Runner) -> Runner:
        cmd = MonitorCommand(name, usage, help, run, max_args)
        for key in (name, *aliases):
            if key in COMMANDS:
                raise ValueError(f"monitor command {key!r} is already registered")
            COMMANDS[key] = cmd
        return run
    return register


def run_monitor(target: "MachineTarget", line: str) -> str:
    """Run one monitor command line; MonitorError for anything it does not take."""
    words = line.split()
    if not words:
        return _help(target, [])
    for n in (2, 1):
        cmd = COMMANDS.get(" ".join(words[:n])) if len(words) >= n else None
        if cmd is not None:
            args = words[n:]
            if len(args) > cmd.max_args:
                raise MonitorError(f"{cmd.name}: unexpected argument '{args[cmd.max_args]}'")
            try:
                return cmd.run(target, args)
            finally:
                # A command may have changed the machine under the stub (reset,
                # loadvm, a write to page tables): drop what the stop cached.
                forget = getattr(target, "forget", None)
                if forget is not None:
                    forget()
    name = " ".join(words[:2]) if words[0] == "info" and len(words) > 1 else words[0]
    raise MonitorError(f"unknown monitor command '{name}' ('monitor help' lists them)")


# --- arguments -------------------------------------------------------------------------

def _vcpu_arg(target: "MachineTarget", cmd: str, args: list[str]) -> "Vcpu":
    """The vCPU an optional index argument names (0-based), else the current thread's."""
    vcpus = target.m.vcpus
    if not args:
        return target._vcpu(target.current_thread())
    try:
        vid = int(args[0], 0)
    except ValueError:
        raise MonitorError(f"{cmd}: '{args[0]}' is not a vCPU (0-{len(vcpus) - 1})") from None
    if not 0 <= vid < len(vcpus):
        raise MonitorError(f"{cmd}: no vCPU {vid} (0-{len(vcpus) - 1})")
    return vcpus[vid]


def _address(cmd: str, text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise MonitorError(f"{cmd}: '{text}' is not an address") from None
    if not 0 <= value < 1 << 64:
        raise MonitorError(f"{cmd}: address {text} out of range")
    return value


# --- commands --------------------------------------------------------------------------

@monitor_command("help", help="this list")
def _help(target: "MachineTarget", args: list[str]) -> str:
    seen: dict[str, MonitorCommand] = {}
    for cmd in COMMANDS.values():
        seen.setdefault(cmd.name, cmd)
    width = max(len(f"{c.name} {c.usage}".strip()) for c in seen.values())
    return "regsync monitor commands:\n" + "".join(
        f"  {f'{c.name} {c.usage}'.strip():<{width}}  {c.help}\n" for c in seen.values())


@monitor_command("info sync", aliases=("sync",),
                 help="per vCPU: exits, ioctls by name, register cache work")
def _info_sync(target: "MachineTarget", args: list[str]) -> str:
    return info_sync_text(target)


@monitor_command("stats", help="the counters of 'info sync' and the stub's stops, as JSON")
def _stats(target: "MachineTarget", args: list[str]) -> str:
    return json.dumps(stats_dict(target)) + "\n"


@monitor_command("regs", help="every register of the current thread (the full catalog dump)")
def _regs(target: "MachineTarget", args: list[str]) -> str:
    v = target._vcpu(target.current_thread())
    return f"vCPU {v.id}:\n" + format_dump(target._call(v, v.regs.dump)) + "\n"


_RUNTIME_VIEW = CATALOG.group_mask("REGS", "SREGS")


@monitor_command("info registers", usage="[-a]", max_args=1,
                 help="general, segment and control registers of the current vCPU (-a: all)")
def _info_registers(target: "MachineTarget", args: list[str]) -> str:
    if args and args[0] != "-a":
        raise MonitorError(f"info registers: unknown option '{args[0]}' (-a for every vCPU)")
    vcpus = target.m.vcpus if args else [target._vcpu(target.current_thread())]
    out = []
    for v in vcpus:
        values = target._call(v, lambda v=v: v.regs.dump(_RUNTIME_VIEW))
        out.append(f"vCPU {v.id} (thread {v.id + 1}):\n{format_dump(values)}\n")
    return "".join(out)


@monitor_command("info bp", aliases=("info breakpoints",),
                 help="breakpoints, debug-register slots and what this host can do")
def _info_bp(target: "MachineTarget", args: list[str]) -> str:
    return info_bp_text(target)


@monitor_command("step-mode", usage="[alone|all]", max_args=1,
                 help="whether the other vCPUs run while one steps")
def _step_mode(target: "MachineTarget", args: list[str]) -> str:
    if args:
        if args[0] not in ("alone", "all"):
            raise MonitorError(f"step-mode: unknown argument '{args[0]}' (alone or all)")
        target.step_mode = args[0]
    return f"step-mode {target.step_mode}: a step runs " + (
        "only the stepping vCPU\n" if target.step_mode == "alone"
        else "the other vCPUs too (when gdb asks)\n")


@monitor_command("xp", usage="[/fmt] ADDR", max_args=2,
                 help="guest-physical memory, QEMU's format: /[count][x|d|u|o][b|h|w|g]")
def _xp(target: "MachineTarget", args: list[str]) -> str:
    if not args:
        raise MonitorError("xp: missing address")
    fmt = args[0] if args[0].startswith("/") else None
    rest = args[1:] if fmt is not None else args
    if len(rest) != 1:
        raise MonitorError("xp: expected [/fmt] ADDR")
    try:
        count, letter, size = parse_xp(fmt)
    except ValueError as e:
        raise MonitorError(f"xp: {e}") from None
    addr = _address("xp", rest[0])
    try:
        data = target.read_physical(addr, count * size)
    except TargetError as e:
        raise MonitorError(f"xp: {e.message or e}", e.errno_value) from None
    return format_xp(addr, data, letter, size)


_PAGING_OFF = "vCPU {} runs with paging off ({}): virtual addresses are physical\n"


def _page_view(target: "MachineTarget", cmd: str, args: list[str],
               fmt: Callable[[Any], str]) -> str:
    """info mem / info tlb: the vCPU's page tables walked, or why there are none."""
    v = _vcpu_arg(target, cmd, args)
    paging = target.paging_of(v.id + 1)
    if paging.mode in ("real", "flat"):
        return _PAGING_OFF.format(v.id, paging.mode)
    return fmt(mappings(target.phys_reader(), paging))


@monitor_command("info mem", usage="[VCPU]", max_args=1,
                 help="mapped virtual ranges and their rights (u user, r, w write)")
def _info_mem(target: "MachineTarget", args: list[str]) -> str:
    return _page_view(target, "info mem", args, format_mem)


@monitor_command("info tlb", usage="[VCPU]", max_args=1,
                 help="every present page: virtual -> physical, flags XGPDACTUW")
def _info_tlb(target: "MachineTarget", args: list[str]) -> str:
    return _page_view(target, "info tlb", args, format_tlb)


_LAPIC_VIEW = CATALOG.group_mask("LAPIC", "SREGS")


@monitor_command("info lapic", usage="[VCPU]", max_args=1,
                 help="the local APIC of the current (or given) vCPU, decoded")
def _info_lapic(target: "MachineTarget", args: list[str]) -> str:
    v = _vcpu_arg(target, "info lapic", args)

    def read() -> dict[str, int | None]:
        values = v.regs.dump(_LAPIC_VIEW)
        values["lapic.tpr"] = v.regs["lapic.tpr"]
        return values
    return format_lapic(v.id, target._call(v, read))


@monitor_command("system_reset", help="every vCPU to its power-on state, the image reloaded")
def _system_reset(target: "MachineTarget", args: list[str]) -> str:
    target.system_reset()
    return "machine reset: the guest starts again from its entry when continued\n"


@monitor_command("nmi", usage="[VCPU]", max_args=1,
                 help="inject an NMI into every vCPU (as QEMU's nmi) or into one")
def _nmi(target: "MachineTarget", args: list[str]) -> str:
    vcpus = [_vcpu_arg(target, "nmi", args)] if args else list(target.m.vcpus)
    for v in vcpus:
        target._call(v, v.handle.nmi)          # KVM_NMI, on the vCPU's own thread
    return "NMI queued for vCPU " + ", ".join(str(v.id) for v in vcpus) + \
        " (delivered when it runs)\n"


# --- what info sync, stats and info bp print ----------------------------------------------

def info_sync_text(target: "MachineTarget") -> str:
    """monitor info sync: per vCPU exits, ioctls, cache work; the stub's stops."""
    from .adapter import register_ioctls   # adapter imports this module: not at the top
    lines = []
    for v in target.m.vcpus:
        st = v.stats
        io = st["ioctls"]
        lines.append(f"vCPU {v.id}: {st['exits']} exits, {io.get('KVM_RUN', 0)} KVM_RUN, "
                     f"{register_ioctls(io)} register ioctls")
        lines.append("  ioctls: " + ", ".join(f"{k}={n}" for k, n in sorted(io.items())))
        lines.append(f"  fetches: {st['fetches'] or '{}'}  writes: {st['writes'] or '{}'}"
                     f"  via kvm_run: {st['deferred_writes'] or '{}'}")
        lines.append(f"  local reads: {st['local_reads']}  fetches avoided: "
                     f"{st['fetches_avoided']}  write-backs avoided: {st['writes_avoided']}")
    s = target.stats
    lat = sorted(s.latencies_ns)
    med = f"{lat[len(lat) // 2] / 1000:.0f} us" if lat else "-"
    lines.append(f"stub: {s.stops} stops (median exit-to-reply {med}), {s.debug_exits} debug "
                 f"exits, {s.injected} re-injected, {s.guest_debug_sets} KVM_SET_GUEST_DEBUG")
    return "\n".join(lines) + "\n"

def stats_dict(target: "MachineTarget") -> dict[str, Any]:
    """Machine-readable counters: ioctls per vCPU and the stub's stop costs."""
    from .adapter import register_ioctls
    s = target.stats
    return {
        "ioctls": [dict(v.handle.counters) for v in target.m.vcpus],
        "register_ioctls": [register_ioctls(v.handle.counters) for v in target.m.vcpus],
        "stops": s.stops, "debug_exits": s.debug_exits, "injected": s.injected,
        "guest_debug_sets": s.guest_debug_sets, "latencies_ns": list(s.latencies_ns),
        "stop_ioctls": [list(x) for x in s.stop_ioctls], "step_mode": target.step_mode,
    }

def info_bp_text(target: "MachineTarget") -> str:
    """monitor info bp: slots in use, software breakpoints, what this host can do."""
    from .adapter import NSLOTS
    lines = []
    used = 0
    for i, slot in enumerate(target.slots):
        if slot is not None:
            used += 1
            lines.append(f"hw slot {i} (DR{i}): {slot.label}")
    lines.append(f"hardware slots: {used}/{NSLOTS} in use")
    for addr in sorted(target.sw):
        lines.append(f"sw breakpoint (int3) at {addr:#x}")
    c = target.caps
    if c.sw_breakpoints:
        lines.append(f"software breakpoints: int3 ({c.sw_detail})")
    else:
        lines.append("software breakpoints: fall back to hardware slots: int3 is not "
                     f"intercepted by KVM here ({c.sw_detail})")
    lines.append("watchpoints: " + ("hardware (DR7 R/W)" if c.watchpoints else
                                     f"unavailable ({c.watch_detail})"))
    return "\n".join(lines) + "\n"


# Commands other packages own register on import (the snapshot room: savevm, loadvm;
# the trace room: trace).
from ..snapshot import monitor as _snapshot_monitor  # noqa: E402,F401  (registers)
from ..trace import monitor as _trace_monitor  # noqa: E402,F401  (registers: trace)
