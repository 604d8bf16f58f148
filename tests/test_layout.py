"""Every struct regsync declares, checked against <linux/kvm.h> by compiling a C
probe with the installed headers (linux-libc-dev): the size of each struct, and
the offset and size of every field, nested structs, unions and arrays included.

The probe is generated from the ctypes definitions themselves (each ``kvm_*``
struct in regsync.kvm.structs, ``_fields_`` walked recursively), so a field
added, reordered or resized there is checked without anyone listing it. Also:
every ioctl number, capability and constant regsync uses.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from regsync.kvm import ioctls
from regsync.kvm import structs as s

_Aggregate = (ctypes.Structure, ctypes.Union)


def declared_structs() -> dict[str, type]:
    """The C-named structs regsync declares (``kvm_*``); the private helper structs
    (``_events_nmi``, ``_exit_io`` ...) are C's unnamed members and are reached
    through the struct that contains them."""
    return {name: obj for name, obj in vars(s).items()
            if name.startswith("kvm_") and isinstance(obj, type)
            and issubclass(obj, _Aggregate) and obj.__module__ == s.__name__}


def _members(cls: type, prefix: str, base: int) -> Iterator[tuple[str, int, int]]:
    """(C member path, offset, size) for every field under ``cls`` at ``base``.

    Anonymous members (``_anonymous_``, C's anonymous unions) add no path
    component; an array yields itself, its first element, and the members of
    its first and last element when those are structs.
    """
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:
        off = base + getattr(cls, name).offset
        if name in anonymous:
            yield from _members(ftype, prefix, off)
            continue
        path = f"{prefix}{name}"
        yield path, off, ctypes.sizeof(ftype)
        yield from _inside(ftype, path, off)


def _inside(ftype: type, path: str, off: int) -> Iterator[tuple[str, int, int]]:
    if isinstance(ftype, type) and issubclass(ftype, _Aggregate):
        yield from _members(ftype, f"{path}.", off)
    elif hasattr(ftype, "_length_"):                       # a ctypes array
        elem, n = ftype._type_, ftype._length_
        step = ctypes.sizeof(elem)
        for i in sorted({0, n - 1}):
            yield f"{path}[{i}]", off + i * step, step
            yield from _inside(elem, f"{path}[{i}]", off + i * step)


def layout_checks() -> list[tuple[str, str, int]]:
    """(key, C expression, what regsync says) for every size and member."""
    checks: list[tuple[str, str, int]] = []
    for cname, cls in sorted(declared_structs().items()):
        checks.append((f"sizeof {cname}", f"sizeof(struct {cname})", ctypes.sizeof(cls)))
        for path, off, size in _members(cls, "", 0):
            checks.append((f"offsetof {cname}.{path}",
                           f"__builtin_offsetof(struct {cname}, {path})", off))
            checks.append((f"sizeof {cname}.{path}",
                           f"sizeof(((struct {cname} *)0)->{path})", size))
    return checks


def _probe_source() -> tuple[str, list[tuple[str, int]]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    expected: list[tuple[str, int]] = []

    def emit(key: str, c_expr: str, value: int) -> None:
        lines.append(f'printf("{key} %lu\\n", (unsigned long)({c_expr}));')
        expected.append((key, value))

    for key, c_expr, value in layout_checks():
        emit(key, c_expr, value)
    for op in ioctls.TABLE:
        emit(f"ioctl {op.name}", op.macro, op.number)
    for cap, num in ioctls.CAPS.items():
        emit(f"cap {cap}", f"KVM_CAP_{cap}", num)
    for name in dir(s):
        if name.startswith(("KVM_EXIT_", "KVM_SYNC_X86_", "KVM_GUESTDBG_", "KVM_VCPUEVENT_VALID",
                            "KVM_MP_STATE_", "KVM_SYSTEM_EVENT_", "KVM_IRQCHIP_", "KVM_CLOCK_",
                            "KVM_MEM_LOG_", "KVM_DIRTY_LOG_", "KVM_IOAPIC_NUM_PINS")):
            emit(f"const {name}", name, getattr(s, name))
    lines += ["return 0;", "}"]
    return "\n".join(lines), expected


def run_probe(tmp_path: Path) -> list[str]:
    """Compile and run the probe; the mismatches, one line each."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc) on this machine: layout probe not compiled")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("no <linux/kvm.h> (Debian package linux-libc-dev): layout probe not compiled")
    src, expected = _probe_source()
    (tmp_path / "probe.c").write_text(src)
    subprocess.run([cc, "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        got[key] = int(value)
    return [f"{k}: C says {got.get(k)}, regsync says {v}" for k, v in expected if got.get(k) != v]


def test_layout_matches_kernel_headers(tmp_path: Path) -> None:
    mismatches = run_probe(tmp_path)
    assert not mismatches, "\n".join(mismatches)


def test_probe_reaches_every_field() -> None:
    """The walk is as deep as the issue asks: the fields a swap would move are there."""
    keys = {k for k, _, _ in layout_checks()}
    for name in ("rax", "r9", "r10", "rip", "rflags"):
        assert f"offsetof kvm_regs.{name}" in keys
    for path in ("nmi.injected", "nmi.pending", "nmi.masked", "exception.error_code",
                 "smi.latched_init", "triple_fault.pending"):
        assert f"offsetof kvm_vcpu_events.{path}" in keys
    assert "offsetof kvm_run.s.regs.events.nmi.masked" in keys        # through the unions
    assert "offsetof kvm_run.io.port" in keys                          # anonymous union
    assert "offsetof kvm_xcrs.xcrs[15].value" in keys                  # array of structs
    assert "sizeof kvm_fpu.fpr[0]" in keys                              # array of arrays


@pytest.mark.parametrize("struct, a, b", [("kvm_regs", "r9", "r10"),
                                          ("_events_nmi", "pending", "masked")])
def test_probe_catches_a_swapped_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       struct: str, a: str, b: str) -> None:
    """Swap two same-sized fields in a copy of the ctypes struct: the probe fails."""
    orig = getattr(s, struct)
    fields = list(orig._fields_)
    ia = next(i for i, f in enumerate(fields) if f[0] == a)
    ib = next(i for i, f in enumerate(fields) if f[0] == b)
    fields[ia], fields[ib] = fields[ib], fields[ia]
    swapped = type(orig.__name__, orig.__bases__, {"_fields_": fields, "__module__": s.__name__})
    monkeypatch.setattr(s, struct, swapped)
    if struct == "_events_nmi":      # rebuild the struct that holds it, as the module does
        ev = s.kvm_vcpu_events
        ev_fields = [(n, swapped if t is orig else t) for n, t, *_ in ev._fields_]
        monkeypatch.setattr(s, "kvm_vcpu_events", type("kvm_vcpu_events", ev.__bases__,
                                                       {"_fields_": ev_fields,
                                                        "__module__": s.__name__}))
    mismatches = run_probe(tmp_path)
    assert any(f".{a}:" in m for m in mismatches), mismatches
    assert any(f".{b}:" in m for m in mismatches), mismatches
