"""The start-up probe: what guest debugging can do on this host.

KVM's capabilities do not say whether int3 is intercepted with
KVM_GUESTDBG_USE_SW_BP, nor whether data breakpoints fire (nested and
paravirtual hosts differ from upstream); three throwaway VMs find out, once
per process. Without interception an int3 in guest memory would kill a CPL0
guest, so the adapter then serves software breakpoints from hardware slots.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

from ..exits import DebugExit
from ..kvm import KvmError
from ..kvm import structs as ks

__all__ = ["DebugCaps", "probe_debug_caps", "DR7_FIXED", "LEN_BITS", "RW_EXEC", "RW_WRITE",
           "RW_ACCESS", "ZERO_DRS"]

DR7_FIXED = 0x400         # bit 10 reads as 1
KVM_CAP_SET_GUEST_DEBUG2 = 195
LEN_BITS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}      # DR7 LENn encodings by byte length
RW_EXEC, RW_WRITE, RW_ACCESS = 0b00, 0b01, 0b11       # DR7 R/Wn encodings
ZERO_DRS = (0,) * 8
_LEN_BITS, _RW_WRITE, _ZERO_DRS = LEN_BITS, RW_WRITE, ZERO_DRS


@dataclass(frozen=True)
class DebugCaps:
    """What guest debugging can do on this host (from :func:`probe_debug_caps`)."""

    sw_breakpoints: bool
    sw_detail: str
    hw_breakpoints: bool
    hw_detail: str
    watchpoints: bool
    watch_detail: str
    blockirq: bool = False


_WATCH_GPA = 0x200000
_PROBE_EXIT = b"\xb0\x00\xe6\xf4\xf4"               # mov al,0; out 0xf4,al; hlt
_PROBES: dict[str, tuple[bytes, int, tuple[int, ...], int]] = {
    # name: (code at 0x100000, control, debugreg, KVM_EXIT_DEBUG exception expected)
    "sw": (b"\xcc" + _PROBE_EXIT, ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_SW_BP,
           _ZERO_DRS, 3),
    "hw": (b"\x90" + _PROBE_EXIT, ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP,
           (0x100001, 0, 0, 0, 0, 0, 0, DR7_FIXED | 0b10), 1),
    # mov dword [0x200000], 1 with DR0 a 4-byte write watch on it
    "watch": (b"\xc7\x04\x25" + _WATCH_GPA.to_bytes(4, "little") + b"\x01\x00\x00\x00"
              + _PROBE_EXIT, ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP,
              (_WATCH_GPA, 0, 0, 0, 0, 0, 0,
               DR7_FIXED | 0b10 | (_RW_WRITE << 16) | (_LEN_BITS[4] << 18)), 1),
}
_probe_lock = threading.Lock()
_probed: DebugCaps | None = None


def _probe_one(name: str) -> tuple[bool, str]:
    from ..machine import Machine
    code, control, drs, want = _PROBES[name]
    fd, path = tempfile.mkstemp(prefix=f"regsync-probe-{name}-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(code)
        with Machine(smp=1, mem_mb=4, irqchip=False) as m:
            m.load(path, mode="long")
            v = m.vcpus[0]
            v.set_guest_debug(control, list(drs))
            for _ in range(8):
                ex = v.run()
                if ex.kind == "interrupted":
                    continue
                if isinstance(ex, DebugExit) and ex.exception == want:
                    return True, f"KVM_EXIT_DEBUG exception {want} at {ex.pc:#x}"
                if ex.kind == "io":
                    return False, "the guest ran past it (no exit)"
                detail = getattr(ex, "description", "")
                return False, f"probe got {ex.kind}{' (' + detail + ')' if detail else ''}"
            return False, "no exit"
    except (KvmError, OSError, ValueError) as e:
        return False, f"probe failed: {e}"
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def probe_debug_caps(force: bool = False) -> DebugCaps:
    """Find out once per process, in throwaway VMs, whether int3 interception
    (KVM_GUESTDBG_USE_SW_BP), hardware breakpoints and data watchpoints work."""
    global _probed
    with _probe_lock:
        if _probed is not None and not force:
            return _probed
        sw, sw_d = _probe_one("sw")
        hw, hw_d = _probe_one("hw")
        watch, watch_d = _probe_one("watch") if hw else (False, "no hardware breakpoints")
        blockirq = False
        try:
            from ..kvm import System
            with System() as kvm:
                blockirq = bool(kvm.check_extension(KVM_CAP_SET_GUEST_DEBUG2)
                                & ks.KVM_GUESTDBG_BLOCKIRQ)
        except Exception:  # noqa: BLE001 - an optional refinement
            pass
        _probed = DebugCaps(sw, sw_d, hw, hw_d, watch, watch_d, blockirq)
        return _probed
