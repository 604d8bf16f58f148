"""Exit statuses: a guest's code can never read as one of regsync's own statuses,
in either convention, and the qemu convention is QEMU's (code << 1) | 1."""

from __future__ import annotations

import pytest

from regsync import exitstatus as es


@pytest.mark.parametrize("convention", es.CONVENTIONS)
def test_no_guest_code_collides_with_an_own_status(convention: str) -> None:
    own = {es.own_status(s, convention) for s in es.OWN}
    for code in range(256):
        assert es.guest_status(code, convention) not in own, code
        assert es.process_status(None, code, convention) == es.guest_status(code, convention)


def test_qemu_convention_is_qemus() -> None:
    assert [es.guest_status(c, "qemu") for c in (0, 1, 2, 62, 127, 128)] == [1, 3, 5, 125, 255, 1]
    assert es.process_status(es.FATAL, None, "qemu") == 126
    assert es.process_status(0, None, "qemu") == 0          # powered off: QEMU exits 0


def test_regsync_convention_keeps_ordinary_codes() -> None:
    assert [es.guest_status(c) for c in (0, 1, 3, 77, 122)] == [0, 1, 3, 77, 122]
    assert {es.guest_status(c) for c in (2, 123, 124, 125, 130, 255)} == {123}
    assert es.process_status(es.TIMEOUT, None) == 124
    assert es.process_status(124, 124) == 123               # the guest wrote 124: not a timeout
    with pytest.raises(ValueError):
        es.guest_status(0, "bochs")
