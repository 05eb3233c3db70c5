"""Shared helpers for the ATA device tests (no tests here).

:func:`ata_disk` is the shared test fake (tests/fakes.py) set up as the ATA tests want it: sectors
never written read as :func:`pattern` (so a read shows which sectors it came from), no path unless
given, and writes that are not whole sectors refused. Faults: :func:`bad_sectors` or
``disk.fail("flush")``; what happened: ``disk.writes``, ``disk.discards``, ``disk.flushes``.
"""
from __future__ import annotations

from vdisk.errors import VDiskError

from fakes import FakeDisk

SECTOR = 512


def pattern(lba: int, n: int = 1) -> bytes:
    """Deterministic content of sectors never written: each sector names its own LBA."""
    out = bytearray()
    for s in range(lba, lba + n):
        tag = s.to_bytes(8, "little")
        out += (tag + bytes([s & 0xFF]) * 8) * (SECTOR // 16)
    return bytes(out)


def _pattern_bytes(offset: int, length: int) -> bytes:
    return pattern(offset // SECTOR, length // SECTOR)


def ata_disk(sectors: int, *, patterned: bool = True, path=None, **kw) -> FakeDisk:
    """A sparse in-memory disk of *sectors* 512-byte sectors (``read_only``, ``geometry``, ``uuid``
    and ``path`` as FakeDisk takes them)."""
    return FakeDisk(sectors * SECTOR, block_size=4096, background=_pattern_bytes if patterned else None,
                    aligned=True, path=path, **kw)


def sectors(disk: FakeDisk, lba: int, n: int) -> bytes:
    """What the disk holds in sectors [lba, lba+n)."""
    return disk.content(lba * SECTOR, n * SECTOR)


def bad_sectors(disk: FakeDisk, op: str, *lbas: int) -> None:
    """Sectors that fail to read (*op* "readinto": EIO) or write ("pwrite": a VDiskError), like a
    disk with bad sectors."""
    for lba in lbas:
        disk.fail(op, lba * SECTOR, SECTOR, VDiskError("injected write error") if op == "pwrite" else None)


def dsm_ranges(*ranges: tuple[int, int], blocks: int = 1) -> bytes:
    """A DATA SET MANAGEMENT payload of ``blocks`` 512-byte blocks holding (lba, count) entries."""
    out = bytearray()
    for lba, n in ranges:
        out += ((n << 48) | lba).to_bytes(8, "little")
    return bytes(out.ljust(blocks * SECTOR, b"\0"))
