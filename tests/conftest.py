"""Test tiers: unit (no KVM), kvm (real /dev/kvm), gdb (real gdb). A tier whose
requirement is missing is skipped with the reason printed (pytest -ra).

Hypothesis depth: REGSYNC_HYPOTHESIS=quick (the default, what CI runs) or deep.
The state machine tests (tests/unit/test_cache_model.py, tests/kvm/test_cache_model_kvm.py)
take their budgets from the ``<depth>-sim`` and ``<depth>-kvm`` profiles below,
``settings.get_profile(os.environ["REGSYNC_HYPOTHESIS"] + "-kvm")``; the depth's
own profile is loaded as the default, so every other hypothesis test runs deeper
too under ``deep``.

    REGSYNC_HYPOTHESIS=deep .venv/bin/python -m pytest tests/unit/test_cache_model.py \
        tests/kvm/test_cache_model_kvm.py -q
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_GDB = shutil.which("gdb") is not None

DEPTHS = ("quick", "deep")
DEPTH = os.environ.setdefault("REGSYNC_HYPOTHESIS", "quick")
if DEPTH not in DEPTHS:
    raise pytest.UsageError(f"REGSYNC_HYPOTHESIS={DEPTH!r}: use one of {', '.join(DEPTHS)}")
_SLOW_OK = dict(deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("quick")                      # hypothesis' own defaults
settings.register_profile("deep", max_examples=2_000, **_SLOW_OK)
# The state machines: interleavings (examples) x steps per interleaving.
settings.register_profile("quick-sim", max_examples=200, stateful_step_count=40, **_SLOW_OK)
settings.register_profile("deep-sim", max_examples=10_000, stateful_step_count=60, **_SLOW_OK)
settings.register_profile("quick-kvm", max_examples=25, stateful_step_count=25, **_SLOW_OK)
settings.register_profile("deep-kvm", max_examples=500, stateful_step_count=40, **_SLOW_OK)
settings.load_profile(DEPTH)


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
