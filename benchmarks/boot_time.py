"""Start-to-exit wall time of a trivial multiboot kernel (not a test).

    python benchmarks/boot_time.py [--runs 10] [--out FILE]

The kernel is the conformance kernel ``hello`` (regsync.board.kernels: gcc -m32,
multiboot ELF32; it programs COM1, prints one line and writes 0 to
isa-debug-exit). Each variant is a fresh process, timed from spawn to exit,
with the same QEMU arguments:

    regsync            python -m regsync.board.qemu_cli (regsync-qemu), pc board
    qemu pc+SeaBIOS    qemu-system-x86_64 -accel kvm (default firmware)
    qemu pc+qboot      ... -bios /usr/share/qemu/qboot.rom
    qemu microvm       ... -M microvm (its qboot-based bios-microvm.bin)

regsync runs from compiled bytecode, as an installed package does (the warm-up
run writes it). Runs are interleaved (one of each variant per round) so drift on a shared host
hits every variant alike; reported: median, min and max per variant, and each
variant's output and status are checked (same line, status 1) so a run that
did not boot the kernel is not timed. Table on stdout, JSON to
benchmarks/out/boot_time.json (git-ignored) unless --out names another file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from regsync.board import conformance
from regsync.board.kernels import build as kbuild

ARGS = ["-m", "64", "-append", "code=0", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot"]
EXPECTED_LINE = "hello: exiting with code 0\n"


def variants(kernel: Path) -> dict[str, list[str]]:
    common = ["-kernel", str(kernel), *ARGS]
    qemu = [conformance.QEMU, "-accel", "kvm"]
    return {
        "regsync": [sys.executable, "-m", "regsync.board.qemu_cli", *common],
        "qemu pc+SeaBIOS": [*qemu, *common],
        "qemu pc+qboot": [*qemu, "-bios", conformance.QBOOT, *common],
        "qemu microvm": [*qemu, "-M", "microvm", *common],
    }


def time_once(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    wall = time.perf_counter() - t0
    if p.stdout != EXPECTED_LINE or p.returncode != 1:
        raise RuntimeError(f"{' '.join(cmd)}: status {p.returncode}, output {p.stdout!r}, "
                           f"stderr {p.stderr[-300:]!r}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="rounds (one run of each variant per round)")
    ap.add_argument("--out", default="benchmarks/out/boot_time.json")
    args = ap.parse_args()
    reason = conformance.missing()
    if reason:
        print(f"boot_time: cannot run: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        kernel = kbuild.build("hello", Path(tmp))
        cmds = variants(kernel)
        # Warm the page cache (not timed). regsync's warm-up run may write its
        # bytecode (.pyc), as pip does at install: a PYTHONDONTWRITEBYTECODE
        # environment would otherwise make every timed run compile ~40 modules.
        writer = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for name, cmd in cmds.items():
            time_once(cmd, writer if name == "regsync" else None)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                times[name].append(time_once(cmd))
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": t}
            for name, t in times.items()}
    ours = rows["regsync"]["median_s"]
    print(f"Start-to-exit wall time, {args.runs} interleaved runs each "
          f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}):\n")
    print("| variant | median | min | max | median / regsync |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s'] * 1000:.0f} ms | {r['min_s'] * 1000:.0f} ms "
              f"| {r['max_s'] * 1000:.0f} ms | {r['median_s'] / ours:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.platform(), "python": platform.python_version(),
        "qemu": subprocess.run([conformance.QEMU, "--version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "runs": args.runs, "results": rows}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
