"""Every struct size, field offset and ioctl number regsync uses, checked against
<linux/kvm.h> by compiling a C probe with the installed headers (linux-libc-dev)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from regsync.kvm import ioctls
from regsync.kvm import structs as s




def _field_type(cls: type, name: str) -> type:
    for n, ty, *_ in cls._fields_:
        if n == name:
            return ty
    for anon in getattr(cls, "_anonymous_", ()):
        sub = _field_type(cls, anon)
        try:
            return _field_type(sub, name)
        except KeyError:
            pass
    raise KeyError(name)


def py_offset(cls: type, path: str) -> int:
    """Offset of a dotted field path inside a ctypes struct (anonymous unions followed)."""
    off, t = 0, cls
    for part in path.split("."):
        off += getattr(t, part).offset
        t = _field_type(t, part)
    return off


def _probe_source() -> tuple[str, list[tuple[str, int]]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    expected: list[tuple[str, int]] = []
    for cname, (cls, fields) in s.LAYOUT_CHECKED.items():
        key = f"sizeof {cname}"
        lines.append(f'printf("{key} %zu\\n", sizeof(struct {cname}));')
        expected.append((key, ctypes.sizeof(cls)))
        for f in fields:
            key = f"offsetof {cname}.{f}"
            lines.append(f'printf("{key} %zu\\n", offsetof(struct {cname}, {f}));')
            expected.append((key, py_offset(cls, f)))
    for path in s.LAYOUT_RUN_PAYLOAD:
        key = f"offsetof kvm_run.{path}"
        lines.append(f'printf("{key} %zu\\n", offsetof(struct kvm_run, {path}));')
        expected.append((key, py_offset(s.kvm_run, path)))
    for op in ioctls.TABLE:
        key = f"ioctl {op.name}"
        lines.append(f'printf("{key} %lu\\n", (unsigned long){op.macro});')
        expected.append((key, op.number))
    for cap, num in ioctls.CAPS.items():
        key = f"cap {cap}"
        lines.append(f'printf("{key} %d\\n", KVM_CAP_{cap});')
        expected.append((key, num))
    for name in dir(s):
        if name.startswith(("KVM_EXIT_", "KVM_SYNC_X86_", "KVM_GUESTDBG_", "KVM_VCPUEVENT_VALID",
                            "KVM_MP_STATE_", "KVM_SYSTEM_EVENT_")):
            key = f"const {name}"
            lines.append(f'printf("{key} %lu\\n", (unsigned long){name});')
            expected.append((key, getattr(s, name)))
    lines += ["return 0;", "}"]
    return "\n".join(lines), expected


def test_layout_matches_kernel_headers(tmp_path: Path) -> None:
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
    mismatches = [f"{k}: C says {got.get(k)}, regsync says {v}" for k, v in expected if got.get(k) != v]
    assert not mismatches, "\n".join(mismatches)
    # The probe really covered every struct the issue lists.
    assert len(expected) > 150
