"""The ways to sync registers, behind one cache interface.

``regsync`` is the real cache (cache.RegisterCache). The others exist only to
be compared against it in tests and benchmarks:

* ``eager``    fetch every group on the first access after an exit; write every
               fetched group back before the next run if anything changed
               (what most small VMMs do).
* ``qemu2012`` QEMU v1.3: one dirty flag, any synchronize gets everything, every
               run after it puts RUNTIME (the seed's lost edit).
* ``qemu2013`` the seed's patch as posted: the dirty flag holds a level; a wider
               synchronize puts, then gets; the run puts at the dirty level.
* ``qemu``     QEMU today: vcpu_dirty after any get; every run after it puts
               RUNTIME, TSC_DEADLINE included.

qemu.py has the algorithms, qemu_plans.py what each put writes, with sources.
"""

from __future__ import annotations

from ..cache import RegisterCache, Transport
from .eager import EagerCache
from .qemu import Qemu2012Cache, Qemu2013Cache, QemuCache

STRATEGIES: dict[str, type[RegisterCache]] = {
    "regsync": RegisterCache,
    "eager": EagerCache,
    "qemu2012": Qemu2012Cache,
    "qemu2013": Qemu2013Cache,
    "qemu": QemuCache,
}


def make_cache(name: str, transport: Transport) -> RegisterCache:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
    return cls(transport)
