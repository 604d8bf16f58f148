"""Range scans the stub runs for gdb: qCRC (compare-sections) and qSearch:memory (find).

Both read the target through a ``read(addr, length) -> bytes`` callable (virtual
or physical, as the connection's memory mode says) in chunks, so a scan of a
kernel image never holds more than a chunk.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["SCAN_CHUNK", "SCAN_LIMIT", "crc32_gdb", "crc_of", "search"]

#: Bytes read per step of a scan.
SCAN_CHUNK = 0x10000
#: Largest range a scan accepts (a kernel image fits; more is a typo).
SCAN_LIMIT = 1 << 30

Reader = Callable[[int, int], bytes]


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        table.append(c & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc32_gdb(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The CRC qCRC answers: gdb's xcrc32 (libiberty/crc32.c, called by
    gdb/remote.c compare_sections_command): polynomial 0x04c11db7, MSB first,
    no reflection, no final xor; start from 0xffffffff."""
    table = _CRC_TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


def crc_of(read: Reader, addr: int, length: int) -> int:
    """crc32_gdb of ``length`` bytes at ``addr``."""
    crc = 0xFFFFFFFF
    for off in range(0, length, SCAN_CHUNK):
        crc = crc32_gdb(read(addr + off, min(SCAN_CHUNK, length - off)), crc)
    return crc


def search(read: Reader, addr: int, length: int, pattern: bytes) -> int | None:
    """The first address in [addr, addr + length) where ``pattern`` starts, or None.
    Chunks overlap by len(pattern) - 1 bytes so a match across a boundary is found."""
    carry = b""
    for off in range(0, length, SCAN_CHUNK):
        window = carry + read(addr + off, min(SCAN_CHUNK, length - off))
        hit = window.find(pattern)
        if hit >= 0:
            return addr + off - len(carry) + hit
        carry = window[-(len(pattern) - 1):] if len(pattern) > 1 else b""
    return None
