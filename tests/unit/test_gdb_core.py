"""StubCore tests against an in-memory FakeTarget (pure, no KVM)."""

from __future__ import annotations

import errno

import pytest

from regsync.gdb.core import StubCore
from regsync.gdb.packets import Ack, Framer, Packet, checksum, encode_packet
from regsync.gdb.target import (
    Action, LocalProtocolError, StopEvent, TargetBase, TargetError, Unsupported,
)
from regsync.gdb.targetxml import (
    I386_LAYOUT, X86_64_LAYOUT, GdbRegister, RegisterLayout, register_bytes,
    register_updates,
)

PAGE = 0x1000
CATALOG = (
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
    " cs.selector ss.selector ds.selector es.selector fs.selector gs.selector"
    " fs.base gs.base kernel_gs_base cr0 cr2 cr3 cr4 cr8 efer fcw fsw ftw fop fip fdp"
    " mxcsr"
).split() + [f"st{i}" for i in range(8)] + [f"xmm{i}" for i in range(16)]


class FakeTarget(TargetBase):
    """N vCPUs with a register catalog each, sparse paged memory, and logs."""

    def __init__(self, n: int = 3) -> None:
        self.cpus = {
            tid: {name: 0 for name in CATALOG} for tid in range(1, n + 1)
        }
        for tid, cat in self.cpus.items():
            cat.update(rip=0x1000 * tid, rsp=0x8000 + tid, rbp=0x9000 + tid,
                       rax=tid, rflags=0x2, fcw=0x37F, mxcsr=0x1F80)
        self.modes = {tid: X86_64_LAYOUT for tid in self.cpus}
        self.unavailable: set[str] = set()
        self.pages: dict[int, bytearray] = {}
        self.breakpoints: set[tuple[int, int, int]] = set()
        self.resumed: list[tuple[dict[int, Action], Action | None]] = []
        self.writes: list[tuple[int, str]] = []
        self.interrupts = 0
        self.killed = self.detached = False

    # threads
    def threads(self) -> list[int]:
        return sorted(self.cpus)

    def thread_extra_info(self, tid: int) -> str:
        return f"vCPU {tid - 1} rip={self.cpus[tid]['rip']:#x}"

    # registers
    def register_layout(self, tid: int) -> RegisterLayout:
        return self.modes[tid]

    def read_register(self, tid: int, reg: GdbRegister) -> bytes | None:
        if reg.name in self.unavailable:
            return None
        return register_bytes(reg, self.cpus[tid].__getitem__)

    def write_register(self, tid: int, reg: GdbRegister, data: bytes) -> None:
        if reg.name == "cr0" and int.from_bytes(data, "little") == 0:
            raise TargetError(errno.EPERM, "refuse cr0=0")
        self.writes.append((tid, reg.name))
        self.cpus[tid].update(register_updates(reg, data, self.cpus[tid].__getitem__))

    # memory
    def map(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.pages.setdefault((addr + i) // PAGE, bytearray(PAGE))[(addr + i) % PAGE] = b

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + length):
            page = self.pages.get(a // PAGE)
            if page is None:
                raise TargetError(errno.EFAULT, "unmapped")
            out.append(page[a % PAGE])
        return bytes(out)

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        if any((a // PAGE) not in self.pages for a in range(addr, addr + len(data))):
            raise TargetError(errno.EFAULT, "unmapped")
        self.map(addr, data)

    # execution
    def resume(self, actions: dict[int, Action], default: Action | None) -> None:
        self.resumed.append((actions, default))

    def interrupt(self) -> None:
        self.interrupts += 1

    def kill(self) -> None:
        self.killed = True

    def detach(self) -> None:
        self.detached = True

    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        if kind == 4:
            raise Unsupported()
        if addr == 0xDEAD:
            raise TargetError(errno.ENOSPC, "no debug registers left")
        self.breakpoints.add((kind, addr, length))

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        self.breakpoints.discard((kind, addr, length))

    def monitor(self, command: str) -> str:
        if command.startswith("echo "):
            return command[5:]
        if command == "quiet":
            return ""
        if command == "big":
            return "y" * 10000
        raise Unsupported()


def make(n: int = 3, running: bool = False, **kw: int) -> tuple[StubCore, FakeTarget]:
    target = FakeTarget(n)
    stop = None if running else StopEvent(tid=1)
    return StubCore(target, initial_stop=stop, **kw), target


def replies(out: bytes) -> list[bytes]:
    return [e.payload for e in Framer(1 << 20).feed(out) if isinstance(e, Packet)]


def ask(core: StubCore, payload: bytes) -> list[bytes]:
    return replies(core.receive(encode_packet(payload, rle=False)))


def ask1(core: StubCore, payload: bytes) -> bytes:
    [reply] = ask(core, payload)
    return reply


def le(value: int, n: int = 8) -> bytes:
    return value.to_bytes(n, "little").hex().encode()


# --- session ------------------------------------------------------------------


def test_qsupported_and_acks() -> None:
    core, _ = make()
    out = core.receive(encode_packet(b"qSupported:multiprocess+;swbreak+;hwbreak+"))
    assert out.startswith(b"+$")
    [reply] = replies(out)
    assert set(reply.split(b";")) == {
        b"PacketSize=4000", b"qXfer:features:read+", b"QStartNoAckMode+",
        b"vContSupported+", b"swbreak+", b"hwbreak+"}


def test_no_ack_mode() -> None:
    core, _ = make()
    out = core.receive(encode_packet(b"QStartNoAckMode"))
    assert out == b"+" + encode_packet(b"OK") and core.no_ack_mode
    out = core.receive(b"+" + encode_packet(b"qAttached"))
    assert out == encode_packet(b"1")
    assert core.receive(b"$g#00") == b""  # bad checksum: dropped silently


def test_bad_checksum_nack_and_retransmit() -> None:
    core, _ = make()
    assert core.receive(b"$qAttached#00") == b"-"
    first = core.receive(encode_packet(b"qAttached"))
    assert core.receive(b"-") == first[1:]  # resend last packet, no ack


def test_oversize_packet_answered_with_error() -> None:
    core, _ = make(packet_size=64)
    out = core.receive(b"$" + b"a" * 100 + b"#00")
    assert out == b"+" + encode_packet(b"E16")


@pytest.mark.parametrize("payload", [b"qOffsets", b"qSymbol::", b"qTStatus",
                                     b"vMustReplyEmpty", b"!", b"jzz", b"qFoo:1"])
def test_unknown_packets_empty(payload: bytes) -> None:
    core, _ = make()
    assert ask1(core, payload) == b""


def test_misc_queries() -> None:
    core, _ = make()
    assert ask1(core, b"qAttached") == b"1"
    assert ask1(core, b"vCont?") == b"vCont;c;C;s;S;t"
    assert ask1(core, b"qC") == b"QC1"


def test_detach_and_kill() -> None:
    core, target = make()
    assert ask1(core, b"D") == b"OK" and target.detached and core.wants_close
    core, target = make()
    out = core.receive(encode_packet(b"k"))
    assert out == b"+" and target.killed and core.wants_close
    core, target = make()
    assert ask1(core, b"vKill;1") == b"OK" and target.killed


# --- stop replies ----------------------------------------------------------------


def test_initial_stop_reply_expedites_fp_sp_pc() -> None:
    core, _ = make()
    assert ask1(core, b"?") == (b"T0506:" + le(0x9001) + b";07:" + le(0x8001)
                                + b";10:" + le(0x1000) + b";thread:01;")


def test_resume_stop_and_thread_switch() -> None:
    core, target = make()
    ask(core, b"qSupported:swbreak+")
    assert ask(core, b"vCont;c") == [] and not core.stopped
    assert target.resumed == [({}, ("c", None))]
    out = core.on_stop(StopEvent(tid=3, signal=5, reason="swbreak"))
    assert out == encode_packet(b"T0506:" + le(0x9003) + b";07:" + le(0x8003)
                                + b";10:" + le(0x3000) + b";thread:03;swbreak:;")
    assert core.stopped
    assert ask1(core, b"qC") == b"QC3"
    assert ask1(core, b"p10") == le(0x3000)
    assert ask1(core, b"?").startswith(b"T05")


def test_swbreak_only_if_peer_supports_it() -> None:
    core, _ = make()
    ask(core, b"vCont;c")
    assert b"swbreak" not in core.on_stop(StopEvent(tid=1, reason="swbreak"))


def test_watch_reply_and_server_expedite() -> None:
    core, _ = make()
    ask(core, b"c")
    out = core.on_stop(StopEvent(tid=2, reason="awatch", address=0xBEEF,
                                 expedite={16: b"\x01" * 8}))
    assert replies(out) == [b"T0510:" + b"01" * 8 + b";thread:02;awatch:beef;"]


def test_on_stop_misuse_raises() -> None:
    core, _ = make()
    with pytest.raises(LocalProtocolError):
        core.on_stop(StopEvent(tid=1))
    ask(core, b"c")
    with pytest.raises(LocalProtocolError):
        core.on_stop(StopEvent(tid=9))
    with pytest.raises(LocalProtocolError):
        core.on_stop(StopEvent(tid=1, expedite={999: b""}))
    with pytest.raises(ValueError):
        StopEvent(tid=1, reason="watch")


def test_interrupt_while_running() -> None:
    core, target = make()
    ask(core, b"vCont;c")
    assert core.receive(b"\x03") == b"" and target.interrupts == 1
    reply = replies(core.on_stop(StopEvent(tid=2, signal=2)))
    assert reply[0].startswith(b"T02") and b"thread:02;" in reply[0]
    assert core.receive(b"\x03") == b"" and target.interrupts == 1  # stopped


def test_connect_to_running_machine() -> None:
    core, target = make(running=True)
    assert ask1(core, b"qAttached") == b"1"  # queries work while running
    assert ask1(core, b"g") == b"E16"  # register access does not
    assert ask(core, b"?") == [] and target.interrupts == 1
    assert replies(core.on_stop(StopEvent(tid=1, signal=2)))[0].startswith(b"T02")


def test_unsolicited_stop_is_kept_for_question_mark() -> None:
    core, _ = make(running=True)
    assert core.on_stop(StopEvent(tid=2)) == b""
    assert b"thread:02;" in ask1(core, b"?")


def test_exit() -> None:
    core, _ = make()
    ask(core, b"c")
    assert core.on_exit(3) == encode_packet(b"W03") and core.wants_close


# --- resumption ----------------------------------------------------------------


def test_vcont_actions() -> None:
    core, target = make()
    ask(core, b"vCont;s:2;C0b:3;c")
    assert target.resumed[-1] == ({2: ("s", None), 3: ("c", 11)}, ("c", None))
    core.on_stop(StopEvent(tid=2))
    ask(core, b"vCont;s:p1.1")
    assert target.resumed[-1] == ({1: ("s", None)}, None)
    core.on_stop(StopEvent(tid=1))
    assert ask1(core, b"vCont;t:1") == b"OK" and core.stopped
    for bad in (b"vCont;c:9", b"vCont;x", b"vCont;", b"vCont;C:1"):
        assert ask1(core, bad) == b"E16"
    assert core.stopped


def test_resume_while_running_refused() -> None:
    core, target = make()
    ask(core, b"vCont;c")
    assert ask1(core, b"vCont;c") == b"E16" and len(target.resumed) == 1


def test_legacy_continue_and_step_with_address() -> None:
    core, target = make()
    assert ask1(core, b"Hc2") == b"OK"
    assert ask(core, b"s4000") == []
    assert target.resumed[-1] == ({2: ("s", None)}, None)
    assert target.cpus[2]["rip"] == 0x4000
    core.on_stop(StopEvent(tid=1))
    ask(core, b"C02;5000")
    assert target.resumed[-1] == ({}, ("c", 2)) and target.cpus[1]["rip"] == 0x5000


# --- registers --------------------------------------------------------------------


def test_g_reads_whole_layout() -> None:
    core, target = make()
    target.unavailable.add("cr8")
    reply = ask1(core, b"g")
    assert len(reply) == 2 * X86_64_LAYOUT.g_size
    assert reply.startswith(le(1) + b"00" * 8)  # rax=1, rbx=0
    cr8 = X86_64_LAYOUT.by_name("cr8")
    offset = 2 * sum(r.nbytes for r in X86_64_LAYOUT.registers[: cr8.regnum])
    assert reply[offset : offset + 16] == b"x" * 16


def test_G_writes_only_changes() -> None:
    core, target = make()
    block = bytearray(ask1(core, b"g"))
    block[0:16] = le(0x1234)
    assert ask1(core, b"G" + bytes(block)) == b"OK"
    assert target.writes == [(1, "rax")] and target.cpus[1]["rax"] == 0x1234
    assert ask1(core, b"G" + bytes(block[:-2])) == b"E16"
    assert ask1(core, b"G" + bytes(block[:-1])) == b"E16"


def test_p_and_P() -> None:
    core, target = make()
    assert ask1(core, b"p11") == b"02000000"  # eflags is 32-bit
    assert ask1(core, b"P0=" + le(0xAB)) == b"OK" and target.cpus[1]["rax"] == 0xAB
    assert ask1(core, b"Hg2") == b"OK"
    assert ask1(core, b"p0") == le(2)
    for bad in (b"p99", b"pzz", b"p", b"P0=12", b"P0=" + le(1)[:-1], b"P0",
                b"P23=01000000"):  # fiseg cannot be non-zero
        assert ask1(core, bad) == b"E16"
    cr0 = X86_64_LAYOUT.by_name("cr0").regnum
    assert ask1(core, b"P%x=" % cr0 + le(0)) == b"E01"  # target refused: EPERM


def test_layout_is_pinned_per_connection() -> None:
    core, target = make()
    target.modes[1] = I386_LAYOUT
    core2 = StubCore(target, initial_stop=StopEvent(tid=1))
    xml = ask1(core2, b"qXfer:features:read:target.xml:0,ffff")
    assert b"<architecture>i386</architecture>" in xml
    target.modes[1] = X86_64_LAYOUT  # mode switch after connect
    assert len(ask1(core2, b"g")) == 2 * I386_LAYOUT.g_size
    assert ask1(core2, b"p8") == b"00100000"  # eip: low 32 bits of rip
    assert len(ask1(core, b"g")) == 2 * X86_64_LAYOUT.g_size


# --- memory ----------------------------------------------------------------------


def test_memory_read_write() -> None:
    core, target = make()
    target.map(0x2000, bytes(range(16)))
    assert ask1(core, b"m2000,4") == b"00010203"
    assert ask1(core, b"M2000,2:aabb") == b"OK"
    assert target.read_memory(1, 0x2000, 2) == b"\xaa\xbb"
    data = b"#$}*\x03\x00+-"
    assert ask1(core, b"X2004,%x:" % len(data) + data) == b"OK"
    assert target.read_memory(1, 0x2004, len(data)) == data
    assert ask1(core, b"X0,0:") == b"OK"  # gdb's X probe


def test_memory_errors() -> None:
    core, target = make()
    target.map(0x2000, b"\1")
    assert ask1(core, b"m9000,4") == b"E0e"
    assert ask1(core, b"M9000,1:00") == b"E0e"
    for bad in (b"m2000", b"m2000,", b"mzz,1", b"M2000,2:aa", b"M2000,1:a",
                b"M2000,1", b"X2000,2:a", b"mffffffffffffffff,2"):
        assert ask1(core, bad) == b"E16", bad


def test_partial_read_up_to_unmapped_page() -> None:
    core, target = make()
    target.map(0x2FFE, b"\x11\x22")
    assert ask1(core, b"m2ffe,10") == b"1122"
    assert ask1(core, b"m3000,10") == b"E0e"


def test_memory_read_capped_by_packet_size() -> None:
    core, target = make(packet_size=0x100)
    target.map(0x2000, b"\0" * 0x200)
    assert len(ask1(core, b"m2000,200")) < 0x100


# --- breakpoints -------------------------------------------------------------------


def test_breakpoints() -> None:
    core, target = make()
    for kind in range(4):
        assert ask1(core, b"Z%d,1000,1" % kind) == b"OK"
    assert target.breakpoints == {(k, 0x1000, 1) for k in range(4)}
    assert ask1(core, b"z0,1000,1") == b"OK"
    assert (0, 0x1000, 1) not in target.breakpoints
    assert ask1(core, b"Z0,2000,1;X2,0a") == b"OK"  # conditions ignored
    assert ask1(core, b"Z4,1000,8") == b""  # target: unsupported
    assert ask1(core, b"Z9,1000,1") == b""  # unknown type
    # ENOSPC with its message, in the E.<code>.<text> form gdb 13 prints for Z1
    assert ask1(core, b"Z1,dead,1") == b"E.ENOSPC.no debug registers left"
    assert ask1(core, b"Z1,1000") == b"E16"


# --- threads -------------------------------------------------------------------------


def test_thread_packets() -> None:
    core, _ = make(4)
    assert ask1(core, b"qfThreadInfo") == b"m1,2,3,4"
    assert ask1(core, b"qsThreadInfo") == b"l"
    assert ask1(core, b"T2") == b"OK" and ask1(core, b"T9") == b"E16"
    assert ask1(core, b"Hg-1") == b"OK" and ask1(core, b"Hc0") == b"OK"
    assert ask1(core, b"Hg9") == b"E16" and ask1(core, b"Hx1") == b"E16"
    extra = ask1(core, b"qThreadExtraInfo,2")
    assert bytes.fromhex(extra.decode()) == b"vCPU 1 rip=0x2000"
    assert ask1(core, b"qThreadExtraInfo,9") == b"E16"


def test_thread_list_chunked() -> None:
    core, _ = make(200, packet_size=64)
    ids = []
    reply = ask1(core, b"qfThreadInfo")
    while reply != b"l":
        assert reply.startswith(b"m") and len(reply) <= 64
        ids += [int(x, 16) for x in reply[1:].split(b",")]
        reply = ask1(core, b"qsThreadInfo")
    assert ids == list(range(1, 201))


# --- qXfer and monitor -------------------------------------------------------------


def test_qxfer_chunks() -> None:
    core, _ = make()
    doc = X86_64_LAYOUT.xml()
    assert doc is not None
    got, offset = b"", 0
    while True:
        reply = ask1(core, b"qXfer:features:read:target.xml:%x,100" % offset)
        got += reply[1:]
        offset += len(reply) - 1
        if reply[:1] == b"l":
            break
        assert reply[:1] == b"m"
    assert got == doc
    assert ask1(core, b"qXfer:features:read:target.xml:%x,10" % len(doc)) == b"l"
    assert ask1(core, b"qXfer:features:read:nope.xml:0,10") == b"E00"
    assert ask1(core, b"qXfer:auxv:read::0,10") == b""
    assert ask1(core, b"qXfer:features:read:target.xml:0") == b"E16"


def test_monitor() -> None:
    core, _ = make()
    assert ask1(core, b"qRcmd," + b"echo hi".hex().encode()) == b"hi".hex().encode()
    assert ask1(core, b"qRcmd," + b"quiet".hex().encode()) == b"OK"
    assert ask1(core, b"qRcmd," + b"nope".hex().encode()) == b""
    assert ask1(core, b"qRcmd,zz") == b"E16"
    big = ask(core, b"qRcmd," + b"big".hex().encode())
    assert big[-1] == b"OK" and all(p.startswith(b"O") for p in big[:-1])
    assert b"".join(bytes.fromhex(p[1:].decode()) for p in big[:-1]) == b"y" * 10000


def test_ack_stream_shape() -> None:
    core, _ = make()
    out = core.receive(encode_packet(b"qAttached") + encode_packet(b"qC"))
    events = Framer().feed(out)
    assert events == [Ack(), Packet(b"1"), Ack(), Packet(b"QC1")]
    assert out[-2:] == b"%02x" % checksum(b"QC1")


# --- short 'g' replies, X exits, current thread ---------------------------------------


class PrefixTarget(FakeTarget):
    """Answers 'g' with the first ``n`` registers only (cheap ones), like the VM adapter."""

    n = 24

    def read_registers(self, tid: int, layout: RegisterLayout) -> list[bytes | None]:
        return [self.read_register(tid, r) for r in layout.registers[: self.n]]


def test_g_prefix_and_matching_G() -> None:
    target = PrefixTarget(2)
    core = StubCore(target, initial_stop=StopEvent(tid=1))
    reply = ask1(core, b"g")
    size = sum(r.nbytes for r in X86_64_LAYOUT.registers[:24])
    assert len(reply) == 2 * size
    block = bytearray(reply)
    block[16:32] = le(0x55)                                  # rbx
    assert ask1(core, b"G" + bytes(block)) == b"OK"
    assert target.writes == [(1, "rbx")] and target.cpus[1]["rbx"] == 0x55
    # a G covering more than the g reply reads the rest one register at a time
    full = bytes(block) + ask1(core, b"p18")                 # + st0
    assert ask1(core, b"G" + full) == b"OK" and target.writes == [(1, "rbx")]
    assert ask1(core, b"G" + bytes(block[:-2])) == b"E16"  # not on a register boundary


def test_g_empty_prefix_is_a_local_error() -> None:
    target = PrefixTarget(1)
    target.n = 0
    core = StubCore(target, initial_stop=StopEvent(tid=1))
    with pytest.raises(LocalProtocolError):
        core.receive(encode_packet(b"g"))


def test_exit_with_signal_is_X() -> None:
    core, _ = make()
    ask(core, b"c")
    assert core.on_exit(125, signal=11) == encode_packet(b"X0b") and core.wants_close


def test_current_thread_follows_stop_and_Hg() -> None:
    core, _ = make()
    assert core.current_thread == 1
    ask(core, b"c")
    core.on_stop(StopEvent(tid=3))
    assert core.current_thread == 3
    ask1(core, b"Hg2")
    assert core.current_thread == 2


# --- issue 13: physical memory, scans, messages ------------------------------------------


class PhysTarget(FakeTarget):
    """FakeTarget plus 64 KiB of guest-physical memory distinct from the virtual pages."""

    def __init__(self) -> None:
        super().__init__(2)
        self.phys = bytearray(0x10000)

    def read_physical(self, addr: int, length: int) -> bytes:
        if addr + length > len(self.phys):
            raise TargetError(errno.EFAULT, f"{addr:#x}+{length:#x} is outside guest RAM")
        return bytes(self.phys[addr:addr + length])

    def write_physical(self, addr: int, data: bytes) -> None:
        if addr + len(data) > len(self.phys):
            raise TargetError(errno.EFAULT, "outside guest RAM")
        self.phys[addr:addr + len(data)] = data

    def monitor(self, command: str) -> str:
        if command == "bad":
            raise TargetError(errno.EINVAL, "unknown monitor command 'bad'")
        return super().monitor(command)


def phys_core() -> tuple[StubCore, PhysTarget]:
    target = PhysTarget()
    return StubCore(target, initial_stop=StopEvent(tid=1)), target


def test_phymemmode_packets_as_qemu_answers_them() -> None:
    core, t = phys_core()
    t.map(0x2000, b"virt")
    t.phys[0x2000:0x2004] = b"phys"
    assert ask1(core, b"qqemu.Supported") == b"PhyMemMode"
    assert ask1(core, b"qqemu.PhyMemMode") == b"0"
    assert ask1(core, b"m2000,4") == b"virt".hex().encode()
    assert ask1(core, b"Qqemu.PhyMemMode:") == b"E22"          # no value: QEMU's E22
    assert ask1(core, b"Qqemu.PhyMemMode:1") == b"OK"
    assert ask1(core, b"qqemu.PhyMemMode") == b"1"
    assert ask1(core, b"m2000,4") == b"phys".hex().encode()
    assert ask1(core, b"M2000,2:4142") == b"OK" and t.phys[0x2000:0x2002] == b"AB"
    assert ask1(core, b"Xfffe,4:abcd") == b"E0e" and t.phys[0xFFFE:] == b"\0\0"
    assert ask1(core, b"Qqemu.PhyMemMode:0") == b"OK"
    assert ask1(core, b"m2000,4") == b"virt".hex().encode()
    fresh, _ = phys_core()                      # each connection starts virtual
    assert ask1(fresh, b"qqemu.PhyMemMode") == b"0"


def test_qcrc_is_gdbs_crc32_over_the_current_memory_mode() -> None:
    from regsync.gdb.scan import crc32_gdb
    assert crc32_gdb(b"123456789") == 0x0376E6E7     # CRC-32/MPEG-2 check value
    core, t = phys_core()
    data = bytes(range(256)) * 0x200                 # crosses the 64 KiB scan chunks
    t.map(0x10000, data)
    assert ask1(core, b"qCRC:10000,%x" % len(data)) == b"C%x" % crc32_gdb(data)
    assert ask1(core, b"qCRC:ffff0000,10") == b"E0e"
    assert ask1(core, b"qCRC:0,80000000") == b"E%02x" % errno.E2BIG
    t.phys[0x100:0x104] = b"abcd"
    ask1(core, b"Qqemu.PhyMemMode:1")
    assert ask1(core, b"qCRC:100,4") == b"C%x" % crc32_gdb(b"abcd")


def test_qsearch_memory_finds_a_pattern_across_chunk_boundaries() -> None:
    core, t = phys_core()
    blob = bytearray(0x20000)
    blob[0xFFFE:0x10002] = b"NEED"                   # straddles the first chunk's end
    blob[0x1FFF0:0x1FFF4] = b"a}#b"                  # bytes that need escaping on the wire
    t.map(0x40000, bytes(blob))
    assert ask1(core, b"qSearch:memory:40000;20000;NEED") == b"1,%x" % (0x40000 + 0xFFFE)
    # encode_packet escapes } and # on the wire; the core sees the bytes themselves
    assert ask1(core, b"qSearch:memory:40000;20000;a}#b") == b"1,%x" % (0x40000 + 0x1FFF0)
    assert ask1(core, b"qSearch:memory:40000;20000;nowhere") == b"0"
    assert ask1(core, b"qSearch:memory:0;10;x") == b"E0e"
    assert ask1(core, b"qSearch:other:0;10;x") == b""


def test_refusal_messages_where_gdb_shows_them() -> None:
    core, _ = phys_core()
    # gdb 13: Z refusals carry E.<code>.<text>; monitor errors go out as console text.
    assert ask1(core, b"Z1,dead,1") == b"E.ENOSPC.no debug registers left"
    out = ask(core, b"qRcmd," + b"bad".hex().encode())
    assert out == [b"O" + b"unknown monitor command 'bad'\n".hex().encode(), b"E16"]
    assert ask1(core, b"m0,4") == b"E0e"            # memory stays E nn for gdb 13
    # A gdb that announces error-message+ (gdb 15) gets E.text everywhere.
    core, _ = phys_core()
    ask1(core, b"qSupported:multiprocess+;error-message+")
    assert ask1(core, b"Z1,dead,1") == b"E.no debug registers left"
    assert ask1(core, b"qRcmd," + b"bad".hex().encode()) == b"E.unknown monitor command 'bad'"
    assert ask1(core, b"m0,4") == b"E.unmapped"


def test_packet_counters() -> None:
    core, _ = phys_core()
    ask1(core, b"qqemu.PhyMemMode")
    ask1(core, b"m0,1")
    ask1(core, b"m0,1")
    assert core.packets == 3 and core.by_packet == {"qqemu.PhyMemMode": 1, "m": 2}
