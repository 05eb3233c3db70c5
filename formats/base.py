"""What every format module exposes to the engine: a Layer.

A Layer is one image file. The engine only asks it "where does block *b* live?" (``block_map``),
"which sectors of block *b* are present here?" (``sector_bitmap``, differencing VHD only) and tells
it to allocate blocks and persist metadata. Layers never import the engine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk.errors import UnsupportedError
from vdisk.io import ImageFile
from vdisk.units import SECTOR

log = logging.getLogger("vdisk")

#: block_map value: the block is not stored here (ask the parent; zeros at the bottom of a chain).
ABSENT = -1
#: block_map value: the block reads as zeros and hides the parent (VDI 0xFFFFFFFE).
ZERO = -2



@dataclass
class ParentHint:
    """One place a differencing image says its parent may be found."""
    kind: str          # "relative", "absolute", "name"
    path: str          # as stored, already converted to a host path


@dataclass
class Layer:
    """Base class; format modules fill the fields and override the methods that apply."""

    file: ImageFile
    format: str
    subtype: str
    size: int
    block_size: int
    block_map: np.ndarray
    uuid: Optional[uuidlib.UUID] = None
    parent_id: Optional[bytes] = None            # raw bytes identifying the parent (VHD id / VDI linkage)
    parent_hints: list = field(default_factory=list)
    geometry: Optional[tuple] = None
    creator: Optional[str] = None
    warnings: list = field(default_factory=list)
    #: differencing VHD: presence is decided per sector by a bitmap in each allocated block
    sector_granular: bool = False
    #: the guest data is one contiguous run of the file (raw, fixed VHD): writes go straight
    #: through and zeros may be punched as holes
    flat: ClassVar[bool] = False
    #: the sector the image presents to a guest (VHDX may say 4096)
    logical_sector_size: int = 512

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def is_differencing(self) -> bool:
        return self.subtype == "differencing"

    @property
    def preallocated(self) -> bool:
        """Every block has storage from the start (raw, fixed): unstored zeros are not a state."""
        return self.subtype in ("fixed", "raw")

    @property
    def writable(self) -> bool:
        return self.file.writable

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)

    # -- what the engine calls ----------------------------------------------------------------
    def sector_bitmap(self, block: int) -> Optional[np.ndarray]:
        """Packed MSB-first presence bits of an allocated block (uint8 array), or None (all present)."""
        return None

    def set_sectors_present(self, block: int, first: int, count: int) -> None:
        """Mark sectors of an allocated block as present in this layer (differencing VHD)."""

    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        """Give *block* storage, write *pieces* (in-block offset, data) into it; the rest reads as zeros.

        *present* is the (first sector, count) range to mark present (differencing VHD).
        Returns the file offset of the block's data. Metadata pointing at it may be deferred to
        :meth:`flush`.
        """
        raise UnsupportedError(f"{self.path}: {self.format} {self.subtype} images cannot allocate blocks")

    def mark_zero(self, block: int) -> None:
        """Make an unallocated block read as zeros without storage (VDI ZERO entries)."""
        raise UnsupportedError(f"{self.path}: {self.format} has no zero-block entries")

    def can_mark_zero(self) -> bool:
        return False

    def deallocate(self, block: int) -> bool:
        """Drop an allocated block's storage if this format can do so safely; True if done."""
        return False

    def punch(self, file_offset: int, length: int) -> bool:
        """Release the storage behind a range of data that must read as zeros (raw/fixed)."""
        return False

    def flush(self) -> None:
        """Persist deferred metadata: data barrier, then the structures pointing at it."""
        self.file.sync()

    def close(self) -> None:
        self.file.close()

    def info(self) -> dict:
        """Format-specific facts for `vdisk info` (JSON-serialisable)."""
        return {}


def write_table_entries(file: ImageFile, table: bytes, table_offset: int, dirty: set) -> None:
    """Write the 512-byte sectors of a u32 table (BAT, VDI block map) holding the dirty entries."""
    sectors = sorted({index * 4 // SECTOR for index in dirty})
    start = prev = sectors[0]
    for s in sectors[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        lo, hi = start * SECTOR, min((prev + 1) * SECTOR, len(table))
        file.pwrite(table[lo:hi], table_offset + lo)
        start = prev = s


def data_runs_from_holes(file: ImageFile, data_start: int, length: int, block_size: int) -> np.ndarray:
    """Identity block map over [data_start, data_start+length), ABSENT where the file has a hole.

    Uses SEEK_DATA/SEEK_HOLE so sparse raw and fixed images are recognised without reading them.
    """
    nblocks = -(-length // block_size)
    block_map = data_start + np.arange(nblocks, dtype=np.int64) * block_size
    has_data = np.zeros(nblocks, dtype=bool)
    for start, stop in file.data_runs(data_start, data_start + length):
        has_data[(start - data_start) // block_size:(stop - 1 - data_start) // block_size + 1] = True
    block_map[~has_data] = ABSENT
    return block_map


def new_uuid() -> uuidlib.UUID:
    return uuidlib.uuid4()
