"""The x86_64 register catalog: every register regsync knows, as data.

Each Register names its group (one kernel transfer), a ``field`` locator the
KVM transport turns into an accessor (kvm.py), its width and whether the kernel
may change it while the vCPU is stopped (volatile). The cache, the transport,
the gdb layout and the CLI dump all read this table; there is no second list.

One home per register: state reachable through two kernel paths (EFER, APIC
base and FS/GS base via sregs or MSRs; CR8 via sregs or the LAPIC TPR) lives in
exactly one group; the other path is an alias of that home (MSR_ALIASES,
ALIASES), never a second copy that could be written back stale.

Field locators:
    name                kvm_regs / kvm_sregs scalar         (rax, cr0, efer)
    seg:<s>:<f>         kvm_sregs segment field              (seg:cs:base)
    segattr:<s>         packed segment attributes (SEG_ATTR layout below)
    dt:<t>:<f>          kvm_sregs descriptor table          (dt:gdt:limit)
    ev:<path>           kvm_vcpu_events field               (ev:nmi.pending)
    xsave:<off>         byte offset in the XSAVE area, standard format (legacy fxsave
                        layout, then XSAVE_COMPONENTS)
    xcr:<n>             XCR n in kvm_xcrs
    db:<n>, dr6, dr7    kvm_debugregs
    lapic:<off>         32-bit LAPIC register at <off> (256-bit when width is 256:
                        eight registers at a 0x10 stride, as IRR/ISR/TMR are laid out)
    mp_state            kvm_mp_state
    msr:<index>         one MSR
"""

from __future__ import annotations

import functools

from ...regdefs import Alias, Catalog, Group, Register

# Packed segment attributes, the VMX access-rights layout:
# type 0-3 | s 4 | dpl 5-6 | present 7 | avl 12 | l 13 | db 14 | g 15 | unusable 16
SEG_ATTR_FIELDS = (("type", 0, 4), ("s", 4, 1), ("dpl", 5, 2), ("present", 7, 1),
                   ("avl", 12, 1), ("l", 13, 1), ("db", 14, 1), ("g", 15, 1),
                   ("unusable", 16, 1))

GROUPS = (
    Group("REGS", 1 << 0, "general purpose registers, rip, rflags (kvm_regs)", sync=True),
    Group("SREGS", 1 << 1, "segments, descriptor tables, control registers, EFER, APIC base "
          "(kvm_sregs)", sync=True),
    Group("EVENTS", 1 << 2, "pending/injected exception, interrupt, NMI; SIPI vector "
          "(kvm_vcpu_events; written with valid-flags so untouched fields are not written)",
          volatile=True, sync=True, invalidates=()),
    Group("XSAVE", 1 << 3, "x87 and SSE state (KVM_GET_XSAVE2)"),
    Group("XCRS", 1 << 4, "extended control registers (kvm_xcrs)"),
    Group("DEBUGREGS", 1 << 5, "DR0-DR3, DR6, DR7 (kvm_debugregs)"),
    Group("LAPIC", 1 << 6, "local APIC registers (kvm_lapic_state); IRR, ISR and the timer "
          "count change while the vCPU is stopped", volatile=True),
    # KVM_GET_MP_STATE first processes a pending INIT/SIPI, which resets the
    # vCPU: everything else the cache holds may be stale afterwards.
    Group("MP_STATE", 1 << 7, "multiprocessing state (kvm_mp_state); INIT/SIPI change it",
          volatile=True, invalidates=("REGS", "SREGS", "EVENTS", "XSAVE", "XCRS", "DEBUGREGS",
                                      "LAPIC", "MSRS", "MSRS_TIME")),
    Group("MSRS", 1 << 8, "architectural MSRs, one KVM_GET/SET_MSRS batch"),
    Group("MSRS_TIME", 1 << 9, "TSC, TSC_ADJUST, TSC_DEADLINE: they move on their own",
          volatile=True),
)

# QEMU's levels as masks over the groups: RUNTIME is what gdb can access; RESET
# adds what a system reset puts back; FULL adds the state that runs on its own
# (LAPIC timer, TSC), which only a full save/restore should touch.
_RUNTIME = ("REGS", "SREGS", "XSAVE")
_RESET = _RUNTIME + ("EVENTS", "XCRS", "DEBUGREGS", "MP_STATE", "MSRS")
_FULL = _RESET + ("LAPIC", "MSRS_TIME")
LEVEL_GROUPS = {"RUNTIME": _RUNTIME, "RESET": _RESET, "FULL": _FULL}


def _regs() -> list[Register]:
    out = [Register(n, 64, "REGS", n) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")]
    out.append(Register("rflags", 64, "REGS", "rflags", aliases=("eflags",)))
    return out


def _sregs() -> list[Register]:
    out = []
    for seg, kseg in (("cs", "cs"), ("ds", "ds"), ("es", "es"), ("fs", "fs"), ("gs", "gs"),
                      ("ss", "ss"), ("tr", "tr"), ("ldtr", "ldt")):
        out.append(Register(f"{seg}.selector", 16, "SREGS", f"seg:{kseg}:selector",
                            aliases=(seg,)))
        extra = (f"{seg}_base",) if seg in ("fs", "gs") else ()
        out.append(Register(f"{seg}.base", 64, "SREGS", f"seg:{kseg}:base", aliases=extra))
        out.append(Register(f"{seg}.limit", 32, "SREGS", f"seg:{kseg}:limit"))
        out.append(Register(f"{seg}.attr", 17, "SREGS", f"segattr:{kseg}",
                            doc="type|s<<4|dpl<<5|p<<7|avl<<12|l<<13|db<<14|g<<15|unusable<<16"))
    for t, kt in (("gdtr", "gdt"), ("idtr", "idt")):
        out.append(Register(f"{t}.base", 64, "SREGS", f"dt:{kt}:base"))
        out.append(Register(f"{t}.limit", 16, "SREGS", f"dt:{kt}:limit"))
    out += [Register(n, 64, "SREGS", n) for n in ("cr0", "cr2", "cr3", "cr4")]
    out.append(Register("cr8", 4, "SREGS", "cr8", doc="task priority; lapic.tpr aliases it"))
    out.append(Register("efer", 64, "SREGS", "efer"))
    out.append(Register("apic_base", 64, "SREGS", "apic_base"))
    return out


def _events() -> list[Register]:
    spec = (
        ("exception.injected", 1, False), ("exception.nr", 8, False),
        ("exception.has_error_code", 1, False), ("exception.pending", 1, False),
        ("exception.error_code", 32, False),
        ("interrupt.injected", 1, False), ("interrupt.nr", 8, False),
        ("interrupt.soft", 1, False), ("interrupt.shadow", 2, False),
        ("nmi.injected", 1, False), ("nmi.pending", 8, True), ("nmi.masked", 1, False),
        ("sipi_vector", 32, True),
    )
    return [Register(n, w, "EVENTS", f"ev:{n}", volatile=v) for n, w, v in spec]


# XSAVE state components beyond x87/SSE: name -> (XSTATE_BV bit, byte offset, size) in the
# standard format. KVM_GET_XSAVE2 fills the buffer in that format (api.rst, "4.42
# KVM_GET_XSAVE2"; arch/x86/kernel/fpu/xstate.c copy_xstate_to_uabi_buf uses the
# non-compacted offsets); the offsets are CPUID.(EAX=0DH, ECX=bit):EBX and the sizes EAX.
XSAVE_COMPONENTS: dict[str, tuple[int, int, int]] = {
    "AVX": (2, 576, 256), "OPMASK": (5, 1088, 64), "ZMM_HI256": (6, 1152, 512),
    "HI16_ZMM": (7, 1664, 1024)}


def _xoff(component: str) -> int:
    return XSAVE_COMPONENTS[component][1]


def xsave_component_bit(offset: int) -> int:
    """The XSTATE_BV bit of the component holding byte ``offset`` (0/1: legacy area)."""
    for bit, start, size in XSAVE_COMPONENTS.values():
        if start <= offset < start + size:
            return bit
    return 1 if offset >= 160 or 24 <= offset < 32 else 0   # xmm/mxcsr: SSE, else x87


def _xsave() -> list[Register]:
    out = [Register("fcw", 16, "XSAVE", "xsave:0"), Register("fsw", 16, "XSAVE", "xsave:2"),
           Register("ftw", 8, "XSAVE", "xsave:4", doc="abridged (FXSAVE) tag byte"),
           Register("fop", 16, "XSAVE", "xsave:6"), Register("fip", 64, "XSAVE", "xsave:8"),
           Register("fdp", 64, "XSAVE", "xsave:16"), Register("mxcsr", 32, "XSAVE", "xsave:24")]
    out += [Register(f"st{i}", 80, "XSAVE", f"xsave:{32 + 16 * i}") for i in range(8)]
    out += [Register(f"xmm{i}", 128, "XSAVE", f"xsave:{160 + 16 * i}") for i in range(16)]
    # Components past the legacy area, at their offsets in the standard (non-compacted)
    # format KVM_GET_XSAVE2 returns (XSAVE_COMPONENTS). Present on a vCPU only where its
    # CPUID leaf 0xD lists the component (the gdb stub checks); elsewhere they read 0.
    out += [Register(f"ymm{i}h", 128, "XSAVE", f"xsave:{_xoff('AVX') + 16 * i}",
                     doc="bits 255:128 of ymm; 127:0 are xmm") for i in range(16)]
    out += [Register(f"k{i}", 64, "XSAVE", f"xsave:{_xoff('OPMASK') + 8 * i}")
            for i in range(8)]
    out += [Register(f"zmm{i}h", 256, "XSAVE", f"xsave:{_xoff('ZMM_HI256') + 32 * i}",
                     doc="bits 511:256 of zmm") for i in range(16)]
    out += [Register(f"zmm{i}", 512, "XSAVE", f"xsave:{_xoff('HI16_ZMM') + 64 * (i - 16)}",
                     doc="whole register; xmm/ymm 16-31 are its low bits") for i in range(16, 32)]
    return out


def _debugregs() -> list[Register]:
    return ([Register(f"dr{i}", 64, "DEBUGREGS", f"db:{i}") for i in range(4)]
            + [Register("dr6", 64, "DEBUGREGS", "dr6"), Register("dr7", 64, "DEBUGREGS", "dr7")])


# (name, offset, width, volatile). TPR is not here: its home is cr8 (ALIASES).
_LAPIC = (
    ("id", 0x20, 32, False), ("version", 0x30, 32, False), ("apr", 0x90, 32, False),
    ("ppr", 0xA0, 32, True), ("ldr", 0xD0, 32, False), ("dfr", 0xE0, 32, False),
    ("svr", 0xF0, 32, False), ("isr", 0x100, 256, True), ("tmr", 0x180, 256, True),
    ("irr", 0x200, 256, True), ("esr", 0x280, 32, True), ("icr", 0x300, 32, False),
    ("icr2", 0x310, 32, False), ("lvt_timer", 0x320, 32, False),
    ("lvt_thermal", 0x330, 32, False), ("lvt_pmc", 0x340, 32, False),
    ("lvt_lint0", 0x350, 32, False), ("lvt_lint1", 0x360, 32, False),
    ("lvt_error", 0x370, 32, False), ("tmict", 0x380, 32, False),
    ("tmcct", 0x390, 32, True), ("tdcr", 0x3E0, 32, False),
)

# (name, index, group, volatile)
_MSRS = (
    ("sysenter_cs", 0x174, "MSRS", False), ("sysenter_esp", 0x175, "MSRS", False),
    ("sysenter_eip", 0x176, "MSRS", False), ("pat", 0x277, "MSRS", False),
    ("misc_enable", 0x1A0, "MSRS", False), ("star", 0xC0000081, "MSRS", False),
    ("lstar", 0xC0000082, "MSRS", False), ("cstar", 0xC0000083, "MSRS", False),
    ("sfmask", 0xC0000084, "MSRS", False), ("kernel_gs_base", 0xC0000102, "MSRS", False),
    ("tsc_aux", 0xC0000103, "MSRS", False),
    ("kvm_wall_clock", 0x4B564D00, "MSRS", False), ("kvm_system_time", 0x4B564D01, "MSRS", False),
    ("tsc", 0x10, "MSRS_TIME", True), ("tsc_adjust", 0x3B, "MSRS_TIME", True),
    ("tsc_deadline", 0x6E0, "MSRS_TIME", True),
)

# MSR indices whose home is another group: regs.msr(i) reads and writes the home.
MSR_ALIASES = {0xC0000080: "efer", 0x1B: "apic_base", 0xC0000100: "fs.base",
               0xC0000101: "gs.base"}


def _build() -> Catalog:
    regs = _regs() + _sregs() + _events() + _xsave()
    regs.append(Register("xcr0", 64, "XCRS", "xcr:0"))
    regs += _debugregs()
    regs += [Register(f"lapic.{n}", w, "LAPIC", f"lapic:{off:#x}", volatile=v)
             for n, off, w, v in _LAPIC]
    regs.append(Register("mp_state", 32, "MP_STATE", "mp_state", volatile=True,
                         doc="0 runnable, 1 uninitialized, 2 init received, 3 halted, "
                             "4 sipi received"))
    regs += [Register(n, 64, g, f"msr:{idx:#x}", volatile=v) for n, idx, g, v in _MSRS]
    # TPR's home is cr8 (SREGS, handed back in kvm_run at every exit). KVM keeps all
    # eight TPR bits in the LAPIC page, but every KVM_SET_SREGS sets TPR from CR8
    # (arch/x86/kvm/x86.c __set_sregs_common -> kvm_set_cr8 -> kvm_lapic_set_tpr),
    # so TPR[3:0] cannot be kept by the home: the alias refuses them.
    aliases = (Alias("lapic.tpr", "cr8", shift=4, width=8,
                     doc="TPR[3:0] cannot be kept: the home of TPR is cr8 (TPR[7:4]) and "
                         "KVM_SET_SREGS rewrites TPR from CR8; write a multiple of 0x10, "
                         "or cr8"),)
    bits = {g.name: g.bit for g in GROUPS}
    levels = {lv: sum(bits[g] for g in names) for lv, names in LEVEL_GROUPS.items()}
    return Catalog("x86_64", GROUPS, tuple(regs), levels, aliases)


CATALOG = _build()
@functools.lru_cache(maxsize=None)
def msr_index(reg: Register) -> int:
    """The MSR number of an ``msr:<index>`` register (parsed once per register)."""
    kind, _, index = reg.field.partition(":")
    if kind != "msr":
        raise ValueError(f"{reg.name} is not an MSR (field {reg.field!r})")
    return int(index, 16)


MSR_BY_INDEX = {msr_index(r): r for r in CATALOG.registers if r.field.startswith("msr:")}
