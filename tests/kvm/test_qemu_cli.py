"""The QEMU-compatible front door and the exit-status conventions on real guests:
regsync-qemu's argument subset (everything else refused in one line), a guest's
code never read as one of regsync's own statuses, board-specific bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from regsync.board.kernels import build as kbuild

HELLO_ARGS = ["-m", "64", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
              "-display", "none", "-nodefaults", "-no-reboot"]


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = kbuild.toolchain_missing()
    if why:
        pytest.skip(f"cannot build the conformance kernels: {why}")
    return kbuild.build("hello", tmp_path_factory.mktemp("kernels"))


def _regsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regsync", *args], capture_output=True,
                          text=True, timeout=120)


def _front_door(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regsync.board.qemu_cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code, status", [(0, 0), (1, 1), (3, 3), (2, 123), (124, 123),
                                          (125, 123), (130, 123)])
def test_guest_code_never_reads_as_a_regsync_status(hello: Path, code: int, status: int) -> None:
    p = _regsync("run", str(hello), "--smp", "1", "--append", f"code={code}")
    assert p.returncode == status, p.stderr
    assert f"code {code}" in p.stdout and f"wrote code {code};" in p.stderr


@pytest.mark.parametrize("code", [0, 2, 62, 124])
def test_qemu_convention(hello: Path, code: int) -> None:
    p = _regsync("run", str(hello), "--smp", "1", "--append", f"code={code}", "--exit-status", "qemu")
    assert p.returncode == ((code << 1) | 1) & 0xFF, p.stderr
    q = _regsync("qemu", "-kernel", str(hello), "-append", f"code={code}", *HELLO_ARGS)
    assert q.returncode == p.returncode and q.stdout == p.stdout, q.stderr


@pytest.mark.parametrize("args, named", [
    (["-vnc", ":1"], "-vnc"),
    (["-device", "virtio-net-pci"], "virtio-net-pci"),
    (["-machine", "q35"], "q35"),
    (["-accel", "tcg"], "tcg"),
    (["-serial", "pty"], "pty"),
    (["-cpu", "host,+nosuchfeature"], "nosuchfeature"),
    (["-cpu", "Skylake-Server"], "Skylake-Server"),
    (["-smp", "two"], "two"),
    (["-m", "lots"], "lots"),
    (["-initrd", "/nonexistent/module"], "/nonexistent/module"),
])
def test_front_door_refuses_in_one_line(hello: Path, args: list[str], named: str) -> None:
    p = _front_door("-kernel", str(hello), *HELLO_ARGS, *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_front_door_without_kernel() -> None:
    p = _front_door("-m", "64")
    assert p.returncode == 2 and "-kernel" in p.stderr


def test_modules_that_do_not_fit_are_refused(hello: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))
    p = _front_door("-kernel", str(hello), "-m", "2", "-initrd", str(big), *HELLO_ARGS[2:])
    assert p.returncode == 2 and "past the end of RAM" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cpu_filter_clears_x2apic(hello: Path) -> None:
    from regsync import Machine
    with Machine(cpu="host,-x2apic") as m:
        leaf1 = [e for e in m._cpuid.entries[:m._cpuid.nent] if e.function == 1][0]
        assert not leaf1.ecx & (1 << 21)


def test_cpu_filter_reaches_the_guest(tmp_path: Path) -> None:
    why = kbuild.toolchain_missing()
    if why:
        pytest.skip(f"cannot build the conformance kernels: {why}")
    kernel = str(kbuild.build("cpuid", tmp_path))
    plain = _front_door("-kernel", kernel, *HELLO_ARGS)
    filtered = _front_door("-kernel", kernel, "-cpu", "host,-x2apic", *HELLO_ARGS)
    if "x2apic 1" not in plain.stdout:
        pytest.skip("KVM here offers no x2APIC: nothing for -x2apic to remove")
    assert "x2apic 0" in filtered.stdout and filtered.returncode == 1, filtered.stdout


def _bad_images(hello: Path, d: Path) -> dict[str, tuple[Path, str]]:
    elf = hello.read_bytes()
    arm = bytearray(elf)
    arm[18:20] = (40).to_bytes(2, "little")              # e_machine: ARM
    cases = {"truncated": (elf[:100], "past the end"), "wrong machine": (bytes(arm), "ARM"),
             "no multiboot header": (b"\x90" * 4096, "no multiboot header"),
             "empty": (b"", "")}
    out = {}
    for name, (data, words) in cases.items():
        path = d / name.replace(" ", "_")
        path.write_bytes(data)
        out[name] = (path, words)
    return out


def test_bad_images_are_one_line_each(hello: Path, tmp_path: Path) -> None:
    for name, (path, words) in _bad_images(hello, tmp_path).items():
        p = _front_door("-kernel", str(path), *HELLO_ARGS)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (name, p.stderr)
        assert words.lower() in lines[0].lower(), (name, lines[0])
