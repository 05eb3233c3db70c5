"""What the in-place operations (compact, commit, resize, relink) ask a driver about a file.

A :class:`SparseLayout` describes one writable sparse layer's file: where each allocated block's
storage *unit* starts (VHD: bitmap + data; VDI: slot), where the metadata ends, how the block
table is encoded, and what must follow the last unit. The operations compute moves and new maps
from it and hand the writes to a journal Transaction; they never learn the format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .base import SECTOR

Write = tuple[int, bytes]


@dataclass
class SparseLayout:
    skip: int                     # unit start -> block data (a VHD sector bitmap, VDI block_extra)
    unit: int                     # bytes of one unit: skip + block size
    table_offset: int             # file offset of the block table
    entries: int                  # entries the table holds
    table_len: int                # bytes the table takes
    meta_end: int                 # units may start here at the earliest
    end_of_data: int              # the end of the last unit now
    grid: Optional[int]           # units sit on a grid from here (VDI slots); None: anywhere
    encode: Callable[[np.ndarray], bytes]          # block map -> the on-disk table
    #: bytes that must follow the last unit (a VHD footer); the file ends after them
    trailer: bytes = b""
    #: the writes recording how many units are in use (a VDI header), given that count
    count_writes: Callable[[int], list[Write]] = field(default=lambda used: [])

    def final_size(self, end_of_units: int) -> int:
        return end_of_units + len(self.trailer)

    def table_writes(self, old_map: np.ndarray, new_map: np.ndarray) -> list[Write]:
        """The 512-byte sectors of the table that differ between two block maps, merged."""
        old, new = self.encode(old_map), self.encode(new_map)
        writes: list[tuple[int, bytearray]] = []
        for lo in range(0, len(new), SECTOR):
            hi = min(lo + SECTOR, len(new))
            if old[lo:hi] != new[lo:hi]:
                at = self.table_offset + lo
                if writes and writes[-1][0] + len(writes[-1][1]) == at:
                    writes[-1][1].extend(new[lo:hi])
                else:
                    writes.append((at, bytearray(new[lo:hi])))
        return [(o, bytes(d)) for o, d in writes]


@dataclass
class LinkPlan:
    """A driver's answer to "make this child name that parent"."""
    writes: list[Write]           # in file order of no importance; the journal applies them
    changes: list[str]            # what changes, in words, for the report
    end: Optional[int] = None     # the new end of the data area, when link data moved there


@dataclass
class ResizePlan:
    """A driver's answer to "give this image that virtual size", for one journal transaction."""
    moves: list[Write] = field(default_factory=list)     # data out of the way: written first
    writes: list[Write] = field(default_factory=list)    # then the metadata pointing at it
    final_size: Optional[int] = None                     # the file's size once committed
    redo: list[Write] = field(default_factory=list)      # writes that must land after the cut
    extend_to: Optional[int] = None                      # grow the file first (new fixed slots)
    moved_blocks: int = 0


def read_exact(file, offset: int, n: int) -> bytes:
    """*n* bytes at *offset*, zeros past the end of the file (locator data near the end)."""
    data = file.pread(n, offset)
    return data + bytes(n - len(data))


def read_block(file, offset: int, n: int) -> bytes:
    """A stored block that is about to move: a failed or short read is a ReadError, never zeros
    written to the block's new place."""
    buf = bytearray(n)
    file.readinto_exact(memoryview(buf), offset)
    return bytes(buf)


def plan_moves(unit_starts: list[tuple[int, int]], unit: int, meta_end: int,
               grid: Optional[int]) -> tuple[list[tuple[int, int, int]], int]:
    """Fill holes with the physically last units.

    *unit_starts*: (block, start) of every unit that stays. Returns ([(block, src, dst)], new end
    of data). Holes are gaps of at least one unit between *meta_end* and the last unit (on a
    VDI slot grid starting at *grid*). Moving highest into lowest until the hole is above the
    unit leaves the units dense.
    """
    live = sorted(unit_starts, key=lambda t: t[1])
    holes: list[int] = []
    pos = meta_end if grid is None else grid
    for _, start in live:
        while start - pos >= unit:
            holes.append(pos)
            pos += unit
        pos = max(pos, start + unit)
    moves = []
    hi = len(live) - 1
    for h in holes:
        if hi < 0 or h >= live[hi][1]:
            break
        blk, src = live[hi]
        moves.append((blk, src, h))
        hi -= 1
    final = [s for _, s in live[: hi + 1]] + [dst for _, _, dst in moves]
    end = max([meta_end if grid is None else grid] + [s + unit for s in final])
    return moves, end
