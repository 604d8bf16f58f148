"""x86_64: the register catalog, its KVM transport, boot state, register file class."""

from ...regfile import make_register_file
from .catalog import CATALOG, MSR_ALIASES, MSR_BY_INDEX
from .transport import FLUSH_ORDER, LAPIC_EDITS, KvmTransport, accessors, write_refusals

Registers = make_register_file(CATALOG, {r: accessors(r) for r in CATALOG.registers},
                               MSR_ALIASES, MSR_BY_INDEX, write_refusals(CATALOG))

__all__ = ["CATALOG", "FLUSH_ORDER", "LAPIC_EDITS", "KvmTransport", "Registers", "MSR_ALIASES"]
