"""``-cpu host,-x2apic,+feature`` as QEMU reads it, applied to KVM's supported CPUID.

QEMU's ``host`` model is what KVM_GET_SUPPORTED_CPUID reports; ``-name`` or
``name=off`` clears a feature bit, ``+name`` or ``name=on`` sets it if KVM
supports it (otherwise QEMU warns "host doesn't support requested feature" and
leaves it clear: target/i386/cpu.c x86_cpu_filter_features). Feature names and
their (leaf, subleaf, register, bit) are QEMU's, from target/i386/cpu.c
feature_word_info (names with '_' or '.' are accepted as '-', as QEMU does).
"""

from __future__ import annotations

from typing import Any, Callable

# leaf, subleaf, register: names by bit, from QEMU's feature_word_info.
_WORDS: dict[tuple[int, int, str], dict[int, str]] = {
    (1, 0, "edx"): {0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
                    8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov",
                    16: "pat", 17: "pse36", 19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse",
                    26: "sse2", 27: "ss", 28: "ht"},
    (1, 0, "ecx"): {0: "pni", 1: "pclmulqdq", 3: "monitor", 5: "vmx", 9: "ssse3", 12: "fma",
                    13: "cx16", 15: "pdcm", 17: "pcid", 19: "sse4-1", 20: "sse4-2", 21: "x2apic",
                    22: "movbe", 23: "popcnt", 24: "tsc-deadline", 25: "aes", 26: "xsave",
                    28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor"},
    (7, 0, "ebx"): {0: "fsgsbase", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep", 8: "bmi2", 9: "erms",
                    10: "invpcid", 11: "rtm", 16: "avx512f", 18: "rdseed", 19: "adx", 20: "smap",
                    23: "clflushopt", 24: "clwb", 29: "sha-ni"},
    (7, 0, "ecx"): {1: "avx512vbmi", 2: "umip", 3: "pku", 16: "la57", 22: "rdpid"},
    (7, 0, "edx"): {26: "spec-ctrl", 29: "arch-capabilities"},
    (0xD, 1, "eax"): {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    (0x80000001, 0, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
    (0x80000001, 0, "ecx"): {0: "lahf-lm", 2: "svm", 5: "abm", 6: "sse4a"},
}
_ALIASES = {"sse3": "pni", "sse4.1": "sse4-1", "sse4.2": "sse4-2", "sse4_1": "sse4-1",
            "sse4_2": "sse4-2", "i64": "lm", "xd": "nx", "lahf_lm": "lahf-lm"}
FEATURES: dict[str, tuple[int, int, str, int]] = {
    name: (leaf, sub, reg, bit) for (leaf, sub, reg), bits in _WORDS.items() for bit, name in bits.items()}
MODELS = ("host", "max")


class CpuSpecError(ValueError):
    """A -cpu value regsync cannot honour (unknown model or feature)."""


def parse(spec: str) -> tuple[str, dict[str, bool]]:
    """"host,-x2apic,+vmx,avx=off" -> ("host", {"x2apic": False, "vmx": True, "avx": False})."""
    model, *items = spec.split(",")
    if model not in MODELS:
        raise CpuSpecError(f"-cpu {model}: regsync offers KVM's own CPUID: {' or '.join(MODELS)}")
    wanted: dict[str, bool] = {}
    for item in items:
        if item[:1] in "+-" and item[1:]:
            name, on = item[1:], item[0] == "+"
        elif "=" in item:
            name, value = item.split("=", 1)
            if value not in ("on", "off", "true", "false"):
                raise CpuSpecError(f"-cpu ...,{item}: a feature is on or off")
            on = value in ("on", "true")
        else:
            raise CpuSpecError(f"-cpu ...,{item}: expected +feature, -feature or feature=on|off")
        key = _ALIASES.get(name, name.replace("_", "-"))
        if key not in FEATURES:
            raise CpuSpecError(f"-cpu: unknown CPU feature {name!r}")
        wanted[key] = on
    return model, wanted


def apply(cpuid: Any, spec: str, warn: Callable[[str], None] | None = None) -> Any:
    """A copy of a kvm_cpuid2 buffer with the features of spec set or cleared."""
    _, wanted = parse(spec)
    out = type(cpuid).from_buffer_copy(cpuid)
    entries = {(e.function, e.index): e for e in out.entries[:out.nent]}
    for name, on in wanted.items():
        leaf, sub, reg, bit = FEATURES[name]
        e = entries.get((leaf, sub))
        if on and (e is None or not getattr(e, reg) >> bit & 1):
            if warn is not None:
                warn(f"host doesn't support requested feature: {name}")
            continue
        if e is not None and not on:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    return out
