"""Compacting a dynamic VHDX in place (`vdisk compact`), through the file's own log.

Blocks that read as zeros (or that the guest's filesystem does not use, with
``--filesystem-aware``) become NOT_PRESENT; the physically last blocks then move into the holes
below them and the file is cut after the last one. Two log writes keep every cut safe for
Hyper-V, QEMU and vdisk alike: (1) the dropped entries, so their storage is unreferenced before
anything is written there; (2) after the moved blocks' data is copied and flushed, their new
offsets. The truncation comes last.
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Optional

import numpy as np

from vdisk.errors import UnsupportedError
from ..base import ABSENT
from ..maintenance import plan_moves
from .structs import MiB, OFFSET_MASK, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT

COPY = 8 * MiB


def compact(layer, *, dry_run: bool, free: Optional[np.ndarray], progress=None) -> tuple[int, int, int, int]:
    """(blocks given up, blocks moved, file size before, after) of compacting the dynamic VHDX *layer*."""
    if layer.subtype != "dynamic":
        raise UnsupportedError(f"{layer.path}: vdisk compacts dynamic VHDX images only (this one is "
                               f"{layer.subtype})")
    raw, bs = layer.raw, layer.block_size
    sb = layer.bat[layer.cr::layer.cr + 1]
    if ((sb & np.uint64(7)) != 0).any():
        raise UnsupportedError(f"{layer.path}: a dynamic VHDX with sector bitmap blocks is not compacted "
                               f"(run 'vdisk check {layer.path}')")
    # Entries that keep an offset without data there (UNMAPPED after a discard, ZERO): their
    # offsets are given up first, or a later write would reuse storage a moved block now holds.
    payload = np.ones(len(layer.bat), dtype=bool)
    payload[layer.cr::layer.cr + 1] = False
    state = layer.bat & np.uint64(7)
    stale = np.flatnonzero(payload & (state < PAYLOAD_FULLY_PRESENT) & ((layer.bat & np.uint64(OFFSET_MASK)) != 0))
    live = np.flatnonzero(layer.block_map >= 0)
    dropped = []
    buf = bytearray(bs)
    view = memoryview(buf)
    for n, b in enumerate(live.tolist()):
        if free is not None and b < len(free) and free[b]:
            dropped.append(b)
        else:
            length = min(bs, layer.size - b * bs)
            raw.readinto_exact(view[:length], int(layer.block_map[b]))
            if not np.frombuffer(view[:length], dtype=np.uint8).any():
                dropped.append(b)
        if progress and (n & 63 == 63 or n == len(live) - 1):
            progress((n + 1) * bs, len(live) * bs)
    keep = sorted(set(live.tolist()) - set(dropped))
    # Everything below the first block is structure (headers, log, BAT, metadata): the data area
    # starts after the last region.
    meta_end = _data_start(layer)
    moves, new_end = plan_moves([(b, int(layer.block_map[b])) for b in keep], bs, meta_end, None)
    size_before = raw.size()
    size_after = min(size_before, new_end) if (moves or dropped) else size_before
    if dry_run or not (moves or dropped or len(stale) or new_end < size_before):
        return len(dropped), len(moves), size_before, size_after
    layer._begin_if_needed()                              # new FileWriteGuid and DataWriteGuid
    if dropped or len(stale):                             # 1: their storage becomes unreferenced
        for i in stale.tolist():
            layer._set_entry(i, int(layer.bat[i]) & 7)
        for b in dropped:
            layer._set_entry(layer.payload_index(b), PAYLOAD_NOT_PRESENT)
            layer.block_map[b] = ABSENT
        layer.flush()
    if moves:                                             # 2: copy into holes, flush, then the entries
        for b, src, dst in moves:
            for off in range(0, bs, COPY):
                n = min(COPY, bs - off)
                raw.readinto_exact(view[:n], src + off)
                raw.pwrite(view[:n], dst + off)
        raw.sync()
        for b, src, dst in moves:
            layer._set_entry(layer.payload_index(b), int(dst) | PAYLOAD_FULLY_PRESENT)
            layer.block_map[b] = dst
        layer.flush()
    _cut(layer, new_end)
    layer._eof = -(-max(new_end, meta_end) // MiB) * MiB
    return len(dropped), len(moves), size_before, raw.size()


def empty_child(layer, parent_path: Optional[str], parent) -> None:
    """After a commit: every payload and sector bitmap entry of the child NOT_PRESENT (one log
    write), the link rewritten to *parent* if given (another), the log cleared, the file cut after
    its structures. A cut before the first write leaves the full child (its data also in the
    parent: the chain reads the same); after it, an empty child."""
    raw = layer.raw
    # What the chain shows is unchanged, and the children of this child link to its
    # DataWriteGuid: only FileWriteGuid changes (VHDX.md A5.1).
    layer.headers.update(raw, file_write_guid=uuidlib.uuid4().bytes_le)
    for i in np.flatnonzero(layer.bat != 0).tolist():
        layer._set_entry(i, PAYLOAD_NOT_PRESENT)
    layer.block_map[:] = ABSENT
    layer._sb.clear()
    layer._bits.clear()
    layer.flush()
    if parent_path is not None:
        from .link import link_writes
        link_writes(layer, parent_path, parent, True)
    end = _data_start(layer)
    _cut(layer, end)
    layer._eof = end


def _data_start(layer) -> int:
    """Where blocks may start: after the headers, the log and every region, on a MiB boundary."""
    h = layer.headers.current
    end = max([r.offset + r.length for r in layer.regions] + [h["log_offset"] + h["log_length"]])
    return -(-end // MiB) * MiB


def _cut(layer, end: int) -> None:
    """Cut the file at *end*. The log's entries name the file size they were written at; with them
    applied, the log is cleared first (a replay must never meet a file shorter than an entry says)."""
    raw = layer.raw
    if end >= raw.size():
        return
    if layer._log_guid is not None:
        layer.headers.update(raw, log_guid=bytes(16))
        layer._log_guid = None
        layer._log_head = 0
    raw.truncate(end)
    raw.sync()

