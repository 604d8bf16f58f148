"""Issue 12: Vcpu.serve(), the handler-table loop, keeps every rule of run() and the cache."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from regsync import Machine, WrongThreadError
from regsync.devices.basic import HYPERCALL_PORT
from regsync.guests import hypercall_checksum
from regsync.serving import uses

N = 3_000


def typed_handler(m: Machine) -> Callable[[Any], None]:
    regs = m.vcpus[0].regs

    def hypercall(ex: Any) -> None:
        assert ex.direction == "out" and ex.value == 1
        regs.rax = regs.rdi + regs.rsi
    return hypercall


def named_handler(m: Machine) -> Callable[..., int]:
    @uses("rdi", "rsi", writes="rax")
    def hypercall(ex: Any, rdi: int, rsi: int) -> int:
        assert ex.direction == "out" and ex.value == 1
        return rdi + rsi
    return hypercall


def serve_to_the_end(m: Machine, handler: Callable[..., Any], **kw: Any) -> int:
    """Serve hypercalls, dispatch everything else, until the guest's debug exit."""
    v = m.vcpus[0]
    calls = 0
    while m.exit_status is None:
        before = v.cache.exits
        ex = v.serve({HYPERCALL_PORT: handler}, **kw)
        calls += v.cache.exits - before - (ex is not None)
        if ex is not None:
            m.dispatch(v, ex)
    return calls


def run_to_the_end(m: Machine) -> int:
    """The typed run() loop of test_foundation: the reference."""
    v = m.vcpus[0]
    calls = 0
    while m.exit_status is None:
        ex = v.run()
        if ex.kind == "io" and ex.port == HYPERCALL_PORT:
            v.regs.rax = v.regs.rdi + v.regs.rsi
            calls += 1
        else:
            m.dispatch(v, ex)
    return calls


@pytest.mark.parametrize("form", [typed_handler, named_handler], ids=["regs", "uses"])
def test_serve_answers_every_hypercall_with_the_transfers_of_run(form: Any) -> None:
    """Each form gives the guest the right answers and moves exactly what the run()
    loop moves: the same ioctls, the same cache counters (REGS rides kvm_run)."""
    with Machine(smp=1) as m, Machine(smp=1) as ref:
        for x in (m, ref):
            x.load("hypercall", arg=N)
            x.vcpus[0].end_setup()
        calls = serve_to_the_end(m, form(m))
        assert calls == N == run_to_the_end(ref)
        assert m.exit_status == 0, m.serial.text
        assert f"checksum={hypercall_checksum(N):#018x}" in m.serial.text
        got, want = m.vcpus[0].stats, ref.vcpus[0].stats
        assert got == want
        if m.sync_regs:
            assert got["deferred_writes"]["REGS"] >= N      # every answer rode kvm_run
            assert "KVM_SET_REGS" not in got["ioctls"]


def test_limit_and_the_exits_serve_returns() -> None:
    with Machine(smp=1) as m:
        m.load("hypercall", arg=100)
        v = m.vcpus[0]
        hc = named_handler(m)
        while True:                                 # to the first hypercall
            ex = v.run()
            if ex.kind == "io" and ex.port == HYPERCALL_PORT:
                break
            m.dispatch(v, ex)
        exits0 = v.cache.exits
        assert v.serve({HYPERCALL_PORT: hc}, limit=0) is None and v.cache.exits == exits0
        v.regs.rax = v.regs.rdi + v.regs.rsi          # answer call 1 as after run()
        ex = v.serve({}, limit=5)                     # no handler: call 2 comes back
        assert ex is not None and ex.kind == "io" and ex.port == HYPERCALL_PORT
        assert v.cache.exits == exits0 + 1 and v.last_exit is ex
        v.regs.rax = v.regs.rdi + v.regs.rsi          # answer it as after run()
        assert v.serve({HYPERCALL_PORT: hc}, limit=7) is None     # calls 3..9
        assert v.cache.exits == exits0 + 8
        for bad in (-1, 2.5, "3"):
            with pytest.raises(ValueError, match="limit"):
                v.serve({HYPERCALL_PORT: hc}, limit=bad)   # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            v.serve({HYPERCALL_PORT: 42})                  # type: ignore[dict-item]
        calls = 9 + serve_to_the_end(m, hc)
        assert calls == 100 and m.exit_status == 0
        assert f"checksum={hypercall_checksum(100):#018x}" in m.serial.text


def test_serve_is_refused_off_the_owner_thread_and_when_closed() -> None:
    """Rule 9: once the machine's vCPU thread owns the vCPU, serve() from another
    thread is WrongThreadError before anything runs; a closed vCPU is refused."""
    m = Machine(smp=1)
    try:
        m.load("spin")
        m.start()
        v = m.vcpus[0]
        with pytest.raises(WrongThreadError):
            v.serve({HYPERCALL_PORT: named_handler(m)}, limit=1)
        m.stop()
    finally:
        m.close()
    with pytest.raises(ValueError, match="closed"):
        v.serve({HYPERCALL_PORT: named_handler(m)})


def _at_first_hypercall(m: Machine) -> None:
    v = m.vcpus[0]
    while True:
        ex = v.run()
        if ex.kind == "io" and ex.port == HYPERCALL_PORT:
            v.regs.rax = v.regs.rdi + v.regs.rsi
            return
        m.dispatch(v, ex)


def test_named_registers_errors_are_the_register_files() -> None:
    """A bad name, value or return is one clear error, as vcpu.regs gives; the edits
    made before it stay, and the vCPU goes on serving with nothing lost."""
    with Machine(smp=1) as m:
        m.load("hypercall", arg=50)
        v = m.vcpus[0]
        _at_first_hypercall(m)

        @uses("rdi", "rsx", writes="rax")
        def typo(ex: Any, rdi: int, rsx: int) -> int:
            return 0
        with pytest.raises(KeyError, match="no register named .rsx.; did you mean .*rsi"):
            v.serve({HYPERCALL_PORT: typo})

        def returning(value: Any, writes: Any = "rax") -> Callable[..., Any]:
            @uses("rdi", writes=writes)
            def h(ex: Any, rdi: int) -> Any:
                v.regs.r13 = 0x1234                 # an edit before the failure (r13: unused by the guest)
                return value
            return h
        cases: list[tuple[Any, Any, type[Exception], str]] = [
            # (a negative value is two's complement, as for regs.rax = -1: not an error)
            (1 << 64, "rax", ValueError, "rax: .* does not fit"),   # the cache's own errors
            ("7", "rax", TypeError, "rax: register values are ints"),
            (5, "lapic.icr", ValueError, "IPI"),               # refused as regs.lapic_icr = 5 is
            ((1, 2, 3), ("rax", "rcx"), ValueError, "tuple of 2"),
            (9, (), ValueError, "writes nothing"),
        ]
        for value, writes, err, text in cases:
            with pytest.raises(err, match=text):
                v.serve({HYPERCALL_PORT: returning(value, writes)})
            assert v.regs.r13 == 0x1234             # the edit before it is still there
            v.regs.rax = v.regs.rdi + v.regs.rsi    # answer the interrupted call by hand
        calls = serve_to_the_end(m, named_handler(m))
        assert m.exit_status == 0
        assert f"checksum={hypercall_checksum(50):#018x}" in m.serial.text, (calls, m.serial.text)


def test_named_reads_outside_held_groups_follow_the_cache_rules() -> None:
    """dr7 (DEBUGREGS, not handed back by the exit) is fetched once, then held until
    the next run drops it; mp_state (volatile) is fetched at every read; writes of
    a group that does not ride go by ioctl before the run."""
    with Machine(smp=1) as m:
        m.load("hypercall", arg=40)
        v = m.vcpus[0]
        _at_first_hypercall(m)
        seen: list[tuple[int, int]] = []

        @uses("dr7", "dr6")
        def debugregs(ex: Any, dr7: int, dr6: int) -> None:
            seen.append((dr7, dr6))
            v.regs.rax = v.regs.rdi + v.regs.rsi

        @uses("mp_state", writes="dr0")
        def volatile(ex: Any, mp_state: int) -> int:
            v.regs.rax = v.regs.rdi + v.regs.rsi
            return 0x1000 + len(seen)

        io0 = dict(v.stats["ioctls"])
        assert v.serve({HYPERCALL_PORT: debugregs}, limit=10) is None
        io1 = dict(v.stats["ioctls"])
        assert io1.get("KVM_GET_DEBUGREGS", 0) - io0.get("KVM_GET_DEBUGREGS", 0) == 10
        assert len(seen) == 10 and all(s == seen[0] for s in seen)
        assert v.serve({HYPERCALL_PORT: volatile}, limit=10) is None
        io2 = dict(v.stats["ioctls"])
        assert io2.get("KVM_GET_MP_STATE", 0) - io1.get("KVM_GET_MP_STATE", 0) == 10
        # Each dr0 write goes by ioctl before the next run: 9 so far, the 10th is dirty.
        assert io2.get("KVM_SET_DEBUGREGS", 0) - io1.get("KVM_SET_DEBUGREGS", 0) == 9
        assert v.cache.dirty_mask == v.cache.catalog.group_mask("DEBUGREGS", "REGS")   # + rax
        # MP_STATE's fetch invalidates REGS (INIT/SIPI may have changed them): the
        # handler's rdi/rsi reads fetch REGS again, every turn.
        assert io2.get("KVM_GET_REGS", 0) - io1.get("KVM_GET_REGS", 0) == 10
        v.flush()
        assert v.handle.get_debugregs().db[0] == 0x1000 + 10
        serve_to_the_end(m, named_handler(m))
        assert m.exit_status == 0
        assert f"checksum={hypercall_checksum(40):#018x}" in m.serial.text


@pytest.mark.parametrize("strategy", ["qemu", "eager"])
def test_serve_under_a_comparison_strategy_takes_run(strategy: str) -> None:
    """A strategy cache has its own write-back: every turn is a run() call, and the
    named handler writes through vcpu.regs (its write path). Same answers."""
    with Machine(smp=1, strategy=strategy) as m, Machine(smp=1, strategy=strategy) as ref:
        for x in (m, ref):
            x.load("hypercall", arg=200)
        calls = serve_to_the_end(m, named_handler(m))
        assert calls == 200 == run_to_the_end(ref) and m.exit_status == 0
        assert f"checksum={hypercall_checksum(200):#018x}" in m.serial.text
        assert m.vcpus[0].stats == ref.vcpus[0].stats       # the strategy's own write-back


def test_a_handler_that_synchronizes_or_runs_the_vcpu_itself() -> None:
    """Handlers may do anything the typed API allows between exits: a FULL
    synchronize (a fetch since the last run: that turn goes through run()), or
    running the vCPU themselves (serve notices the exit is no longer its own)."""
    with Machine(smp=1) as m:
        m.load("hypercall", arg=60)
        v = m.vcpus[0]
        regs = v.regs
        count = [0]

        def busy(ex: Any) -> None:
            count[0] += 1
            regs.rax = regs.rdi + regs.rsi
            if count[0] % 3 == 0:
                v.synchronize("FULL")
            if count[0] % 5 == 0 and count[0] < 50:  # answer the next hypercall here
                nxt = v.run()
                assert nxt.kind == "io" and nxt.port == HYPERCALL_PORT
                count[0] += 1
                regs.rax = regs.rdi + regs.rsi
        serve_to_the_end(m, busy)
        assert count[0] == 60 and m.exit_status == 0
        assert f"checksum={hypercall_checksum(60):#018x}" in m.serial.text


def _hello_handlers(v: Any, form: str, polls: list[int], chars: bytearray,
                    nested: bool = False) -> dict[int, Any]:
    """The hello guest's serial, answered so that every other LSR poll also gets
    rax = 0 written: the guest then sees al = 0 (if the edit lands after the IN's
    completion) and polls again. ``nested``: the THR handler runs the vCPU itself
    into the next poll and answers it there."""
    def lsr(ex: Any) -> None:
        polls[0] += 1
        ex.respond(0x20)
        if polls[0] % 2:
            v.regs.rax = 0

    @uses(writes="rax")
    def lsr_named(ex: Any) -> int | None:
        polls[0] += 1
        ex.respond(0x20)
        return 0 if polls[0] % 2 else None

    def thr(ex: Any) -> None:
        chars.extend(ex.data)
        if nested and len(chars) < 20:
            nxt = v.run()
            assert nxt.kind == "io" and nxt.port == 0x3FD and nxt.direction == "in"
            lsr(nxt)
    return {0x3FD: lsr if form == "regs" else lsr_named, 0x3F8: thr}


@pytest.mark.parametrize("form,nested", [("regs", False), ("uses", False), ("regs", True)])
def test_an_edit_at_an_in_exit_lands_after_its_completion(form: str, nested: bool) -> None:
    """api.rst: an IN completes only when userspace re-enters KVM_RUN, so an edit made
    at an IN exit is written after a completion run (immediate_exit), as run() does.
    serve() must take run()'s way for such a turn: exactly the KVM_RUNs and transfers
    of the run() loop, including when serve starts at such an exit and when a
    handler ran the vCPU into one itself. (This host applies a riding rax after
    the completion anyway, so only the counts can tell: upstream merges the IN's
    byte into the edited rax, and the guest would see 0x20 too early.)"""
    results = []
    for driver in ("run", "serve"):
        with Machine(smp=1) as m:
            m.load("hello")
            v = m.vcpus[0]
            polls, chars = [0], bytearray()
            handlers = _hello_handlers(v, form, polls, chars, nested)
            while True:                       # serve() starts at an edited IN exit
                ex = v.run()
                if ex.kind == "io" and ex.port == 0x3FD:
                    handlers[0x3FD](ex) if form == "regs" else _answer_named(v, ex, polls)
                    break
                m.dispatch(v, ex)
            while m.exit_status is None:
                if driver == "serve":
                    ex = v.serve(handlers)
                    assert ex is not None
                else:
                    ex = v.run()
                    h = handlers.get(ex.port) if ex.kind == "io" else None
                    if h is not None:
                        _call(h, v, ex, polls)
                        continue
                m.dispatch(v, ex)
            assert chars.decode() == "Hello from the regsync guest!\n"
            assert polls[0] == 2 * len(chars)
            results.append(dict(v.stats))
    assert results[0] == results[1]


def _answer_named(v: Any, ex: Any, polls: list[int]) -> None:
    polls[0] += 1
    ex.respond(0x20)
    if polls[0] % 2:
        v.regs.rax = 0


def _call(h: Any, v: Any, ex: Any, polls: list[int]) -> None:
    """Call a handler as serve() would, for the run() reference loop."""
    if hasattr(h, "__regsync_uses__"):
        out = h(ex)
        if out is not None:
            v.regs.rax = out
    else:
        h(ex)


def test_after_each_turn_only_what_the_exit_handed_back_is_held_and_edits_are_done() -> None:
    """After a served exit REGS is held again even if a handler dropped it (no GET_REGS
    for the next reads), and an answer KVM applied is no longer an edit: dropping
    REGS and reading rax gives the kernel's value, not the old answer laid on top."""
    with Machine(smp=1) as m:
        m.load("hypercall", arg=60)
        v = m.vcpus[0]
        regs = v.regs
        _at_first_hypercall(m)

        def answer_then_drop(ex: Any) -> None:
            regs.rax = regs.rdi + regs.rsi
            v.flush()                          # by ioctl now: nothing left dirty
            v.invalidate("REGS")               # and no longer held
        gets = v.stats["ioctls"].get("KVM_GET_REGS", 0)
        assert v.serve({HYPERCALL_PORT: answer_then_drop}, limit=20) is None
        assert v.stats["ioctls"].get("KVM_GET_REGS", 0) == gets     # every read was local

        assert v.serve({HYPERCALL_PORT: named_handler(m)}, limit=20) is None
        ex = v.serve({})                       # runs once: KVM applies the 20th answer
        assert ex is not None and ex.port == HYPERCALL_PORT
        v.invalidate("REGS")
        assert v.regs.rax == v.handle.get_regs().rax == 1      # eax = HC_ADD at the exit
        v.regs.rax = v.regs.rdi + v.regs.rsi
        serve_to_the_end(m, named_handler(m))
        assert f"checksum={hypercall_checksum(60):#018x}" in m.serial.text


def test_a_served_answer_is_done_once_kvm_applied_it() -> None:
    """The trace of the next run names only that run's edits: the answers serve()
    queued and KVM applied are no longer edits (the dirty record is cleared)."""
    from regsync.trace import SyncTrace
    with Machine(smp=1) as m:
        m.load("hypercall", arg=30)
        v = m.vcpus[0]
        _at_first_hypercall(m)
        assert v.serve({HYPERCALL_PORT: named_handler(m)}, limit=10) is None
        ex = v.serve({})                      # applies the 10th answer, returns call 12
        assert ex is not None
        tr = SyncTrace()
        tr.attach(v)
        v.regs.r13 = 7                        # (call 12 unanswered: the guest stops after)
        v.run()
        tr.detach()
        rides = [r for r in tr.records if r["ioctl"] == "kvm_run"]
        assert [(r["group"], r["registers"]) for r in rides] == [("REGS", ["r13"])]


def test_a_negative_named_write_is_twos_complement_as_regs_makes_it() -> None:
    """-1 returned for rax is 2**64-1, as `regs.rax = -1` stores it: a FULL
    synchronize right after (MP_STATE's fetch re-reads REGS to check the edits)
    reports no contradiction, and the kernel gets 2**64-1."""
    import warnings
    with Machine(smp=1) as m:
        m.load("hypercall", arg=30)
        v = m.vcpus[0]
        _at_first_hypercall(m)

        @uses(writes="r13")
        def minus_one(ex: Any) -> int:
            v.regs.rax = v.regs.rdi + v.regs.rsi
            return -1
        assert v.serve({HYPERCALL_PORT: minus_one}, limit=1) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            v.synchronize("FULL")
        assert v.stats["contradicted"] == []
        assert v.regs.r13 == (1 << 64) - 1
        v.flush()
        assert v.handle.get_regs().r13 == (1 << 64) - 1


def test_serve_on_a_paused_machines_vcpu_runs_nothing_off_its_thread() -> None:
    """The owner check comes before the first turn: with the vCPU thread parked
    (paused), serve() from this thread raises and issues no KVM_RUN."""
    m = Machine(smp=1)
    try:
        m.load("hypercall", arg=10)
        v = m.vcpus[0]
        _at_first_hypercall(m)            # an answer queued: the first turn would be steady
        m.start(paused=True)
        runs = v.stats["ioctls"].get("KVM_RUN", 0)
        with pytest.raises(WrongThreadError):
            v.serve({HYPERCALL_PORT: named_handler(m)})
        assert v.stats["ioctls"].get("KVM_RUN", 0) == runs
    finally:
        m.close()


@pytest.mark.parametrize("reads", [("rdi", "cr0"), ("rdi", "nmi.pending"),
                                   ("nmi.masked", "nmi.pending")])
def test_named_reads_of_two_groups_and_of_volatile_registers_take_the_rules_path(
        reads: tuple[str, str]) -> None:
    """rdi (REGS) with cr0 (SREGS): each from its own group's copy. nmi.pending
    (EVENTS: handed back by every exit, but volatile) is fetched at every read."""
    with Machine(smp=1) as m:
        m.load("hypercall", arg=40)
        v = m.vcpus[0]
        _at_first_hypercall(m)
        seen: list[tuple[int, int]] = []

        @uses(*reads, writes="rax")
        def mixed(ex: Any, first: int, other: int) -> int:
            seen.append((first, other))
            return v.regs.rdi + v.regs.rsi
        gets = v.stats["ioctls"].get("KVM_GET_VCPU_EVENTS", 0)
        assert v.serve({HYPERCALL_PORT: mixed}, limit=10) is None
        assert [s[0] for s in seen] == (list(range(2, 12)) if reads[0] == "rdi" else [0] * 10)
        want = v.handle.get_sregs().cr0 if reads[1] == "cr0" else 0
        assert all(s[1] == want for s in seen)
        fetched = v.stats["ioctls"].get("KVM_GET_VCPU_EVENTS", 0) - gets
        assert fetched == (10 if reads[1] == "nmi.pending" else 0)   # one per turn
        serve_to_the_end(m, named_handler(m))
        assert f"checksum={hypercall_checksum(40):#018x}" in m.serial.text
