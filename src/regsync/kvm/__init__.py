"""The KVM kernel interface and nothing else: structs, the ioctl table, handles."""

from .handles import System, Vcpu, Vm
from .syscall import Counters, KvmError, KvmUnavailable, MsrError

__all__ = ["System", "Vm", "Vcpu", "Counters", "KvmError", "KvmUnavailable", "MsrError"]
