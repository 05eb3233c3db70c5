"""Resizing a VHD in place: the plan of writes `vdisk resize` hands to the journal."""
from __future__ import annotations

import numpy as np

from vdisk import limits
from vdisk.errors import UnsupportedError
from ..base import SECTOR
from ..maintenance import ResizePlan, SparseLayout, read_block, read_exact
from .image import MAX_DYNAMIC_SIZE, encode_bat, plan_size
from .structs import FOOTER_CHECKSUM_OFFSET, HEADER_CHECKSUM_OFFSET, DynamicHeader, Footer, with_checksum


def _vhd_footer(raw: bytes, new_size: int) -> bytes:
    f = dict(Footer.parse(raw))
    f.pop("_io", None)
    size, geometry, creator = plan_size(new_size, "exact")
    # original_size too: libvhdi (vhdiinfo) presents it as the media size.
    f.update(current_size=size, original_size=size, cylinders=geometry[0], heads=geometry[1], sectors_per_track=geometry[2],
             creator_app=creator if f["creator_app"] not in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"wa\0\0")
             else f["creator_app"], checksum=0)
    return with_checksum(Footer.build(f), FOOTER_CHECKSUM_OFFSET)


def fixed_plan(layer, new_size: int) -> ResizePlan:
    """A fixed VHD: the footer moves to the new end; the old one becomes guest data (zeros)."""
    footer = _vhd_footer(layer.footer_raw, new_size)
    writes = [(layer.size, bytes(SECTOR))] if new_size > layer.size else []
    return ResizePlan(writes=writes + [(new_size, footer)], final_size=new_size + SECTOR)


def dynamic_plan(layer, new_size: int, sf: SparseLayout) -> ResizePlan:
    """A dynamic VHD: the BAT grows in place; blocks and locator data in its way move to the end
    of the file, the footer after them."""
    if new_size > MAX_DYNAMIC_SIZE:
        raise UnsupportedError(f"{layer.path}: a dynamic VHD holds at most {MAX_DYNAMIC_SIZE} bytes")
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
        starts = np.where(block_map >= 0, block_map - sf.skip, -1)
        for b in np.flatnonzero((starts >= 0) & (starts < new_table_end) & (starts + sf.unit > old_table_end)):
            src = int(starts[b])
            writes_beyond.append((end, read_block(file, src, sf.unit)))
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
                blob = read_exact(file, lo, span)
                loc["platform_data_space"] = span if span >= SECTOR else 0
                writes_beyond.append((end, blob))
                loc["platform_data_offset"] = end
                end += -(-len(blob) // SECTOR) * SECTOR
        end = max(end, new_table_end)
    h["max_table_entries"] = new_n
    h["checksum"] = 0
    header = with_checksum(DynamicHeader.build(h), HEADER_CHECKSUM_OFFSET)
    table = encode_bat(block_map, -(-4 * new_n // SECTOR) * SECTOR // 4, sf.skip)   # padded to whole sectors
    footer = _vhd_footer(layer.footer_raw, new_size)
    writes = [(toff, table), (layer.header_offset, header), (0, footer)]
    if end > layer.footer_offset:
        return ResizePlan(moves=writes_beyond, writes=writes + [(end, footer)], final_size=end + SECTOR,
                          moved_blocks=moved)
    return ResizePlan(moves=writes_beyond, writes=writes, redo=[(layer.footer_offset, footer)], moved_blocks=moved)
