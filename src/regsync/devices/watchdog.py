"""A watchdog modelled on the PPC BookE one of the seed discussion.

The guest arms it with a timeout and pets it by hypercall. If a timeout passes
without a pet, ``on_expire(vcpu_id)`` runs on the watchdog's own thread; the
VMM then records the vCPU's state through the cache (on the vCPU's thread, via
run_on_cpu) and resets or stops the guest. The watchdog never touches
registers itself, so petting and expiry cannot lose a register change.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from . import VcpuPort
from .basic import HC_WATCHDOG_ARM, HC_WATCHDOG_DISARM, HC_WATCHDOG_PET, Hypercalls


class Watchdog:
    name = "watchdog"

    def __init__(self, on_expire: Callable[[int], None]) -> None:
        self.on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._timeout = 0.0
        self._owner = 0
        self._closed = False
        self.pets = 0
        self.expiries = 0
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def attach(self, hypercalls: Hypercalls) -> None:
        hypercalls.handlers[HC_WATCHDOG_ARM] = self._hc_arm
        hypercalls.handlers[HC_WATCHDOG_PET] = self._hc_pet
        hypercalls.handlers[HC_WATCHDOG_DISARM] = self._hc_disarm

    # hypercall handlers (run on the calling vCPU's thread) -----------------------
    def _hc_arm(self, vcpu: VcpuPort) -> int:
        ms = vcpu.regs.rdi  # type: ignore[attr-defined]
        if not 1 <= ms <= 3_600_000:
            return (1 << 64) - 1
        self.arm(ms / 1000.0, vcpu.id)
        return 0

    def _hc_pet(self, vcpu: VcpuPort) -> int:
        return 0 if self.pet() else (1 << 64) - 1

    def _hc_disarm(self, vcpu: VcpuPort) -> int:
        self.disarm()
        return 0

    # API ---------------------------------------------------------------------------
    def arm(self, timeout: float, vcpu_id: int = 0) -> None:
        with self._cond:
            self._timeout, self._owner = timeout, vcpu_id
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    def pet(self) -> bool:
        with self._cond:
            if self._deadline is None:
                return False
            self.pets += 1
            self._deadline = time.monotonic() + self._timeout
            return True

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def save_state(self) -> dict[str, float | int | None]:
        """For a snapshot: the timeout, the time left (None when disarmed), the owner."""
        with self._cond:
            left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            return {"timeout": self._timeout, "left": left, "owner": self._owner}

    def load_state(self, state: dict[str, float | int | None]) -> None:
        """From a snapshot: armed with the time that was left then, or disarmed."""
        with self._cond:
            self._timeout = float(state.get("timeout") or 0.0)
            self._owner = int(state.get("owner") or 0)
            left = state.get("left")
            self._deadline = None if left is None else time.monotonic() + float(left)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None          # one expiry per arming
                self.expiries += 1
                owner = self._owner
                self._cond.release()
                try:
                    self.on_expire(owner)
                finally:
                    self._cond.acquire()
