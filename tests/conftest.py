"""Test tiers: unit (no KVM), kvm (real /dev/kvm), gdb (real gdb). A tier whose
requirement is missing is skipped with the reason printed (pytest -ra)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_GDB = shutil.which("gdb") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if "kvm" in path.parts or "gdb" in path.parts:
            item.add_marker(pytest.mark.kvm)
        if "gdb" in path.parts:
            item.add_marker(pytest.mark.gdb)
        if item.get_closest_marker("kvm") and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="/dev/kvm is missing or not accessible"))
        if item.get_closest_marker("gdb") and not HAVE_GDB:
            item.add_marker(pytest.mark.skip(reason="gdb is not installed (Debian package gdb)"))
