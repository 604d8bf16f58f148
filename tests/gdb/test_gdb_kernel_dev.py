"""What a kernel developer reaches for after ``stepi`` (issue 13), with the real gdb.

Physical memory (QEMU's ``Qqemu.PhyMemMode``), the monitor commands (page
tables, LAPIC, every vCPU's registers, reset, NMI), AVX registers from the
catalog, ``--wait`` that waits, sessions that cannot starve the next one, no
partial writes, refusals gdb can explain, and the extra queries (qCRC,
qSearch:memory). Guest: ``spin`` on 2 vCPUs unless said otherwise.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from regsync import Machine
from regsync.arch.x86_64.catalog import XSAVE_COMPONENTS
from regsync.gdb.adapter import probe_debug_caps
from regsync.gdb.packets import encode_packet
from regsync.gdb.server import _BATCH
from regsync.vmm import RunState

from test_gdb_real import (ENTRY64, SPIN, TIMEOUT, _free_port, counters, gdb_args, gdb_python,
                           result, run_gdb, spin_vm, stop_spin, wait_for)

# A 4 KiB test mapping the guest never touches: VA 0x80_0000_1000 -> PA 0x100000
# (the code page) in fresh tables at 4 MiB, entered in PML4[1].
TEST_VA = 0x80_0000_1000
PDPT, PD, PT = 0x400000, 0x401000, 0x402000


def add_test_mapping(m: Machine, cr3: int) -> None:
    assert m.memory.read_u64(cr3 + 8) == 0, "PML4[1] is in use"
    m.memory.write(PDPT, bytes(0x3000))
    m.memory.write_u64(PT + 8, 0x100000 | 1)            # present, read-only
    m.memory.write_u64(PD, PT | 3)
    m.memory.write_u64(PDPT, PD | 3)
    m.memory.write_u64(cr3 + 8, PDPT | 3)


def cr3_of(m: Machine, vid: int = 0) -> int:
    v = m.vcpus[vid]
    return m.run_on_cpu(v, lambda: v.regs.cr3) & ~0xFFF


def received(out: str) -> list[str]:
    """The replies ``maintenance packet`` printed, in order."""
    return re.findall(r'received: "([^"]*)"', out)


# --- 1. physical memory ----------------------------------------------------------------


def test_phymemmode_switches_m_and_M_to_guest_physical_addresses() -> None:
    with spin_vm(wait=False) as (m, server):
        assert wait_for(lambda: counters(m)[0] > 0)
        add_test_mapping(m, cr3_of(m))
        code = m.memory.read_u64(0x100000 + 8)
        out = run_gdb(server.port, "maintenance packet qqemu.PhyMemMode",
                      f"x/gx {TEST_VA + 8:#x}",
                      "maintenance packet Qqemu.PhyMemMode:1",
                      "maintenance packet qqemu.PhyMemMode",
                      f"x/gx {TEST_VA + 8:#x}",            # no RAM at 512 GiB physical
                      f"x/gx {PT + 8:#x}",                 # the page table entry itself
                      "set var *(long*)0x403000 = 0x1122334455667788",
                      "maintenance packet Qqemu.PhyMemMode:",   # no value: E22 as QEMU
                      "maintenance packet Qqemu.PhyMemMode:0",
                      f"x/gx {TEST_VA + 8:#x}", "detach")
        assert received(out) == ["0", "OK", "1", "E22", "OK"], out
        assert out.count(f"{TEST_VA + 8:#x}:\t{code:#018x}") == 2, out
        assert f"Cannot access memory at address {TEST_VA + 8:#x}" in out, out
        assert f"{PT + 8:#x}:\t0x0000000000100001" in out, out
        assert m.memory.read_u64(0x403000) == 0x1122334455667788
        assert stop_spin(m) == 0


def test_monitor_xp_reads_guest_physical_memory() -> None:
    with spin_vm(wait=False) as (m, server):
        assert wait_for(lambda: counters(m)[0] > 0)
        add_test_mapping(m, cr3_of(m))
        out = run_gdb(server.port, f"monitor xp /2gx {PT:#x}", f"monitor xp /4bx {PT + 8:#x}",
                      f"monitor xp /2gx {TEST_VA:#x}", "monitor xp 0x10", "detach")
        assert f"{PT:016x}: 0x0000000000000000 0x0000000000100001" in out, out
        assert f"{PT + 8:016x}: 0x01 0x00 0x10 0x00" in out, out
        assert "outside guest RAM" in out, out          # 512 GiB is no physical address
        assert re.search(r"0000000000000010: 0x[0-9a-f]{8}\b", out), out   # default /1xw
        assert stop_spin(m) == 0


# --- 2. monitor commands ---------------------------------------------------------------


def test_monitor_info_mem_and_info_tlb_walk_the_page_tables() -> None:
    with spin_vm(setup=lambda m: add_test_mapping(m, 0x2000)) as (m, server):
        out = run_gdb(server.port, "monitor info mem", "monitor info tlb", "detach")
        # The VMM's identity map (2 MiB pages, writable) and the read-only test page.
        assert "0000000000000000-0000000100000000 0000000100000000 -rw" in out, out
        assert "0000008000001000-0000008000002000 0000000000001000 -r-" in out, out
        tlb = re.findall(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([-XGPDACTUW]{9})$", out, re.M)
        assert len(tlb) == 2048 + 1, out[-2000:]
        assert ("0000000000200000", "0000000000200000") in [(a, b) for a, b, _ in tlb]
        flags = {a: f for a, _, f in tlb}
        assert flags["0000000000200000"][2] == "P" and flags["0000000000200000"][8] == "W"
        assert flags["0000008000001000"][2] == "-" and flags["0000008000001000"][8] == "-"
        assert ("0000008000001000", "0000000000100000") in [(a, b) for a, b, _ in tlb]
        assert stop_spin(m) == 0


def test_monitor_info_lapic_decodes_each_vcpus_local_apic() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "delete",
                      "thread 1", "monitor info lapic", "monitor info lapic 1", "detach")
        svr = [m.run_on_cpu(v, lambda v=v: v.regs["lapic.svr"]) for v in m.vcpus]
        blocks = out.split("local APIC of vCPU ")
        assert [b[:1] for b in blocks[1:]] == ["0", "1"], out
        for vid, block in enumerate(blocks[1:]):
            assert re.search(rf"^ID\s+{vid}\b", block, re.M), block
            assert f"spurious vector {svr[vid] & 0xFF:#04x}" in block, block
            assert ("APIC enabled" if svr[vid] & 0x100 else "APIC disabled") in block, block
            for name in ("LVT0", "LVT1", "Timer", "ISR", "IRR", "ICR", "TPR"):
                assert re.search(rf"^{name}\b", block, re.M), (name, block)
        assert stop_spin(m) == 0


def test_monitor_info_registers_shows_one_or_every_vcpu() -> None:
    with spin_vm(smp=3) as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "delete",
                      "thread 2", "monitor info registers", "monitor info registers -a",
                      "thread 1", "p/x $pc", "thread 2", "p/x $pc", "thread 3", "p/x $pc",
                      "detach")
        pcs = [int(p, 16) for p in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]
        dumps = re.findall(r"^vCPU (\d) \(thread \d\):\n(?:.*\n)*?.*?\brip = (0x[0-9a-f]+)",
                           out, re.M)
        assert [int(v) for v, _ in dumps] == [1, 0, 1, 2], out
        assert [int(r, 16) for _, r in dumps[1:]] == pcs, out
        assert int(dumps[0][1], 16) == pcs[1], out
        assert stop_spin(m) == 0


def test_monitor_system_reset_restarts_the_guest_from_its_entry() -> None:
    with spin_vm() as (m, server):
        out = run_gdb(server.port, f"hbreak *{SPIN['spin_a']:#x}", "continue", "delete",
                      "monitor system_reset", "maintenance flush register-cache", "thread 1",
                      "p/x $pc",
                      f"x/gx {SPIN['spin_counters']:#x}",
                      f"set var *(long*){SPIN['spin_stop']:#x} = 1", "continue")
        assert f"$1 = {ENTRY64:#x}" in out, out
        assert re.search(rf"{SPIN['spin_counters']:#x}.*:\s+0x0+\n", out), out   # reloaded
        assert "exited normally" in out, out
        assert m.resets == 1
        assert m.wait(20) == 0


_NMI_SCRIPT = f"""
gdb.execute("hbreak *{SPIN['spin_a']:#x}")
gdb.execute("continue")
gdb.execute("delete")
def nmis():
    return [c.get("KVM_NMI", 0) for c in json.loads(gdb.execute("monitor stats", to_string=True))["ioctls"]]
gdb.execute("monitor nmi " + ARG)
print("RESULT " + json.dumps(nmis()))
gdb.execute(END)
"""


def test_monitor_nmi_to_one_vcpu_reaches_its_guest_handler(tmp_path: Path) -> None:
    with spin_vm(smp=3) as (m, server):
        out = gdb_python(tmp_path, server.port,
                         'ARG, END = "0", "continue"\n' + _NMI_SCRIPT)
        assert result(out) == [1, 0, 0], out
        # The guest's IDT sends every exception vector to a handler that reports it.
        assert "exited with code 0177" in out, out
        assert m.wait(20) == 0x7F
        assert re.search(r"EXCEPTION vec=0x2 ", m.serial.text), m.serial.text


def test_monitor_nmi_without_an_argument_goes_to_every_vcpu(tmp_path: Path) -> None:
    with spin_vm(smp=3) as (m, server):
        out = gdb_python(tmp_path, server.port, 'ARG, END = "", "kill"\n' + _NMI_SCRIPT)
        assert result(out) == [1, 1, 1], out
        assert m.wait(20) == 137


def test_unknown_monitor_command_or_argument_is_an_error_naming_it(tmp_path: Path) -> None:
    with spin_vm() as (m, server):
        body = """
errors = {}
for cmd in ("bogus", "step-mode bogus", "info bogus", "nmi seven", "info lapic 9",
            "xp /2q 0x0", "info sync extra", "step-mode all"):
    try:
        gdb.execute("monitor " + cmd)
    except gdb.error as e:
        errors[cmd] = str(e)
print("RESULT " + json.dumps(sorted(errors)))
gdb.execute("detach")
"""
        out = gdb_python(tmp_path, server.port, body)
        assert result(out) == sorted(["bogus", "step-mode bogus", "info bogus", "nmi seven",
                                      "info lapic 9", "xp /2q 0x0", "info sync extra"]), out
        for text in ("unknown monitor command 'bogus'", "step-mode: unknown argument 'bogus'",
                     "unknown monitor command 'info bogus'", "nmi: 'seven' is not a vCPU",
                     "info lapic: no vCPU 9", "xp: bad format '/2q'",
                     "info sync: unexpected argument 'extra'"):
            assert text in out, (text, out)
        assert "regsync monitor commands" not in out, out         # no help dump
        assert server.target.step_mode == "all"                   # the good one took effect
        assert stop_spin(m) == 0


# --- 3. vector registers ---------------------------------------------------------------


def _xsave_features() -> int:
    with Machine(smp=1) as m:
        cpuid = m.kvm.supported_cpuid()
        for e in cpuid.entries[:cpuid.nent]:
            if e.function == 0xD and e.index == 0:
                return e.eax
    return 0


def test_ymm_registers_read_and_write_through_the_xsave_group() -> None:
    avx_bit = XSAVE_COMPONENTS["AVX"][0]
    if not _xsave_features() >> avx_bit & 1:
        pytest.skip("KVM on this host offers no AVX state (CPUID 0xD.0 EAX bit 2 clear)")
    lo, hi = 0x0011223344556677_8899AABBCCDDEEFF, 0x0F0E0D0C0B0A0908_0706050403020100

    def setup(m: Machine) -> None:
        m.vcpus[0].regs.xmm2 = lo
        m.vcpus[0].regs["ymm2h"] = hi
    with spin_vm(setup=setup) as (m, server):
        out = run_gdb(server.port, "p/x $ymm2.v2_int128", "p $ymm15h",
                      "set var $ymm5.v8_int32[7] = 0x1234abcd",
                      f"hbreak *{SPIN['spin_a']:#x}", "continue", "thread 1",
                      "maintenance flush register-cache", "p/x $ymm5.v8_int32[7]",
                      "p/x $ymm2.v2_int128[1]", "detach")
        assert f"$1 = {{{lo:#x}, {hi:#x}}}" in out, out
        assert "$2 = void" not in out and "Invalid" not in out, out
        assert "$3 = 0x1234abcd" in out and f"$4 = {hi:#x}" in out, out
        v = m.vcpus[0]
        assert m.run_on_cpu(v, lambda: v.regs["ymm5h"]) >> 96 == 0x1234ABCD
        assert stop_spin(m) == 0


def test_zmm_and_k_registers_where_xsave_holds_them() -> None:
    bits = [XSAVE_COMPONENTS[c][0] for c in ("OPMASK", "ZMM_HI256", "HI16_ZMM")]
    features = _xsave_features()
    if not all(features >> b & 1 for b in bits):
        pytest.skip(f"KVM on this host offers no AVX-512 state (CPUID 0xD.0 EAX={features:#x})")
    with spin_vm(setup=lambda m: m.vcpus[0].regs.__setitem__("k3", 0xF00D)) as (m, server):
        out = run_gdb(server.port, "p/x $k3", "set var $zmm20.v16_int32[15] = 0x77",
                      "p/x $zmm20.v16_int32[15]", "p/x $ymm17.v8_int32[0]", "detach")
        assert "$1 = 0xf00d" in out and "$2 = 0x77" in out and "$3 = 0x0" in out, out
        v = m.vcpus[0]
        assert m.run_on_cpu(v, lambda: v.regs["zmm20"]) >> 480 == 0x77
        assert stop_spin(m) == 0


# --- 4. --wait means wait ----------------------------------------------------------------


def test_a_bare_connect_and_close_leaves_a_waiting_guest_stopped() -> None:
    with spin_vm(wait=True) as (m, server):
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
        assert wait_for(lambda: server.connections == 1 and server.client is None)
        time.sleep(0.3)                   # would be plenty for the BSP to start counting
        assert counters(m) == [0, 0]
        assert all(t.state is not RunState.RUNNING for t in m.threads)
        out = run_gdb(server.port, "p/x $pc", "detach")
        assert f"$1 = {ENTRY64:#x}" in out, out
        assert stop_spin(m) == 0


def test_a_client_that_vanishes_while_stopped_leaves_the_guest_stopped() -> None:
    with spin_vm() as (m, server):
        proc = subprocess.Popen(gdb_args(server.port, [f"hbreak *{SPIN['spin_c']:#x}",
                                                       "continue",
                                                       "python import time; time.sleep(60)"]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for(lambda: server.target.stats.stops >= 1 and
                            server.target.state == "stopped", timeout=TIMEOUT)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        assert wait_for(lambda: server.client is None)
        before = counters(m)
        time.sleep(0.3)
        assert counters(m) == before
        out = run_gdb(server.port, "p/x $pc", "info breakpoints", "detach")
        assert f"$1 = {SPIN['spin_c']:#x}" in out, out        # the same stop, reported again
        assert server.target.slots == [None] * 4              # the dead session's hbreak is gone
        assert stop_spin(m) == 0


def test_cli_wait_survives_port_probes() -> None:
    """What a script does before it starts gdb: poll the port until it answers."""
    port = _free_port()
    cli = subprocess.Popen([sys.executable, "-m", "regsync.cli", "run", "spin", "--smp", "2",
                            "--gdb", str(port), "--wait", "--timeout", "50"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        probes = 0
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            probes += 1
            if probes == 3:
                break
        assert probes == 3, "the stub never listened"
        time.sleep(0.3)                   # plenty for a started guest to leave its entry
        out = run_gdb(port, "p/x $pc", f"x/gx {SPIN['spin_counters']:#x}",
                      f"set var *(long*){SPIN['spin_stop']:#x} = 1", "continue")
        cli_out, cli_err = cli.communicate(timeout=TIMEOUT)
    finally:
        cli.kill()
    assert f"$1 = {ENTRY64:#x}" in out, out
    assert re.search(rf"{SPIN['spin_counters']:#x}:\s+0x0+\n", out), out
    assert "exited normally" in out and cli.returncode == 0, (out, cli_err)


# --- 5. no client starves the next -------------------------------------------------------


def test_work_queued_for_a_vanished_client_dies_with_it() -> None:
    n = 30000
    with spin_vm() as (m, server):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(encode_packet(b"QStartNoAckMode"))
        burst = encode_packet(b"m100000,100") * n

        def pipeline() -> None:
            try:
                s.sendall(burst)
            except OSError:
                pass                      # the test closes the socket under it
        sender = threading.Thread(target=pipeline)
        sender.start()
        assert wait_for(lambda: server.core is not None and server.core.packets > 100)
        core = server.core
        assert core is not None
        handled_before = core.packets
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        sender.join(TIMEOUT)
        out = run_gdb(server.port, "p/x $pc", "detach")
        assert f"$1 = {ENTRY64:#x}" in out, out
        first = server.sessions[0]
        assert first["end"] == "vanished", first
        # After the hang-up at most a few batches are served (the check runs between
        # batches); the old loop answered a whole 64 KiB read, ~4,000 requests, to nobody.
        per_batch = _BATCH // len(encode_packet(b"m100000,100"))
        assert first["packets"] - handled_before <= 4 * per_batch, (first, handled_before)
        assert stop_spin(m) == 0


def test_the_listen_backlog_takes_a_burst_of_reconnects() -> None:
    with spin_vm() as (m, server):
        ss = subprocess.run(["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True,
                            text=True, timeout=TIMEOUT)
        fields = ss.stdout.split()
        assert fields and fields[0] == "LISTEN", ss.stdout + ss.stderr
        assert int(fields[2]) >= 8, ss.stdout              # Send-Q of a listener: its backlog
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                 for _ in range(8)]
        for s in socks:
            s.close()
        out = run_gdb(server.port, "p/x $pc", "detach")
        assert f"$1 = {ENTRY64:#x}" in out, out
        assert stop_spin(m) == 0


# --- 6. no partial writes -------------------------------------------------------------------


def test_M_across_the_end_of_ram_writes_nothing() -> None:
    with spin_vm() as (m, server):
        end = m.memory.size
        before = m.memory.read(end - 4, 4)
        out = run_gdb(server.port, f"maintenance packet M{end - 4:x},8:1122334455667788",
                      "maintenance packet Qqemu.PhyMemMode:1",
                      f"maintenance packet M{end - 4:x},8:1122334455667788", "detach")
        replies = received(out)
        assert replies[0].startswith("E") and replies[2].startswith("E"), out
        assert m.memory.read(end - 4, 4) == before
        assert stop_spin(m) == 0


# --- 7. refusals gdb can explain ----------------------------------------------------------


def test_a_full_set_of_debug_registers_is_reported_as_such() -> None:
    with spin_vm() as (m, server):
        cmds = [f"hbreak *{SPIN[f'bw_{i}']:#x}" for i in range(5)]
        out = run_gdb(server.port, *cmds, "continue", "delete 5", "continue", "p/x $pc",
                      "detach")
        assert "all 4 debug registers are in use" in out, out
        assert f"= {SPIN['bw_0']:#x}" in out, out
        assert stop_spin(m) == 0


def test_a_break_refused_for_want_of_a_slot_says_why_on_the_console() -> None:
    """Without int3 interception ``break`` takes a debug register. gdb 13 prints no
    text for a refused Z0 (remote_target::insert_breakpoint: "Cannot access memory"),
    so the VMM's console and ``monitor info bp`` say what happened."""
    if probe_debug_caps().sw_breakpoints:
        pytest.skip("int3 is intercepted here: break needs no debug register")
    with spin_vm() as (m, server):
        server.log = console = io.StringIO()
        cmds = [f"hbreak *{SPIN[f'bw_{i}']:#x}" for i in range(4)]
        out = run_gdb(server.port, *cmds, f"break *{SPIN['bw_5']:#x}", "continue",
                      "monitor info bp", "detach")
        assert "Cannot insert breakpoint 5" in out, out
        assert "hardware slots: 4/4 in use" in out, out
        assert f"breakpoint at {SPIN['bw_5']:#x} refused: all 4 debug registers are in use" \
            in console.getvalue(), console.getvalue()
        assert stop_spin(m) == 0


def test_a_refused_watchpoint_says_why() -> None:
    """gdb 13 prints no text for a refused Z2 whatever the reply carries
    (remote_target::insert_watchpoint): the refusal names itself on the VMM's
    console, in ``monitor info bp``, and in the E.<code>.<text> reply."""
    caps = probe_debug_caps()
    if caps.watchpoints:
        pytest.skip("data breakpoints fire on this host: nothing is refused")
    with spin_vm() as (m, server):
        server.log = console = io.StringIO()
        out = run_gdb(server.port, f"watch *(long*){SPIN['spin_counters']:#x}", "continue",
                      "delete", "monitor info bp",
                      f"maintenance packet Z2,{SPIN['spin_counters']:x},8", "detach")
        assert "Could not insert hardware watchpoint 1" in out, out
        assert "watchpoints: unavailable" in out, out
        reply = received(out)[0]
        assert reply.startswith("E.") and ".data breakpoints do not fire" in reply, out
        assert f"watchpoint at {SPIN['spin_counters']:#x} refused: data breakpoints do not " \
            "fire on this host" in console.getvalue(), console.getvalue()
        assert stop_spin(m) == 0


# --- 8. what else a kernel developer notices ------------------------------------------------


def _gdb_crc32(data: bytes) -> int:
    """gdb's xcrc32 (gdb/remote.c compare_sections_command): CRC-32, MSB first, init ~0."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def test_qcrc_and_qsearch_memory() -> None:
    with spin_vm() as (m, server):
        start = SPIN["spin_loop"]
        pattern = m.memory.read(SPIN["spin_d"], 4)
        want = _gdb_crc32(m.memory.read(start, 0x200))
        out = run_gdb(server.port, f"maintenance packet qCRC:{start:x},200",
                      "find /b " + f"{start:#x}, +0x400, "
                      + ", ".join(f"{b:#04x}" for b in pattern),
                      "maintenance packet qCRC:7fffff000000,10", "detach")
        replies = received(out)
        assert replies[0] == f"C{want:x}", out
        assert f"{SPIN['spin_d']:#x}" in out and "1 pattern found" in out, out
        assert replies[1].startswith("E"), out
        assert server.sessions[-1]["by_packet"].get("qSearch", 0) >= 1
        assert stop_spin(m) == 0
