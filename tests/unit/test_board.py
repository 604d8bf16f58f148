"""The pc board's pure parts, without KVM: ACPI tables and checksums, fw_cfg's port
and DMA protocol, the multiboot information layout, -cpu parsing, PCI, CMOS, pc-testdev."""

from __future__ import annotations

import struct

import pytest

from regsync.board import acpi, cpuid, fwcfg, multiboot
from regsync.board.isa import AcpiPm, Cmos, PcTestdev
from regsync.board.pci import PciHost


class _Vcpu:
    id = 0
    regs = None


V = _Vcpu()


class _Ram:
    def __init__(self, size: int = 1 << 20) -> None:
        self.mem = bytearray(size)

    def read(self, gpa: int, n: int) -> bytes:
        if gpa + n > len(self.mem):
            raise ValueError("outside RAM")
        return bytes(self.mem[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > len(self.mem):
            raise ValueError("outside RAM")
        self.mem[gpa:gpa + len(data)] = data


# --- ACPI ---------------------------------------------------------------------------------
def test_acpi_tables_checksum_and_link() -> None:
    placed = acpi.build(0xE0000, 0xF0000, 3)
    ram = _Ram()
    for addr, data in placed.items():
        ram.write(addr, data)
    rsdp = ram.read(0xF0000, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    rsdt_addr, = struct.unpack_from("<I", rsdp, 16)
    xsdt_addr, = struct.unpack_from("<Q", rsdp, 24)
    tables = {}
    for base, fmt in ((rsdt_addr, "<I"), (xsdt_addr, "<Q")):
        length, = struct.unpack_from("<I", ram.read(base, 8), 4)
        head = ram.read(base, length)
        assert sum(head) % 256 == 0
        n = (length - 36) // struct.calcsize(fmt)
        for i in range(n):
            a, = struct.unpack_from(fmt, head, 36 + i * struct.calcsize(fmt))
            sig = ram.read(a, 4)
            tlen, = struct.unpack_from("<I", ram.read(a, 8), 4)
            assert sum(ram.read(a, tlen)) % 256 == 0, sig
            tables[sig] = a
    fadt = ram.read(tables[b"FACP"], 244)
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    assert ram.read(facs, 4) == b"FACS" and facs % 64 == 0 and ram.read(dsdt, 4) == b"DSDT"
    assert struct.unpack_from("<I", fadt, 76)[0] == acpi.PM_TMR
    madt = ram.read(tables[b"APIC"], struct.unpack_from("<I", ram.read(tables[b"APIC"], 8), 4)[0])
    off, lapics, overrides = 44, [], []
    while off < len(madt):
        kind, size = madt[off], madt[off + 1]
        if kind == 0:
            lapics.append(madt[off + 3])
        if kind == 2:
            overrides.append((madt[off + 3], struct.unpack_from("<I", madt, off + 4)[0]))
        off += size
    assert lapics == [0, 1, 2] and (0, 2) in overrides


def test_rsdp_outside_the_bios_area_is_refused() -> None:
    with pytest.raises(ValueError, match="RSDP"):
        acpi.build(0xE0000, 0x90000, 1)


# --- fw_cfg -------------------------------------------------------------------------------
def _fw() -> tuple[fwcfg.FwCfg, _Ram]:
    ram = _Ram()
    return fwcfg.FwCfg.for_pc(ram, 64 << 20, 2, [(0, 64 << 20, 1), (0xFFFBC000, 0x4000, 2)]), ram


def _read(fw: fwcfg.FwCfg, key: int, n: int) -> bytes:
    fw.io_out(V, fwcfg.CTL_PORT, 2, key)
    return bytes(fw.io_in(V, fwcfg.DATA_PORT, 1) for _ in range(n))


def test_fwcfg_items_and_unknown_keys() -> None:
    fw, _ = _fw()
    assert _read(fw, fwcfg.SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", _read(fw, fwcfg.ID, 4))[0] == 3
    assert struct.unpack("<Q", _read(fw, fwcfg.RAM_SIZE, 8))[0] == 64 << 20
    assert struct.unpack("<H", _read(fw, fwcfg.NB_CPUS, 2))[0] == 2
    assert _read(fw, 0x18, 4) == bytes(4) and _read(fw, 0x3FFE, 4) == bytes(4)
    assert _read(fw, fwcfg.SIGNATURE, 6) == b"QEMU\0\0"          # past the end: zeros
    count = struct.unpack(">I", _read(fw, fwcfg.FILE_DIR, 4))[0]
    entry = _read(fw, fwcfg.FILE_DIR, 4 + 64 * count)[4:68]
    size, key = struct.unpack(">IH", entry[:6])
    assert entry[8:16] == b"etc/e820" and size == 40
    assert struct.unpack("<QQI", _read(fw, key, 20)) == (0, 64 << 20, 1)


def test_fwcfg_dma_read_and_refused_write() -> None:
    fw, ram = _fw()
    assert fw.io_in(V, fwcfg.DMA_PORT, 4).to_bytes(4, "little") == b"QEMU"
    ram.write(0x1000, struct.pack(">IIQ", (fwcfg.RAM_SIZE << 16) | fwcfg.DMA_SELECT | fwcfg.DMA_READ,
                                  8, 0x2000))
    fw.io_out(V, fwcfg.DMA_PORT, 4, 0)
    fw.io_out(V, fwcfg.DMA_PORT + 4, 4, int.from_bytes((0x1000).to_bytes(4, "big"), "little"))
    assert struct.unpack("<Q", ram.read(0x2000, 8))[0] == 64 << 20
    assert struct.unpack(">I", ram.read(0x1000, 4))[0] == 0
    ram.write(0x1000, struct.pack(">IIQ", fwcfg.DMA_WRITE, 4, 0x2000))
    fw.io_out(V, fwcfg.DMA_PORT + 4, 4, int.from_bytes((0x1000).to_bytes(4, "big"), "little"))
    assert struct.unpack(">I", ram.read(0x1000, 4))[0] == fwcfg.DMA_ERROR


# --- multiboot ----------------------------------------------------------------------------
def test_multiboot_info_layout() -> None:
    mmap = multiboot.memory_map(64 << 20, [(0xFFFBC000, 0x4000)])
    mods = [multiboot.Module(b"abc", "/m1 x=1"), multiboot.Module(b"d" * 5000, "/m2")]
    p = multiboot.build(0x103456, 64 << 20, "/k answer=42", mods, mmap)
    ram = _Ram(2 << 20)
    for a, d in p.blobs.items():
        ram.write(a, d)
    info = ram.read(p.info_addr, 88)
    flags, lower, upper = struct.unpack_from("<III", info)
    assert flags & 0x24D == 0x24D and lower == 639 and upper == 63 * 1024
    cmd = struct.unpack_from("<I", info, 16)[0]
    assert ram.read(cmd, 13) == b"/k answer=42\0"
    count, addr = struct.unpack_from("<II", info, 20)
    starts = [struct.unpack_from("<II", ram.read(addr + 16 * i, 8)) for i in range(count)]
    assert [s % 4096 for s, _ in starts] == [0, 0] and starts[0][0] >= 0x104000
    assert ram.read(starts[1][0], 5) == b"ddddd" and starts[1][1] - starts[1][0] == 5000
    mlen, maddr = struct.unpack_from("<II", info, 44)
    assert mlen == 24 * len(mmap)              # size field + 20 bytes each
    assert struct.unpack_from("<IQQI", ram.read(maddr, 24)) == (20, 0, 0x9FC00, 1)


def test_modules_past_ram_are_refused() -> None:
    with pytest.raises(multiboot.MultibootError, match="past the end of RAM"):
        multiboot.build(0x100000, 2 << 20, "k", [multiboot.Module(bytes(3 << 20), "/big")],
                        multiboot.memory_map(2 << 20))


# --- -cpu ---------------------------------------------------------------------------------
def test_cpu_spec_parsing() -> None:
    assert cpuid.parse("host,-x2apic,+vmx,avx=off,sse4.2=on") == (
        "host", {"x2apic": False, "vmx": True, "avx": False, "sse4-2": True})
    for bad in ("qemu64", "host,+bogus", "host,x2apic", "host,avx=maybe"):
        with pytest.raises(cpuid.CpuSpecError):
            cpuid.parse(bad)


# --- PCI, CMOS, testdev, PM ---------------------------------------------------------------
def test_pci_host_bridge_and_empty_slots() -> None:
    pci = PciHost()
    pci.io_out(V, 0xCF8, 4, 0x80000000)
    assert pci.io_in(V, 0xCFC, 4) == 0x12378086
    assert pci.io_in(V, 0xCFE, 2) == 0x1237
    pci.io_out(V, 0xCF8, 4, 0x80000000 | 5 << 11)
    assert pci.io_in(V, 0xCFC, 4) == 0xFFFFFFFF
    pci.io_out(V, 0xCF8, 4, 0x00000000)                 # enable bit clear
    assert pci.io_in(V, 0xCFC, 2) == 0xFFFF


def test_cmos_memory_bytes_and_clock() -> None:
    c = Cmos(64 << 20, 2, clock=lambda: 1_700_000_000.0)   # 2023-11-14 22:13:20 UTC
    def rd(i: int) -> int:
        c.io_out(V, 0x70, 1, i | 0x80)                      # NMI mask bit ignored
        return c.io_in(V, 0x71, 1)
    assert rd(0x15) | rd(0x16) << 8 == 640
    assert rd(0x17) | rd(0x18) << 8 == 63 * 1024
    assert rd(0x34) | rd(0x35) << 8 == 48 * 16
    assert rd(0x5F) == 1
    assert (rd(0x04), rd(0x02), rd(0x00), rd(0x09), rd(0x32)) == (0x22, 0x13, 0x20, 0x23, 0x20)


def test_testdev_port_iomem_and_irq_lines() -> None:
    lines: list[tuple[int, int]] = []
    t = PcTestdev(lambda n, level: lines.append((n, level)))
    t.io_out(V, 0xE0, 4, 0x12345678)
    t.io_out(V, 0xEA, 1, 0xAB)
    assert t.io_in(V, 0xE0, 4) == 0x12AB5678 and t.io_in(V, 0xE1, 1) == 0x56
    t.io_out(V, 0x2005, 1, 7)
    t.io_out(V, 0x2005, 1, 0)
    assert lines == [(5, 1), (5, 0)]
    assert t.mmio(0xFF00FFFC, b"\1\2\3\4", 4) == b""
    assert t.mmio(0xFF00FFFC, None, 4) == b"\1\2\3\4"
    assert t.mmio(0xFF010000, None, 4) is None and t.mmio(0xFF00FFFE, None, 4) is None


def test_pm_timer_counts_at_3_579545_mhz_and_s5_powers_off() -> None:
    now = [0]
    off: list[bool] = []
    pm = AcpiPm(on_poweroff=lambda: off.append(True), clock=lambda: now[0])
    now[0] = 1_000_000_000                                   # one second
    assert pm.io_in(V, acpi.PM_TMR, 4) == acpi.PM_TIMER_HZ
    now[0] = 5 * 1_000_000_000                               # 24 bits wrap
    assert pm.io_in(V, acpi.PM_TMR, 4) == (5 * acpi.PM_TIMER_HZ) & 0xFFFFFF
    pm.io_out(V, acpi.PM1A_CNT, 2, 1 << 13)                  # SLP_EN, SLP_TYP 0 (S5)
    assert off == [True]


# --- the front door's parser ---------------------------------------------------------------
def test_qemu_command_line_parsing() -> None:
    from regsync.board import qemu_cli as q
    o = q.parse(["-kernel", "k", "-append", "a b", "-initrd", "m1 x,m2", "-smp", "sockets=2,cores=2",
                 "-m", "1G", "-cpu", "host,-x2apic", "-machine", "pc,accel=kvm", "-enable-kvm",
                 "-device", "isa-debug-exit", "-global", "isa-debug-exit.iobase=0xf4",
                 "-device", "pc-testdev", "-serial", "mon:stdio", "-display", "none",
                 "-nodefaults", "-no-reboot", "-bios", "/x/qboot.rom"])
    assert (o.kernel, o.append, o.initrd, o.smp, o.mem_mb, o.cpu) == (
        "k", "a b", ["m1 x", "m2"], 4, 1024, "host,-x2apic")
    assert o.debug_exit == (0xF4, 2) and o.testdev and o.serial == "stdio" and o.no_reboot
    assert q.parse(["-kernel", "k"]).debug_exit is None          # QEMU: no exit device
    assert q.parse(["-kernel", "k", "-smp", "3,maxcpus=8"]).smp == 3
    for bad in (["-kernel", "k", "-smp"], ["-kernel", "k", "-usb"], ["-kernel", "k", "stray"],
                ["-kernel", "k", "-device", "isa-debug-exit,bogus=1"], ["-m", "64"]):
        with pytest.raises(q.UsageError):
            q.parse(bad)
