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
