"""The snapshot file: a container apart from the state it carries.

Layout (little-endian)::

    header   64 bytes   magic "RSYNCSNP", major u16, minor u16, header size u32,
                        arch (16 bytes, NUL padded), section count u32,
                        total file size u64, reserved
    table    48 bytes per section: name (32 bytes, NUL padded), offset u64, size u64
    sections "meta" (JSON: machine shape, guest, devices, the memory map),
             "vcpu<N>/<GROUP>" and "cpuid<N>" (the kernel's bytes),
             "vm/<part>" (PIT, clock, irqchips), "mem<N>" (page data)
    trailer  32 bytes   SHA-256 of every byte before it

Guest memory is stored as runs of non-zero pages only (zero pages are not
stored: the meta section maps each run to its place in the slot), each run at a
page-aligned file offset so that the file can be mapped into a guest rather
than read. Runs are not compressed: compressed pages could not be mapped, and
the guests here are mostly zero pages, which are already left out.

Reading checks everything before any state is handed out -- size, magic,
version, the checksum, architecture, every section inside the file and within
its limit, the meta section -- and raises SnapshotError with one line naming
what is wrong. Writing is atomic: a temporary file in the same directory,
fsync, rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..memory import PAGE
from .state import ARCH, MachineState, SlotImage, SnapshotError, VcpuState

MAGIC = b"RSYNCSNP"
MAJOR, MINOR = 1, 0
_HEADER = struct.Struct("<8sHHI16sIQ20x")          # 64 bytes
_ENTRY = struct.Struct("<32sQQ")                    # 48 bytes
_DIGEST = hashlib.sha256
TRAILER = _DIGEST().digest_size

# Limits against hostile or damaged files: nothing larger is read or allocated.
MAX_VCPUS = 1024
MAX_SECTIONS = 16 + MAX_VCPUS * 16
MAX_META = 16 << 20
MAX_GROUP = 1 << 20            # one register group (XSAVE with AMX is ~11 KiB)
MAX_VM_PART = 4096
MAX_MEMORY = 1 << 40           # guest RAM described by one file
assert _HEADER.size == 64 and _ENTRY.size == 48


@dataclass(frozen=True)
class FileInfo:
    """What ``regsync snapshot info`` prints: the header and the section sizes."""
    path: str
    version: str
    arch: str
    size: int
    sections: dict[str, int]
    state: MachineState


# --- writing ---------------------------------------------------------------------------
def _nonzero_runs(img: SlotImage) -> list[tuple[int, Any]]:
    """The image's extents split into runs of pages that are not all zero."""
    zero = bytes(PAGE)
    runs: list[tuple[int, Any]] = []
    for off, data in img.extents:
        view = memoryview(data)
        start = None
        for p in range(0, len(view), PAGE):
            empty = view[p:p + PAGE].tobytes() == zero[:len(view[p:p + PAGE])]
            if not empty and start is None:
                start = p
            elif empty and start is not None:
                runs.append((off + start, view[start:p]))
                start = None
        if start is not None:
            runs.append((off + start, view[start:]))
    return runs


def _meta(st: MachineState, mem_maps: list[list[list[int]]]) -> bytes:
    meta = {
        "info": st.info, "irqchip": st.irqchip, "guest": st.guest, "devices": st.devices,
        "vcpus": [{"id": v.id, "groups": list(v.groups)} for v in st.vcpus],
        "vm": list(st.vm),
        "slots": [{"gpa": s.gpa, "size": s.size, "runs": runs}
                  for s, runs in zip(st.memory, mem_maps)],
    }
    return json.dumps(meta, sort_keys=True).encode()


def encode_sections(st: MachineState) -> list[tuple[str, Any]]:
    """(name, bytes-like) in file order; memory runs as views, not copies."""
    mem_sections: list[tuple[str, list[tuple[int, Any]]]] = []
    mem_maps: list[list[list[int]]] = []
    for i, img in enumerate(st.memory):
        runs = _nonzero_runs(img)
        at, table = 0, []
        for off, data in runs:
            table.append([off, len(data), at])      # slot offset, length, offset in section
            at += len(data)
        mem_sections.append((f"mem{i}", runs))
        mem_maps.append(table)
    parts: list[tuple[str, Any]] = [("meta", _meta(st, mem_maps))]
    for v in st.vcpus:
        parts.append((f"cpuid{v.id}", v.cpuid))
        parts += [(f"vcpu{v.id}/{g}", data) for g, data in v.groups.items()]
    parts += [(f"vm/{name}", data) for name, data in st.vm.items()]
    for name, runs in mem_sections:
        parts.append((name, _Joined(runs)))
    return parts


class _Joined:
    """Memory runs written back to back as one section, without joining them in RAM."""

    def __init__(self, runs: list[tuple[int, Any]]) -> None:
        self.runs = runs

    def __len__(self) -> int:
        return sum(len(d) for _, d in self.runs)

    def chunks(self) -> Iterable[Any]:
        return (d for _, d in self.runs)


def write(path: str | os.PathLike[str], st: MachineState) -> int:
    """Write st to path atomically; returns the file size."""
    parts = encode_sections(st)
    if len(parts) > MAX_SECTIONS:
        raise SnapshotError(f"{len(parts)} sections: more than the format's {MAX_SECTIONS}")
    at = _HEADER.size + _ENTRY.size * len(parts)
    table = []
    for name, data in parts:
        if name.startswith("mem"):
            at = -(-at // PAGE) * PAGE               # page-aligned: the file can be mapped
        table.append((name, at, len(data)))
        at += len(data)
    total = at + TRAILER
    header = _HEADER.pack(MAGIC, MAJOR, MINOR, _HEADER.size, ARCH.encode(), len(parts), total)
    entries = b"".join(_ENTRY.pack(n.encode(), o, s) for n, o, s in table)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        digest = _DIGEST()
        with os.fdopen(fd, "wb") as f:
            def put(b: Any) -> None:
                digest.update(b)
                f.write(b)
            put(header)
            put(entries)
            pos = _HEADER.size + len(entries)
            for (name, data), (_, off, _size) in zip(parts, table):
                if off > pos:
                    put(bytes(off - pos))
                for chunk in (data.chunks() if isinstance(data, _Joined) else (data,)):
                    put(chunk)
                pos = off + len(data)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return total


# --- reading ---------------------------------------------------------------------------
def _fail(path: Path, why: str) -> SnapshotError:
    return SnapshotError(f"{path}: {why}")


def read(path: str | os.PathLike[str]) -> FileInfo:
    """Validate the whole file and decode it. Memory runs stay views of the mapped file."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise _fail(p, "no such snapshot file") from None
    except OSError as e:
        raise _fail(p, f"cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER.size:
            raise _fail(p, f"truncated: {size} bytes, shorter than the {_HEADER.size}-byte header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        info = _decode(p, buf, size)
        # The very file that was validated (not whatever the path names later) stays
        # open, so put_memory can map its page-aligned runs instead of copying them.
        source = MappedFile(os.dup(f.fileno()))
    for img in info.state.memory:
        img.source = source
    return info


class MappedFile:
    """An open snapshot file whose memory runs may be mapped into a guest (closed with it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _decode(p: Path, buf: Any, size: int) -> FileInfo:
    magic, major, minor, hsize, arch_b, nsec, total = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _fail(p, f"not a regsync snapshot (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if major > MAJOR:
        raise _fail(p, f"format version {major}.{minor} is newer than this regsync reads "
                       f"({MAJOR}.x): upgrade regsync")
    if major < 1 or hsize != _HEADER.size:
        raise _fail(p, f"format version {major}.{minor} with a {hsize}-byte header is not one "
                       f"this regsync knows")
    if total != size:
        if size < total:
            raise _fail(p, f"truncated: {size} of {total} bytes")
        raise _fail(p, f"{size - total} unexpected bytes after the end of the snapshot")
    if nsec > MAX_SECTIONS or _HEADER.size + nsec * _ENTRY.size + TRAILER > size:
        raise _fail(p, f"section count {nsec} is beyond the limit ({MAX_SECTIONS}) or the file")
    digest = _DIGEST(memoryview(buf)[:size - TRAILER]).digest()
    if digest != buf[size - TRAILER:size]:
        raise _fail(p, "checksum mismatch: the file is damaged (SHA-256 over the contents "
                       "does not match the trailer)")
    arch = arch_b.rstrip(b"\0").decode("ascii", "replace")
    if arch != ARCH:
        raise _fail(p, f"snapshot is for the {arch} architecture, this regsync runs {ARCH}")
    sections: dict[str, tuple[int, int]] = {}
    end = size - TRAILER
    for i in range(nsec):
        raw, off, length = _ENTRY.unpack_from(buf, _HEADER.size + i * _ENTRY.size)
        name = raw.rstrip(b"\0").decode("ascii", "replace")
        if off + length > end or off < _HEADER.size:
            raise _fail(p, f"section {name!r} ({length} bytes at {off}) lies outside the file")
        limit = (MAX_META if name == "meta" else MAX_MEMORY if name.startswith("mem")
                 else MAX_VM_PART if name.startswith("vm/") else MAX_GROUP)
        if length > limit:
            raise _fail(p, f"section {name!r} is {length} bytes, beyond its limit of {limit}")
        sections[name] = (off, length)
    view = memoryview(buf)

    def section(name: str) -> memoryview:
        if name not in sections:
            raise SnapshotError(f"section {name!r} is missing")
        off, length = sections[name]
        return view[off:off + length]

    def section_offset(name: str) -> int:
        return sections[name][0]

    try:
        meta = json.loads(bytes(section("meta")))
        st = _state(meta, section, section_offset, arch)
    except SnapshotError as e:
        raise _fail(p, str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(p, f"meta section does not describe a machine ({type(e).__name__}: {e})") from None
    return FileInfo(str(p), f"{major}.{minor}", arch, size,
                    {n: ln for n, (_, ln) in sections.items()}, st)


def _state(meta: dict[str, Any], section: Any, section_offset: Any, arch: str) -> MachineState:
    vcpu_meta = meta["vcpus"]
    if not isinstance(vcpu_meta, list) or not 1 <= len(vcpu_meta) <= MAX_VCPUS:
        raise SnapshotError(f"vCPU count {len(vcpu_meta)} is beyond the limit (1..{MAX_VCPUS})")
    vcpus = []
    for v in vcpu_meta:
        vid = int(v["id"])
        groups = {str(g): bytes(section(f"vcpu{vid}/{g}")) for g in v["groups"]}
        vcpus.append(VcpuState(vid, bytes(section(f"cpuid{vid}")), groups))
    vm = {str(n): bytes(section(f"vm/{n}")) for n in meta["vm"]}
    memory = []
    total = 0
    for i, s in enumerate(meta["slots"]):
        gpa, size = int(s["gpa"]), int(s["size"])
        total += size
        if size <= 0 or size % PAGE or gpa % PAGE or total > MAX_MEMORY:
            raise SnapshotError(f"memory slot {i} ({size} bytes at {gpa:#x}) is beyond the "
                                f"limits (page aligned, {MAX_MEMORY >> 30} GiB in all)")
        data = section(f"mem{i}")
        base = section_offset(f"mem{i}")
        extents, file_runs = [], []
        for off, length, at in s["runs"]:
            if off < 0 or length < 0 or off + length > size or at < 0 or at + length > len(data):
                raise SnapshotError(f"memory slot {i}: run of {length} bytes at {off:#x} lies "
                                    f"outside the slot or its section")
            extents.append((int(off), data[at:at + length]))
            file_runs.append((int(off), int(length), base + int(at)))
        memory.append(SlotImage(gpa, size, extents, file_runs=file_runs))
    return MachineState(arch, bool(meta["irqchip"]), vcpus, vm, memory,
                        dict(meta.get("devices") or {}), meta.get("guest"),
                        dict(meta.get("info") or {}))
