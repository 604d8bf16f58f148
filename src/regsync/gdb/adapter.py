"""The :class:`~regsync.gdb.target.Target` over a running regsync Machine.

Threads and ownership
---------------------
* Register access and KVM_SET_GUEST_DEBUG happen on the vCPU's own thread:
  the stub (server thread) goes through ``machine.run_on_cpu``.  Guest memory
  is an mmap and is read directly.
* KVM_EXIT_DEBUG arrives on a vCPU thread (``machine.debug_handler``).  The
  handler classifies it (our single-step, one of our hardware slots, or the
  guest's own #DB/#BP, which is re-injected), pauses the machine
  (``stop_all_from``), snapshots rip/rsp/rbp and the paging registers through
  the cache (the kvm_run page carries them after the exit: no ioctl) and
  hands a :class:`StopRecord` to the server through ``notify``.  The server
  calls :meth:`MachineTarget.complete_stop`, which waits for every vCPU to be
  paused and builds the :class:`StopEvent` with the registers expedited.
* ``_state`` (under ``_lock``) is "detached" (no gdb: the guest runs free),
  "stopped", "running" or "stopping" (a stop was claimed and is being
  reported).  Only the first event of a run claims the stop; later ones are
  dropped (a hardware breakpoint is fault-like: the vCPU hits it again when
  resumed).  ``_gen`` counts runs so a record from an earlier run is ignored.
* Debug exits are judged against the guest-debug state the vCPU actually ran
  with (``_applied``), never against gdb's current breakpoints, so a late hit
  of a breakpoint gdb already lifted is held, not re-injected into the guest.
* Pausing goes through ``machine.pause``, which queues "pause" even to a thread
  that looks paused: one may hold a queued "resume" not yet drained.

Breakpoints
-----------
Four debug-register slots serve Z1 (hbreak), and Z0 too unless a start-up
probe showed that KVM intercepts int3 (KVM_GUESTDBG_USE_SW_BP); without
interception an int3 in guest memory would kill a CPL0 guest, so Z0 then
takes a hardware slot and ``monitor info bp`` says so.  Watchpoints (Z2/Z4)
use DR7 R/W bits when the probe saw a data breakpoint fire; otherwise they
are refused (empty reply).  Debug registers reach KVM lazily: only when a
vCPU resumes and only if its guest-debug state differs from what it has.

Stepping
--------
``vCont;s:N;c`` steps vCPU N with the others held ("alone", like gdb's
``scheduler-locking step``, the default) or running ("all"): ``monitor
step-mode all|alone``.

Sessions
--------
Only ``D`` (detach) lets the guest go and only ``k`` ends it.  A client that
vanishes (EOF, reset, a port probe) is :meth:`MachineTarget.vanish`: its
breakpoints go, and the guest is left as it was -- running if it runs,
stopped if it is stopped -- except that the stop the connection itself made
(attach) is undone when the guest ran before that client came and the client
never resumed it.  So ``--wait`` keeps waiting through a ``nc -z`` probe, a
guest left at a breakpoint by a crashed gdb is still there for the next one
(which is told the same stop), and a running guest is never held by a probe.

Monitor commands live in :mod:`.monitor` (a table); vector registers come
from the catalog's XSAVE group where the vCPU's CPUID leaf 0xD holds them.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..arch.x86_64 import CATALOG
from ..exits import DebugExit
from ..kvm import KvmError
from ..kvm.ioctls import moves_register_state
from ..kvm import structs as ks
from ..memory import GuestMemoryError
from ..vmm import EXIT_FATAL, EXIT_WATCHDOG, RunState, VcpuStopped
from .pagewalk import PageFault, Paging, ranges
from ..arch.x86_64.catalog import XSAVE_COMPONENTS
from .monitor import run_monitor
from .probe import (DR7_FIXED, LEN_BITS as _LEN_BITS, RW_ACCESS as _RW_ACCESS,
                    RW_EXEC as _RW_EXEC, RW_WRITE as _RW_WRITE, ZERO_DRS as _ZERO_DRS,
                    DebugCaps, probe_debug_caps)
from .target import (
    BP_ACCESS_WATCH, BP_HARDWARE, BP_READ_WATCH, BP_SOFTWARE, BP_WRITE_WATCH, SIGINT,
    SIGTRAP, Action, StopEvent, TargetBase, TargetError, Unsupported,
)
from .targetxml import (
    I386_LAYOUT, I8086_LAYOUT, GdbRegister, RegisterLayout, register_bytes, register_updates,
    value_to_bytes, x86_64_layout,
)

if TYPE_CHECKING:
    from ..machine import Machine
    from ..vcpu import Vcpu

__all__ = [
    "DebugCaps", "KILL_STATUS", "MachineTarget", "StopRecord", "probe_debug_caps",
    "register_ioctls",
]

#: The guest's exit status after gdb's ``kill`` (128 + SIGKILL, like a shell).
KILL_STATUS = 137
NSLOTS = 4
DR6_BS = 1 << 14
DR7_GE = 1 << 9
#: Groups the kvm_run page hands back after every exit (SYNC_REGS): reading
#: their registers at a stop costs no ioctl.
_FREE_GROUPS = frozenset({"REGS", "SREGS"})
_SNAP_REGS = ("rip", "rsp", "rbp", "cr0", "cr3", "cr4", "efer")


def xsave_components(machine: "Machine") -> frozenset[str]:
    """The XSAVE components (catalog XSAVE_COMPONENTS names) this machine's vCPUs hold.

    A component counts when KVM's supported CPUID lists it in leaf 0xD sub-leaf 0
    (EAX, the XCR0 bits it supports) and sub-leaf <bit> puts it at the catalog's
    standard-format offset and size (EBX, EAX): the catalog's offsets are checked
    against this host rather than trusted (Machine gives each vCPU this CPUID)."""
    kvm = getattr(machine, "kvm", None)
    if kvm is None:                      # a stand-in machine (unit tests): x87/SSE only
        return frozenset()
    cpuid = kvm.supported_cpuid()
    leaf = {(e.function, e.index): e for e in cpuid.entries[:cpuid.nent] if e.function == 0xD}
    base = leaf.get((0xD, 0))
    if base is None:
        return frozenset()
    found = set()
    for name, (bit, offset, size) in XSAVE_COMPONENTS.items():
        sub = leaf.get((0xD, bit))
        if base.eax >> bit & 1 and sub is not None and (sub.ebx, sub.eax) == (offset, size):
            found.add(name)
    return frozenset(found)


def register_ioctls(counters: dict[str, int]) -> int:
    """How many of ``counters`` moved vCPU register state (see kvm.ioctls)."""
    return sum(n for name, n in counters.items() if moves_register_state(name))


# --- records --------------------------------------------------------------------------

@dataclass
class StopRecord:
    """A claimed stop, handed from a vCPU thread (or interrupt) to the server."""

    gen: int
    tid: int
    signal: int
    reason: str | None = None
    address: int | None = None
    values: dict[str, int] | None = None     # _SNAP_REGS read at the exit
    t_exit: int = 0                          # perf_counter_ns at the debug exit
    ioctls_at_exit: tuple[int, int] = (0, 0)  # (all, register) summed over vCPUs


@dataclass
class Slot:
    addr: int
    rw: int
    length: int
    origin: int            # the Z type that asked for it
    refs: int = 1

    @property
    def label(self) -> str:
        what = {BP_SOFTWARE: "break (Z0, hardware fallback)", BP_HARDWARE: "hbreak (Z1)",
                BP_WRITE_WATCH: "watch (Z2)", BP_ACCESS_WATCH: "awatch (Z4)"}[self.origin]
        return f"{what} at {self.addr:#x}" + (f" len {self.length}" if self.rw else "")


@dataclass
class StubStats:
    stops: int = 0
    debug_exits: int = 0
    injected: int = 0
    dropped: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    stop_ioctls: list[tuple[int, int]] = field(default_factory=list)   # (all, register)
    guest_debug_sets: int = 0


class MachineTarget(TargetBase):
    """Target over a :class:`~regsync.machine.Machine` (one thread per vCPU)."""

    def __init__(self, machine: "Machine", caps: DebugCaps | None = None,
                 notify: Callable[[StopRecord], None] | None = None) -> None:
        self.m = machine
        self.caps = caps if caps is not None else probe_debug_caps()
        self.notify: Callable[[StopRecord], None] = notify or (lambda rec: None)
        #: The core's current thread (the server wires it to the core).
        self.current_thread: Callable[[], int] = lambda: 1
        self.step_mode = "alone"
        self.stats = StubStats()
        #: One-line notices for the VMM's console (the server prints them).
        self.say: Callable[[str], None] = lambda text: None
        comps = xsave_components(machine)
        self._vector = ("AVX" in comps,
                        {"OPMASK", "ZMM_HI256", "HI16_ZMM"} <= comps)
        self._last_event: StopEvent | None = None   # the stop gdb was last told
        self._ran_before_attach = False
        self._resumed_since_attach = False
        self._lock = threading.Lock()
        self._state = "detached"
        self._gen = 0
        self.slots: list[Slot | None] = [None] * NSLOTS
        self.sw: dict[int, tuple[int, int]] = {}        # vaddr -> (gpa, original byte)
        self._applied: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._snap: dict[int, dict[str, int]] = {}     # vid -> _SNAP_REGS at this stop
        self._tlb: dict[int, dict[int, int]] = {}      # vid -> {page: gpa} at this stop
        self._ran: set[int] = set()                    # vids resumed by the last resume
        self._cheap_prefix: dict[str, int] = {}

    # --- helpers ---------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    def _vcpu(self, tid: int) -> "Vcpu":
        vid = tid - 1
        if not 0 <= vid < len(self.m.vcpus):
            raise TargetError(errno.ESRCH, f"no thread {tid}")
        return self.m.vcpus[vid]

    def _call(self, v: "Vcpu", fn: Callable[[], Any]) -> Any:
        """run_on_cpu with the VM's failures turned into refusals."""
        try:
            return self.m.run_on_cpu(v, fn, timeout=10.0)
        except (VcpuStopped, TimeoutError) as e:
            raise TargetError(errno.ESRCH, str(e)) from None
        except KvmError as e:
            raise TargetError(e.errno or errno.EIO, str(e)) from None

    def _ioctl_totals(self) -> tuple[int, int]:
        """(all, register) ioctls so far, summed over vCPUs (taken at every stop)."""
        total = reg = 0
        for v in self.m.vcpus:
            c = v.handle.counters
            total += sum(c.values())
            reg += register_ioctls(c)
        return total, reg

    def _read_snapshot(self, v: "Vcpu") -> dict[str, int]:
        regs = v.regs
        return {n: regs[n] for n in _SNAP_REGS}

    def _snapshot(self, tid: int) -> dict[str, int]:
        vid = tid - 1
        snap = self._snap.get(vid)
        if snap is None:
            v = self._vcpu(tid)
            snap = self._snap[vid] = self._call(v, lambda: self._read_snapshot(v))
        return snap

    def _forget(self, vids: set[int] | None = None) -> None:
        """Drop snapshots and cached translations (of ``vids``, default all)."""
        if vids is None:
            self._snap.clear()
            self._tlb.clear()
            return
        for vid in vids:
            self._snap.pop(vid, None)
            self._tlb.pop(vid, None)

    def _paging(self, tid: int) -> Paging:
        s = self._snapshot(tid)
        return Paging(s["cr0"], s["cr3"], s["cr4"], s["efer"])

    def forget(self) -> None:
        """Drop the registers and translations cached at this stop (the machine
        changed under the stub: a monitor command, a snapshot restored)."""
        self._forget()

    def paging_of(self, tid: int) -> Paging:
        """The paging registers of ``tid`` at this stop (monitor info mem/tlb)."""
        return self._paging(tid)

    # --- connection lifecycle (server thread) ------------------------------------------
    def attach(self) -> StopEvent:
        """gdb connected: stop the machine (if it runs) and report the stop.

        A guest still held at a stop a vanished client saw is reported as that
        stop (same thread, same reason); otherwise thread 1 with SIGTRAP."""
        with self._lock:
            held = self._state == "held"
            self._state = "stopping"
            self._gen += 1
        self._ran_before_attach = not held and not self.m.paused
        self._resumed_since_attach = False
        self._pause()
        with self._lock:
            self._state = "stopped"
        self._forget()
        last = self._last_event
        if held and last is not None and last.tid in self.threads():
            return StopEvent(last.tid, last.signal, last.reason, last.address)
        return StopEvent(tid=1, signal=SIGTRAP)

    def reported(self, event: StopEvent) -> None:
        """The server told gdb about ``event`` (kept for a reconnecting gdb)."""
        self._last_event = event

    def _pause(self, vids: set[int] | None = None) -> None:
        """Pause the vCPUs ``vids`` (default all) and wait until they are
        (``machine.pause`` queues the pause even behind a not-yet-drained resume)."""
        try:
            self.m.pause(vids)
        except TimeoutError:
            pass  # a vCPU stuck in the kernel: go on, it is asked to pause

    def complete_stop(self, rec: StopRecord, layout: RegisterLayout) -> StopEvent | None:
        """Finish a stop claimed by ``rec``: wait for all vCPUs to pause, return
        the event to report (None if the record is stale)."""
        with self._lock:
            if rec.gen != self._gen or self._state != "stopping":
                self.stats.dropped += 1
                return None
        # The vCPU that hit the event paused itself (stop_all_from); the others
        # that were resumed may not even have started running yet.
        self._pause(self._ran - {rec.tid - 1} if rec.values is not None else self._ran)
        with self._lock:
            self._state = "stopped"
        self._forget(self._ran)     # vCPUs held during the run keep their snapshot
        if rec.values is not None:
            self._snap[rec.tid - 1] = rec.values
        try:
            snap = self._snapshot(rec.tid)
        except TargetError:
            snap = None
        expedite = None
        if snap is not None:
            expedite = {r.regnum: value_to_bytes(r, snap[r.source])
                        for r in layout.expedite_registers if r.source in snap}
        self.stats.stops += 1
        return StopEvent(rec.tid, rec.signal, rec.reason, rec.address, expedite)

    # --- KVM_EXIT_DEBUG (vCPU thread) ---------------------------------------------------
    def on_debug_exit(self, vcpu: "Vcpu", ex: "DebugExit") -> None:
        t_exit = time.perf_counter_ns()
        vid = vcpu.id
        with self._lock:
            self.stats.debug_exits += 1
            state = self._state
            if state == "detached":
                return      # a late exit racing a detach: the debug state is being cleared
            reason: str | None = None
            address: int | None = None
            ours = False
            if ex.exception == 1:
                # Judge by the debug state this vCPU actually ran with (gdb may
                # have changed the breakpoints since).
                control, drs = self._applied.get(vid, (0, _ZERO_DRS))
                if control & ks.KVM_GUESTDBG_SINGLESTEP and ex.dr6 & DR6_BS:
                    ours = True
                for i in range(NSLOTS):
                    if ex.dr6 & (1 << i) and control & ks.KVM_GUESTDBG_USE_HW_BP \
                            and drs[7] & (3 << (2 * i)):
                        ours = True
                        slot = self.slots[i]
                        if slot is None or slot.addr != drs[i] or slot.rw == _RW_EXEC:
                            reason = "swbreak" if slot is not None and \
                                slot.origin == BP_SOFTWARE else "hwbreak"
                        else:
                            reason = "watch" if slot.rw == _RW_WRITE else "awatch"
                            address = slot.addr
                        break
            elif ex.exception == 3:
                rip = vcpu.regs.rip
                if rip in self.sw:
                    ours, reason = True, "swbreak"
                elif rip - 1 in self.sw:           # trap-like report: back to the int3
                    vcpu.regs.rip = rip - 1
                    ours, reason = True, "swbreak"
            if not ours:
                self._inject(vcpu, ex.exception)
                return
            self.m.stop_all_from(vcpu)
            if state != "running":
                self.stats.dropped += 1
                return
            self._state = "stopping"
            gen = self._gen
        values = self._read_snapshot(vcpu)       # held after the exit: no ioctl
        self.notify(StopRecord(gen, vid + 1, SIGTRAP, reason, address, values, t_exit,
                               self._ioctl_totals()))

    def _inject(self, vcpu: "Vcpu", exception: int) -> None:
        """The guest's own #DB/#BP: hand it back to the guest on the next entry."""
        control, drs = self._applied.get(vcpu.id, (0, _ZERO_DRS))
        flag = ks.KVM_GUESTDBG_INJECT_DB if exception == 1 else ks.KVM_GUESTDBG_INJECT_BP
        try:
            vcpu.set_guest_debug(control | flag, list(drs))
            self.stats.injected += 1
        except KvmError:
            pass  # EBUSY: an exception is already pending; it is delivered first

    # --- Target: threads and registers ---------------------------------------------------
    def threads(self) -> list[int]:
        return [v.id + 1 for v in self.m.vcpus]

    def thread_extra_info(self, tid: int) -> str:
        v = self._vcpu(tid)
        snap = self._snapshot(tid)
        mode = Paging(snap["cr0"], snap["cr3"], snap["cr4"], snap["efer"]).mode
        t = self.m.thread_of(v)
        extra = " halted" if t is not None and t.state is RunState.STOPPED else ""
        return f"vCPU {v.id} rip={snap['rip']:#x} {mode}{extra}"

    def register_layout(self, tid: int) -> RegisterLayout:
        v = self._vcpu(tid)
        cr0, efer, cs_attr = self._call(
            v, lambda: (v.regs.cr0, v.regs.efer, v.regs["cs.attr"]))
        if not cr0 & 1:
            return I8086_LAYOUT
        if efer & (1 << 10) and cs_attr & (1 << 13):
            return x86_64_layout(*self._vector)
        return I386_LAYOUT

    def _prefix(self, layout: RegisterLayout) -> int:
        n = self._cheap_prefix.get(layout.arch)
        if n is None:
            n = 0
            for reg in layout.registers:
                src = CATALOG.by_name.get(reg.source) if reg.source else None
                if reg.view or src is None or src.group not in _FREE_GROUPS:
                    break
                n += 1
            self._cheap_prefix[layout.arch] = n = max(n, 1)
        return n

    def read_registers(self, tid: int, layout: RegisterLayout) -> list[bytes | None]:
        """The leading registers that come free with every exit (general,
        rip, eflags, segments); gdb reads x87/SSE/MSR-backed ones with 'p'."""
        v = self._vcpu(tid)
        regs = layout.registers[: self._prefix(layout)]
        get = v.regs.__getitem__
        return self._call(v, lambda: [register_bytes(r, get) for r in regs])

    def read_register(self, tid: int, reg: GdbRegister) -> bytes | None:
        v = self._vcpu(tid)

        def read() -> bytes | None:
            try:
                return register_bytes(reg, v.regs.__getitem__)
            except KeyError:            # an MSR this host does not save
                return None
        return self._call(v, read)

    def write_register(self, tid: int, reg: GdbRegister, data: bytes) -> None:
        v = self._vcpu(tid)

        def write() -> None:
            for name, value in register_updates(reg, data, v.regs.__getitem__).items():
                v.regs[name] = value
        self._call(v, write)
        self._forget({v.id})

    # --- memory --------------------------------------------------------------------------
    def _phys_reader(self) -> Callable[[int, int], int]:
        mem = self.m.memory
        return lambda gpa, n: int.from_bytes(mem.read(gpa, n), "little")

    def phys_reader(self) -> Callable[[int, int], int]:
        """Reads n bytes of guest RAM at a physical address as an int (page walks)."""
        return self._phys_reader()

    def _check_ram(self, pieces: list[tuple[int, int]]) -> None:
        """Refuse the whole access unless every piece is guest RAM (no partial writes)."""
        for gpa, n in pieces:
            try:
                self.m.memory.read(gpa, n)
            except GuestMemoryError:
                raise TargetError(errno.EFAULT, f"guest-physical {gpa:#x}+{n:#x} is outside "
                                                f"guest RAM") from None

    def read_physical(self, addr: int, length: int) -> bytes:
        """Guest-physical memory (Qqemu.PhyMemMode, monitor xp); gdb's int3s hidden."""
        self._check_ram([(addr, length)])
        out = bytearray(self.m.memory.read(addr, length))
        for gpa, orig in self.sw.values():
            if addr <= gpa < addr + length:
                out[gpa - addr] = orig
        return bytes(out)

    def write_physical(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory, all of it or (outside RAM) none of it."""
        self._check_ram([(addr, len(data))])
        buf = bytearray(data)
        for vaddr, (gpa, _) in list(self.sw.items()):   # keep our int3, update what it hides
            if addr <= gpa < addr + len(data):
                self.sw[vaddr] = (gpa, buf[gpa - addr])
                buf[gpa - addr] = 0xCC
        self.m.memory.write(addr, bytes(buf))
        self._tlb.clear()

    def _pieces(self, tid: int, addr: int, length: int) -> list[tuple[int, int]]:
        if 0 < (addr & 0xFFF) + length <= 0x1000 and 0 <= addr < 1 << 64:
            # gdb reads the same few pages many times per stop: cache the walk
            # (dropped whenever the vCPU runs or its registers are written).
            tlb = self._tlb.setdefault(tid - 1, {})
            page = addr >> 12
            base = tlb.get(page)
            if base is None:
                try:
                    (gpa, _), = ranges(self._phys_reader(), self._paging(tid), page << 12, 1)
                except PageFault as e:
                    raise TargetError(errno.EFAULT, str(e)) from None
                base = tlb[page] = gpa
            return [(base | (addr & 0xFFF), length)]
        try:
            return list(ranges(self._phys_reader(), self._paging(tid), addr, length))
        except PageFault as e:
            raise TargetError(errno.EFAULT, str(e)) from None

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        out = bytearray()
        try:
            for gpa, n in self._pieces(tid, addr, length):
                out += self.m.memory.read(gpa, n)
        except GuestMemoryError as e:
            raise TargetError(errno.EFAULT, str(e)) from None
        for bp, (_, orig) in self.sw.items():    # gdb must not see our int3s
            if addr <= bp < addr + length:
                out[bp - addr] = orig
        return bytes(out)

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        pieces = self._pieces(tid, addr, len(data))
        self._check_ram(pieces)          # all pages translated and in RAM before any write
        buf = bytearray(data)
        for bp, (gpa, _) in list(self.sw.items()):  # keep our int3, update what it hides
            if addr <= bp < addr + len(data):
                self.sw[bp] = (gpa, buf[bp - addr])
                buf[bp - addr] = 0xCC
        off = 0
        try:
            for gpa, n in pieces:
                self.m.memory.write(gpa, bytes(buf[off:off + n]))
                off += n
        except GuestMemoryError as e:
            raise TargetError(errno.EFAULT, str(e)) from None
        self._tlb.clear()       # the write may have changed page tables

    # --- breakpoints ---------------------------------------------------------------------
    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        if kind == BP_SOFTWARE and self.caps.sw_breakpoints:
            self._insert_sw(addr)
            return
        if kind in (BP_SOFTWARE, BP_HARDWARE):
            if not self.caps.hw_breakpoints:
                raise TargetError(errno.ENOSYS, "hardware breakpoints do not work here")
            rw, size = _RW_EXEC, 1
        elif kind == BP_READ_WATCH:
            raise Unsupported()             # x86 has no read-only data breakpoint
        else:
            if not self.caps.watchpoints:
                # gdb 13 prints only "Could not insert hardware watchpoint" whatever we
                # reply (module docstring of .core): the VMM's console says why.
                why = (f"data breakpoints do not fire on this host ({self.caps.watch_detail}); "
                       "'set can-use-hw-watchpoints 0' in gdb gives software watchpoints")
                self.say(f"watchpoint at {addr:#x} refused: {why}")
                raise TargetError(errno.EOPNOTSUPP, why)
            if length not in _LEN_BITS or addr % length:
                raise TargetError(errno.EINVAL, "watch 1, 2, 4 or 8 aligned bytes")
            rw, size = (_RW_WRITE if kind == BP_WRITE_WATCH else _RW_ACCESS), length
        for slot in self.slots:
            if slot is not None and (slot.addr, slot.rw, slot.length, slot.origin) == \
                    (addr, rw, size, kind):
                slot.refs += 1
                return
        for i, slot in enumerate(self.slots):
            if slot is None:
                self.slots[i] = Slot(addr, rw, size, kind)
                return
        why = f"all {NSLOTS} debug registers are in use"
        if kind == BP_SOFTWARE:
            # gdb 13 shows "Cannot access memory" for any refused Z0: say it here.
            self.say(f"breakpoint at {addr:#x} refused: {why} ('monitor info bp' lists them)")
        raise TargetError(errno.ENOSPC, why)

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        if kind == BP_SOFTWARE and self.caps.sw_breakpoints:
            self._remove_sw(addr)
            return
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.addr == addr and slot.origin == kind:
                slot.refs -= 1
                if slot.refs <= 0:
                    self.slots[i] = None
                return

    def _insert_sw(self, addr: int) -> None:
        if addr in self.sw:
            return
        tid = self.current_thread()
        (gpa, _), = self._pieces(tid, addr, 1)
        try:
            orig = self.m.memory.read(gpa, 1)[0]
            self.m.memory.write(gpa, b"\xcc")
        except GuestMemoryError as e:
            raise TargetError(errno.EFAULT, str(e)) from None
        self.sw[addr] = (gpa, orig)

    def _remove_sw(self, addr: int) -> None:
        entry = self.sw.pop(addr, None)
        if entry is not None:
            gpa, orig = entry
            self.m.memory.write(gpa, bytes([orig]))

    def _debug_state(self, step: bool) -> tuple[int, tuple[int, ...]]:
        control = 0
        drs: tuple[int, ...] = _ZERO_DRS
        if any(self.slots):
            control |= ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP
            dr7 = DR7_FIXED | DR7_GE
            addrs = [0, 0, 0, 0]
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    addrs[i] = slot.addr
                    dr7 |= (2 << (2 * i)) | (slot.rw << (16 + 4 * i)) \
                        | (_LEN_BITS[slot.length] << (18 + 4 * i))
            drs = (*addrs, 0, 0, 0, dr7)
        if self.sw:
            control |= ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_SW_BP
        if step:
            control |= ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_SINGLESTEP
            if self.caps.blockirq:
                control |= ks.KVM_GUESTDBG_BLOCKIRQ
        return control, drs

    def _apply(self, v: "Vcpu", want: tuple[int, tuple[int, ...]]) -> None:
        """Give ``v`` the guest-debug state ``want`` (on its thread, only if it differs)."""
        if self._applied.get(v.id, (0, _ZERO_DRS)) == want:
            return

        def apply() -> None:
            v.set_guest_debug(want[0], list(want[1]))
            self._applied[v.id] = want
            self.stats.guest_debug_sets += 1
        self._call(v, apply)

    # --- resume, interrupt, detach, kill -------------------------------------------------
    def resume(self, actions: dict[int, Action], default: Action | None) -> None:
        plan = {tid - 1: letter for tid, (letter, _sig) in actions.items()}
        stepping = {vid for vid, letter in plan.items() if letter == "s"}
        if default is not None and not (stepping and self.step_mode == "alone"):
            for v in self.m.vcpus:
                plan.setdefault(v.id, default[0])
                if default[0] == "s":
                    stepping.add(v.id)
        if not plan:                       # nothing named: run everything
            plan = {v.id: "c" for v in self.m.vcpus}
        # Signals cannot be delivered to a VM: they are ignored.
        for vid in plan:
            self._apply(self.m.vcpus[vid], self._debug_state(vid in stepping))
        with self._lock:
            self._state = "running"
            self._gen += 1
        self._resumed_since_attach = True
        self._ran = set(plan)
        self._forget(self._ran)
        self.m.resume(plan)

    def interrupt(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._state = "stopping"
            gen = self._gen
        self.notify(StopRecord(gen, self.current_thread(), SIGINT, t_exit=time.perf_counter_ns(),
                               ioctls_at_exit=self._ioctl_totals()))

    def detach(self) -> None:
        """Remove every breakpoint, clear guest debug everywhere, let the VM run."""
        with self._lock:
            self._state = "detached"
            self._gen += 1
        self._pause()                # a consistent point: no stop half-way through
        self._clear_debug()
        self._ran = {v.id for v in self.m.vcpus}
        self.m.resume_all()

    def _clear_debug(self) -> None:
        for addr in list(self.sw):
            self._remove_sw(addr)
        self.slots = [None] * NSLOTS
        for v in self.m.vcpus:
            try:
                self._apply(v, (0, _ZERO_DRS))
            except TargetError:
                pass
        self._forget()

    def vanish(self) -> None:
        """The client went away without D or k: drop its breakpoints, leave the run state.

        Running stays running. Stopped stays stopped ("held" for the next gdb),
        unless the only stop was the one attaching made to a guest that was
        running and this client never resumed it: that stop is undone."""
        with self._lock:
            state = self._state
            self._gen += 1
            if state in ("running", "stopping") and self._resumed_since_attach:
                self._state = "detached"
            elif self._ran_before_attach and not self._resumed_since_attach:
                self._state = "detached"
            else:
                self._state = "held"
        self._pause()
        self._clear_debug()
        if self._state == "detached":
            self._ran = {v.id for v in self.m.vcpus}
            self.m.resume_all()

    def system_reset(self) -> None:
        """Every vCPU to its power-on state, the image reloaded (monitor system_reset)."""
        self.m.reset()
        self._forget()

    def kill(self) -> None:
        with self._lock:
            self._state = "detached"
            self._gen += 1
        self.m.stop(KILL_STATUS)

    # --- monitor ------------------------------------------------------------------------
    def monitor(self, command: str) -> str:
        """One ``monitor`` line: the table in :mod:`.monitor` (errors name the problem)."""
        return run_monitor(self, command)

    # --- VM exit ------------------------------------------------------------------------
    def exit_reply_args(self, status: int) -> tuple[int, int | None]:
        """(status, signal) for the core's on_exit: X for a dying guest."""
        if status == EXIT_FATAL and self.m.fatal:
            return status, 11           # SIGSEGV
        if status == EXIT_WATCHDOG:
            return status, 14           # SIGALRM
        if status == KILL_STATUS:
            return status, 9
        return status, None
