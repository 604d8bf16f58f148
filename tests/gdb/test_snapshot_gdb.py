"""Snapshots while gdb has the guest stopped: monitor savevm / loadvm with the real gdb."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

from regsync import Machine
from regsync.gdb.server import attach_gdb
from regsync.guests import symbols
from regsync.snapshot import read

SPIN = symbols("spin")


def run_gdb(port: int, *cmds: str) -> str:
    args = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in cmds:
        args += ["-ex", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_savevm_while_stopped_then_loadvm_goes_back(tmp_path: Path) -> None:
    snap = tmp_path / "stopped.snap"
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all")
    with Machine(smp=2, serial_out=io.StringIO()) as m:
        m.load("spin")
        server = attach_gdb(m, 0, wait=True, announce=False)
        try:
            m.start(paused=True)
            out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue",
                          "p/x $pc", f"monitor savevm {snap}",
                          "stepi", "stepi", "stepi", "p/x $pc",
                          f"monitor loadvm {bad}", f"monitor loadvm {snap}",
                          "maintenance flush register-cache", "p/x $pc", "monitor savevm",
                          "delete", "detach")
        finally:
            server.close()
            m.memory.write_u64(SPIN["spin_stop"], 1)
            status = m.wait(20)
        assert status == 0, (status, m.fatal)
        assert not server.errors, server.errors
    assert f"saved the machine to {snap}" in out, out
    pcs = re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)
    assert pcs[0] == f"{SPIN['spin_a']:#x}" and pcs[1] != pcs[0], out     # stepped on
    assert pcs[2] == pcs[0], out                                         # loadvm went back
    assert re.search(r"^loadvm: .*bad.snap: truncated: 21 bytes", out, re.M), out  # refused
    assert "savevm: which file?" in out, out
    st = read(snap).state
    assert st.smp == 2
    rips = [int.from_bytes(v.groups["REGS"][128:136], "little") for v in st.vcpus]  # kvm_regs.rip
    assert SPIN["spin_a"] in rips                   # the vCPU gdb stopped at the breakpoint
