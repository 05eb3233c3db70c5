"""Physical layout of sparse images, for the in-place maintenance operations.

A :class:`SparseFile` wraps one open, writable sparse Layer (VHD dynamic/differencing or VDI
dynamic/differencing) and answers the questions compact, resize and commit share: where does
each allocated block's storage *unit* start (VHD: bitmap + data; VDI: slot), where does the
metadata end, and which sectors of the block table change when the block map changes. It also
computes content digests for ``--verify``. All writes go through a journal Transaction chosen by
the caller; this module only computes bytes and offsets.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from vdisk.errors import UnsupportedError
from vdisk.formats.base import SECTOR, ZERO, Layer
from vdisk.formats.vdi.structs import BLOCK_FREE, BLOCK_ZERO, PRE_HEADER_SIZE
from vdisk.formats.vhd.structs import BAT_UNUSED, Footer


class SparseFile:
    """Maintenance view of a sparse layer: storage units, metadata extent, table encoding."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.file = layer.file
        self.format = layer.format
        if layer.format == "vhd" and hasattr(layer, "bat_offset"):
            footer = Footer.parse(layer.footer_raw)
            if footer.saved_state:
                raise UnsupportedError(f"{layer.path}: the image holds a saved VM state; refusing to modify it")
            self.skip = layer.bitmap_bytes                  # unit start -> data
            self.unit = layer.bitmap_bytes + layer.block_size
            self.table_offset = layer.bat_offset
            self.entries = layer.bat_entries
            self.table_len = -(-4 * self.entries // SECTOR) * SECTOR
            regions = [(0, 512), (layer.header_offset, layer.header_offset + 1024),
                       (self.table_offset, self.table_offset + self.table_len)]
            # A locator's reserved space counts only as far as the file has room for it: the
            # end of metadata never lies past the data, so moving blocks never grows the file.
            regions += [(e.start, e.end) for e in layer.locator_extents()]
            self.meta_end = -(-max(hi for _, hi in regions) // SECTOR) * SECTOR
            self.end_of_data = layer.footer_offset
            self.grid = None                                # VHD blocks may sit at any sector
        elif layer.format == "vdi" and layer.subtype in ("dynamic", "differencing"):
            self.skip = layer.block_extra
            self.unit = layer.slot_size
            self.table_offset = layer.offset_blocks
            self.entries = len(layer.block_map)
            self.table_len = 4 * self.entries
            self.meta_end = layer.offset_data
            self.end_of_data = layer.offset_data + layer.allocated * layer.slot_size
            self.grid = layer.offset_data
        else:
            raise UnsupportedError(f"{layer.path}: {layer.format} {layer.subtype} images have no block "
                                   f"table to rearrange (only dynamic and differencing VHD/VDI)")

    # -- block map <-> units ------------------------------------------------------------------
    def unit_starts(self, block_map: Optional[np.ndarray] = None) -> np.ndarray:
        bm = self.layer.block_map if block_map is None else block_map
        return np.where(bm >= 0, bm - self.skip, -1)

    def table_bytes(self, block_map: np.ndarray) -> bytes:
        """The on-disk block table for *block_map* (VHD BAT without its padding; VDI map)."""
        bm = block_map[: self.entries]
        if self.format == "vhd":
            out = np.full(self.entries, BAT_UNUSED, dtype=">u4")
            alloc = bm >= 0
            out[: len(bm)][alloc] = (bm[alloc] - self.skip) // SECTOR
            return out.tobytes()
        out = np.full(self.entries, BLOCK_FREE, dtype="<u4")
        alloc = bm >= 0
        out[alloc] = (bm[alloc] - self.skip - self.layer.offset_data) // self.unit
        out[bm == ZERO] = BLOCK_ZERO
        return out.tobytes()

    def table_writes(self, old_map: np.ndarray, new_map: np.ndarray) -> list[tuple[int, bytes]]:
        """The 512-byte sectors of the table that differ between two block maps."""
        old = self.table_bytes(old_map)
        new = self.table_bytes(new_map)
        writes = []
        for lo in range(0, len(new), SECTOR):
            hi = min(lo + SECTOR, len(new))
            if old[lo:hi] != new[lo:hi]:
                writes.append((self.table_offset + lo, new[lo:hi]))
        return _merge_writes(writes)

    def vdi_header(self, **changes) -> tuple[int, bytes]:
        h = self.layer.header
        h.update(changes)
        return PRE_HEADER_SIZE, self.layer.header_bytes()


def _merge_writes(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytearray]] = []
    for off, data in writes:
        if out and out[-1][0] + len(out[-1][1]) == off:
            out[-1][1].extend(data)
        else:
            out.append((off, bytearray(data)))
    return [(o, bytes(d)) for o, d in out]


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


def content_digest(disk, chunk: int = 16 << 20) -> str:
    """SHA-256 of a Disk's virtual content; unallocated and zero runs are hashed without reading."""
    h = hashlib.sha256()
    zero = bytes(chunk)
    buf = bytearray(chunk)
    for ext in disk.extents():
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(chunk, end - pos)
            if int(ext.kind) != 0:
                h.update(memoryview(zero)[:n])
            else:
                view = memoryview(buf)[:n]
                disk.readinto(view, pos)
                h.update(view)
            pos += n
    return h.hexdigest()


def path_digest(path: str, **open_args) -> str:
    """Content digest of the image at *path* (opened read-only with its chain)."""
    import vdisk
    with vdisk.open(path, **open_args) as d:
        return content_digest(d)
