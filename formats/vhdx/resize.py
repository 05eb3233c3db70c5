"""Resizing a VHDX in place (`vdisk resize`), through the file's own log.

The virtual size is one metadata item; the BAT region already holds entries for every block it
has room for (the region is whole MiB), so growing within that room changes the size item and,
for a fixed image, gives the new blocks storage at the end of the file (FULLY_PRESENT); shrinking,
as Hyper-V allows when nothing allocated lies past the new end (the caller checks; for a fixed
image: nothing but zeros), drops the entries past it, and a fixed image's file is then cut after
its last kept block. The changed 4 KiB sectors go through the log, after the new blocks exist,
so a cut at any write leaves the old size or the new for Hyper-V, QEMU and vdisk alike. Growing past
the BAT region's room would mean moving the BAT: refused.
"""
from __future__ import annotations

import numpy as np

from vdisk.errors import UnsupportedError
from ..base import ABSENT
from ..maintenance import ResizePlan
from .compact import _cut, _data_start
from .log import SectorEdits
from .structs import MAX_VIRTUAL_SIZE, METADATA_GUID, MiB, OFFSET_MASK, PAYLOAD_FULLY_PRESENT


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
    room = len(layer.bat) // (cr + 1) * cr                # payload entries the BAT region holds
    if new_n > room:
        raise UnsupportedError(f"{path}: the BAT region has entries for {room * bs} bytes; growing to "
                               f"{new_size} would mean moving it, which vdisk does not do yet")
    changed: list[int] = []
    layer._begin_if_needed()                              # new FileWriteGuid and DataWriteGuid first
    raw = layer.raw
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
    for i in changed:
        put(layer.bat_region.offset + 8 * i, bytes(table[8 * i:8 * i + 8]))
    region = next(r for r in layer.regions if r.guid == METADATA_GUID)
    item = next(e for e in layer.md.entries if e[0] == "virtual_disk_size")
    put(region.offset + item[1], int(new_size).to_bytes(8, "little"))
    layer._log_write(edits.writes())
    raw.sync()
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
