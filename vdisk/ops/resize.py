"""Changing the virtual size of an image in place (``vdisk resize``), journaled.

The layer's driver plans the writes (``resize_plan``: data in the way of a larger table moves
first, then the metadata that points at it); this module checks what may be cut, applies the
plan in one journal transaction and verifies. Shrinking needs ``shrink=True`` and is
refused when anything allocated lies past the new end; the error says where.
Differencing images keep their parent's size and are refused.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from vdisk import journal
from vdisk.errors import UnsupportedError, VDiskError
from vdisk.formats.base import SECTOR
from vdisk.formats.registry import driver_for
from vdisk.ops.digest import content_digest

CHUNK = 8 << 20


@dataclass
class ResizeReport:
    path: str
    format: str
    subtype: str
    old_size: int
    new_size: int
    moved_blocks: int = 0
    file_size_before: int = 0
    file_size_after: int = 0
    verified: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verb = "grew" if self.new_size > self.old_size else "shrank" if self.new_size < self.old_size else "kept"
        moved = f", moved {self.moved_blocks} blocks" if self.moved_blocks else ""
        return f"{self.path}: {verb} {self.format} {self.subtype} from {self.old_size} to {self.new_size} bytes{moved}"


def resize(path: str, new_size: int, *, shrink: bool = False, verify: bool = False) -> ResizeReport:
    """Set the virtual size of the image at *path* to *new_size* bytes."""
    import vdisk
    path = os.fspath(path)
    if new_size <= 0 or new_size % SECTOR:
        raise VDiskError(f"new size {new_size} must be a positive multiple of 512 bytes")
    disk = vdisk.open(path, "r+")
    try:
        layer = disk.layers[0]
        report = ResizeReport(path, layer.format, layer.subtype, disk.size, new_size,
                              file_size_before=layer.file.size())
        if layer.is_differencing:
            raise UnsupportedError(f"{path}: a differencing image has its parent's size; resize the base image "
                                   f"and recreate or commit the children")
        if new_size == disk.size:
            report.file_size_after = report.file_size_before
            return report
        if new_size < disk.size:
            if not shrink:
                raise VDiskError(f"{path}: {new_size} is smaller than the current size {disk.size}; "
                                 f"pass --shrink to cut the disk")
            _refuse_data_past(disk, new_size)
        before = content_digest(disk, min(new_size, disk.size)) if verify else None
        plan = driver_for(layer).resize_plan(layer, new_size)
        with journal.Transaction(layer.file, "resize") as tx:
            tx.write_many(plan.moves)             # data in the way of larger tables, to its new place
            tx.write_many(plan.writes)            # then the metadata that points at it
            if plan.extend_to is not None and plan.extend_to > layer.file.size():
                tx.truncate(plan.extend_to)
            tx.commit(final_size=plan.final_size, redo=plan.redo)
        report.moved_blocks = plan.moved_blocks
        report.file_size_after = layer.file.size()
    finally:
        disk.close()
    if verify:
        with vdisk.open(path) as d:
            if d.size != new_size:
                raise VDiskError(f"{path}: VERIFY FAILED: size is {d.size}, expected {new_size}")
            after = content_digest(d, min(new_size, report.old_size))
            if after != before:
                raise VDiskError(f"{path}: VERIFY FAILED: the content that was kept changed")
            if new_size > report.old_size and any(e.kind == 0 and _nonzero(d, e) for e in
                                                  d.extents(report.old_size, new_size - report.old_size)):
                raise VDiskError(f"{path}: VERIFY FAILED: the added range does not read as zeros")
        report.verified = True
    return report


def _nonzero(d, ext) -> bool:
    pos, end = ext.offset, ext.offset + ext.length
    while pos < end:
        n = min(CHUNK, end - pos)
        if np.frombuffer(d.pread(n, pos), dtype=np.uint8).any():
            return True
        pos += n
    return False


def _refuse_data_past(disk, new_size: int) -> None:
    """Shrinking: nothing stored past the new end, or say where it is."""
    layer = disk.layers[0]
    bs = layer.block_size
    for ext in disk.extents(new_size, disk.size - new_size):
        if int(ext.kind) != 0:
            continue
        if layer.preallocated:
            if not _nonzero(disk, ext):
                continue                       # a fixed image stores zeros everywhere
        pos = ext.offset
        blk = pos // bs
        raise VDiskError(f"{disk.path}: cannot shrink to {new_size} bytes: data is allocated at virtual offset "
                         f"{pos} ({ext.length} bytes, block {blk}); move or discard it, or compact first")
    if not layer.preallocated:
        # A partially cut last block must hold zeros past the new end, or growing later would
        # bring the old bytes back.
        last = new_size // bs
        if new_size % bs and last < len(layer.block_map) and layer.block_map[last] >= 0:
            tail = disk.pread(min((last + 1) * bs, disk.size) - new_size, new_size)
            if np.frombuffer(tail, dtype=np.uint8).any():
                raise VDiskError(f"{disk.path}: cannot shrink: block {last} holds data past the new end")
