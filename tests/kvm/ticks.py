"""Shared by the kvm tier: drive the counter guest from one exit to the next tick."""

from __future__ import annotations

from typing import Any

from regsync import Machine
from regsync.devices.basic import TICK_PORT


def run_to_tick(m: Machine, v: Any) -> None:
    """Run v until the guest's next tick exit (OUT to the tick port), serving the rest."""
    while True:
        ex = v.run()
        assert ex.kind == "io", ex
        if ex.port == TICK_PORT:
            return
        m.dispatch(v, ex)
