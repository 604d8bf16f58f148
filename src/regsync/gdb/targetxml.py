"""Register layouts as data, the ``target.xml`` they produce, and value conversion.

A :class:`RegisterLayout` is the single source of truth for what gdb sees:
register order (which *is* the remote protocol numbering, since every
``<reg>`` carries an explicit dense ``regnum``), widths, types, and which
entry of the VMM's register catalog backs each register (``source``).

Mapping rule from gdb registers to catalog names (used by the VM adapter):

* ``source`` names a catalog register; ``bitsize`` is gdb's width.  When gdb's
  width is smaller than the catalog value (``eax`` over ``rax``, ``eflags``
  over ``rflags``, ``fioff`` over ``fip``) gdb sees the low ``bitsize`` bits;
  a write replaces those bits and keeps the upper ones.
* ``view="zero"`` registers (``fiseg``/``foseg``) have no backing: the 64-bit
  FXSAVE format has no selector fields, so they read as 0.
* ``view="ftag"`` (``ftag``) converts the abridged FXSAVE tag byte held in
  the catalog ("ftw") to the full 16-bit x87 tag word gdb expects, using
  "fsw" (for TOP) and "st0".."st7".
* ``view="slice"`` shows ``bitsize`` bits of a wider catalog register from bit
  ``shift`` (``xmm16``/``ymm16h``/``zmm16h`` are slices of catalog ``zmm16``);
  a write replaces those bits only.

Vector registers follow gdb's features (gdb/features/i386/64bit-avx.xml,
64bit-avx512.xml): the target describes the upper halves (``ymm0h``,
``zmm0h``...) and gdb builds ``$ymm0``/``$zmm0`` from them as pseudo registers.
:func:`x86_64_layout` adds them where the vCPU's XSAVE holds the components.

All conversions live in :func:`register_value`, :func:`register_bytes` and
:func:`register_updates` so the adapter needs no x86 knowledge of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from xml.sax.saxutils import quoteattr

__all__ = [
    "CatalogGetter",
    "Feature",
    "GdbRegister",
    "I386_LAYOUT",
    "I8086_LAYOUT",
    "RegisterLayout",
    "X86_64_LAYOUT",
    "abridged_tag_word",
    "x86_64_layout",
    "full_tag_word",
    "register_bytes",
    "register_updates",
    "register_value",
    "value_from_bytes",
    "value_to_bytes",
    "x87_tag",
]

#: Reads one catalog register by name (e.g. through the register cache).
CatalogGetter = Callable[[str], int]


@dataclass(frozen=True)
class GdbRegister:
    """One register as gdb sees it.

    ``regnum`` is the remote protocol number (dense, equal to the position in
    the layout); ``source`` is the catalog name backing it; ``view`` selects a
    non-trivial conversion (``None``, ``"zero"`` or ``"ftag"``).
    """

    name: str
    bitsize: int
    type: str
    feature: str
    regnum: int
    source: str
    group: str | None = None
    view: str | None = None
    shift: int = 0

    @property
    def nbytes(self) -> int:
        """Width on the wire in bytes."""
        return self.bitsize // 8


@dataclass(frozen=True)
class Feature:
    """A target description feature: its name and type definitions (XML)."""

    name: str
    types: str = ""


@dataclass(frozen=True)
class RegisterLayout:
    """An architecture name plus an ordered register list and its features.

    ``pc``/``sp``/``fp`` name the registers the stop reply expedites, so gdb
    can show where a thread stopped without a ``g`` round trip.  ``osabi``,
    if set (e.g. "none" for a bare-metal guest), is sent as ``<osabi>``;
    unset, gdb uses its default (GNU/Linux on Debian) or the ELF's.
    """

    arch: str
    registers: tuple[GdbRegister, ...]
    features: tuple[Feature, ...]
    pc: str
    sp: str
    fp: str
    osabi: str | None = None

    def __post_init__(self) -> None:
        # Fail at import time rather than confuse gdb at run time.
        names = [r.name for r in self.registers]
        if len(set(names)) != len(names):
            raise ValueError("duplicate register name")
        known = {f.name for f in self.features}
        for i, reg in enumerate(self.registers):
            if reg.regnum != i:
                raise ValueError(f"{reg.name}: regnum {reg.regnum} != {i}")
            if reg.bitsize <= 0 or reg.bitsize % 8:
                raise ValueError(f"{reg.name}: bitsize {reg.bitsize}")
            if reg.feature not in known:
                raise ValueError(f"{reg.name}: unknown feature {reg.feature}")
        # gdb validates known features by their registers; an empty one
        # would make it reject the whole description.
        for feat in self.features:
            if not any(r.feature == feat.name for r in self.registers):
                raise ValueError(f"feature {feat.name} has no registers")
        for name in (self.pc, self.sp, self.fp):
            self.by_name(name)

    def by_name(self, name: str) -> GdbRegister:
        """Look a register up by its gdb name (KeyError if absent)."""
        for reg in self.registers:
            if reg.name == name:
                return reg
        raise KeyError(name)

    @property
    def pc_register(self) -> GdbRegister:
        """The program counter (``rip``/``eip``)."""
        return self.by_name(self.pc)

    @property
    def expedite_registers(self) -> tuple[GdbRegister, ...]:
        """Registers sent along with every stop reply (fp, sp, pc)."""
        return tuple(self.by_name(n) for n in (self.fp, self.sp, self.pc))

    @property
    def g_size(self) -> int:
        """Size in bytes of the ``g`` packet's register block."""
        return sum(r.nbytes for r in self.registers)

    def xml(self, annex: str = "target.xml") -> bytes | None:
        """The document for a ``qXfer:features:read`` annex, or None.

        Everything is inlined into ``target.xml`` so gdb needs one transfer
        and no ``xi:include`` resolution.
        """
        if annex != "target.xml":
            return None
        out = [
            '<?xml version="1.0"?>',
            '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
            "<target>",
            f"  <architecture>{self.arch}</architecture>",
        ]
        if self.osabi:
            out.append(f"  <osabi>{self.osabi}</osabi>")
        for feat in self.features:
            out.append(f"  <feature name={quoteattr(feat.name)}>")
            if feat.types:
                out.append(feat.types.rstrip("\n"))
            for reg in self.registers:
                if reg.feature != feat.name:
                    continue
                attrs = (
                    f"name={quoteattr(reg.name)} bitsize=\"{reg.bitsize}\""
                    f" type={quoteattr(reg.type)} regnum=\"{reg.regnum}\""
                )
                if reg.group:
                    attrs += f" group={quoteattr(reg.group)}"
                out.append(f"    <reg {attrs}/>")
            out.append("  </feature>")
        out.append("</target>")
        return ("\n".join(out) + "\n").encode("utf-8")


# --- value conversion ----------------------------------------------------

# Catalog registers narrower than gdb's view of them; writes that do not fit
# are refused instead of being silently truncated.
_CATALOG_BITS: Mapping[str, int] = {
    **{f"{s}.selector": 16 for s in ("cs", "ss", "ds", "es", "fs", "gs")},
    "fcw": 16,
    "fsw": 16,
    "fop": 16,
    "ftw": 8,
    "mxcsr": 32,
}

TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = 0, 1, 2, 3


def x87_tag(value: int) -> int:
    """Classify a non-empty 80-bit x87 value as valid, zero or special."""
    exponent = (value >> 64) & 0x7FFF
    integer_bit = (value >> 63) & 1
    fraction = value & ((1 << 63) - 1)
    if exponent == 0x7FFF:
        return TAG_SPECIAL  # infinity / NaN
    if exponent == 0:
        if fraction == 0 and not integer_bit:
            return TAG_ZERO
        return TAG_SPECIAL  # denormal / pseudo-denormal
    return TAG_VALID if integer_bit else TAG_SPECIAL  # unnormal is special


def full_tag_word(abridged: int, st_values: Sequence[int], top: int) -> int:
    """Rebuild the 16-bit x87 tag word from FXSAVE's abridged tag byte.

    FXSAVE keeps one "non-empty" bit per *physical* register R0..R7, while the
    values are stored in *stack* order ST(0)..ST(7) (catalog "st0".."st7").
    Physical register p holds ST((p - top) mod 8); ``top`` is FSW bits 11-13.
    """
    word = 0
    for phys in range(8):
        if abridged >> phys & 1:
            tag = x87_tag(st_values[(phys - top) & 7])
        else:
            tag = TAG_EMPTY
        word |= tag << (2 * phys)
    return word


def abridged_tag_word(full: int) -> int:
    """FXSAVE's abridged tag byte: bit p set iff physical register p is not empty."""
    return sum(1 << p for p in range(8) if (full >> (2 * p)) & 3 != TAG_EMPTY)


def value_to_bytes(reg: GdbRegister, value: int) -> bytes:
    """Little-endian wire bytes of ``value`` truncated to ``reg.bitsize``."""
    return (value & ((1 << reg.bitsize) - 1)).to_bytes(reg.nbytes, "little")


def value_from_bytes(reg: GdbRegister, data: bytes) -> int:
    """Inverse of :func:`value_to_bytes`; ValueError on a width mismatch."""
    if len(data) != reg.nbytes:
        raise ValueError(f"{reg.name} takes {reg.nbytes} bytes, got {len(data)}")
    return int.from_bytes(data, "little")


def register_value(reg: GdbRegister, get: CatalogGetter) -> int:
    """gdb's value of ``reg`` (already truncated to its bitsize)."""
    if reg.view == "zero":
        return 0
    if reg.view == "ftag":
        sts = [get(f"st{i}") for i in range(8)]
        return full_tag_word(get(reg.source), sts, (get("fsw") >> 11) & 7)
    return (get(reg.source) >> reg.shift) & ((1 << reg.bitsize) - 1)


def register_bytes(reg: GdbRegister, get: CatalogGetter) -> bytes:
    """gdb's wire bytes for ``reg`` read through ``get``."""
    return value_to_bytes(reg, register_value(reg, get))


def register_updates(
    reg: GdbRegister, data: bytes, get: CatalogGetter
) -> dict[str, int]:
    """Catalog writes implementing gdb writing ``data`` to ``reg``.

    Returns ``{catalog_name: new_value}`` (empty when there is nothing to
    store).  Raises ValueError when the value cannot be represented; the stub
    core answers that with ``E16``.
    """
    value = value_from_bytes(reg, data)
    if reg.view == "zero":
        if value:
            raise ValueError(f"{reg.name} is not representable (always 0)")
        return {}
    if reg.view == "ftag":
        return {reg.source: abridged_tag_word(value)}
    if reg.view == "slice":
        mask = ((1 << reg.bitsize) - 1) << reg.shift
        return {reg.source: (get(reg.source) & ~mask) | (value << reg.shift)}
    limit = _CATALOG_BITS.get(reg.source)
    if limit is not None:
        if value >> limit:
            raise ValueError(f"{reg.name}: {value:#x} exceeds {limit} bits")
        return {reg.source: value}
    if reg.bitsize < 64 and reg.type != "i387_ext":
        # A narrow view of a 64-bit register: keep the bits gdb cannot see.
        mask = (1 << reg.bitsize) - 1
        value |= get(reg.source) & ~mask
    return {reg.source: value}


# --- x86 types -----------------------------------------------------------


def _flags(ident: str, size: int, fields: str) -> str:
    """A ``<flags>`` type: ``fields`` is "NAME:bit ..." (one-bit fields)."""
    lines = [f'    <flags id="{ident}" size="{size}">']
    for item in fields.split():
        name, bit = item.split(":")
        lines.append(f'      <field name="{name}" start="{bit}" end="{bit}"/>')
    lines.append("    </flags>")
    return "\n".join(lines)


_EFLAGS = _flags(
    "i386_eflags",
    4,
    "CF:0 PF:2 AF:4 ZF:6 SF:7 TF:8 IF:9 DF:10 OF:11 NT:14 RF:16 VM:17 AC:18"
    " VIF:19 VIP:20 ID:21",
)
_MXCSR = _flags(
    "i386_mxcsr",
    4,
    "IE:0 DE:1 ZE:2 OE:3 UE:4 PE:5 DAZ:6 IM:7 DM:8 ZM:9 OM:10 UM:11 PM:12 FZ:15",
)
# The union lets gdb print xmm registers as floats or integer lanes; the
# element types are gdb built-ins.
_VEC128 = "\n".join(
    [
        f'    <vector id="{vid}" type="{etype}" count="{n}"/>'
        for vid, etype, n in (
            ("v4f", "ieee_single", 4),
            ("v2d", "ieee_double", 2),
            ("v16i8", "int8", 16),
            ("v8i16", "int16", 8),
            ("v4i32", "int32", 4),
            ("v2i64", "int64", 2),
        )
    ]
    + ['    <union id="vec128">']
    + [
        f'      <field name="{fname}" type="{ftype}"/>'
        for fname, ftype in (
            ("v4_float", "v4f"),
            ("v2_double", "v2d"),
            ("v16_int8", "v16i8"),
            ("v8_int16", "v8i16"),
            ("v4_int32", "v4i32"),
            ("v2_int64", "v2i64"),
            ("uint128", "uint128"),
        )
    ]
    + ["    </union>"]
)
_SYS_TYPES = "\n".join(
    [
        _flags("x86_cr0", 8, "PE:0 MP:1 EM:2 TS:3 ET:4 NE:5 WP:16 AM:18 NW:29 CD:30 PG:31"),
        _flags(
            "x86_cr4",
            8,
            "VME:0 PVI:1 TSD:2 DE:3 PSE:4 PAE:5 MCE:6 PGE:7 PCE:8 OSFXSR:9"
            " OSXMMEXCPT:10 UMIP:11 LA57:12 VMXE:13 SMXE:14 FSGSBASE:16 PCIDE:17"
            " OSXSAVE:18 SMEP:20 SMAP:21 PKE:22",
        ),
        _flags("x86_efer", 8, "SCE:0 LME:8 LMA:10 NXE:11 SVME:12 LMSLE:13 FFXSR:14 TCE:15"),
    ]
)

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
AVX = "org.gnu.gdb.i386.avx"
AVX512 = "org.gnu.gdb.i386.avx512"
SEGMENTS = "org.gnu.gdb.i386.segments"
#: Our own feature: gdb does not interpret it but shows its registers in
#: ``info registers system`` and allows ``p $cr3``.
SYS = "org.regsync.x86.sys"

_FEATURES = (
    Feature(CORE, _EFLAGS),
    Feature(SSE, _VEC128 + "\n" + _MXCSR),
    Feature(SEGMENTS),
    Feature(AVX),
    # Types are looked up per feature: xmm16-31 need vec128 here too.
    Feature(AVX512, _VEC128 + '\n    <vector id="v2ui128" type="uint128" count="2"/>'),
    Feature(SYS, _SYS_TYPES),
)

# (name, bitsize, type, feature, source[, group[, view]])
_Spec = tuple[Any, ...]


def _layout(arch: str, specs: Sequence[_Spec], pc: str, sp: str, fp: str) -> RegisterLayout:
    regs = tuple(
        GdbRegister(s[0], s[1], s[2], s[3], i, s[4], *s[5:])
        for i, s in enumerate(specs)
    )
    used = {r.feature for r in regs}
    return RegisterLayout(arch, regs, tuple(f for f in _FEATURES if f.name in used), pc, sp, fp)


def _x87() -> list[_Spec]:
    sts = [(f"st{i}", 80, "i387_ext", CORE, f"st{i}") for i in range(8)]
    ctl = [
        ("fctrl", 32, "int", CORE, "fcw", "float"),
        ("fstat", 32, "int", CORE, "fsw", "float"),
        ("ftag", 32, "int", CORE, "ftw", "float", "ftag"),
        ("fiseg", 32, "int", CORE, "", "float", "zero"),
        ("fioff", 32, "int", CORE, "fip", "float"),
        ("foseg", 32, "int", CORE, "", "float", "zero"),
        ("fooff", 32, "int", CORE, "fdp", "float"),
        ("fop", 32, "int", CORE, "fop", "float"),
    ]
    return sts + ctl


_SEGS = [(s, 32, "int32", CORE, f"{s}.selector") for s in ("cs", "ss", "ds", "es", "fs", "gs")]


def _sse(count: int) -> list[_Spec]:
    xmms = [(f"xmm{i}", 128, "vec128", SSE, f"xmm{i}") for i in range(count)]
    return xmms + [("mxcsr", 32, "i386_mxcsr", SSE, "mxcsr", "vector")]


def _sys(with_kgs: bool) -> list[_Spec]:
    kgs = [("k_gs_base", 64, "uint64", SYS, "kernel_gs_base", "system")] if with_kgs else []
    crs = [
        ("cr0", 64, "x86_cr0", SYS, "cr0", "system"),
        ("cr2", 64, "uint64", SYS, "cr2", "system"),
        ("cr3", 64, "uint64", SYS, "cr3", "system"),
        ("cr4", 64, "x86_cr4", SYS, "cr4", "system"),
        ("cr8", 64, "uint64", SYS, "cr8", "system"),
        ("efer", 64, "x86_efer", SYS, "efer", "system"),
    ]
    return kgs + crs


_GPR64 = "rax rbx rcx rdx rsi rdi rbp rsp".split() + [f"r{i}" for i in range(8, 16)]

def _avx() -> list[_Spec]:
    return [(f"ymm{i}h", 128, "uint128", AVX, f"ymm{i}h") for i in range(16)]


def _avx512() -> list[_Spec]:
    hi16 = range(16, 32)
    return ([(f"xmm{i}", 128, "vec128", AVX512, f"zmm{i}", None, "slice", 0) for i in hi16]
            + [(f"ymm{i}h", 128, "uint128", AVX512, f"zmm{i}", None, "slice", 128)
               for i in hi16]
            + [(f"k{i}", 64, "uint64", AVX512, f"k{i}") for i in range(8)]
            + [(f"zmm{i}h", 256, "v2ui128", AVX512, f"zmm{i}h") for i in range(16)]
            + [(f"zmm{i}h", 256, "v2ui128", AVX512, f"zmm{i}", None, "slice", 256)
               for i in hi16])


def _x86_64_specs(avx: bool, avx512: bool) -> list[_Spec]:
    return ([(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", CORE, n) for n in _GPR64]
            + [("rip", 64, "code_ptr", CORE, "rip"),
               ("eflags", 32, "i386_eflags", CORE, "rflags")]
            + _SEGS
            + _x87()
            + _sse(16)
            + [("fs_base", 64, "int", SEGMENTS, "fs.base"),
               ("gs_base", 64, "int", SEGMENTS, "gs.base")]
            + (_avx() if avx else [])
            + (_avx512() if avx and avx512 else [])
            + _sys(True))


#: Long mode: gdb's 64bit-core + 64bit-sse + 64bit-segments order, then ours.
X86_64_LAYOUT = _layout("i386:x86-64", _x86_64_specs(False, False), pc="rip", sp="rsp",
                        fp="rbp")
_X86_64_VECTOR_LAYOUTS = {
    (True, False): _layout("i386:x86-64", _x86_64_specs(True, False), "rip", "rsp", "rbp"),
    (True, True): _layout("i386:x86-64", _x86_64_specs(True, True), "rip", "rsp", "rbp"),
}


def x86_64_layout(avx: bool = False, avx512: bool = False) -> RegisterLayout:
    """The long-mode layout, with ``ymm*h`` (AVX) and the AVX-512 registers when the
    vCPU's XSAVE area holds those components (AVX-512 implies AVX)."""
    return _X86_64_VECTOR_LAYOUTS[(True, avx512)] if avx else X86_64_LAYOUT

# gdb's i386 numbering differs from amd64's (ecx before ebx, esp before ebp).
_GPR32 = [("eax", "rax"), ("ecx", "rcx"), ("edx", "rdx"), ("ebx", "rbx"),
          ("esp", "rsp"), ("ebp", "rbp"), ("esi", "rsi"), ("edi", "rdi")]
_I386_SPECS: list[_Spec] = (
    [(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", CORE, src) for n, src in _GPR32]
    + [("eip", 32, "code_ptr", CORE, "rip"), ("eflags", 32, "i386_eflags", CORE, "rflags")]
    + _SEGS
    + _x87()
    + _sse(8)
    # Not in org.gnu.gdb.i386.segments: with gdb 13's default GNU/Linux OS
    # ABI, i386 + segments without org.gnu.gdb.i386.linux trips an internal
    # assertion (tdesc_use_registers).  In our own feature gdb numbers them
    # itself and `p $fs_base` still works.
    + [("fs_base", 32, "int", SYS, "fs.base", "system"),
       ("gs_base", 32, "int", SYS, "gs.base", "system")]
    + _sys(False)
)

#: Protected mode (and a usable fallback for real mode): 32-bit views.
I386_LAYOUT = _layout("i386", _I386_SPECS, pc="eip", sp="esp", fp="ebp")

#: Same registers as :data:`I386_LAYOUT`; gdb disassembles 16-bit code.
I8086_LAYOUT = _layout("i8086", _I386_SPECS, pc="eip", sp="esp", fp="ebp")
