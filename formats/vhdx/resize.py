"""Resizing a VHDX in place (`vdisk resize`), through the file's own log.

The virtual size is one metadata item; the BAT region already holds entries for every block it
has room for (the region is whole MiB), so growing within that room changes the size item and,
for a fixed image, gives the new blocks storage at the end of the file (FULLY_PRESENT); shrinking,
as Hyper-V allows when nothing allocated lies past the new end (the caller checks; for a fixed
image: nothing but zeros), drops the entries past it, and a fixed image's file is then cut after
its last kept block. The changed 4 KiB sectors go through the log, after the new blocks exist,
so a cut at any write leaves the old size or the new for Hyper-V, QEMU and vdisk alike. Growing past
the BAT region's room moves the BAT: a larger region is written whole at the end of the file and
flushed, then both region table copies (pointing at it) and the size item go through the log
in one entry, so a cut leaves the old BAT and size or the new ones.
"""
from __future__ import annotations

import numpy as np

from vdisk.errors import UnsupportedError
from ..base import ABSENT
from ..maintenance import ResizePlan
from .compact import _cut, _data_start
from .log import SectorEdits
from .create import bat_layout, region_table
from .metadata import Region
from .structs import (BAT_GUID, MAX_VIRTUAL_SIZE, METADATA_GUID, MiB, OFFSET_MASK, PAYLOAD_FULLY_PRESENT,
                      LOG_SECTOR, REGION_OFFSETS, REGION_TABLE_SIZE)


def resize(layer, new_size: int) -> ResizePlan:
    """Give the base VHDX *layer* the virtual size *new_size*; the plan left for the caller's
    journal is empty (the log made the change durable)."""
    path, lss, bs, cr = layer.path, layer.logical_sector_size, layer.block_size, layer.cr
    if new_size % lss:
        raise UnsupportedError(f"{path}: {new_size} is not a whole number of {lss}-byte logical sectors")
    if new_size > MAX_VIRTUAL_SIZE:
        raise UnsupportedError(f"{path}: a VHDX holds at most {MAX_VIRTUAL_SIZE} bytes")
    fixed = layer.subtype == "fixed"
    old_n, new_n = layer.nblocks, -(-new_size // bs)
    full, rest = divmod(layer.bat_region.length // 8, cr + 1)
    room = full * cr + min(rest, cr)                      # payload entries the BAT region holds
    relocate = new_n > room
    if relocate and layer._log_capacity() < 2 * REGION_TABLE_SIZE // LOG_SECTOR + 1:
        raise UnsupportedError(f"{path}: the log is too small to move the BAT region in one entry")
    changed: list[int] = []
    layer._begin_if_needed()                              # new FileWriteGuid and DataWriteGuid first
    raw = layer.raw
    if relocate:
        # A larger BAT region at the end of the file: entries keep their indexes (the chunk
        # layout does not depend on the block count); new fixed blocks follow it.
        _npb, entries, bat_len = bat_layout(new_size, bs, lss, path)
        used = len(layer.bat)
        bigger = np.zeros(max(entries, used), dtype="<u8")
        bigger[:used] = layer.bat
        layer.bat = bigger
        bat_at = layer._append(bat_len)
    if new_n > old_n and fixed:
        starts = [layer._append(bs) for _ in range(new_n - old_n)]
        raw.truncate(layer._eof)                          # the new blocks exist (zeros) before any entry
        raw.sync()
        for b, at in zip(range(old_n, new_n), starts):
            layer.bat[layer.payload_index(b)] = np.uint64(at | PAYLOAD_FULLY_PRESENT)
            changed.append(layer.payload_index(b))
    lo, hi = min(old_n, new_n), max(old_n, new_n)
    for b in range(lo, hi):                               # dropped entries, and stale ones in the new range
        i = layer.payload_index(b)
        if int(layer.bat[i]) and (new_n < old_n or not fixed):
            layer.bat[i] = 0
            changed.append(i)
    edits = SectorEdits(raw)
    put = edits.put
    table = layer.bat.view(np.uint8)
    if relocate:
        # The new region, whole, before the region tables point at it (data before metadata).
        # Only the entries in use are written: the rest of the region is a hole, reading zeros
        # (it starts past the file's end at open, so nothing stale lies there).
        upto = max(used, layer.payload_index(new_n - 1) + 1) if fixed else used
        raw.pwrite(bytes(table[:8 * upto]), bat_at)
        raw.truncate(max(raw.size(), layer._eof))
        raw.sync()
        new_region = Region(BAT_GUID, bat_at, bat_len, layer.bat_region.required)
        regions = [new_region if r.guid == BAT_GUID else r for r in layer.regions]
        rt = region_table(regions)
        for at in REGION_OFFSETS:                         # only the sectors that change
            for s0 in range(0, len(rt), LOG_SECTOR):
                if raw.pread(LOG_SECTOR, at + s0) != rt[s0:s0 + LOG_SECTOR]:
                    put(at + s0, rt[s0:s0 + LOG_SECTOR])
    else:
        for i in changed:
            put(layer.bat_region.offset + 8 * i, bytes(table[8 * i:8 * i + 8]))
    region = next(r for r in layer.regions if r.guid == METADATA_GUID)
    item = next(e for e in layer.md.entries if e[0] == "virtual_disk_size")
    put(region.offset + item[1], int(new_size).to_bytes(8, "little"))
    layer._log_write(edits.writes())
    raw.sync()
    if relocate:
        layer.bat_region, layer.regions = new_region, regions
    if fixed and new_n < old_n:
        # The dropped blocks' storage is unreferenced now; where it ends the file, it goes.
        kept = layer.bat[[layer.payload_index(b) for b in range(new_n)]] & np.uint64(OFFSET_MASK)
        end = max(_data_start(layer), int(kept.max()) + bs if len(kept) else 0)
        _cut(layer, end)
        layer._eof = -(-end // MiB) * MiB
    # The open layer follows (the caller closes it at once).
    layer.md.virtual_disk_size = new_size
    layer.size = new_size
    entries = layer.bat[[layer.payload_index(b) for b in range(new_n)]] if new_n else np.zeros(0, np.uint64)
    block_map = np.full(new_n, ABSENT, dtype=np.int64)
    present = (entries & np.uint64(7)) == PAYLOAD_FULLY_PRESENT
    block_map[present] = (entries[present] & np.uint64(OFFSET_MASK)).astype(np.int64)
    keep = min(old_n, new_n)
    block_map[:keep] = layer.block_map[:keep]
    layer.block_map = block_map
    layer.nblocks = new_n
    return ResizePlan(moved_blocks=0)
