"""Conformance kernels: tiny multiboot ELF32 kernels, each testing one QEMU convention.
Built from source by :mod:`.build` (no build outputs are shipped)."""
