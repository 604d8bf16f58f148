"""Issue 10: kernels written for QEMU's conventions run unchanged under regsync.

Each conformance kernel (regsync.board.kernels, multiboot ELF32 built here by
gcc -m32) runs under ``regsync-qemu`` and under the real qemu-system-x86_64
-accel kvm with the same arguments: same serial output, same status, and the
kernel's own verdict is PASS."""

from __future__ import annotations

from pathlib import Path

import pytest

from regsync.board import conformance as conf


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = conf.missing()
    if reason:
        pytest.skip(f"cannot compare with QEMU here: {reason}")
    return tmp_path_factory.mktemp("kernels")


@pytest.mark.parametrize("case", conf.CASES, ids=[c.kernel + ":" + c.name for c in conf.CASES])
def test_same_as_qemu(case: conf.Case, build_dir: Path) -> None:
    if case.firmware == "seabios" and not Path(conf.SEABIOS).exists():
        pytest.skip(f"{conf.SEABIOS} is missing (Debian package seabios): QEMU cannot boot")
    args = conf.prepare(case, build_dir)
    ours = conf.run_regsync(args)
    qemu = conf.run_qemu(args, case.firmware)
    assert qemu.status == case.expect, f"QEMU itself: {qemu}"
    assert ours.stdout == qemu.stdout
    assert ours.status == qemu.status
    if case.kernel != "hello" and case.kernel != "hello-aout":
        assert ours.verdict.startswith("PASS"), ours.stdout
