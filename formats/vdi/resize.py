"""Resizing a VDI in place: the plan of writes `vdisk resize` hands to the journal."""
from __future__ import annotations

import numpy as np

from vdisk import limits
from vdisk.errors import UnsupportedError
from ..maintenance import ResizePlan, read_block
from .image import MAX_BLOCKS, MAX_VIRTUAL_SIZE, encode_map
from .structs import PRE_HEADER_SIZE


def resize_plan(layer, new_size: int) -> ResizePlan:
    """The block map grows or shrinks; if it would run into the data area, the data area's start
    moves by whole slots and the slots in the way are copied to the end (VDI.md B8)."""
    file = layer.file
    fixed = layer.subtype == "fixed"
    if layer.version >> 16 != 1:
        raise UnsupportedError(f"{layer.path}: legacy VDI images cannot be resized")
    bs, unit = layer.block_size, layer.slot_size
    old_n = len(layer.block_map)
    new_n = limits.new_table_entries(layer.path, new_size, bs, format_max=MAX_BLOCKS, format_name="VDI",
                                     size_limit=MAX_VIRTUAL_SIZE)
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
            writes_beyond.append((base + moved * unit, read_block(file, od + k * unit, unit)))
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
    table = encode_map(block_map, layer.block_extra, new_od, unit).tobytes()
    if new_n < old_n:
        table += b"\xff" * (4 * (old_n - new_n))              # cut entries read as free
    header = dict(layer.header)
    header.update(disk_size=new_size, blocks_in_image=new_n, offset_data=new_od, blocks_allocated=top)
    layer.header = header
    final = new_od + top * unit if (moved or fixed) else None
    return ResizePlan(moves=writes_beyond, writes=[(ob, table), (PRE_HEADER_SIZE, layer.header_bytes())],
                      extend_to=final, final_size=final, moved_blocks=moved)
