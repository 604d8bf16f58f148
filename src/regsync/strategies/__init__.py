"""The ways to sync registers, behind one cache interface.

``regsync`` is the real cache (cache.RegisterCache). The others exist only to
be compared against it in tests and benchmarks:

* ``eager``    fetch every group on the first access after an exit; write every
               fetched group back before the next run if anything changed
               (what most small VMMs do).
* ``qemu2012`` QEMU's levels with one dirty flag, as before the seed's patch.
* ``qemu``     QEMU today: any synchronize fetches FULL and marks the vCPU
               dirty; the RUNTIME groups are written back before every run.
"""

from __future__ import annotations

from ..cache import RegisterCache, Transport
from .eager import EagerCache
from .qemu import Qemu2012Cache, QemuCache

STRATEGIES: dict[str, type[RegisterCache]] = {
    "regsync": RegisterCache,
    "eager": EagerCache,
    "qemu2012": Qemu2012Cache,
    "qemu": QemuCache,
}


def make_cache(name: str, transport: Transport) -> RegisterCache:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
    return cls(transport)
