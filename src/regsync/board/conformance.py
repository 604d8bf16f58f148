"""Run a conformance kernel under regsync-qemu and under qemu-system-x86_64 with the
same arguments, and compare: the serial output and the process status must match.

    python -m regsync.board.conformance [BUILD_DIR]   # the table, as markdown

Every case names the firmware QEMU boots through: qboot (-bios qboot.rom, fast)
unless the kernel checks state only SeaBIOS leaves (the PIC's masks), where QEMU
runs its default SeaBIOS (about 5 s to boot on this host).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .kernels import build as kbuild

QEMU = "qemu-system-x86_64"
QBOOT = "/usr/share/qemu/qboot.rom"
SEABIOS = "/usr/share/seabios/bios-256k.bin"
COMMON = ("-m", "64", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
          "-display", "none", "-nodefaults", "-no-reboot")
TIMEOUT = 120


@dataclass(frozen=True)
class Case:
    name: str
    kernel: str                       # a kernel of regsync.board.kernels ("-aout": flat binary)
    args: tuple[str, ...]
    firmware: str                     # "qboot" or "seabios": what QEMU boots through
    expect: int = 1                   # QEMU's status for code 0: (0 << 1) | 1


MODULE_TEXT = b"module-one data\nsecond line\n"
CASES: tuple[Case, ...] = (
    Case("exit code 0", "hello", ("-append", "code=0"), "qboot"),
    Case("exit code 5", "hello", ("-append", "code=5"), "qboot", expect=11),
    Case("exit code 62 (QEMU 125)", "hello", ("-append", "code=62"), "qboot", expect=125),
    Case("a.out kludge", "hello-aout", ("-append", "code=3"), "qboot", expect=7),
    Case("serial 16550", "serial", (), "qboot"),
    Case("multiboot info", "mbinfo", ("-append", "answer=42", "-initrd", "{module}"), "qboot"),
    Case("fw_cfg", "fwcfg", ("-smp", "2", "-append", "cpus=2"), "qboot"),
    Case("ACPI + PM timer", "acpi", ("-smp", "3", "-append", "cpus=3"), "qboot"),
    Case("SMP bring-up from the MADT (INIT/SIPI), 2 vCPUs", "smp", ("-smp", "2", "-append", "cpus=2"),
         "qboot"),
    Case("SMP bring-up from the MADT (INIT/SIPI), 4 vCPUs", "smp", ("-smp", "4", "-append", "cpus=4"),
         "qboot"),
    Case("CMOS memory bytes, RTC against the PM timer", "cmos", ("-smp", "2", "-append", "cpus=2"),
         "qboot"),
    Case("pc-testdev ports and iomem, PCI host bridge", "testdev", ("-device", "pc-testdev"), "qboot"),
    Case("CPUID filtered by -cpu host,-x2apic", "cpuid", ("-cpu", "host,-arch-capabilities,-x2apic"),
         "qboot"),
    Case("PIT IRQ 0 through the IOAPIC pin of the MADT override", "pit", (), "qboot"),
    Case("PIC (as SeaBIOS leaves it) + IOAPIC via pc-testdev", "irq", ("-device", "pc-testdev"),
         "seabios"),
)


@dataclass(frozen=True)
class Outcome:
    stdout: str
    status: int

    @property
    def verdict(self) -> str:
        last = self.stdout.rstrip("\n").rsplit("\n", 1)[-1]
        word = "PASS" if last.startswith("PASS") else "FAIL" if last.startswith("FAIL") else "-"
        return f"{word}, status {self.status}"


def missing() -> str | None:
    """Why the comparison cannot run here (None when it can)."""
    why = kbuild.toolchain_missing()
    if why:
        return why
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86)"
    if not Path(QBOOT).exists():
        return f"{QBOOT} is missing (Debian package qemu-system-data)"
    return None


def prepare(case: Case, build_dir: Path) -> list[str]:
    """Build the kernel and return the argument list both sides get."""
    image = kbuild.build(case.kernel, build_dir)
    module = build_dir / "module.txt"
    module.write_bytes(MODULE_TEXT)
    return ["-kernel", str(image), *COMMON, *(a.format(module=module) for a in case.args)]


def _run(cmd: list[str]) -> Outcome:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    return Outcome(p.stdout, p.returncode)


def run_regsync(args: list[str]) -> Outcome:
    return _run([sys.executable, "-m", "regsync.board.qemu_cli", *args])


def run_qemu(args: list[str], firmware: str) -> Outcome:
    bios = ["-bios", QBOOT] if firmware == "qboot" else []
    return _run([QEMU, "-accel", "kvm", *bios, *args])


def table(build_dir: Path) -> str:
    rows = ["| kernel | checks | QEMU firmware | regsync | QEMU | same output |",
            "|---|---|---|---|---|---|"]
    for case in CASES:
        args = prepare(case, build_dir)
        r, q = run_regsync(args), run_qemu(args, case.firmware)
        rows.append(f"| `{case.kernel}` | {case.name} | {case.firmware} | {r.verdict} | {q.verdict} "
                    f"| {'yes' if r.stdout == q.stdout else 'NO'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    reason = missing()
    if reason:
        sys.exit(f"conformance: cannot compare here: {reason}")
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/kernels")))
