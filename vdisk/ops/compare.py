"""Content equality of two disks of any formats and chains (like `qemu-img compare`).

    with vdisk.open("a.vhd") as a, vdisk.open("b.vdi") as b:
        result = compare(a, b)
        result.identical, result.offset       # offset: first differing byte, or None

Ranges that read as zeros without being stored (unallocated, zero blocks) in *both* disks are
skipped without reading; a range stored in only one of them is checked for zeros. When the sizes
differ, the disks are identical only if the larger one reads as zeros past the smaller one's end
(as qemu-img compare does without ``-s``); ``strict=True`` calls any size difference a mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from vdisk.disk import Disk
from vdisk.engine import ExtentKind

CHUNK = 8 << 20


@dataclass
class CompareResult:
    """Outcome of :func:`compare` (``as_dict`` gives the `--json` form)."""
    identical: bool
    offset: Optional[int]                 # first differing byte (None when identical)
    size_a: int
    size_b: int
    reason: str                           # one-line human summary
    bytes_compared: int = 0

    def as_dict(self) -> dict:
        return {"identical": self.identical, "offset": self.offset, "size_a": self.size_a,
                "size_b": self.size_b, "size_mismatch": self.size_a != self.size_b,
                "reason": self.reason, "bytes_compared": self.bytes_compared}


def _stored(disk: Disk, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) ranges of DATA in *disk* within [start, end)."""
    if end <= start:
        return []
    return [(e.offset, e.offset + e.length) for e in disk.extents(start, end - start)
            if e.kind == ExtentKind.DATA]


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _first_nonzero(buf: np.ndarray) -> Optional[int]:
    if not buf.any():
        return None
    return int(np.flatnonzero(buf)[0])


def compare(a: Disk, b: Disk, *, strict: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> CompareResult:
    """Compare the virtual contents of *a* and *b*; stop at the first difference."""
    common = min(a.size, b.size)
    ranges = _union(_stored(a, 0, common), _stored(b, 0, common))
    bigger = a if a.size > b.size else b
    tail = _stored(bigger, common, bigger.size)
    total = sum(e - s for s, e in ranges) + sum(e - s for s, e in tail)
    buf_a = np.empty(CHUNK, dtype=np.uint8)
    buf_b = np.empty(CHUNK, dtype=np.uint8)
    done = 0
    if progress:
        progress(0, total)
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            va, vb = buf_a[:n], buf_b[:n]
            a.readinto(va, pos)
            b.readinto(vb, pos)
            if not np.array_equal(va, vb):
                off = pos + int(np.flatnonzero(va != vb)[0])
                return CompareResult(False, off, a.size, b.size, f"content mismatch at offset {off}", done)
            pos += n
            done += n
            if progress:
                progress(done, total)
    if a.size != b.size and strict:
        return CompareResult(False, common, a.size, b.size,
                             f"size mismatch ({a.size} != {b.size} bytes)", done)
    for start, end in tail:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            v = buf_a[:n]
            bigger.readinto(v, pos)
            hit = _first_nonzero(v)
            if hit is not None:
                off = pos + hit
                return CompareResult(False, off, a.size, b.size,
                                     f"content mismatch at offset {off} (past the end of the smaller image)", done)
            pos += n
            done += n
            if progress:
                progress(done, total)
    note = "" if a.size == b.size else f" (sizes differ: {a.size} != {b.size} bytes; the rest reads as zeros)"
    return CompareResult(True, None, a.size, b.size, "images are identical" + note, done)
