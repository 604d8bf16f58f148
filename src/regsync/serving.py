"""``Vcpu.serve()``: answer a hot port in a loop inside regsync.

``vcpu.serve({port: handler})`` runs the guest and hands each port I/O exit of a
listed port to its handler, until an exit no handler takes (returned, to be
handled as a ``run()`` result) or a limit. A handler is either

* any ``fn(exit)``, reading and writing registers through ``vcpu.regs``; or
* a function that names its registers up front::

      @uses("rdi", "rsi", writes="rax")
      def hypercall(ex, rdi, rsi):
          return rdi + rsi          # written to rax (None: write nothing)

  It gets the values it names as arguments, after the exit, and returns what to
  write (a tuple when ``writes`` names several registers).

Why the second form: on CPython 3.11 every ``regs.x`` is a call from C back into
Python (a descriptor's ``__get__``, the register file's ``__setattr__``), about
2,500 machine instructions each (cachegrind), where a Python-to-Python call costs
about 600 and a ctypes field read about 150. A hypercall reads two registers and
writes one: the attribute syntax alone costs more than a hand-written loop's whole
exit. Named registers are read straight from the held local copy and written with
one dirty mark, in the loop's own frame (benchmarks/hot_path.py measures both).

The cache's rules are the typed API's, and run() is the reference for each turn:

* Reads: from the local copy only while the group is held and the register is
  not volatile (regfile's fast path); otherwise ``getattr(vcpu.regs, name)``, a
  fetch with every rule. Writes: into the local copy, marked dirty, as
  ``regs.rax = v`` does (RegisterFileBase.__setattr__'s inlined write); anything
  that path does not take (a refused register, an alias, a value out of range,
  a strategy cache) is ``setattr(vcpu.regs, name, value)``, errors included.
* A turn whose state is the steady state of a hypercall loop -- nothing fetched
  since the last run, no exit pending, only riding groups dirty, no IN or MMIO
  read waiting for completion -- queues, runs and takes the exit back with
  run()'s own inlined code (cache.flush()'s no-syscall case, cache.after_run()'s
  common case); any other turn is a run() call.
* The owner thread is checked once: the loop and its handlers run on it. A
  handler that raises stops the loop with its edits dirty, as after run().
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from . import exits
from .kvm import KvmError
from .regdefs import Register

if TYPE_CHECKING:
    from .vcpu import Vcpu

F = TypeVar("F", bound=Callable[..., Any])

_USES = "__regsync_uses__"
# A bound handler: (a turn taking the exit, or None) and (the fast lane, or None).
# The fast lane is a named-register handler of the usual shape run in the loop's
# own frame: (fn, read group, its bit, how many reads, get0, get1, get2,
#             written register, its group, its bit, its setter, its mask, its dirty
#             dict, the generic turn for when the lane does not apply).
Lane = tuple[Any, ...]
Bound = tuple[Callable[[exits.IoExit], object] | None, Lane | None]


def uses(*reads: str, writes: str | Sequence[str] = ()) -> Callable[[F], F]:
    """Mark a serve() handler as taking the registers ``reads`` as arguments (after
    the exit) and returning the values of ``writes`` (one value, or a tuple)."""
    names = (writes,) if isinstance(writes, str) else tuple(writes)

    def mark(fn: F) -> F:
        setattr(fn, _USES, (tuple(reads), names))
        return fn
    return mark


# --- the loop ---------------------------------------------------------------------------

def serve(vcpu: Vcpu, handlers: Mapping[int, Callable[..., Any]],
          limit: int | None = None) -> exits.AnyExit | None:
    """See the module docstring and Vcpu.serve()."""
    vcpu.cache._check_thread()
    if vcpu._run_view is None:
        raise ValueError(f"KVM_RUN: vCPU {vcpu.id} is closed")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"serve(): limit must be a count of exits >= 0, not {limit!r}")
    bound = {port: bind(h, vcpu) for port, h in handlers.items()}
    left = -1 if limit is None else limit
    batch = 1
    while left:
        # Turns run in batches: CPython 3.11 specializes a function's bytecode after
        # a few calls of it, never inside one long-running call.
        n = batch if left < 0 else min(left, batch)
        ex, done = _turns(vcpu, bound, n)
        if ex is not None:
            return ex
        left -= done
        batch = min(batch * 2, 512)
    return None


def _turns(vcpu: Vcpu, bound: dict[int, Bound], n: int) -> tuple[exits.AnyExit | None, int]:
    """Up to n turns: (the exit no handler took, or None; the turns done)."""
    from .vcpu import _DIRTY_REGS_AT, _EXIT_IO, _EXIT_REASON_AT, _IO_AT, _IO_WORD, _unpack_io

    cache, view, transport = vcpu.cache, vcpu._run_view, vcpu.transport
    if view is None:
        raise ValueError(f"KVM_RUN: vCPU {vcpu.id} is closed")
    io_exits, fast_mask, flags_for = vcpu._io_exits, vcpu._fast_defer_mask, vcpu._dirty_flags
    sync_mask, steady = vcpu._sync_mask, vcpu._plain_cache
    tally, dirty_of_bit, locals_ = cache._deferred_tally, cache._dirty_of_bit, cache.locals
    nobody: Bound = (None, None)
    words = vcpu._run_words
    known: dict[int, tuple[int, exits.IoExit, Bound, bool]] = {}
    # Does the exit on the page complete on entry (an IN, an MMIO read)? Known from
    # its decode; a handler that ran the vCPU itself (last_exit is no longer ours)
    # sends the turn through run(), which looks again.
    ex: Any = vcpu.last_exit
    completes = vcpu._completion_pending()
    for done in range(n):
        dirty = cache.dirty_mask
        if steady and vcpu.last_exit is ex and vcpu._pending_exit is None \
                and not cache._fetched_since_run \
                and not dirty & ~(fast_mask & cache.held) and not (dirty and completes):
            if dirty:                                     # as in Vcpu.run()
                view[_DIRTY_REGS_AT] |= flags_for[dirty]
                transport.deferred |= dirty
                cache.in_flight |= dirty
                cache.dirty_mask = 0
            try:
                rc = vcpu._kvm_run()
            except KvmError as e:
                if e.errno == errno.EINVAL and transport.deferred:
                    cache.run_failed()
                cache.take_back_deferred()
                raise
            if rc < 0 or view[_DIRTY_REGS_AT] or cache.dirty_mask:
                cache.after_run(transport.unconsumed(cache.in_flight)
                                if view[_DIRTY_REGS_AT] else 0)
                if rc < 0:
                    vcpu._run_page.immediate_exit = 0
                    vcpu.last_exit = exits.INTERRUPTED
                    return exits.INTERRUPTED, done
            else:                                         # as in Vcpu.run()
                transport.deferred = 0
                cache.held = sync_mask
                cache.exits += 1
                flight = cache.in_flight
                if flight:
                    tally[flight] += 1
                    one = dirty_of_bit.get(flight)
                    if one is not None:
                        one.clear()
                    else:
                        cache.applied(flight)
                    cache.in_flight = 0
            if view[_EXIT_REASON_AT] != _EXIT_IO:
                ex = exits.decode(vcpu._run_page, vcpu._run_addr, view)
                vcpu.last_exit = ex
                return ex, done
            # The exit's I/O fields are two words of the page: direction, size, port
            # and count, then data_offset. The first picks what this batch decoded.
            fields = words[_IO_WORD]
            seen = known.get(fields)
            if seen is None or words[_IO_WORD + 1] != seen[0]:  # not seen in this batch
                ex = io_exits.get(_unpack_io(view, _IO_AT)) or vcpu._new_io_exit(view)
                seen = known[fields] = (words[_IO_WORD + 1], ex, bound.get(ex[0], nobody),
                                        ex[1] == "in")
            _, ex, (turn, lane), completes = seen
            vcpu.last_exit = ex
        else:
            ex = vcpu.run()
            if type(ex) is not exits.IoExit:
                return ex, done
            turn, lane = bound.get(ex[0], nobody)
            completes = vcpu._completion_pending()
        if lane is None:
            if turn is None:
                return ex, done
            turn(ex)
            continue
        # The fast lane: a named-register handler, in this frame (see _lane()).
        fn, rgroup, rbit, nreads, get0, get1, get2, wreg, wgroup, wbit, set_, wmask, wdirty, \
            generic = lane
        if not cache.held & rbit:
            generic(ex)
            continue
        local = locals_[rgroup]
        if nreads == 2:
            out = fn(ex, get0(local), get1(local))
        elif nreads == 1:
            out = fn(ex, get0(local))
        elif nreads == 0:
            out = fn(ex)
        else:
            out = fn(ex, get0(local), get1(local), get2(local))
        if out is None:
            continue
        if wreg is not None and type(out) is int and 0 <= out <= wmask:
            set_(locals_[wgroup], out)                 # RegisterFileBase.__setattr__'s write
            wdirty[wreg] = out
            cache.dirty_mask |= wbit
        else:
            _writer(fn, vcpu)(out)
    return None, n


# --- binding handlers --------------------------------------------------------------------

def bind(handler: Callable[..., Any], vcpu: Vcpu) -> Bound:
    """What serve() runs for ``handler`` on ``vcpu`` (see Bound)."""
    spec = getattr(handler, _USES, None)
    if spec is None:
        if not callable(handler):
            raise TypeError(f"serve(): a handler must be callable, not {handler!r}")
        return handler, None
    reads, writes = spec
    regs = vcpu.regs
    for n in (*reads, *writes):
        regs._lookup(n)                                   # unknown names: KeyError, suggestions
    read, write = _reader(handler, vcpu), _writer(handler, vcpu)

    def generic(ex: exits.IoExit) -> None:
        vals = read()
        write(handler(ex, *vals))
    return generic, _lane(handler, vcpu, generic)


def _lane(fn: Callable[..., Any], vcpu: Vcpu, generic: Callable[[exits.IoExit], None]
          ) -> Lane | None:
    """The fast lane's tuple for fn, when its shape allows: at most three reads, all
    non-volatile registers of one group, and at most one write, of a plain register
    of a cache whose writes are the plain ones. None otherwise."""
    reads, writes = getattr(fn, _USES)
    regs, cache = vcpu.regs, vcpu.cache
    cls = type(regs)
    rentries = [regs._lookup(n) for n in reads]
    if len(reads) > 3 or len(writes) > 1 or not cache.plain_writes \
            or not all(isinstance(e, Register) and not e.volatile for e in rentries) \
            or len({e.group for e in rentries}) > 1:
        return None
    rgroup = rentries[0].group if rentries else "REGS"
    getters = [cls._getters[e] for e in rentries] + [None] * (3 - len(rentries))
    wreg = wgroup = set_ = wdirty = None
    wbit = wmask = 0
    if writes:
        attr = cls._writers[writes[0].replace(".", "_")]
        if type(attr).__name__ != "_RegisterAttr":
            return None                                   # refused, intent, alias: generic
        wreg, wgroup, set_ = attr.reg, attr.reg.group, attr.set
        wbit, wmask, wdirty = attr.bit, attr.reg.mask, cache.dirty[wgroup]
    rbit = cache.catalog.group_by_name[rgroup].bit if rentries else -1
    return (fn, rgroup, rbit, len(rentries), *getters, wreg, wgroup, wbit, set_, wmask,
            wdirty, generic)


def _reader(fn: Callable[..., Any], vcpu: Vcpu) -> Callable[[], tuple[int, ...]]:
    """The values fn names, read as ``getattr(vcpu.regs, name)`` (every rule)."""
    regs = vcpu.regs
    names = [n.replace(".", "_") for n in getattr(fn, _USES)[0]]

    def read() -> tuple[int, ...]:
        return tuple(getattr(regs, n) for n in names)
    return read


def _writer(fn: Callable[..., Any], vcpu: Vcpu) -> Callable[[Any], None]:
    """Write fn's return value to the registers it names (None: nothing)."""
    regs = vcpu.regs
    writes = getattr(fn, _USES)[1]
    names = [n.replace(".", "_") for n in writes]

    def write(out: Any) -> None:
        if out is None:
            return
        if len(names) == 1:
            out = (out,)
        elif not names or not isinstance(out, tuple) or len(out) != len(names):
            raise ValueError(f"serve(): {getattr(fn, '__qualname__', fn)} returned {out!r}; "
                             f"it writes {', '.join(writes) or 'nothing'}: return "
                             + ("None" if not names else "a value" if len(names) == 1
                                else f"a tuple of {len(names)} values or None"))
        for n, value in zip(names, out):
            setattr(regs, n, value)
    return write


__all__ = ["uses", "serve", "bind"]
