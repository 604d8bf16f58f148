"""The snapshot CLI: run --save-on-exit, snapshot info, run --restore; bad files in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from regsync.guests import hypercall_checksum


def regsync(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regsync.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_save_on_exit_info_and_restore(tmp_path: Path) -> None:
    snap = tmp_path / "hc.snap"
    n = 200_000                                # far more than 0.3 s of hypercalls here
    out = regsync("run", "hypercall", "--smp", "1", "--arg", str(n), "--timeout", "0.3",
                  "--save-on-exit", str(snap))
    assert out.returncode == 124, out.stderr
    assert f"saved the machine to {snap}" in out.stderr
    info = regsync("snapshot", "info", str(snap))
    assert info.returncode == 0, info.stderr
    assert "format 1.0, x86_64" in info.stdout and "checksum good" in info.stdout
    assert "guest: hypercall" in info.stdout and "vCPUs: 1" in info.stdout
    assert "64 MiB in 1 slot(s)" in info.stdout
    # Too long to finish here: restore, run 0.3 s more, save again; the guest's loop
    # counter moved on from where the first file left it.
    snap2 = tmp_path / "hc2.snap"
    again = regsync("run", "--restore", str(snap), "--timeout", "0.3", "--save-on-exit", str(snap2))
    assert again.returncode == 124, again.stderr
    assert "restored from" in again.stderr
    from regsync.snapshot import read
    rbx = [read(p).state.vcpus[0].groups["REGS"] for p in (snap, snap2)]
    i1, i2 = (int.from_bytes(r[8:16], "little") for r in rbx)     # kvm_regs.rbx: the loop's i
    assert 0 < i1 < i2 < n


def test_restore_finishes_with_the_right_checksum(tmp_path: Path) -> None:
    snap = tmp_path / "hc.snap"
    n = 100_000                                 # seconds of hypercalls here: cut at 0.2 s
    first = regsync("run", "hypercall", "--smp", "1", "--arg", str(n), "--timeout", "0.2",
                    "--save-on-exit", str(snap))
    assert first.returncode == 124, first.stderr
    rest = regsync("run", "--restore", str(snap), timeout=120)
    assert rest.returncode == 0, rest.stderr
    assert f"checksum={hypercall_checksum(n):#018x}" in rest.stdout
    info = regsync("snapshot", "info", "--json", str(snap))
    assert info.returncode == 0 and '"arch": "x86_64"' in info.stdout


def test_bad_snapshot_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"RSYNCSNP" + bytes(10))
    for args in (("snapshot", "info", str(bad)), ("run", "--restore", str(bad))):
        out = regsync(*args)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("regsync: error:"), out.stderr
        assert "truncated" in lines[0]
    out = regsync("snapshot", "info", str(tmp_path / "missing.snap"))
    assert out.returncode == 2 and "no such snapshot file" in out.stderr
    out = regsync("snapshot")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
