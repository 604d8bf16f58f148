"""Stock gdb (batch mode) against regsync's stub on real KVM.

Each scenario starts a machine in-process (``Machine`` + ``attach_gdb`` on a
free port) or the CLI in a subprocess, drives ``gdb -nx -batch`` and checks
what gdb printed against the VM API.  Unless said otherwise the guest is
``spin`` on 2 vCPUs (see src/regsync/guests/src/spin.S).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from regsync import Machine
from regsync.gdb.adapter import probe_debug_caps
from regsync.gdb.packets import encode_packet
from regsync.gdb.server import GdbServer, attach_gdb
from regsync.guests import symbols
from regsync.vmm import RunState

SPIN = symbols("spin")
TIMEOUT = 60
ENTRY64 = SPIN["entry64"]


@contextlib.contextmanager
def spin_vm(smp: int = 2, wait: bool = True,
            setup: Callable[[Machine], None] | None = None) -> Iterator[tuple[Machine, GdbServer]]:
    with Machine(smp=smp) as m:
        m.load("spin")
        if setup is not None:
            setup(m)
        server = attach_gdb(m, 0, wait=wait, announce=False)
        try:
            m.start(paused=wait)
            yield m, server
        finally:
            server.close()
            if m.exit_status is None:
                m.stop(0)
        assert not server.errors, server.errors


def gdb_args(port: int, cmds: list[str], script: str | None = None) -> list[str]:
    args = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in cmds:
        args += ["-ex", c]
    if script is not None:
        args += ["-x", script]
    return args


def run_gdb(port: int, *cmds: str, script: str | None = None, timeout: float = TIMEOUT) -> str:
    r = subprocess.run(gdb_args(port, list(cmds), script), capture_output=True, text=True,
                       timeout=timeout)
    return r.stdout + r.stderr


def gdb_python(tmp_path: Path, port: int, body: str, *pre: str) -> str:
    script = tmp_path / "script.py"
    script.write_text("import gdb, json\n" + body)
    return run_gdb(port, *pre, script=str(script))


def result(out: str) -> dict:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(f"no RESULT line in gdb output:\n{out}")


def stop_spin(m: Machine) -> int | None:
    m.memory.write_u64(SPIN["spin_stop"], 1)
    status = m.wait(20)
    if status != 0:
        print(f"guest status {status}; serial:\n{m.serial.text}\nfatal: {m.fatal}")
    return status


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def counters(m: Machine) -> list[int]:
    return [m.memory.read_u64(SPIN["spin_counters"] + 8 * i) for i in range(len(m.vcpus))]


# --- registers -------------------------------------------------------------------------


def test_info_registers_match_the_api() -> None:
    def setup(m: Machine) -> None:
        m.vcpus[0].regs.r8 = 0x1122334455667788
        m.vcpus[0].regs.r9 = 0xFEDCBA9876543210
        m.vcpus[0].regs.xmm3 = 0x0123456789ABCDEF_1122334455667788
    with spin_vm(setup=setup) as (m, server):
        v = m.vcpus[0]
        want = m.run_on_cpu(v, lambda: {n: v.regs[n] for n in ("rsp", "cr3", "rflags")})
        out = run_gdb(server.port, "info registers r8 r9 rip rsp eflags cs", "p/x $cr3",
                      "p $_thread", "p/x $xmm3.uint128", "detach")
        assert "$3 = 0x123456789abcdef1122334455667788" in out, out   # via 'p' (XSAVE)
        assert re.search(r"^r8\s+0x1122334455667788\b", out, re.M), out
        assert re.search(r"^r9\s+0xfedcba9876543210\b", out, re.M), out
        assert re.search(rf"^rip\s+{ENTRY64:#x}\b", out, re.M), out
        assert re.search(rf"^rsp\s+{want['rsp']:#x}\b", out, re.M), out
        assert re.search(rf"^eflags\s+{want['rflags'] & 0xFFFFFFFF:#x}\b", out, re.M), out
        assert re.search(r"^cs\s+0x8\b", out, re.M), out
        assert f"= {want['cr3']:#x}" in out, out
        assert "$2 = 1" in out, out          # --wait: stopped in thread 1 (vCPU 0)
        assert stop_spin(m) == 0


def test_set_register_then_continue_the_guest_sees_it() -> None:
    """bw_18 stores rax in bsp_work_result: gdb changes rax just before it."""
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['bw_18']:#x}", "continue",
                      "set $rax = 0x1234abcd", "delete", f"hbreak *{SPIN['spin_d']:#x}",
                      "continue", f"x/gx {SPIN['bsp_work_result']:#x}", "p/x $rax", "detach")
        # the guest's own store (bw_18) wrote the value gdb put in rax; after the
        # detach bsp_work runs again and stores 0x77
        assert re.search(rf"{SPIN['bsp_work_result']:#x}:\s+0x000000001234abcd", out), out
        assert wait_for(lambda: m.memory.read_u64(SPIN["bsp_work_result"]) == 0x77)
        assert stop_spin(m) == 0


def test_stepi_100_follows_the_code_with_at_most_one_register_ioctl(tmp_path: Path) -> None:
    with spin_vm() as (m, server):
        body = f"""
gdb.execute("hbreak *{SPIN['bw_0']:#x}")
gdb.execute("continue")
gdb.execute("delete")
before = json.loads(gdb.execute("monitor stats", to_string=True))
pcs = []
for i in range(100):
    gdb.execute("stepi", to_string=True)
    pcs.append(int(gdb.parse_and_eval("$pc")))
after = json.loads(gdb.execute("monitor stats", to_string=True))
print("RESULT " + json.dumps({{"pcs": pcs, "before": before, "after": after}}))
gdb.execute("detach")
"""
        res = result(gdb_python(tmp_path, server.port, body))
        # One loop of the BSP: bw_1..bw_19 (ret), spin_d (cmpq, 9 bytes), je,
        # spin_loop, spin_a, spin_b, spin_c, spin_bsp (call), bw_0.
        assert m.memory.read(SPIN["spin_d"], 4) == bytes.fromhex("48833c25")
        cycle = ([SPIN[f"bw_{i}"] for i in range(1, 20)]
                 + [SPIN["spin_d"], SPIN["spin_d"] + 9]
                 + [SPIN[n] for n in ("spin_loop", "spin_a", "spin_b", "spin_c", "spin_bsp",
                                      "bw_0")])
        expected = (cycle * 5)[:100]
        assert res["pcs"] == expected
        reg_ioctls = sum(res["after"]["register_ioctls"]) - sum(res["before"]["register_ioctls"])
        assert reg_ioctls <= 100, reg_ioctls          # <= 1 register ioctl per step
        runs = sum(c.get("KVM_RUN", 0) for c in res["after"]["ioctls"]) - \
            sum(c.get("KVM_RUN", 0) for c in res["before"]["ioctls"])
        assert runs == 100                            # step-mode alone: one entry per step
        assert stop_spin(m) == 0


# --- breakpoints -------------------------------------------------------------------------


def test_hbreak_then_continue_stops_there() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "p/x $pc",
                      "continue", "p/x $pc", "detach")
        assert out.count("hit Breakpoint 1") == 2, out
        assert out.count(f"= {SPIN['spin_a']:#x}") == 2, out
        assert stop_spin(m) == 0


def test_break_stops_there_or_falls_back_to_hardware_visibly() -> None:
    caps = probe_debug_caps()
    with spin_vm() as (m, server):
        code = m.memory.read(SPIN["spin_b"], 8)
        out = run_gdb(server.port, "set breakpoint always-inserted on",
                      f"break *{SPIN['spin_b']:#x}", "continue", "p/x $pc", "monitor info bp",
                      "delete", "detach")
        assert "hit Breakpoint 1" in out and f"= {SPIN['spin_b']:#x}" in out, out
        if caps.sw_breakpoints:
            assert "software breakpoints: int3" in out, out
        else:
            assert f"break (Z0, hardware fallback) at {SPIN['spin_b']:#x}" in out, out
            assert "fall back to hardware slots: int3 is not intercepted" in out, out
            assert m.memory.read(SPIN["spin_b"], 8) == code   # no int3 ever written
        assert stop_spin(m) == 0


def test_out_of_debug_registers_is_an_error_not_a_crash() -> None:
    with spin_vm() as (m, server):
        cmds = [f"hbreak *{SPIN[f'bw_{i}']:#x}" for i in range(5)]
        out = run_gdb(server.port, *cmds, "continue", "delete 5", "continue", "p/x $pc",
                      "detach")
        assert "Could not insert hardware breakpoint" in out or \
            "Cannot insert hardware breakpoint" in out or "Could not insert" in out, out
        assert f"= {SPIN['bw_0']:#x}" in out, out
        assert stop_spin(m) == 0


def test_monitor_commands() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['bw_5']:#x}", "continue",
                      "monitor regs", "monitor info sync", "monitor help", "detach")
        assert "vCPU 0:" in out and "[REGS]" in out and "[SREGS]" in out, out
        assert re.search(rf"rip = 0x0*{SPIN['bw_5']:x}\b", out), out
        assert re.search(r"vCPU 1: \d+ exits, \d+ KVM_RUN, \d+ register ioctls", out), out
        assert "ioctls: " in out and "fetches avoided" in out and "stub: 1 stops" in out, out
        assert "info bp" in out, out
        assert stop_spin(m) == 0


def test_watchpoint_works_or_is_refused() -> None:
    caps = probe_debug_caps()
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "delete",
                      f"watch *(long*){SPIN['spin_counters']:#x}", "continue", "monitor info bp",
                      "delete", "detach")
        if caps.watchpoints:
            assert "Hardware watchpoint 2" in out and "Old value" in out, out
        else:
            assert "Could not insert hardware watchpoint 2" in out, out
            assert "watchpoints: unavailable" in out, out
        assert stop_spin(m) == 0


# --- interrupting, threads, memory -------------------------------------------------------


def test_ctrl_c_stops_every_vcpu() -> None:
    with spin_vm(wait=False) as (m, server):
        assert wait_for(lambda: all(counters(m)))
        cs = SPIN["spin_counters"]
        proc = subprocess.Popen(gdb_args(server.port, [
            "continue", "info threads", f"x/2gx {cs:#x}", "shell sleep 0.3", f"x/2gx {cs:#x}",
            "detach"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for(lambda: server.target.state == "running"), "gdb never continued"
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)          # gdb forwards it as ^C (0x03)
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        assert "received signal SIGINT" in out, out
        dumps = re.findall(rf"{cs:#x}:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out)
        assert len(dumps) == 2 and dumps[0] == dumps[1], out   # nobody ran while stopped
        assert int(dumps[0][0], 16) and int(dumps[0][1], 16), out
        before = counters(m)
        assert wait_for(lambda: all(a > b for a, b in zip(counters(m), before)))  # detached
        assert stop_spin(m) == 0


def test_info_threads_lists_every_vcpu_with_its_rip() -> None:
    with spin_vm(smp=3) as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "delete",
                      "info threads", "thread 1", "p/x $pc", "thread 2", "p/x $pc", "thread 3",
                      "p/x $pc", "detach")
        rows = re.findall(r"Thread (\d) \(vCPU (\d) rip=(0x[0-9a-f]+) \w+\)\s+(0x[0-9a-f]+)", out)
        assert [(int(t), int(v)) for t, v, _, _ in rows] == [(1, 0), (2, 1), (3, 2)], out
        pcs = [int(p, 16) for p in re.findall(r"= (0x[0-9a-f]+)", out)]
        assert [int(rip, 16) for _, _, rip, _ in rows] == pcs, out
        for _, _, rip, frame in rows:
            assert int(rip, 16) == int(frame, 16)
        assert SPIN["spin_a"] in pcs, out
        assert stop_spin(m) == 0


def test_x_reads_guest_virtual_memory_through_the_page_tables() -> None:
    with spin_vm(wait=False) as (m, server):
        assert wait_for(lambda: counters(m)[0] > 0)
        v = m.vcpus[0]
        cr3 = m.run_on_cpu(v, lambda: v.regs.cr3) & ~0xFFF
        if m.memory.read_u64(cr3 + 8):
            pytest.skip("the guest uses PML4[1]; no room for a test mapping")
        # VA 0x80_0000_1000 -> PA 0x100000 (the guest code page) with 4 KiB pages
        # in fresh tables at 4 MiB; the guest never touches that address.
        pdpt, pd, pt = 0x400000, 0x401000, 0x402000
        m.memory.write(pdpt, bytes(0x3000))
        m.memory.write_u64(pt + 8, 0x100000 | 1)
        m.memory.write_u64(pd, pt | 3)
        m.memory.write_u64(pdpt, pd | 3)
        m.memory.write_u64(cr3 + 8, pdpt | 3)
        va = 0x80_0000_1000 + (SPIN["spin_loop"] & 0xFFF)
        out = run_gdb(server.port, f"x/8gx {SPIN['spin_loop']:#x}", f"x/8gx {va:#x}",
                      f"x/gx {0x80_0000_2000:#x}", f"x/2gx {SPIN['spin_counters']:#x}",
                      "detach")
        code = m.memory.read(SPIN["spin_loop"], 64)
        words = [f"0x{int.from_bytes(code[i:i + 8], 'little'):016x}" for i in range(0, 64, 8)]
        for base in (SPIN["spin_loop"], va):
            got = []
            for line in out.splitlines():
                mt = re.match(r"(0x[0-9a-f]+):\s+(.*)", line)
                if mt and base <= int(mt.group(1), 16) < base + 64:
                    got += mt.group(2).split()
            assert got == words, out
        assert "Cannot access memory at address 0x8000002000" in out, out
        assert stop_spin(m) == 0


# --- sessions: detach, disconnect, kill, exit, CLI ---------------------------------------


def test_detach_lets_the_guest_run_to_completion() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "detach")
        assert "hit Breakpoint 1" in out and "detached" in out, out
        assert wait_for(lambda: server.target.state == "detached")
        assert wait_for(lambda: all(t.state is RunState.RUNNING for t in m.threads))
        assert stop_spin(m) == 0
        assert "spin: stopped" in m.serial.lines


def test_gdb_killed_mid_session_then_a_second_gdb_attaches() -> None:
    with spin_vm() as (m, server):
        proc = subprocess.Popen(gdb_args(server.port, [f"hbreak *{SPIN['bw_0']:#x}", "continue",
                                                       "delete", "continue"]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for(lambda: server.target.stats.stops >= 1 and
                            server.target.state == "running"), "gdb never got going"
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        assert wait_for(lambda: server.client is None and server.target.state == "detached")
        before = counters(m)
        assert wait_for(lambda: all(a > b for a, b in zip(counters(m), before)))
        out = run_gdb(server.port, "info threads", f"hbreak *{SPIN['spin_c']:#x}", "continue",
                      "p/x $pc", "detach")
        assert "Thread 2 (vCPU 1" in out and f"= {SPIN['spin_c']:#x}" in out, out
        assert server.connections == 2
        assert stop_spin(m) == 0


def test_malformed_input_never_kills_the_server_or_the_vm() -> None:
    with spin_vm(wait=False) as (m, server):
        junk = [b"$garbage#00", b"$m1,zz#" + b"%02x" % (sum(b"m1,zz") & 0xFF), b"\x03\x03xx",
                b"$" + b"A" * 70000 + b"#00", encode_packet(b"vCont;x"),
                encode_packet(b"Z9,0,0"), encode_packet(b"qRcmd,zz"), encode_packet(b"P999=00"),
                encode_packet(b"Hgffff"), encode_packet(b"X1,2:a"), b"}}}*#$#", bytes(range(256))]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            for chunk in junk:
                s.sendall(chunk)
            s.sendall(encode_packet(b"?"))
            buf = b""
            while b"$T05" not in buf:
                data = s.recv(65536)
                assert data, "server closed the connection"
                buf += data
        # an abrupt close of that connection detached: the VM runs again
        assert wait_for(lambda: server.client is None and server.target.state == "detached")
        before = counters(m)
        assert wait_for(lambda: all(a > b for a, b in zip(counters(m), before)))
        out = run_gdb(server.port, "p/x $rsp", "detach")
        assert "$1 = 0x" in out, out
        assert stop_spin(m) == 0


def test_kill_ends_the_vm() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, "kill")
        assert "killed" in out, out
        assert m.wait(20) == 137


def test_guest_exit_while_attached_sends_W() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"set var *(long*){SPIN['spin_stop']:#x} = 1", "continue")
        assert "exited normally" in out, out
        assert m.wait(20) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_run_gdb_wait_stops_before_the_first_instruction() -> None:
    port = _free_port()
    cli = subprocess.Popen([sys.executable, "-m", "regsync.cli", "run", "spin", "--smp", "2",
                            "--gdb", str(port), "--wait", "--timeout", "50"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = run_gdb(port, "p/x $pc", "info threads",
                      f"set var *(long*){SPIN['spin_stop']:#x} = 1", "continue")
        cli_out, cli_err = cli.communicate(timeout=TIMEOUT)
    finally:
        cli.kill()
    assert f"$1 = {ENTRY64:#x}" in out, out
    assert "Thread 2 (vCPU 1" in out, out
    assert "exited normally" in out, out
    assert cli.returncode == 0, cli_err
    assert "spin: stopped" in cli_out


# --- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,addr,arch,pc", [
    ("real", 0xA000, "i8086", "eip"), ("protected", 0x100000, "i386", "eip"),
])
def test_layout_follows_the_mode_at_the_first_stop(mode: str, addr: int, arch: str,
                                                   pc: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(b"\x90\x90\xeb\xfe")              # nop; nop; jmp $
    try:
        with Machine(smp=1) as m:
            m.load(f.name, mode=mode, addr=addr)
            server = attach_gdb(m, 0, wait=True, announce=False)
            try:
                m.start(paused=True)
                out = run_gdb(server.port, "show architecture", f"p/x ${pc}", "stepi",
                              "stepi", f"p/x ${pc}", "info registers eax", "kill")
            finally:
                server.close()
    finally:
        os.unlink(f.name)
    assert f'(currently "{arch}")' in out, out
    ip = addr & 0xFFFF if mode == "real" else addr
    assert f"$1 = {ip:#x}" in out and f"$2 = {ip + 2:#x}" in out, out


def test_trace_of_stepi_shows_no_register_transfer(tmp_path: Path) -> None:
    """Issue 12: `monitor trace` around 20 stepi: KVM_RUNs, and not one register transfer."""
    path = tmp_path / "stepi.jsonl"
    with spin_vm(smp=2) as (m, server):
        # The first stepi enters the guest with the loaded boot state (REGS and SREGS
        # ride kvm_run once); the trace starts after it.
        out = run_gdb(server.port, "stepi", f"monitor trace on {path}", *["stepi"] * 20,
                      "monitor trace show", "monitor trace off", "monitor trace bogus",
                      "detach")
        assert "sync trace on" in out, out
        assert "unknown argument 'bogus'" in out, out
        assert stop_spin(m) == 0
    from regsync.trace import load, summary
    s = summary(load(path))
    assert s["runs"] >= 20, s
    assert s["transfers"] == 0, s
    assert "0 register transfers" in out, out
