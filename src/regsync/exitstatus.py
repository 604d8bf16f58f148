"""Process exit statuses: the guest's code and regsync's own, in two conventions.

A guest ends the VM by writing a code to the debug-exit port (isa-debug-exit,
0xf4). The process status must tell that code apart from regsync's own outcomes,
whatever the code is. Two conventions:

``regsync`` (default)
    0, 1 and 3..122: the guest's code itself (0 also when the guest powered off
    or every vCPU halted without writing one). 123: the guest wrote 2 or a code
    of 123 or more, values that would read as one of regsync's own statuses; the
    exact code is on stderr.

``qemu``
    QEMU's isa-debug-exit rule (hw/misc/debugexit.c debug_exit_write:
    ``exit((val << 1) | 1)``): a guest code c gives the odd status
    ((c << 1) | 1) & 0xff; 0 when the guest shut down without a code, as QEMU
    exits 0 then. Runner scripts written for QEMU read it unchanged.

regsync's own statuses are the same in both, and none is a status a guest code
can produce in either convention (all are even in the qemu convention, which is
why a fatal exit there is 126, not 125 = code 62). An internal error (a bug,
its traceback printed) is a fatal exit, never Python's default status 1:

    2    bad input: one ``regsync: error:`` line, nothing ran
    124  --timeout or the watchdog stopped the guest
    125  (126 in the qemu convention) fatal exit: triple fault, emulation failure,
         or an internal error in regsync (never 1, which is a guest's code)
    130  interrupted (SIGINT)
    137  (138 in the qemu convention) gdb's ``kill`` ended the guest
    141  (142 in the qemu convention) stdout closed early (SIGPIPE)

Killed by SIGKILL from outside, the process has no status of its own; shells print 137, which
in the qemu convention is also what QEMU itself gives for code 68 — a runner
that must tell them apart reads the wait status (a signal, not an exit).
"""

from __future__ import annotations

BAD_INPUT, TIMEOUT, FATAL, INTERRUPTED, KILLED, BROKEN_PIPE = 2, 124, 125, 130, 137, 141
QEMU_FATAL = 126
GUEST_OUT_OF_BAND = 123
CONVENTIONS = ("regsync", "qemu")
OWN = {BAD_INPUT, TIMEOUT, FATAL, INTERRUPTED, KILLED, BROKEN_PIPE}


def guest_status(code: int, convention: str = "regsync") -> int:
    """The process status for a guest's debug-exit code."""
    if convention == "qemu":
        return ((code << 1) | 1) & 0xFF
    if convention != "regsync":
        raise ValueError(f"exit-status convention {convention!r}: one of {', '.join(CONVENTIONS)}")
    code &= 0xFF
    return code if code <= 1 or 3 <= code < GUEST_OUT_OF_BAND else GUEST_OUT_OF_BAND


def own_status(status: int, convention: str = "regsync") -> int:
    """regsync's own outcome (BAD_INPUT, TIMEOUT, FATAL, INTERRUPTED) in a convention."""
    if status not in OWN:
        raise ValueError(f"{status} is not one of regsync's own statuses")
    # QEMU's guest statuses are odd: there regsync's odd ones move to the next even number.
    return status + 1 if convention == "qemu" and status & 1 else status


def process_status(machine_status: int | None, guest_code: int | None,
                   convention: str = "regsync") -> int:
    """Map a finished Machine (``exit_status``, ``guest_code``) to the process status."""
    if guest_code is not None:
        return guest_status(guest_code, convention)
    if machine_status in OWN:
        return own_status(machine_status, convention)
    return 0                      # powered off or halted without a code
