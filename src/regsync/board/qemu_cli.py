"""``regsync-qemu`` (also ``regsync qemu ...``): qemu-system-x86_64's command line,
for runners that start test kernels with QEMU.

    regsync-qemu -kernel k.elf -append "x=1" -initrd mod -smp 2 -m 64 \\
        -device isa-debug-exit,iobase=0xf4,iosize=4 -device pc-testdev \\
        -serial stdio -display none -nodefaults -no-reboot

It accepts the subset such runners pass and refuses anything else with one
line naming the argument (status 2). The machine is regsync's pc board
(regsync.board): the kernel is loaded by regsync's multiboot loader, the
firmware's state is modelled, so -bios is accepted and ignored. The process
status follows QEMU's convention ((code << 1) | 1, regsync.exitstatus) unless
``--exit-status regsync`` is given.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn, Sequence

from .. import exitstatus

PROG = "regsync-qemu"


class UsageError(ValueError):
    """An argument regsync-qemu does not accept (the message names it)."""


@dataclass
class Options:
    kernel: str = ""
    append: str = ""
    initrd: list[str] = field(default_factory=list)
    smp: int = 1
    mem_mb: int = 128                     # QEMU's default RAM size
    cpu: str | None = None
    debug_exit: tuple[int, int] | None = None   # (iobase, iosize)
    testdev: bool = False
    serial: str = "none"                  # "stdio", "none" or "file:PATH"
    no_reboot: bool = False
    gdb_port: int | None = None
    wait_for_gdb: bool = False
    exit_status: str = "qemu"
    exit_at_once: bool = False            # the command line: os._exit after the guest's exit


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None


def _size_mb(text: str) -> int:
    """-m 64 / 64M / 1G / size=64M -> MiB (a bare number is MiB, as in QEMU)."""
    value = text.split(",")[0].removeprefix("size=")
    units = {"": 1, "m": 1, "M": 1, "g": 1024, "G": 1024}
    num, unit = (value[:-1], value[-1]) if value[-1:] in "mMgG" and value[-1:] else (value, "")
    try:
        return int(num) * units[unit]
    except (ValueError, KeyError):
        raise UsageError(f"-m {text}: expected a size such as 64, 64M or 1G") from None


def _keyvals(text: str, what: str, positional: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(text.split(",")):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.replace("_", "-")] = v
        elif i == 0:
            out[positional] = item
        else:
            raise UsageError(f"{what} {text}: unexpected {item!r}")
    return out


def _smp(text: str) -> int:
    kv = _keyvals(text, "-smp", "cpus")
    unknown = set(kv) - {"cpus", "sockets", "cores", "threads", "maxcpus", "dies"}
    if unknown:
        raise UsageError(f"-smp {text}: unsupported {', '.join(sorted(unknown))}")
    if "cpus" in kv:
        return _int(kv["cpus"], "-smp")
    n = 1                                 # QEMU: the topology's product when cpus is not given
    for key in ("sockets", "dies", "cores", "threads"):
        n *= _int(kv.get(key, "1"), f"-smp {key}")
    return n


def _machine(text: str) -> None:
    kv = _keyvals(text, "-machine", "type")
    machine = kv.pop("type", "pc")
    if not (machine == "pc" or machine.startswith("pc-i440fx")):
        raise UsageError(f"-machine {machine}: regsync models QEMU's pc machine only")
    if kv.pop("accel", "kvm") not in ("kvm",):
        raise UsageError(f"-machine {text}: regsync runs on KVM only (accel=kvm)")
    if kv.pop("kernel-irqchip", "on") not in ("on", "true"):
        raise UsageError(f"-machine {text}: the irqchip is always KVM's in-kernel one")
    if kv:
        raise UsageError(f"-machine {text}: unsupported {', '.join(sorted(kv))}")


def _device(text: str, opts: Options) -> None:
    kv = _keyvals(text, "-device", "driver")
    driver = kv.pop("driver", "")
    if driver == "isa-debug-exit":
        # QEMU's defaults: iobase 0x501, iosize 2 (hw/misc/debugexit.c).
        opts.debug_exit = (_int(kv.pop("iobase", "0x501"), "iobase"), _int(kv.pop("iosize", "2"), "iosize"))
    elif driver == "pc-testdev":
        opts.testdev = True
    else:
        raise UsageError(f"-device {driver or text}: not supported (isa-debug-exit, pc-testdev)")
    if kv:
        raise UsageError(f"-device {text}: unsupported {', '.join(sorted(kv))}")


def _global(text: str, opts: Options) -> None:
    prop, _, value = text.partition("=")
    if prop in ("isa-debug-exit.iobase", "isa-debug-exit.iosize"):
        base, size = opts.debug_exit or (0x501, 2)
        n = _int(value, f"-global {prop}")
        opts.debug_exit = (n, size) if prop.endswith("iobase") else (base, n)
    elif not value:
        raise UsageError(f"-global {text}: expected DRIVER.PROPERTY=VALUE")
    # Other device properties describe devices regsync does not have: nothing to set.


_FLAGS = {"nodefaults", "no-reboot", "enable-kvm", "nographic", "no-hpet", "S", "s"}
_VALUED = {"kernel", "append", "initrd", "smp", "m", "cpu", "machine", "M", "accel", "device",
           "serial", "display", "global", "bios", "vga", "monitor", "name", "gdb", "exit-status"}


def parse(argv: Sequence[str]) -> Options:
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"{arg}: unexpected argument (regsync-qemu takes -kernel FILE)")
        name = arg.lstrip("-")
        if name in _FLAGS:
            if name == "no-reboot":
                opts.no_reboot = True
            elif name == "nographic":
                opts.serial = "stdio"
            elif name == "s":
                opts.gdb_port = 1234
            elif name == "S":
                opts.wait_for_gdb = True
            i += 1
            continue
        if name not in _VALUED:
            raise UsageError(f"{arg}: not supported by regsync-qemu")
        if i + 1 >= len(args):
            raise UsageError(f"{arg}: needs a value")
        value = args[i + 1]
        i += 2
        if name == "kernel":
            opts.kernel = value
        elif name == "append":
            opts.append = value
        elif name == "initrd":
            opts.initrd = [v for v in value.split(",") if v]
        elif name == "smp":
            opts.smp = _smp(value)
        elif name == "m":
            opts.mem_mb = _size_mb(value)
        elif name == "cpu":
            opts.cpu = value
        elif name in ("machine", "M"):
            _machine(value)
        elif name == "accel":
            if value.split(",")[0] != "kvm":
                raise UsageError(f"-accel {value}: regsync runs on KVM only")
        elif name == "device":
            _device(value, opts)
        elif name == "serial":
            if value in ("stdio", "mon:stdio"):
                opts.serial = "stdio"
            elif value == "none" or value.startswith("file:"):
                opts.serial = value
            else:
                raise UsageError(f"-serial {value}: regsync offers stdio, none or file:PATH")
        elif name in ("display", "vga", "monitor"):
            if value.split(",")[0] != "none":
                raise UsageError(f"-{name} {value}: regsync has no {name} (only 'none')")
        elif name == "global":
            _global(value, opts)
        elif name == "gdb":
            if not value.startswith("tcp::"):
                raise UsageError(f"-gdb {value}: regsync serves gdb on tcp::PORT")
            opts.gdb_port = _int(value[5:], "-gdb")
        elif name == "exit-status":
            if value not in exitstatus.CONVENTIONS:
                raise UsageError(f"--exit-status {value}: one of {', '.join(exitstatus.CONVENTIONS)}")
            opts.exit_status = value
        # -bios, -name: accepted; regsync is its own firmware and has no window title.
    if not opts.kernel:
        raise UsageError("no -kernel given: regsync-qemu boots a multiboot or ELF kernel")
    return opts


def _check_kernel(path: str, parse_image: Any) -> None:
    """QEMU's -kernel takes a multiboot kernel (or a Linux bzImage, which regsync does
    not boot): a file that is neither multiboot nor ELF is refused here, where
    regsync's own loader would take it as a flat binary."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"-kernel {path}: {e.strerror or e}") from None
    if parse_image(data).format == "flat":
        raise UsageError(f"-kernel {path}: no multiboot header in its first 8 KiB and not an "
                         "ELF image (a Linux bzImage is not supported)")


def _serial_sink(spec: str, stack: contextlib.ExitStack) -> IO[str]:
    if spec == "stdio":
        return sys.stdout
    if spec.startswith("file:"):
        return stack.enter_context(open(spec[5:], "w"))
    return io.StringIO()                  # no serial port wired anywhere: dropped


def run(opts: Options) -> int:
    from ..devices.basic import DebugExit, DEBUG_EXIT_PORT, HYPERCALL_PORT, TICK_PORT
    from ..loader import parse_image
    from ..machine import Machine
    _check_kernel(opts.kernel, parse_image)
    with contextlib.ExitStack() as stack:
        sink = _serial_sink(opts.serial, stack)
        m = stack.enter_context(Machine(mem_mb=opts.mem_mb, smp=opts.smp, cpu=opts.cpu,
                                        board="pc", testdev=opts.testdev, serial_out=sink))
        # QEMU's pc machine has none of regsync's own ports; the exit device only
        # where -device isa-debug-exit puts it.
        for port in (DEBUG_EXIT_PORT, HYPERCALL_PORT, TICK_PORT):
            m.bus.unregister(port)
        if opts.debug_exit is not None:
            base, size = opts.debug_exit
            m.bus.register(DebugExit(m._guest_exit), base, size)
        m.reboot = not opts.no_reboot
        m.load(opts.kernel, cmdline=opts.append, initrd=opts.initrd)
        server = None
        if opts.gdb_port is not None:
            from ..gdb.server import attach_gdb
            server = stack.enter_context(contextlib.closing(
                attach_gdb(m, opts.gdb_port, wait=opts.wait_for_gdb)))
        try:
            m.start(paused=bool(server and opts.wait_for_gdb))
            status = None
            while status is None:
                status = m.wait(0.2)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; stopping the guest", file=sys.stderr)
            m.stop(exitstatus.INTERRUPTED)
            return exitstatus.own_status(exitstatus.INTERRUPTED, opts.exit_status)
        m.serial.drain()
        with contextlib.suppress(OSError, ValueError):
            sink.flush()
        status = exitstatus.process_status(m.exit_status, m.guest_code, opts.exit_status)
        if opts.exit_at_once:
            _exit_now(status)
        return status


def _exit_now(status: int) -> NoReturn:
    """End the process as QEMU does on isa-debug-exit: at once. The vCPU threads
    have stopped; the kernel closes the VM's fds and unmaps its memory faster
    than Machine.close() and interpreter teardown would (about 30 ms here)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(exitstatus.BAD_INPUT)


def main(argv: Sequence[str] | None = None, exit_at_once: bool = True) -> int:
    """The command line. ``exit_at_once=False`` returns the status instead of ending
    the process (for callers that go on afterwards)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["-h"], ["--help"], ["-help"]):
        print(__doc__)
        return 0
    from ..kvm import KvmError, KvmUnavailable
    from ..memory import GuestMemoryError
    try:
        opts = parse(args)
        opts.exit_at_once = exit_at_once
        return run(opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return exitstatus.INTERRUPTED
    except (UsageError, ValueError, TypeError, KvmError, KvmUnavailable, GuestMemoryError,
            OSError) as e:
        _fail(str(e))
    except Exception:                # a bug in regsync: never status 1, QEMU's "code 0"
        import traceback
        traceback.print_exc()
        return exitstatus.own_status(exitstatus.FATAL, "qemu")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
