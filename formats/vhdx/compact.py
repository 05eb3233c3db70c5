"""Compacting a dynamic or differencing VHDX in place (`vdisk compact`), through the file's own log.

Blocks that read as zeros (or that the guest's filesystem does not use, with
``--filesystem-aware``) become NOT_PRESENT (in a child over parent data: ZERO, which also keeps
no storage); the physically last blocks then move into the holes below them (around sector
bitmap blocks, which stay) and the file is cut after the last one. Two log writes keep every cut safe for
Hyper-V, QEMU and vdisk alike: (1) the dropped entries, so their storage is unreferenced before
anything is written there; (2) after the moved blocks' data is copied and flushed, their new
offsets. The truncation comes last.
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Callable, Optional

import numpy as np

from vdisk.errors import UnsupportedError
from ..base import ABSENT, SECTOR, ZERO
from .structs import (MiB, OFFSET_MASK, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT,
                      PAYLOAD_ZERO, SB_BLOCK_SIZE, SB_PRESENT)

COPY = 8 * MiB


def compact(layer, *, dry_run: bool, free: Optional[np.ndarray], progress=None,
            below_zero: Optional[Callable[[int], bool]] = None) -> tuple[int, int, int, int]:
    """(blocks given up, blocks moved, file size before, after) of compacting the dynamic or
    differencing VHDX *layer*. In a child (*below_zero(b)*: the parent chain reads zeros under
    block *b*) a zero or filesystem-free block becomes NOT_PRESENT over zeros and ZERO over
    parent data (it reads zeros either way, and neither keeps storage); a partially present
    block is given up only when its present sectors hold zeros over a zero parent (or it lies in
    free space). Sector bitmap blocks stay where they are; payload blocks move around them."""
    if layer.subtype not in ("dynamic", "differencing"):
        raise UnsupportedError(f"{layer.path}: vdisk compacts dynamic and differencing VHDX images only (this "
                               f"one is {layer.subtype})")
    raw, bs = layer.raw, layer.block_size
    child = layer.subtype == "differencing"
    sb = layer.bat[layer.cr::layer.cr + 1]
    if not child and ((sb & np.uint64(7)) != 0).any():
        raise UnsupportedError(f"{layer.path}: a dynamic VHDX with sector bitmap blocks is not compacted "
                               f"(run 'vdisk check {layer.path}')")
    # Entries that keep an offset without data there (UNMAPPED after a discard, ZERO): their
    # offsets are given up first, or a later write would reuse storage a moved block now holds.
    payload = np.ones(len(layer.bat), dtype=bool)
    payload[layer.cr::layer.cr + 1] = False
    state = layer.bat & np.uint64(7)
    stale = np.flatnonzero(payload & (state < PAYLOAD_FULLY_PRESENT) & ((layer.bat & np.uint64(OFFSET_MASK)) != 0))
    live = np.flatnonzero(layer.block_map >= 0)
    dropped: dict[int, int] = {}                          # block -> its new state
    buf = bytearray(bs)
    view = memoryview(buf)
    for n, b in enumerate(live.tolist()):
        fs_free = free is not None and b < len(free) and bool(free[b])
        if fs_free or _reads_zero(layer, b, view):
            over_zero = below_zero is None or below_zero(b)
            partial = child and layer.state(b) == PAYLOAD_PARTIALLY_PRESENT
            if over_zero:
                dropped[b] = PAYLOAD_NOT_PRESENT
            elif fs_free or not partial:
                dropped[b] = PAYLOAD_ZERO                 # hides the parent's data, for free
        if progress and (n & 63 == 63 or n == len(live) - 1):
            progress((n + 1) * bs, len(live) * bs)
    units = [(int(layer.block_map[b]), bs, layer.payload_index(b)) for b in live.tolist() if b not in dropped]
    units += [(int(e) & OFFSET_MASK, SB_BLOCK_SIZE, layer.sb_index(c)) for c, e in enumerate(sb.tolist())
              if int(e) & 7 == SB_PRESENT]
    meta_end = _data_start(layer)
    moves, new_end = _plan(units, meta_end)
    size_before = raw.size()
    size_after = min(size_before, new_end) if (moves or dropped) else size_before
    if dry_run or not (moves or dropped or len(stale) or new_end < size_before):
        return len(dropped), len(moves), size_before, size_after
    layer._begin_if_needed()                              # new FileWriteGuid and DataWriteGuid
    if dropped or len(stale):                             # 1: their storage becomes unreferenced
        for i in stale.tolist():
            layer._set_entry(i, int(layer.bat[i]) & 7)
        for b, new_state in dropped.items():
            layer._set_entry(layer.payload_index(b), new_state)
            layer.block_map[b] = ABSENT if new_state == PAYLOAD_NOT_PRESENT else ZERO
            layer._bits.pop(b, None)
        layer.flush()
    if moves:                                             # 2: copy into holes, flush, then the entries
        layer.flush()                                     # no sector bitmap change still cached
        for i, src, dst, length in moves:
            for off in range(0, length, COPY):
                k = min(COPY, length - off)
                raw.readinto_exact(view[:k], src + off)
                raw.pwrite(view[:k], dst + off)
        raw.sync()
        for i, src, dst, length in moves:
            layer._set_entry(i, int(dst) | (int(layer.bat[i]) & 7))     # same state, new offset
            if (i + 1) % (layer.cr + 1):                  # a payload entry, not a sector bitmap's
                layer.block_map[i - i // (layer.cr + 1)] = dst
        layer.flush()
    _cut(layer, new_end)
    layer._eof = -(-max(new_end, meta_end) // MiB) * MiB
    return len(dropped), len(moves), size_before, raw.size()


def _reads_zero(layer, b: int, view: memoryview) -> bool:
    """Whether what block *b* stores reads as zeros (in a partially present block: its present
    sectors; the others show the parent)."""
    length = min(layer.block_size, layer.size - b * layer.block_size)
    layer.raw.readinto_exact(view[:length], int(layer.block_map[b]))
    data = np.frombuffer(view[:length], dtype=np.uint8)
    bits = layer.sector_bitmap(b)
    if bits is None:
        return not data.any()
    present = np.unpackbits(bits)[: length // SECTOR].astype(bool)
    return not data[: len(present) * SECTOR].reshape(-1, SECTOR)[present].any()


def _plan(units: list[tuple[int, int, int]], floor: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Move the physically last units with storage (*units*: (offset, length, BAT index) of
    payload blocks and sector bitmap blocks) into the lowest holes past *floor* they fit, only
    ever downwards, until the last one cannot move. ([(BAT index, src, dst, length)], the end of
    what is left)."""
    taken = sorted((o, o + n) for o, n, _ in units)
    holes: list[list[int]] = []
    pos = floor
    for s0, e0 in taken:
        if s0 - pos >= SB_BLOCK_SIZE:
            holes.append([pos, s0])
        pos = max(pos, e0)
    moves = []
    stay = [floor]
    movers = sorted(units, reverse=True)
    for k, (src, length, i) in enumerate(movers):
        hole = next((h for h in holes if h[0] < src and h[1] - h[0] >= length), None)
        if hole is None:
            stay += [o + n for o, n, _ in movers[k:]]
            break
        moves.append((i, src, hole[0], length))
        hole[0] += length
    return moves, max(stay + [dst + n for _, _, dst, n in moves])


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

