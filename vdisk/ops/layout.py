"""Physical layout of sparse images, for the in-place maintenance operations.

A :class:`SparseFile` wraps one open, writable sparse Layer and answers, from its driver's
:class:`~vdisk.formats.maintenance.SparseLayout`, the questions compact, resize and commit share:
where does each allocated block's storage *unit* start, where does the metadata end, and which
sectors of the block table change when the block map changes. All writes go through a journal Transaction chosen by
the caller; this module only computes bytes and offsets.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from vdisk.formats.base import Layer
from vdisk.formats.registry import driver_for


class SparseFile:
    """Maintenance view of a sparse layer: its driver's :class:`SparseLayout`, plus the file."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.file = layer.file
        self.format = layer.format
        self.layout = driver_for(layer).sparse_layout(layer)
        lay = self.layout
        self.skip, self.unit, self.grid = lay.skip, lay.unit, lay.grid
        self.table_offset, self.entries, self.table_len = lay.table_offset, lay.entries, lay.table_len
        self.meta_end, self.end_of_data = lay.meta_end, lay.end_of_data
        #: what follows the last unit (a VHD footer), and the writes that record the unit count
        self.trailer, self.count_writes = lay.trailer, lay.count_writes

    def final_size(self, end_of_units: int) -> int:
        return self.layout.final_size(end_of_units)

    # -- block map <-> units ------------------------------------------------------------------
    def unit_starts(self, block_map: Optional[np.ndarray] = None) -> np.ndarray:
        bm = self.layer.block_map if block_map is None else block_map
        return np.where(bm >= 0, bm - self.skip, -1)

    def table_bytes(self, block_map: np.ndarray) -> bytes:
        """The on-disk block table for *block_map*."""
        return self.layout.encode(block_map)

    def table_writes(self, old_map: np.ndarray, new_map: np.ndarray) -> list[tuple[int, bytes]]:
        """The 512-byte sectors of the table that differ between two block maps."""
        return self.layout.table_writes(old_map, new_map)


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
