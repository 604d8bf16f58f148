"""COM1 as a 16550A (QEMU hw/char/serial.c is the model): divisor latch, scratch,
LSR, IER/IIR with the IRQ line, loopback. Pure: a fake vCPU, no KVM."""

from __future__ import annotations

import io

from regsync.devices.basic import SERIAL_PORT as COM1, Serial


class _Vcpu:
    id = 0
    regs = None


V = _Vcpu()


def _uart() -> tuple[Serial, io.StringIO, list[int]]:
    out = io.StringIO()
    levels: list[int] = []
    s = Serial(out)
    s.irq = levels.append
    return s, out, levels


def _w(s: Serial, reg: int, value: int) -> None:
    s.io_out(V, COM1 + reg, 1, value)


def _r(s: Serial, reg: int) -> int:
    return s.io_in(V, COM1 + reg, 1)


def test_divisor_latch_does_not_reach_the_output() -> None:
    s, out, _ = _uart()
    _w(s, 3, 0x80)            # DLAB
    _w(s, 0, 0x01)            # DLL: must not be transmitted
    _w(s, 1, 0x00)
    assert (_r(s, 0), _r(s, 1)) == (0x01, 0x00)
    _w(s, 3, 0x03)
    for ch in b"ok\n":
        _w(s, 0, ch)
    assert out.getvalue() == "ok\n"
    assert s.lines == ["ok"]


def test_reset_values_scratch_lsr_msr() -> None:
    s, _, _ = _uart()
    assert _r(s, 5) == 0x60                    # THRE | TEMT
    assert _r(s, 2) == 0x01                    # no interrupt pending
    assert _r(s, 4) == 0x08                    # MCR: OUT2 after reset (QEMU serial_reset)
    assert _r(s, 6) == 0xB0                    # DCD | DSR | CTS
    _w(s, 7, 0xA5)
    assert _r(s, 7) == 0xA5
    _w(s, 3, 0x80)
    assert (_r(s, 0), _r(s, 1)) == (0x0C, 0x00)   # 9600 baud after reset


def test_thr_empty_interrupt_raises_and_clears_the_line() -> None:
    s, _, levels = _uart()
    _w(s, 2, 0x07)                             # FIFO on
    _w(s, 1, 0x02)                             # IER: THR empty
    assert levels[-1] == 1
    assert _r(s, 2) == 0xC2                    # FIFO bits + THRI
    assert levels[-1] == 0                     # reading IIR acknowledged it
    assert _r(s, 2) == 0xC1
    _w(s, 0, ord("x"))                         # transmitted at once: THR empty again
    assert levels[-1] == 1
    n = len(levels)
    _w(s, 0, ord("y"))                         # line high: drops and rises (one edge per byte)
    assert levels[n:] == [0, 1]
    _w(s, 1, 0x00)
    assert levels[-1] == 0


def test_loopback_receives_instead_of_transmitting() -> None:
    s, out, levels = _uart()
    _w(s, 4, 0x10)                             # loopback
    _w(s, 1, 0x01)                             # IER: receive data
    _w(s, 0, ord("Q"))
    assert out.getvalue() == ""
    assert _r(s, 5) & 1 and levels[-1] == 1
    assert _r(s, 2) & 0x0F == 0x04
    assert _r(s, 0) == ord("Q")
    assert _r(s, 5) & 1 == 0 and levels[-1] == 0


def test_an_unfinished_line_is_drained() -> None:
    s, out, _ = _uart()
    for ch in b"done\nPASS":
        _w(s, 0, ch)
    assert out.getvalue() == "done\n"
    s.drain()
    assert out.getvalue() == "done\nPASS" and s.lines == ["done"] and s.text == "done\nPASS"
    s.drain()
    for ch in b" 2\n":
        _w(s, 0, ch)
    assert out.getvalue() == "done\nPASS 2\n" and s.lines == ["done", "PASS 2"]
