"""Shared helpers for the ATA device tests (no tests here).

MemDisk is a sparse in-memory stand-in for vdisk.Disk with fault injection: sectors that fail to
read or write, a failing flush, and a count of flushes and discards.
"""
from __future__ import annotations

import errno

from vdisk.errors import RangeError, ReadOnlyError, VDiskError

SECTOR = 512


def pattern(lba: int, n: int = 1) -> bytes:
    """Deterministic content of sectors never written: each sector names its own LBA."""
    out = bytearray()
    for s in range(lba, lba + n):
        tag = s.to_bytes(8, "little")
        out += (tag + bytes([s & 0xFF]) * 8) * (SECTOR // 16)
    return bytes(out)


class MemDisk:
    """A sparse in-memory disk with the Disk API subset AtaDisk uses."""

    def __init__(self, sectors: int, *, read_only: bool = False, patterned: bool = True, geometry=None,
                 uuid=None, path=None):
        self.size = sectors * SECTOR
        self.read_only = read_only
        self.patterned = patterned
        self.geometry = geometry
        self.uuid = uuid
        if path is not None:
            self.path = path
        self.data: dict[int, bytes] = {}
        self.bad_read: set[int] = set()
        self.bad_write: set[int] = set()
        self.fail_flush = False
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def _sector(self, s: int) -> bytes:
        if s in self.data:
            return self.data[s]
        return pattern(s) if self.patterned else bytes(SECTOR)

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise RangeError("out of range")
        first, last = offset // SECTOR, (offset + length - 1) // SECTOR
        for s in range(first, last + 1):
            if s in self.bad_read:
                raise OSError(errno.EIO, "injected read error")
        out = b"".join(self._sector(s) for s in range(first, last + 1))
        skip = offset - first * SECTOR
        return out[skip:skip + length]

    def pwrite(self, data, offset: int) -> int:
        data = bytes(data)
        if self.read_only:
            raise ReadOnlyError("read-only")
        if offset % SECTOR or len(data) % SECTOR or offset + len(data) > self.size:
            raise RangeError("bad write")
        first = offset // SECTOR
        for i in range(len(data) // SECTOR):
            if first + i in self.bad_write:
                raise VDiskError("injected write error")
        for i in range(len(data) // SECTOR):
            self.data[first + i] = data[i * SECTOR:(i + 1) * SECTOR]
        self.writes.append((offset, len(data)))
        return len(data)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError("read-only")
        if offset + length > self.size:
            raise RangeError("bad discard")
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            self.data[s] = bytes(SECTOR)
        self.discards.append((offset, length))

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush error")
        self.flushes += 1

    def content(self, lba: int, n: int) -> bytes:
        return b"".join(self._sector(s) for s in range(lba, lba + n))


def dsm_ranges(*ranges: tuple[int, int], blocks: int = 1) -> bytes:
    """A DATA SET MANAGEMENT payload of ``blocks`` 512-byte blocks holding (lba, count) entries."""
    out = bytearray()
    for lba, n in ranges:
        out += ((n << 48) | lba).to_bytes(8, "little")
    return bytes(out.ljust(blocks * SECTOR, b"\0"))
