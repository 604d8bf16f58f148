"""A machine's whole state as plain data, and how it is taken from and put back into a Machine.

``MachineState`` holds every vCPU's register groups at the FULL level as the
kernel's bytes (taken through the register cache, so local edits are included),
the VM-wide state (PIC master/slave and IOAPIC, PIT, kvmclock), guest memory as
the runs of pages that hold data (everything else is zero), and each device's
state. It knows nothing of files (fileformat.py) or of the fast reset (reset.py).

Taking and putting back both pause the vCPU threads (if running), complete any
I/O exit KVM finishes only on re-entry, and do each vCPU's transfers on its own
thread (run_on_cpu), in the orders of order.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__
from ..arch.x86_64 import CATALOG
from ..kvm import structs as ks
from ..memory import PAGE
from .order import CAPTURE_ORDER, RESTORE_ORDER, VM_RESTORE_ORDER

if TYPE_CHECKING:
    from ..machine import Machine
    from ..vcpu import Vcpu

ARCH = "x86_64"
FULL = CATALOG.levels["FULL"]
_EVENTS = CATALOG.group_by_name["EVENTS"].bit
_CPUID_HEADER = ctypes.sizeof(ks.kvm_cpuid2)
_CPUID_ENTRY = ctypes.sizeof(ks.kvm_cpuid_entry2)
_IRQCHIPS = {"pic_master": ks.KVM_IRQCHIP_PIC_MASTER, "pic_slave": ks.KVM_IRQCHIP_PIC_SLAVE,
             "ioapic": ks.KVM_IRQCHIP_IOAPIC}
# Device registers a snapshot carries (public attributes; a device without one
# of them is saved without it). Counters such as Hypercalls.calls are the VMM's
# statistics, not guest-visible state, and are not saved.
DEVICE_FIELDS: dict[str, tuple[str, ...]] = {
    "serial": ("divisor", "ier", "lcr", "fcr", "scr", "mcr", "lsr", "iir", "thr_ipending"),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_RESIDENT_RUN = re.compile(rb"[\x01-\xff]+")
_ZERO_PAGE = bytes(PAGE)


# The in-memory snapshot each machine's dirty log is counted from (reset.py). Any
# other write of the whole machine (apply) ends it: the next reset copies all pages.
BASELINE: "weakref.WeakKeyDictionary[Machine, object]" = weakref.WeakKeyDictionary()


class SnapshotError(ValueError):
    """A snapshot cannot be taken, read or put back; the message is one line naming why.
    Raised before anything of the target VM is touched."""


@dataclass
class SlotImage:
    """One memory slot: ``extents`` are (byte offset, data) runs; every other byte is zero."""
    gpa: int
    size: int
    extents: list[tuple[int, Any]] = field(default_factory=list)
    # Read from a file: (slot offset, length, file offset) per extent, and the open file.
    file_runs: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    source: Any = field(default=None, repr=False, compare=False)

    @property
    def stored_bytes(self) -> int:
        return sum(len(d) for _, d in self.extents)


@dataclass
class VcpuState:
    id: int
    cpuid: bytes                      # kvm_cpuid_entry2 array (KVM_GET_CPUID2, header dropped)
    groups: dict[str, bytes]          # cache group -> the kernel's bytes (transport.export)


@dataclass
class MachineState:
    arch: str
    irqchip: bool
    vcpus: list[VcpuState]
    vm: dict[str, bytes]              # VM_RESTORE_ORDER name -> kernel struct bytes
    memory: list[SlotImage]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    guest: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)   # who wrote it, when

    @property
    def smp(self) -> int:
        return len(self.vcpus)

    @property
    def mem_bytes(self) -> int:
        return sum(s.size for s in self.memory)


# --- pausing ----------------------------------------------------------------------------
class paused:
    """``with paused(m):`` every vCPU held out of the guest (threads paused); those
    that ran are resumed afterwards.

    Holds the machine's lifecycle lock, as reset() does, so a snapshot and a
    reset never interleave. Without threads (the direct run() API) nothing runs.
    (A class, not a generator: the reset loop enters it thousands of times a second.)
    """

    __slots__ = ("m", "was_running")

    def __init__(self, m: "Machine") -> None:
        self.m = m
        self.was_running = False

    def __enter__(self) -> None:
        m = self.m
        m._lifecycle.acquire()
        try:
            self.was_running = bool(m.threads) and not m.paused and m.exit_status is None
            if self.was_running:
                m.pause_all()
        except BaseException:
            m._lifecycle.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.was_running:
                self.m.resume_all()
        finally:
            self.m._lifecycle.release()


def on_each_vcpu(m: "Machine", fn: Callable[["Vcpu"], Any]) -> list[Any]:
    """fn(vcpu) on each vCPU's own thread (the cache's rule 9), in vCPU order."""
    if not m.threads:                 # the direct run() API: this is the vCPUs' thread
        return [fn(v) for v in m.vcpus]
    return [m.run_on_cpu(v, functools.partial(fn, v)) for v in m.vcpus]


def settle(v: "Vcpu") -> None:
    """Complete an I/O exit KVM finishes only on re-entry; refuse a vCPU that cannot settle."""
    v.complete_pending_operation()
    if v.has_pending_exit:
        raise SnapshotError(f"vCPU {v.id} is inside a string I/O instruction that needs the VMM "
                            f"again: let it run one more exit, then take the snapshot")


# --- taking -----------------------------------------------------------------------------
def capture_vcpu(v: "Vcpu") -> VcpuState:
    """Every FULL group through the cache (edits included), in CAPTURE_ORDER; on v's thread."""
    settle(v)
    c = v.cache
    # EVENTS last and fresh: drop the copy the kvm_run page handed back (edits stay
    # dirty and are laid over the new fetch), then fetch the rest (MP_STATE first).
    c.invalidate(_EVENTS)
    groups = c.export(FULL & ~_EVENTS)
    groups.update(c.export(_EVENTS))
    cpuid = v.handle.get_cpuid2()
    return VcpuState(v.id, cpuid.to_bytes()[_CPUID_HEADER:_CPUID_HEADER + _CPUID_ENTRY * cpuid.nent],
                     {n: groups[n] for n in CAPTURE_ORDER if n in groups})


def get_vm_part(m: "Machine", name: str) -> bytes:
    """One VM-wide part as the kernel's bytes: pit, clock, pic_master, pic_slave, ioapic."""
    vm = m.vm
    if name == "pit":
        return bytes(vm.get_pit2().to_bytes())
    if name == "clock":
        return bytes(vm.get_clock().to_bytes())
    return bytes(vm.get_irqchip(_IRQCHIPS[name]).to_bytes())


def capture_vm(m: "Machine") -> dict[str, bytes]:
    """PIT, kvmclock, PIC master/slave and IOAPIC (nothing without an in-kernel irqchip)."""
    if not m.irqchip:
        return {}
    return {name: get_vm_part(m, name) for name in VM_RESTORE_ORDER}


def resident_runs(mem: Any, host_addr: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the page runs the host has populated (mincore(2)). Pages never
    touched read as zero without being mapped, so only these can hold data."""
    vec = bytearray((size + PAGE - 1) // PAGE)
    if _libc.mincore(host_addr, size, (ctypes.c_char * len(vec)).from_buffer(vec)) != 0:
        return [(0, size)]                    # cannot tell: treat everything as populated
    return [(r.start() * PAGE, (r.end() - r.start()) * PAGE) for r in _RESIDENT_RUN.finditer(vec)]


def capture_memory(m: "Machine") -> list[SlotImage]:
    """A private copy of each slot's populated pages (the vCPUs are paused)."""
    images = []
    for s in m.memory.slots:
        extents = [(off, s.mem[off:off + n]) for off, n in resident_runs(s.mem, s.host_addr, s.size)]
        images.append(SlotImage(s.gpa, s.size, extents))
    return images


def capture_devices(m: "Machine") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, fields in DEVICE_FIELDS.items():
        dev = getattr(m, name, None)
        if dev is not None:
            out[name] = {f: getattr(dev, f) for f in fields if hasattr(dev, f)}
    wd = getattr(m, "watchdog", None)
    if wd is not None and hasattr(wd, "save_state"):
        out["watchdog"] = wd.save_state()
    return out


def capture(m: "Machine", before_memory: Callable[[], Any] | None = None) -> MachineState:
    """The whole machine, consistent: every vCPU paused while it is taken.
    ``before_memory`` runs while paused, just before memory is copied (the fast
    reset starts its dirty log there)."""
    with paused(m):
        vcpus = on_each_vcpu(m, capture_vcpu)
        vm = capture_vm(m)
        if before_memory is not None:
            before_memory()
        memory = capture_memory(m)
        devices = capture_devices(m)
    g = m.guest
    guest = None if g is None else {"name": g.name, "entry": g.entry, "mode": g.mode,
                                    "end": g.end, "arg": g.arg, "addr": g.addr}
    info = {"regsync": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    return MachineState(ARCH, m.irqchip, vcpus, vm, memory, devices, guest, info)


# --- putting back -----------------------------------------------------------------------
def check_target(m: "Machine", st: MachineState, *, fresh: bool) -> None:
    """Everything that could refuse the restore, checked before anything is written
    (with the vCPUs paused: the CPUID is read on each vCPU's own thread)."""
    if st.arch != ARCH:
        raise SnapshotError(f"snapshot is for {st.arch}, this machine is {ARCH}")
    if st.smp != len(m.vcpus):
        raise SnapshotError(f"snapshot has {st.smp} vCPUs, this machine {len(m.vcpus)}: "
                            f"use Machine.from_snapshot for another shape")
    have = [(s.gpa, s.size) for s in m.memory.slots]
    want = [(s.gpa, s.size) for s in st.memory]
    if have != want:
        raise SnapshotError(f"snapshot memory {_mib(st.mem_bytes)} in slots {want} does not match "
                            f"this machine's {_mib(m.memory.size)} in {have}")
    if st.irqchip != m.irqchip:
        raise SnapshotError(f"snapshot irqchip={st.irqchip}, this machine irqchip={m.irqchip}")
    for v, vs in zip(m.vcpus, st.vcpus):
        missing = [n for n in RESTORE_ORDER if n not in vs.groups
                   and CATALOG.group_by_name[n].bit & v.transport.available_mask]
        if missing:
            raise SnapshotError(f"snapshot vCPU {vs.id} lacks register groups {', '.join(missing)}")
        for name in ("MSRS", "MSRS_TIME"):
            data = vs.groups.get(name, b"")
            for off in range(0, len(data), ctypes.sizeof(ks.kvm_msr_entry)):
                idx = int.from_bytes(data[off:off + 4], "little")
                if idx not in m.supported_msrs:
                    raise SnapshotError(f"snapshot vCPU {vs.id} holds MSR {idx:#x}, which this "
                                        f"host's KVM does not save or restore")
        if not fresh and v.handle.counters.get("KVM_RUN", 0) and \
                m.run_on_cpu(v, functools.partial(_cpuid_of, v)) != vs.cpuid:
            raise SnapshotError(f"vCPU {v.id} has run with another CPUID, and KVM refuses "
                                f"KVM_SET_CPUID2 after the first KVM_RUN unless identical: "
                                f"restore into a fresh machine (Machine.from_snapshot)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _cpuid_of(v: "Vcpu") -> bytes:
    c = v.handle.get_cpuid2()
    return bytes(c.to_bytes()[_CPUID_HEADER:_CPUID_HEADER + _CPUID_ENTRY * c.nent])


def set_cpuid(v: "Vcpu", entries: bytes) -> None:
    """KVM_SET_CPUID2 with the saved entries, unless the vCPU already has exactly them."""
    if _cpuid_of(v) == entries:
        return
    n = len(entries) // _CPUID_ENTRY
    buf = ks.cpuid_buffer(n)
    ctypes.memmove(ctypes.addressof(buf) + _CPUID_HEADER, entries, n * _CPUID_ENTRY)
    v.handle.set_cpuid2(buf)


_LVT_TIMER, _TMICT, _TMCCT = 0x320, 0x380, 0x390
_LVT_TIMER_MODE = 3 << 17           # 0 one-shot, 1 periodic, 2 TSC-deadline


def lapic_for_restore(page: bytes) -> bytes:
    """The LAPIC page as KVM_SET_LAPIC should get it.

    A one-shot timer that has run out reads TMCCT = 0 with TMICT still set.
    KVM_SET_LAPIC restarts the timer from the saved TMCCT (lapic.c
    kvm_apic_set_state -> __start_apic_timer(apic, APIC_TMCCT)); on this host a
    zero count there fires the timer once more, so a tick the guest already took
    would come twice (tests/kvm/test_snapshot.py found it). A run-out one-shot
    timer is therefore put back disarmed (TMICT 0: the guest reads 0 there until
    it arms the timer again). What no snapshot can carry: a tick that expired
    but that KVM had not yet moved into IRR (lapic_timer.pending is not part of
    kvm_lapic_state) -- upstream drops it on restore as well.
    """
    lvt = int.from_bytes(page[_LVT_TIMER:_LVT_TIMER + 4], "little")
    tmict = int.from_bytes(page[_TMICT:_TMICT + 4], "little")
    tmcct = int.from_bytes(page[_TMCCT:_TMCCT + 4], "little")
    if lvt & _LVT_TIMER_MODE == 0 and tmict and not tmcct:
        return page[:_TMICT] + bytes(4) + page[_TMICT + 4:]
    return page


def put_group(v: "Vcpu", name: str, data: bytes, defer: bool = False) -> None:
    """One whole group into KVM through the cache (LAPIC as lapic_for_restore gives it)."""
    v.cache.put(name, lapic_for_restore(data) if name == "LAPIC" else data, defer=defer)


def put_vcpu(v: "Vcpu", vs: VcpuState) -> None:
    """CPUID, then every group in RESTORE_ORDER by ioctl; on v's thread. Edits are dropped."""
    v.discard()
    set_cpuid(v, vs.cpuid)
    for name in RESTORE_ORDER:
        if name in vs.groups and CATALOG.group_by_name[name].bit & v.transport.available_mask:
            put_group(v, name, vs.groups[name])


def put_vm_part(m: "Machine", name: str, data: bytes) -> None:
    vm = m.vm
    if name == "pit":
        vm.set_pit2(ks.kvm_pit_state2.from_bytes(data))
    elif name == "clock":
        c = ks.kvm_clock_data.from_bytes(data)
        # Only the saved clock value: TSC_STABLE is refused by some kernels' SET_CLOCK
        # (Firecracker vm.rs save_state clears it), and REALTIME/HOST_TSC would
        # advance the clock by the time since the save.
        c.flags = 0
        vm.set_clock(c)
    else:
        chip = ks.kvm_irqchip.from_bytes(data)
        chip.chip_id = _IRQCHIPS[name]
        vm.set_irqchip(chip)


def put_vm(m: "Machine", parts: dict[str, bytes]) -> None:
    for name in VM_RESTORE_ORDER:
        if name in parts:
            put_vm_part(m, name, parts[name])


MAP_RUN_MIN = 1 << 20       # runs at least this long are mapped from the file, not copied
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_MAP_FIXED = 0x10


def _map_at(addr: int, length: int, fd: int, offset: int) -> bool:
    """mmap(MAP_PRIVATE | MAP_FIXED) over guest memory: from the file (fd >= 0) or fresh
    anonymous zero pages (fd -1). The guest's addresses stay; KVM's MMU notifier drops
    its old mappings and faults the new pages in when the guest touches them."""
    flags = mmap.MAP_PRIVATE | _MAP_FIXED | (mmap.MAP_ANONYMOUS if fd < 0 else 0)
    got = _libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    return got == addr


def put_memory(m: "Machine", images: list[SlotImage], *, fresh: bool) -> None:
    """Each slot becomes its image. A fresh machine's memory is already zero; otherwise
    the slot is first replaced by fresh anonymous pages (zero, whatever backed it).
    Runs read from a file that are page aligned and at least MAP_RUN_MIN long are
    mapped copy-on-write from the validated file (Firecracker's way: nothing is
    copied until the guest touches it); the rest is copied."""
    for s, img in zip(m.memory.slots, images):
        if not fresh and not _map_at(s.host_addr, s.size, -1, 0):
            s.mem.madvise(mmap.MADV_DONTNEED)
        mapped = set()
        if img.source is not None:
            for off, length, at in img.file_runs:
                if length >= MAP_RUN_MIN and not (off | length | at) % PAGE and \
                        _map_at(s.host_addr + off, length, img.source.fd, at):
                    mapped.add(off)
        for off, data in img.extents:
            if off not in mapped:
                s.mem[off:off + len(data)] = data


def put_devices(m: "Machine", devices: dict[str, dict[str, Any]]) -> None:
    for name, fields in DEVICE_FIELDS.items():
        dev, saved = getattr(m, name, None), devices.get(name)
        if dev is not None and saved:
            for f in fields:
                if f in saved and hasattr(dev, f) and getattr(dev, f) != saved[f]:
                    setattr(dev, f, saved[f])
    wd, saved_wd = getattr(m, "watchdog", None), devices.get("watchdog")
    if wd is not None and saved_wd is not None and hasattr(wd, "load_state"):
        # Disarmed then and now: nothing to do (and no wake-up of its thread).
        if saved_wd.get("left") is not None or wd.armed:
            wd.load_state(saved_wd)


def apply(m: "Machine", st: MachineState, *, fresh: bool = False) -> None:
    """Put the whole state into m (same shape). Validated first: a refusal touches nothing."""
    with paused(m):
        check_target(m, st, fresh=fresh)
        on_each_vcpu(m, settle)
        put_vm(m, st.vm)
        put_memory(m, st.memory, fresh=fresh)
        for v, vs in zip(m.vcpus, st.vcpus):
            m.run_on_cpu(v, functools.partial(put_vcpu, v, vs))
        put_devices(m, st.devices)
        BASELINE.pop(m, None)
        m.halted.clear()
    after_restore(m, st)


def after_restore(m: "Machine", st: MachineState) -> None:
    """The VMM's view follows the guest: the loaded guest, and no exit status yet."""
    if st.guest is not None:
        loaded = st.__dict__.get("_loaded_guest")     # built once per state (the reset loop)
        if loaded is None:
            from ..machine import LoadedGuest
            loaded = st.__dict__["_loaded_guest"] = LoadedGuest(**st.guest)
        m.guest = loaded
    if m.threads and all(not t.thread.is_alive() for t in m.threads):
        m.threads = []                    # the guest had finished: start() may run it again
    if not m.threads:
        # The guest runs again: re-arm the exit as start() does (vmm.py owns these;
        # a VmmMixin.rearm() would be the one place -- asked for in the report).
        lock = getattr(m, "_finish_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            m.exit_status = None
            m._stopped.clear()
            gate = getattr(m, "_exit_gate", None)
            if gate is not None:
                gate.acquire(blocking=False)
