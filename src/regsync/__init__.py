"""regsync: drive Linux KVM vCPUs from Python with correct and cheap register state.

    from regsync import Machine
    with Machine(smp=1) as m:
        m.load("hypercall", arg=1000)
        v = m.vcpus[0]
        ex = v.run()                 # a typed exit: ex.kind == "io", ex.port == 0x500
        v.regs.rax = v.regs.rdi + v.regs.rsi   # through the cache: no ioctl with SYNC_REGS
"""

__version__ = "0.1.0"

from .cache import RegisterWriteError, WrongThreadError  # noqa: E402
from .kvm import KvmError, KvmUnavailable  # noqa: E402
from .machine import Machine  # noqa: E402
from .vcpu import LEVELS, Vcpu  # noqa: E402

__all__ = ["Machine", "Vcpu", "LEVELS", "KvmError", "KvmUnavailable", "RegisterWriteError",
           "WrongThreadError", "__version__"]
