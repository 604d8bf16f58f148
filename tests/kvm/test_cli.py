"""The regsync command as a user meets it (issue 8 items 13-15): bad input, piping, stats.

Every case runs the installed entry point (``.venv/bin/regsync``) in a subprocess
with a bounded timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from regsync import Machine

REPO = Path(__file__).resolve().parents[2]
REGSYNC = str(Path(sys.prefix) / "bin" / "regsync")
CASE_TIMEOUT = 60          # seconds per subprocess: a hang is a failure, not a stall


def regsync(*args: str, timeout: float = CASE_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REGSYNC, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kw)


# --- images --------------------------------------------------------------------------
CODE_EXIT_7 = b"\xb0\x07\xe6\xf4\xf4"          # mov $7, %al; out %al, $0xf4; hlt


def elf64(code: bytes = CODE_EXIT_7, *, addr: int = 0x200000, entry: int | None = None,
          memsz: int | None = None, machine: int = 62, ptype: int = 1) -> bytes:
    """A minimal ELF64 executable with one program header at file offset 0x1000."""
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, machine, 1,
                       addr if entry is None else entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", ptype, 5, 0x1000, addr, addr, len(code),
                       len(code) if memsz is None else memsz, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + code


def _write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


# Each case: (id, argv builder given tmp_path, what the one error line must contain).
BAD_INPUT: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("arg-negative", lambda t: ["run", "hello", "--arg", "-1"], "--arg"),
    ("arg-oversize", lambda t: ["run", "hello", "--arg", str(1 << 64)], "--arg"),
    ("gdb-port-70000", lambda t: ["run", "hello", "--gdb", "70000"], "--gdb"),
    ("timeout-nan", lambda t: ["run", "hello", "--timeout", "nan"], "--timeout"),
    ("timeout-negative", lambda t: ["run", "hello", "--timeout", "-1"], "--timeout"),
    ("smp-300", lambda t: ["run", "--smp", "300"], "smp"),
    ("smp-256", lambda t: ["run", "hello", "--smp", "256"], "smp"),
    ("elf-truncated-30", lambda t: ["run", _write(t, "t.elf", elf64()[:30])], "truncated"),
    ("elf-huge-memsz", lambda t: ["run", _write(t, "h.elf", elf64(memsz=1 << 40))],
     "outside guest RAM"),
    ("elf-other-machine", lambda t: ["run", _write(t, "a.elf", elf64(machine=183))], "machine"),
    ("elf-host-program", lambda t: ["run", "/bin/ls"], "ELF"),
    ("elf-over-boot-tables", lambda t: ["run", _write(t, "b.elf", elf64(addr=0x1000))],
     "boot structures"),
    ("elf-no-load-segment", lambda t: ["run", _write(t, "n.elf", elf64(ptype=4))],
     "no loadable segment"),
    ("elf-entry-outside", lambda t: ["run", _write(t, "e.elf", elf64(entry=0x300000))], "entry"),
    ("empty-file", lambda t: ["run", _write(t, "empty.bin", b"")], "empty"),
    ("directory", lambda t: ["run", str(t)], "directory"),
    ("dev-null", lambda t: ["run", "/dev/null"], "not a regular file"),
    ("regs-never-reaches-exit", lambda t: ["regs", _write(t, "loop.bin", b"\xeb\xfe"),
                                           "--exit", "1", "--timeout", "1"], "exit 1"),
    ("regs-timeout-nan", lambda t: ["regs", "hello", "--timeout", "nan"], "--timeout"),
    ("regs-arg-negative", lambda t: ["regs", "hello", "--arg", "-5"], "--arg"),
    ("mem-too-big", lambda t: ["run", "hello", "--mem", "5000"], "mem"),
    ("level-unknown", lambda t: ["regs", "hello", "--level", "nope"], "unknown level"),
    ("no-command", lambda t: [], "command"),
    ("serial-unwritable", lambda t: ["run", "hello", "--serial", str(t / "no" / "such")],
     "--serial"),
    ("wait-without-gdb", lambda t: ["run", "hello", "--wait"], "--wait"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, build: Callable[[Path], list[str]],
                                          needle: str) -> None:
    p = regsync(*build(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("regsync: error:"), p.stderr
    assert needle in lines[0], lines[0]


def test_regs_without_a_timeout_still_ends(tmp_path: Path) -> None:
    """The default regs timeout: a guest with no exits at all cannot hang the command."""
    img = _write(tmp_path, "loop.bin", b"\xeb\xfe")            # jmp .
    p = regsync("regs", img, "--exit", "2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("regsync: error:") and "exit 2" in p.stderr, p.stderr


def test_machine_arguments_are_type_checked() -> None:
    with pytest.raises(TypeError, match="smp"):
        Machine(smp="2")                                       # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mem_mb"):
        Machine(mem_mb=64.0)                                   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smp"):
        Machine(smp=256)
    with pytest.raises(ValueError, match="strategy"):
        Machine(strategy="nope")
    with Machine(smp=1) as m:
        with pytest.raises(ValueError, match="arg"):
            m.load("hello", arg=-1)
        with pytest.raises(ValueError, match="arg"):
            m.load("hello", arg=1 << 64)


def test_a_refused_image_leaves_guest_memory_untouched(tmp_path: Path) -> None:
    """Validation happens before placing: not even the boot tables are written."""
    with Machine(smp=1) as m:
        with pytest.raises(ValueError, match="boot structures"):
            m.load(_write(tmp_path, "b.elf", elf64(addr=0x1000)))
        assert m.memory.read(0, 0x10000) == bytes(0x10000)
        assert m.memory.read(0x200000, 0x1000) == bytes(0x1000)


# --- item 14: output that can be piped -------------------------------------------------
def test_json_is_valid_json_on_stdout_and_serial_goes_to_stderr() -> None:
    p = regsync("run", "hello", "--smp", "1", "--json")      # --json implies --stats
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert len(doc["vcpus"]) == 1
    assert "Hello from the regsync guest!" in p.stderr


def test_json_of_the_smp_demo_is_valid_json() -> None:
    p = regsync("run", "--stats", "--json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["vcpus"]) == 2
    assert "cpu 1 online" in p.stderr


def test_regs_json_is_valid_json_despite_guest_output() -> None:
    p = regsync("regs", "hello", "--exit", "3", "--json")
    assert p.returncode == 0, p.stderr
    assert "rip" in json.loads(p.stdout)["registers"]


def test_python_dash_m_regsync() -> None:
    p = subprocess.run([sys.executable, "-m", "regsync", "list"], capture_output=True,
                       text=True, timeout=CASE_TIMEOUT, cwd=REPO)
    assert p.returncode == 0 and p.stdout.startswith("counter"), p.stderr


def test_level_and_group_names_are_case_insensitive() -> None:
    for level in ("runtime", "Runtime", "regs"):
        p = regsync("regs", "counter", "--exit", "3", "--level", level)
        assert p.returncode == 0, p.stderr
        assert re.search(r"r12 = 0x0*3\b", p.stdout), p.stdout


def test_every_option_of_every_subcommand_has_help() -> None:
    import argparse

    from regsync.cli import build_parser
    missing = []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in [("regsync", parser), *sub.choices.items()]:
        for action in sp._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_module_docstring_lists_exactly_the_subcommands() -> None:
    import argparse

    from regsync import cli
    first = cli.__doc__.splitlines()[0]
    listed = set(re.findall(r"\b(\w+)\b", first.split(":", 1)[1]))
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert listed == set(sub.choices)


def _tracked(path: str) -> bool:
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO,
                          capture_output=True).returncode == 0


def test_benchmarks_do_not_overwrite_tracked_files_by_default() -> None:
    import importlib.util
    import inspect

    from regsync import bench
    from regsync.cli import build_parser
    default = build_parser().parse_args(["bench"]).out
    spec = importlib.util.spec_from_file_location("gdb_stepi", REPO / "benchmarks" / "gdb_stepi.py")
    assert spec is not None and spec.loader is not None
    gdb_stepi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gdb_stepi)
    stepi_default = gdb_stepi.build_parser().parse_args([]).out
    bench_default = inspect.signature(bench.main).parameters["out"].default
    for path in (default, stepi_default, bench_default):
        rel = os.path.relpath(Path(REPO, path), REPO)
        assert not _tracked(rel), f"default output {rel} is a tracked file"
        ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0
        assert ignored, f"default output {rel} is not git-ignored"


def test_readme_exit_status_table_lists_every_status() -> None:
    """Every status the code can return appears in the README's table, and the
    table's numbers are the code's constants."""
    from regsync.cli import EXIT_STATUSES
    from regsync.gdb.adapter import KILL_STATUS
    from regsync.vmm import EXIT_FATAL, EXIT_WATCHDOG
    assert {EXIT_FATAL, EXIT_WATCHDOG, KILL_STATUS, 2, 130} <= set(EXIT_STATUSES)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## CLI", 1)[1].split("\n## ", 1)[0]
    rows = {int(m.group(1)) for m in re.finditer(r"^\| *(\d+) *\|", section, re.M)}
    assert set(EXIT_STATUSES) <= rows, sorted(set(EXIT_STATUSES) - rows)


def test_output_into_a_closed_pipe_is_quiet() -> None:
    """`regsync list | head -0`: the reader is gone before regsync writes."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([REGSYNC, "list"], stdout=w, stderr=subprocess.PIPE,
                           timeout=CASE_TIMEOUT, cwd=REPO)
    finally:
        os.close(w)
    assert p.stderr == b"" and p.returncode == 141, p.stderr


# --- item 15: setup transfers apart from run-time transfers ----------------------------
def test_stats_report_setup_apart_from_the_run() -> None:
    p = regsync("run", "hello", "--smp", "1", "--stats", "--json")
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)["vcpus"][0]
    setup, run = v["setup"], v["run"]
    # The power-on snapshot at creation (RESET level + LAPIC) is setup: nine GETs.
    gets = {k: n for k, n in setup["ioctls"].items() if k.startswith("KVM_GET_")}
    assert sum(setup["fetches"].values()) == 9 and sum(gets.values()) >= 9, setup
    # The hello guest's run reads no register: no GET at run time, only KVM_RUN and writes.
    assert not [k for k in run["ioctls"] if k.startswith("KVM_GET_")], run
    assert run["ioctls"]["KVM_RUN"] >= 1 and sum(run["fetches"].values()) == 0
    assert "KVM_RUN" not in setup["ioctls"]
    p = regsync("run", "hello", "--smp", "1", "--stats")
    assert re.search(r"setup:.*\n.*run:", p.stdout), p.stdout


# --- multiboot kernels on real KVM: ELF32 and the a.out kludge --------------------------
MB_KERNEL = """
    .text
    .globl _start
    .align 4
mb_header:                                  # multiboot v1: page-align + memory info
    .long 0x1BADB002, {flags}, -(0x1BADB002 + {flags})
    .long {kludge}
_start:
    cmp $0x2BADB002, %eax                   # the boot loader's magic
    jne fail
    testl $1, (%ebx)                        # info.flags: mem_lower/mem_upper valid
    jz fail
    mov %cr0, %edx                          # protected mode, paging off
    test $0x80000000, %edx
    jnz fail
    test $1, %edx
    jz fail
    mov $0x12345678, %ecx                   # 32-bit operand size
    shr $16, %ecx
    cmp $0x1234, %ecx
    jne fail
    mov ${status}, %al
    out %al, $0xf4
    hlt
fail:
    mov $0x13, %al
    out %al, $0xf4
    hlt
"""


def _toolchain() -> None:
    import shutil
    missing = [t for t in ("as", "ld", "objcopy") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"binutils missing ({', '.join(missing)}): cannot build the test kernels")


def _assemble(tmp: Path, source: str) -> Path:
    src, obj = tmp / "k.S", tmp / "k.o"
    src.write_text(source)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True)
    return obj


def test_elf32_multiboot_kernel_runs_in_protected_mode(tmp_path: Path) -> None:
    """A kernel as `as --32` + `ld -m elf_i386` build it: multiboot hand-off state."""
    _toolchain()
    obj = _assemble(tmp_path, MB_KERNEL.format(flags=3, kludge="", status=0x21))
    elf = tmp_path / "k.elf"
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", "-o", str(elf),
                    str(obj)], check=True, capture_output=True)
    assert elf.read_bytes()[4] == 1                               # ELFCLASS32
    p = regsync("run", str(elf), "--smp", "1")
    assert p.returncode == 0x21, p.stderr


def test_aout_kludge_kernel_runs_in_protected_mode(tmp_path: Path) -> None:
    """A flat binary whose multiboot header (flags bit 16) says where it goes."""
    _toolchain()
    kludge = ("mb_header, 0x200000, 0, 0x200100, _start")         # header, load, end=file, bss
    obj = _assemble(tmp_path, MB_KERNEL.format(flags=0x10003, kludge=kludge, status=0x22))
    linked, flat = tmp_path / "k.elf", tmp_path / "k.bin"
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x200000", "-e", "_start", "-o", str(linked),
                    str(obj)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", str(linked), str(flat)], check=True,
                   capture_output=True)
    assert flat.read_bytes()[:4] == struct.pack("<I", 0x1BADB002)
    p = regsync("run", str(flat), "--smp", "1")
    assert p.returncode == 0x22, p.stderr
