"""Issue 2 on real KVM: handles, errors, exits, memory, boot, the bundled guests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from regsync import KvmError, Machine
from regsync.guests import symbols
from regsync.memory import GuestMemoryError

MASK64 = (1 << 64) - 1


def test_hello_via_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "regsync.cli", "run", "hello", "--smp", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "Hello from the regsync guest!\n"
    assert "exited with status 0" in out.stderr
    assert out.returncode == 0


def hypercall_checksum(n: int) -> int:
    c = 0
    for i in range(1, n + 1):
        c = (c * 31 + i + i * i) & MASK64
    return c


def test_hypercall_guest_registers_reach_the_guest() -> None:
    """rdi/rsi read and rax written from Python, 10,000 times; the guest checks each."""
    n = 10_000
    with Machine(smp=1) as m:
        m.load("hypercall", arg=n)
        v = m.vcpus[0]
        calls = 0
        while True:
            ex = v.run()
            assert ex.kind == "io", ex
            if ex.port == 0x500:
                assert ex.direction == "out" and ex.size == 4 and ex.value == 1
                v.regs.rax = v.regs.rdi + v.regs.rsi
                calls += 1
            else:
                m.dispatch(v, ex)              # serial output, LSR polls, the debug exit
                if m.exit_status is not None:
                    status = m.exit_status
                    break
        assert calls == n
        assert status == 0, m.serial.text
        assert f"checksum={hypercall_checksum(n):#018x}" in m.serial.text
        # SYNC_REGS: the whole loop issued no register ioctl after the boot state.
        if m.sync_regs:
            io = v.stats["ioctls"]
            assert io.get("KVM_SET_REGS", 0) == 0 and io.get("KVM_GET_REGS", 0) <= 1


def test_bad_memory_slot_names_the_ioctl_and_vm_stays_usable() -> None:
    with Machine(smp=1) as m:
        with pytest.raises(KvmError) as ei:
            m.vm.set_user_memory_region(5, 0x1234, 0x1000, 0)      # misaligned address
        assert ei.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
        assert ei.value.errno == 22 and "Errno 22" in str(ei.value) and "VM" in str(ei.value)
        with pytest.raises(GuestMemoryError, match="outside every memory slot"):
            m.memory.read(0xF000_0000, 4)
        m.load("hello")
        m.start()
        assert m.wait(30) == 0
        assert m.serial.lines == ["Hello from the regsync guest!"]


def test_invalid_cr0_raises_naming_ioctl_and_vm_stays_usable() -> None:
    with Machine(smp=1) as m:
        h = m.vcpus[0].handle
        sregs = h.get_sregs()
        sregs.cr0 = 0x8000_0000          # PG without PE
        with pytest.raises(KvmError) as ei:
            h.set_sregs(sregs)
        assert ei.value.ioctl == "KVM_SET_SREGS" and ei.value.errno == 22
        assert "vCPU 0" in str(ei.value)
        m.load("hello")
        m.start()
        assert m.wait(30) == 0


def _flat_guest() -> bytes:
    """Hand-assembled: rep outsb of 5 bytes, an IN answered by the VMM, its echo, MMIO, hlt."""
    text = b"hello"
    code = bytearray()
    code += b"\x66\xba\xf8\x03"                          # mov $0x3f8, %dx
    code += b"\x48\xbe" + (0x100100).to_bytes(8, "little")  # movabs $0x100100, %rsi
    code += b"\x48\xc7\xc1\x05\x00\x00\x00"              # mov $5, %rcx
    code += b"\xf3\x6e"                                  # rep outsb
    code += b"\xe4\x60"                                  # in $0x60, %al
    code += b"\xe6\x61"                                  # out %al, $0x61
    code += b"\xa2" + (0xD000_0000).to_bytes(8, "little")  # movabs %al, 0xd0000000 (MMIO)
    code += b"\xf4"                                      # hlt
    return bytes(code).ljust(0x100, b"\x90") + text


def test_exit_decoding_rep_in_mmio_hlt(tmp_path) -> None:
    img = tmp_path / "flat.bin"
    img.write_bytes(_flat_guest())
    with Machine(smp=1, irqchip=False) as m:
        m.load(str(img))
        v = m.vcpus[0]
        seen = b""
        while True:
            ex = v.run()
            if ex.kind == "io" and ex.port == 0x3F8:
                assert ex.direction == "out" and ex.size == 1
                seen += ex.data
                if len(seen) >= 5:
                    break
            else:
                pytest.fail(f"unexpected {ex!r}")
        assert seen == b"hello"
        ex = v.run()
        assert (ex.kind, ex.port, ex.direction, ex.size) == ("io", 0x60, "in", 1)
        with pytest.raises(ValueError):
            ex.respond(b"\x01\x02")
        ex.respond(0x42)
        ex = v.run()
        assert (ex.kind, ex.port, ex.direction, ex.value) == ("io", 0x61, "out", 0x42)
        ex = v.run()
        assert ex.kind == "mmio" and ex.addr == 0xD000_0000 and ex.is_write and ex.data == b"\x42"
        ex = v.run()
        assert ex.kind == "hlt"


def test_memory_and_symbols() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        addr = symbols("counter")["counter_value"]
        v = m.vcpus[0]
        for _ in range(3):
            ex = v.run()
            assert ex.kind == "io" and ex.port == 0x501
        assert m.memory.read_u64(addr) == v.regs.r12 == 3


def _elf(code: bytes, entry: int = 0x200000) -> bytes:
    """A minimal ELF64 x86-64 executable: one PT_LOAD segment at entry."""
    import struct
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 62, 1, entry,
                       64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, entry, entry, len(code), len(code) + 0x100,
                       0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + code


def test_elf_image_loads_and_runs(tmp_path) -> None:
    code = b"\xb0\x07\xe6\xf4\xf4"                  # mov $7, %al; out %al, $0xf4; hlt
    img = tmp_path / "guest.elf"
    img.write_bytes(_elf(code))
    with Machine(smp=1) as m:
        g = m.load(str(img))
        assert (g.entry, g.mode) == (0x200000, "long")
        assert m.memory.read(0x200000, len(code)) == code
        assert m.memory.read(0x200000 + len(code), 0x100) == bytes(0x100)   # bss zeroed
        m.start()
        assert m.wait(30) == 7


def test_truncated_elf_is_a_clear_error(tmp_path) -> None:
    img = tmp_path / "bad.elf"
    img.write_bytes(_elf(b"\x90" * 16)[:0x80])
    with Machine(smp=1) as m:
        with pytest.raises(GuestMemoryError, match="past the end of the file"):
            m.load(str(img))


def test_register_edit_at_a_split_rep_ins_loses_no_data(tmp_path) -> None:
    """rep insb across a page boundary exits once per chunk. Editing a register at
    the first IN makes regsync complete the I/O first (re-entry with immediate_exit);
    the next chunk's exit is handed back by run(), and every byte arrives."""
    code = bytearray()
    code += b"\x66\xba\x60\x00"                              # mov $0x60, %dx
    code += b"\x48\xbf" + (0x100FFE).to_bytes(8, "little")  # movabs $0x100ffe, %rdi
    code += b"\x48\xc7\xc1\x04\x00\x00\x00"                  # mov $4, %rcx
    code += b"\xf3\x6c"                                      # rep insb
    code += b"\xe6\x61"                                      # out %al, $0x61
    code += b"\xf4"
    img = tmp_path / "insb.bin"
    img.write_bytes(bytes(code))
    with Machine(smp=1, irqchip=False) as m:
        m.load(str(img))
        v = m.vcpus[0]
        sent = 0
        edited = False
        while True:
            ex = v.run()
            if ex.kind == "io" and ex.port == 0x60:
                ex.respond(bytes(range(0x41 + sent, 0x41 + sent + ex.count)))
                sent += ex.count
                if not edited:
                    v.regs.r8 = 0xE1              # an edit while the IN is pending
                    edited = True
            elif ex.kind == "io" and ex.port == 0x61:
                break
            else:
                pytest.fail(f"unexpected {ex!r}")
        assert sent == 4
        assert m.memory.read(0x100FFE, 4) == b"ABCD"
        assert v.regs.r8 == 0xE1 and v.regs.rcx == 0
