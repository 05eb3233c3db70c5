"""Changing the virtual size of an image in place (``vdisk resize``), journaled.

Growing: VHD fixed (the footer moves; the new range reads as zeros), VHD dynamic (the BAT grows;
blocks in its way move to the end of the file), VDI fixed and dynamic (the block map grows; if it
would run into the data area, the data area's start moves by whole slots and the slots in the way
are copied to the end — VDI.md B8), raw (the file grows). Shrinking needs ``shrink=True`` and is
refused when anything allocated lies past the new end; the error says where.
Differencing images keep their parent's size and are refused.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from . import journal, limits
from .errors import UnsupportedError, VDiskError
from .layout import SparseFile
from vdisk.formats.base import SECTOR, ZERO
from vdisk.formats.vdi import MAX_BLOCKS as VDI_MAX_BLOCKS, MAX_VIRTUAL_SIZE as VDI_MAX_VIRTUAL_SIZE
from vdisk.formats.vdi_structs import PRE_HEADER_SIZE
from vdisk.formats.vhd import MAX_DYNAMIC_SIZE, plan_size
from vdisk.formats.vhd_structs import (BAT_UNUSED, FOOTER_CHECKSUM_OFFSET, HEADER_CHECKSUM_OFFSET,
                                       DynamicHeader, Footer, with_checksum)

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
        if layer.format == "vhdx":
            raise UnsupportedError(f"{path}: vdisk cannot resize VHDX images yet")
        if new_size == disk.size:
            report.file_size_after = report.file_size_before
            return report
        if new_size < disk.size:
            if not shrink:
                raise VDiskError(f"{path}: {new_size} is smaller than the current size {disk.size}; "
                                 f"pass --shrink to cut the disk")
            _refuse_data_past(disk, new_size)
        before = _digest_prefix(disk, min(new_size, disk.size)) if verify else None
        if layer.format == "raw":
            _resize_raw(layer, new_size)
        elif layer.format == "vhd" and layer.subtype == "fixed":
            _resize_vhd_fixed(layer, new_size)
        elif layer.format == "vhd":
            report.moved_blocks = _resize_vhd_dynamic(layer, new_size)
        else:
            report.moved_blocks = _resize_vdi(layer, new_size)
        report.file_size_after = layer.file.size()
    finally:
        disk.close()
    if verify:
        with vdisk.open(path) as d:
            if d.size != new_size:
                raise VDiskError(f"{path}: VERIFY FAILED: size is {d.size}, expected {new_size}")
            after = _digest_prefix(d, min(new_size, report.old_size))
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


def _digest_prefix(disk, length: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for ext in disk.extents(0, length):
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(CHUNK, end - pos)
            h.update(disk.pread(n, pos) if int(ext.kind) == 0 else bytes(n))
            pos += n
    return h.hexdigest()


def _refuse_data_past(disk, new_size: int) -> None:
    """Shrinking: nothing stored past the new end, or say where it is."""
    layer = disk.layers[0]
    bs = layer.block_size
    for ext in disk.extents(new_size, disk.size - new_size):
        if int(ext.kind) != 0:
            continue
        if layer.format in ("raw",) or layer.subtype == "fixed":
            if not _nonzero(disk, ext):
                continue                       # a fixed image stores zeros everywhere
        pos = ext.offset
        blk = pos // bs
        raise VDiskError(f"{disk.path}: cannot shrink to {new_size} bytes: data is allocated at virtual offset "
                         f"{pos} ({ext.length} bytes, block {blk}); move or discard it, or compact first")
    if layer.format != "raw" and layer.subtype != "fixed":
        # A partially cut last block must hold zeros past the new end, or growing later would
        # bring the old bytes back.
        last = new_size // bs
        if new_size % bs and last < len(layer.block_map) and layer.block_map[last] >= 0:
            tail = disk.pread(min((last + 1) * bs, disk.size) - new_size, new_size)
            if np.frombuffer(tail, dtype=np.uint8).any():
                raise VDiskError(f"{disk.path}: cannot shrink: block {last} holds data past the new end")


# ---------------------------------------------------------------------------------------------
def _resize_raw(layer, new_size: int) -> None:
    with journal.Transaction(layer.file, "resize") as tx:
        tx.commit(final_size=new_size)


def _vhd_footer(raw: bytes, new_size: int) -> bytes:
    f = dict(Footer.parse(raw))
    f.pop("_io", None)
    size, geometry, creator = plan_size(new_size, "exact")
    # original_size too: libvhdi (vhdiinfo) presents it as the media size.
    f.update(current_size=size, original_size=size, cylinders=geometry[0], heads=geometry[1], sectors_per_track=geometry[2],
             creator_app=creator if f["creator_app"] not in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"wa\0\0")
             else f["creator_app"], checksum=0)
    return with_checksum(Footer.build(f), FOOTER_CHECKSUM_OFFSET)


def _resize_vhd_fixed(layer, new_size: int) -> None:
    old = layer.size
    footer = _vhd_footer(layer.footer_raw, new_size)
    with journal.Transaction(layer.file, "resize") as tx:
        if new_size > old:
            tx.write(old, bytes(SECTOR))           # the old footer becomes guest data: zeros
            tx.write(new_size, footer)
        else:
            tx.write(new_size, footer)
        tx.commit(final_size=new_size + SECTOR)


def _resize_vhd_dynamic(layer, new_size: int) -> int:
    if new_size > MAX_DYNAMIC_SIZE:
        raise UnsupportedError(f"{layer.path}: a dynamic VHD holds at most {MAX_DYNAMIC_SIZE} bytes")
    sf = SparseFile(layer)
    bs = layer.block_size
    new_n = limits.new_table_entries(layer.path, new_size, bs, format_max=0xFFFFFFFF, format_name="VHD")
    old_n = layer.bat_entries
    file = layer.file
    h = dict(DynamicHeader.parse(layer.header_raw))
    h.pop("_io", None)
    h["parent_locators"] = [{k: v for k, v in loc.items() if k != "_io"} for loc in h["parent_locators"]]
    toff = layer.bat_offset
    new_table_end = toff + -(-4 * new_n // SECTOR) * SECTOR
    old_table_end = toff + sf.table_len
    block_map = layer.block_map.copy()
    if len(block_map) < max(new_n, old_n):
        block_map = np.concatenate([block_map, np.full(max(new_n, old_n) - len(block_map), -1, np.int64)])
    moved = 0
    end = layer.footer_offset
    writes_beyond: list[tuple[int, bytes]] = []
    if new_table_end > old_table_end:
        # Blocks and locator data in the way of the larger table move to the end of the file
        # (and never into the table's new extent).
        end = max(end, new_table_end)
        starts = sf.unit_starts(block_map)
        for b in np.flatnonzero((starts >= 0) & (starts < new_table_end) & (starts + sf.unit > old_table_end)):
            src = int(starts[b])
            writes_beyond.append((end, _read_block(file, src, sf.unit)))
            block_map[b] = end + sf.skip
            end += sf.unit
            moved += 1
        # A locator's reservation only as far as the file has room for it (not a claimed 4 GiB).
        held = {e.index: e.end - e.start for e in layer.locator_extents()}
        for i, loc in enumerate(h["parent_locators"]):
            if not loc["platform_code"] or not loc["platform_data_length"]:
                continue
            span = held.get(i, loc["platform_data_length"])
            lo = loc["platform_data_offset"]
            if lo < new_table_end and lo + span > old_table_end:
                blob = _read_exact(file, lo, span)
                loc["platform_data_space"] = span if span >= SECTOR else 0
                writes_beyond.append((end, blob))
                loc["platform_data_offset"] = end
                end += -(-len(blob) // SECTOR) * SECTOR
        end = max(end, new_table_end)
    h["max_table_entries"] = new_n
    h["checksum"] = 0
    header = with_checksum(DynamicHeader.build(h), HEADER_CHECKSUM_OFFSET)
    table = np.full(-(-4 * new_n // SECTOR) * SECTOR // 4, BAT_UNUSED, dtype=">u4")
    bm = block_map[:new_n]
    alloc = bm >= 0
    table[:new_n][alloc] = (bm[alloc] - sf.skip) // SECTOR
    footer = _vhd_footer(layer.footer_raw, new_size)
    with journal.Transaction(file, "resize") as tx:
        tx.write_many(writes_beyond)
        tx.write_many([(toff, table.tobytes()), (layer.header_offset, header), (0, footer)])
        if end > layer.footer_offset:
            tx.write(end, footer)
            tx.commit(final_size=end + SECTOR)
        else:
            tx.commit(redo=[(layer.footer_offset, footer)])
    return moved


def _read_exact(file, offset: int, n: int) -> bytes:
    data = file.pread(n, offset)
    return data + bytes(n - len(data))


def _read_block(file, offset: int, n: int) -> bytes:
    """A stored block that is about to move: a failed or short read is a ReadError, never zeros
    written to the block's new place."""
    buf = bytearray(n)
    file.readinto_exact(memoryview(buf), offset)
    return bytes(buf)


def _resize_vdi(layer, new_size: int) -> int:
    file = layer.file
    fixed = layer.subtype == "fixed"
    if layer.version >> 16 != 1:
        raise UnsupportedError(f"{layer.path}: legacy VDI images cannot be resized")
    bs, unit = layer.block_size, layer.slot_size
    old_n = len(layer.block_map)
    new_n = limits.new_table_entries(layer.path, new_size, bs, format_max=VDI_MAX_BLOCKS, format_name="VDI",
                                     size_limit=VDI_MAX_VIRTUAL_SIZE)
    ob, od = layer.offset_blocks, layer.offset_data
    block_map = layer.block_map.copy()
    allocated = layer.allocated
    file_end = od + allocated * unit
    moved = 0
    writes_beyond: list[tuple[int, bytes]] = []
    new_od = od
    if ob + 4 * new_n > od:
        # The map would run into the first slots: move the data area's start by whole slots
        # and copy the allocated slots in the way to the end of the file (VDI.md B8).
        d = -(-(ob + 4 * new_n - od) // unit)
        new_od = od + d * unit
        slots = np.where(block_map >= 0, (block_map - layer.block_extra - od) // unit, -1)
        base = max(file_end, new_od)
        for b in np.flatnonzero((slots >= 0) & (slots < d)):
            k = int(slots[b])
            writes_beyond.append((base + moved * unit, _read_block(file, od + k * unit, unit)))
            block_map[b] = base + moved * unit + layer.block_extra
            moved += 1
        file_end = base + moved * unit
    if new_n < old_n:
        block_map = block_map[:new_n]
    elif new_n > old_n:
        extra = np.full(new_n - old_n, -1, np.int64)
        if fixed:
            # New blocks of a fixed image get the next slots (zeros by file extension).
            first = (file_end - new_od) // unit
            extra = new_od + (first + np.arange(new_n - old_n)) * unit + layer.block_extra
        block_map = np.concatenate([block_map, extra])
    alloc = block_map >= 0
    slots = (block_map[alloc] - layer.block_extra - new_od) // unit
    if fixed and new_n < old_n and (slots >= new_n).any():
        raise UnsupportedError(f"{layer.path}: cannot shrink this fixed VDI: its kept blocks are not in the first slots")
    used = int(alloc.sum())
    top = int(slots.max()) + 1 if used else 0
    entries = np.full(new_n, 0xFFFFFFFF, dtype="<u4")
    entries[alloc] = slots
    entries[block_map == ZERO] = 0xFFFFFFFE
    table = entries.tobytes()
    if new_n < old_n:
        table += b"\xff" * (4 * (old_n - new_n))              # cut entries read as free
    header = dict(layer.header)
    header.update(disk_size=new_size, blocks_in_image=new_n, offset_data=new_od, blocks_allocated=top)
    layer.header = header
    final = new_od + top * unit if (moved or fixed) else None
    with journal.Transaction(file, "resize") as tx:
        tx.write_many(writes_beyond)
        tx.write_many([(ob, table), (PRE_HEADER_SIZE, layer.header_bytes())])
        if final is not None and final > file.size():
            tx.truncate(final)
        tx.commit(final_size=final)
    return moved
