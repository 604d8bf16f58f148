"""The snapshot file format on plain data (no KVM): round trip, zero pages left out,
page-aligned memory, atomic writes, and one clear line for every damaged file."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from regsync.snapshot import fileformat as ff
from regsync.snapshot import MachineState, SlotImage, SnapshotError, VcpuState

PAGE = 4096


def sample_state(slot_size: int = 64 << 20, smp: int = 2) -> MachineState:
    mem = bytearray(8 * PAGE)
    mem[PAGE:PAGE + 5] = b"hello"                  # page 1 has data, pages 0 and 2..7 are zero
    mem[5 * PAGE + 100] = 0x42                     # page 5 too
    vcpus = [VcpuState(i, bytes(range(40)) * 3, {"MP_STATE": struct.pack("<I", i),
                                                  "REGS": bytes([i]) * 144, "EVENTS": b"\x01" * 64})
             for i in range(smp)]
    extents = [(0x100000, bytes(mem)), (slot_size - PAGE, b"\x07" * PAGE)]
    return MachineState("x86_64", True, vcpus, {"pit": b"\x02" * 112, "clock": b"\x03" * 48},
                        [SlotImage(0, slot_size, extents)], {"serial": {"lcr": 3}},
                        {"name": "hello", "entry": 0x100040, "mode": "long", "end": 0x101000,
                         "arg": 0, "addr": 0x100000}, {"regsync": "test"})


def contents(img: SlotImage) -> dict[int, bytes]:
    """Non-zero pages by offset."""
    out = {}
    for off, data in img.extents:
        data = bytes(data)
        for p in range(0, len(data), PAGE):
            page = data[p:p + PAGE]
            if page.strip(b"\0"):
                out[off + p] = page
    return out


def reseal(data: bytearray) -> bytearray:
    """Recompute the trailer, so a test reaches the checks after the checksum."""
    data[-ff.TRAILER:] = hashlib.sha256(bytes(data[:-ff.TRAILER])).digest()
    return data


def one_line_error(path: Path) -> str:
    with pytest.raises(SnapshotError) as ei:
        ff.read(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_round_trip_keeps_every_part(tmp_path: Path) -> None:
    st = sample_state()
    p = tmp_path / "a.snap"
    size = ff.write(p, st)
    assert size == p.stat().st_size
    info = ff.read(p)
    got = info.state
    assert info.version == "1.0" and info.arch == "x86_64"
    assert [(v.id, v.cpuid, v.groups) for v in got.vcpus] == \
        [(v.id, v.cpuid, v.groups) for v in st.vcpus]
    assert got.vm == st.vm and got.devices == st.devices and got.guest == st.guest
    assert got.irqchip and got.info == st.info
    assert [(s.gpa, s.size) for s in got.memory] == [(0, 64 << 20)]
    assert contents(got.memory[0]) == contents(st.memory[0])


def test_zero_pages_not_stored_and_memory_page_aligned(tmp_path: Path) -> None:
    p = tmp_path / "a.snap"
    ff.write(p, sample_state())
    info = ff.read(p)
    assert info.sections["mem0"] == 3 * PAGE           # pages 1, 5 and the last one
    assert p.stat().st_size < 32 * 1024                # a 64 MiB guest
    raw = p.read_bytes()
    nsec = struct.unpack_from("<I", raw, 32)[0]
    for i in range(nsec):
        name, off, _ = struct.unpack_from("<32sQQ", raw, 64 + 48 * i)
        if name.rstrip(b"\0") == b"mem0":
            assert off % PAGE == 0


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.snap"
    ff.write(p, sample_state())
    good = p.read_bytes()

    def boom(*a: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        ff.write(p, sample_state(smp=1))
    assert p.read_bytes() == good                      # the old file is intact
    assert [q.name for q in tmp_path.iterdir()] == ["a.snap"]   # no temporary left


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, bytearray]:
    p = tmp_path / "s.snap"
    ff.write(p, sample_state())
    return p, bytearray(p.read_bytes())


def test_wrong_magic(good: tuple[Path, bytearray]) -> None:
    p, data = good
    data[0:8] = b"NOTASNAP"
    p.write_bytes(data)
    assert "not a regsync snapshot" in one_line_error(p)


def test_other_architecture(good: tuple[Path, bytearray]) -> None:
    p, data = good
    data[16:32] = b"aarch64".ljust(16, b"\0")
    p.write_bytes(reseal(data))
    assert "aarch64 architecture" in one_line_error(p)


def test_newer_major_version(good: tuple[Path, bytearray]) -> None:
    p, data = good
    struct.pack_into("<HH", data, 8, ff.MAJOR + 1, 0)
    p.write_bytes(reseal(data))
    msg = one_line_error(p)
    assert f"version {ff.MAJOR + 1}.0 is newer" in msg


def test_newer_minor_version_is_read(good: tuple[Path, bytearray]) -> None:
    p, data = good
    struct.pack_into("<H", data, 10, 7)
    p.write_bytes(reseal(data))
    assert ff.read(p).version == f"{ff.MAJOR}.7"


@pytest.mark.parametrize("keep", [0, 10, 63, 64, 200, -1, -ff.TRAILER])
def test_truncated(good: tuple[Path, bytearray], keep: int) -> None:
    p, data = good
    p.write_bytes(data[:keep])
    assert "truncated" in one_line_error(p)


def test_every_flipped_bit_region_is_caught(good: tuple[Path, bytearray]) -> None:
    """A single flipped bit anywhere (header, table, sections, padding, trailer) is refused."""
    p, data = good
    positions = sorted({*range(0, 64, 3), *range(64, len(data), max(1, len(data) // 400)),
                        len(data) - 1})
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        p.write_bytes(bad)
        with pytest.raises(SnapshotError) as ei:
            ff.read(p)
        assert "\n" not in str(ei.value), pos


def test_section_count_beyond_limit(good: tuple[Path, bytearray]) -> None:
    p, data = good
    struct.pack_into("<I", data, 32, ff.MAX_SECTIONS + 1)
    p.write_bytes(reseal(data))
    assert "section count" in one_line_error(p)


def test_section_beyond_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.snap"
    st = sample_state()
    st.vcpus[0].groups["XSAVE"] = b"\x01" * (ff.MAX_GROUP + 1)
    ff.write(p, st)
    assert "beyond its limit" in one_line_error(p)


def test_memory_size_beyond_limit(tmp_path: Path) -> None:
    p = tmp_path / "s.snap"
    ff.write(p, sample_state(slot_size=ff.MAX_MEMORY + PAGE))
    assert "beyond the limits" in one_line_error(p)


def test_vcpu_count_beyond_limit(tmp_path: Path) -> None:
    p = tmp_path / "s.snap"
    st = sample_state(smp=1)
    st.vcpus = [VcpuState(i, b"", {}) for i in range(ff.MAX_VCPUS + 1)]
    ff.write(p, st)
    assert f"vCPU count {ff.MAX_VCPUS + 1} is beyond the limit" in one_line_error(p)


def test_run_outside_its_slot(tmp_path: Path) -> None:
    p = tmp_path / "s.snap"
    st = sample_state()
    st.memory[0].size = PAGE          # the runs at 1 MiB no longer fit
    ff.write(p, st)
    assert "outside the slot" in one_line_error(p)


def test_missing_file_and_garbage(tmp_path: Path) -> None:
    assert "no such snapshot file" in one_line_error(tmp_path / "nope.snap")
    g = tmp_path / "g.snap"
    g.write_bytes(os.urandom(5000))
    assert "not a regsync snapshot" in one_line_error(g)
