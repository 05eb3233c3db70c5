"""What every filesystem reader of :mod:`vdisk.fsaware` shares: the view of one partition, the
free-space answer it returns, and the refusal it raises.

A reader sees its partition only through :class:`Region` (bounded reads relative to the partition
start, over any :class:`~vdisk.blockdev.BlockDevice`) and answers with a :class:`FreeMap`: the
allocation unit, and chunks of "unit i is free" flags. Nothing here writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from vdisk.errors import VDiskError

MAX_READ = 64 << 20          # the largest single structure a reader may ask for (bounded memory)


class Refusal(VDiskError):
    """The filesystem must not be touched: dirty, needs recovery, unknown features, inconsistent
    or hostile metadata. The message names the image, the partition and the reason."""


class Region:
    """Bounded reads of ``[start, start + length)`` of a block device."""

    def __init__(self, dev, start: int, length: int, label: str):
        self.dev, self.start, self.length, self.label = dev, start, length, label

    def read(self, offset: int, n: int, what: str = "structure") -> bytes:
        """*n* bytes at *offset* inside the region; a read past its end is a Refusal."""
        if n < 0 or n > MAX_READ:
            raise Refusal(f"{self.label}: {what} of {n} bytes is larger than any sane filesystem writes")
        if offset < 0 or offset + n > self.length:
            raise Refusal(f"{self.label}: {what} at byte {offset} (+{n}) lies past the partition end "
                          f"({self.length} bytes)")
        buf = bytearray(n)
        if n:
            self.dev.readinto(buf, self.start + offset)
        return bytes(buf)

    def fail(self, reason: str) -> Refusal:
        return Refusal(f"{self.label}: {reason}")


@dataclass
class FreeChunk:
    """Units ``first .. first + len(free) - 1`` of size *unit*, the first at byte *offset* of the
    partition; ``free[i]`` tells whether unit ``first + i`` holds nothing the filesystem needs."""
    offset: int
    unit: int
    free: np.ndarray


@dataclass
class FreeMap:
    """A filesystem's answer: its name and geometry, and its free units chunk by chunk."""
    filesystem: str
    unit: int                       # allocation unit in bytes (block, cluster, page)
    units: int                      # units the filesystem manages
    free_units: int = 0
    chunks: list[FreeChunk] = field(default_factory=list)
    sink: Optional[Callable[[FreeChunk], None]] = None   # given: chunks are passed on, not kept

    @property
    def free_bytes(self) -> int:
        return self.free_units * self.unit

    def add(self, offset: int, free: np.ndarray) -> None:
        free = np.asarray(free, dtype=bool)
        self.free_units += int(np.count_nonzero(free))
        if free.any():
            chunk = FreeChunk(offset, self.unit, free)
            if self.sink is not None:
                self.sink(chunk)
            else:
                self.chunks.append(chunk)

    def runs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(starts, ends) byte arrays of free runs, relative to the partition, chunk by chunk."""
        for c in self.chunks:
            yield chunk_runs(c)


def chunk_runs(c: FreeChunk) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte arrays of a chunk's free runs, relative to the partition."""
    s, e = mask_runs(c.free)
    return c.offset + s.astype(np.int64) * c.unit, c.offset + e.astype(np.int64) * c.unit


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) index runs of True in a boolean array."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return edges[0::2], edges[1::2]


def bits_free(raw: bytes, n: int) -> np.ndarray:
    """The first *n* bits of a little-endian allocation bitmap, True where the bit is clear."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:n]
    return bits == 0


def u16(b: bytes | bytearray, o: int) -> int:
    return int.from_bytes(b[o:o + 2], "little")


def u32(b: bytes | bytearray, o: int) -> int:
    return int.from_bytes(b[o:o + 4], "little")


def u64(b: bytes | bytearray, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "little")


def power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def need(cond: bool, region: Region, reason: str) -> None:
    if not cond:
        raise region.fail(reason)


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c_update(crc: int, data: bytes) -> int:
    """CRC-32C (Castagnoli) register update from *crc*, no pre- or post-inversion (the form ext4
    chains its metadata checksums with)."""
    t = _CRC32C
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc
