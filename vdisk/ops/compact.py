"""Compaction of dynamic and differencing VHD/VDI images (``vdisk compact``).

In place (journaled): every allocated block of the top image is read once, in physical order;
a block that reads as zeros is unallocated — in a differencing image only where that does not
change what the guest reads (its parent reads zeros there too); otherwise a VDI block becomes a
ZERO entry, a VHD block stays. Then the physically last blocks are moved into the holes, the
block table is rewritten and the file is truncated (VHD: footer moved to the new end).

By copy (``to=NEW``): a fresh image of the same kind receives only the data that matters.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from vdisk import journal
from vdisk.engine import Engine, ExtentKind
from vdisk.errors import UnsupportedError, VDiskError
from vdisk.io import ImageFile
from vdisk.formats.maintenance import plan_moves
from vdisk.formats.registry import driver_for
from vdisk.ops.layout import SparseFile
from vdisk.ops.digest import content_digest
from vdisk.formats.base import ABSENT, SECTOR, ZERO

MOVE_BATCH = 1 << 40           # bytes moved per journal barrier (undo records of holes are tiny)

Progress = Optional[Callable[[int, int], None]]


@dataclass
class CompactReport:
    path: str
    format: str
    subtype: str
    allocated_before: int = 0
    unallocated: int = 0            # zero blocks given up entirely
    zero_marked: int = 0            # VDI differencing blocks turned into ZERO entries
    moved: int = 0
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False
    target: Optional[str] = None
    verified: Optional[bool] = None

    @property
    def reclaimed(self) -> int:
        return self.size_before - self.size_after

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reclaimed"] = self.reclaimed
        return d

    def summary(self) -> str:
        verb = "would reclaim" if self.dry_run else "reclaimed"
        where = f" into {self.target}" if self.target else ""
        return (f"{self.path}: {self.allocated_before} allocated blocks, {self.unallocated} unallocated, "
                f"{self.zero_marked} made zero blocks, {self.moved} moved{where}; {verb} {self.reclaimed} bytes "
                f"({self.size_before} -> {self.size_after})")


def _data_intervals(file: ImageFile, start: int, end: int) -> tuple[list[int], list[int]]:
    """Starts and ends of the file's data (not hole) runs in [start, end)."""
    runs = file.data_runs(start, end)
    return [s for s, _ in runs], [e for _, e in runs]


def _has_data(starts: list[int], ends: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(ends, lo)
    return i < len(starts) and starts[i] < hi


@dataclass
class _Scan:
    new_map: np.ndarray
    dropped: dict          # unit start -> full_zero (for the journal: what the hole held)


def _is_zero(buf) -> bool:
    a = np.frombuffer(buf, dtype=np.uint8)
    n8 = len(a) // 8 * 8
    return not (a[:n8].view(np.uint64).any() or a[n8:].any())


class _BlockReader:
    """Reads a block's data in growing pieces and stops at the first non-zero byte: a block of
    real data costs one small read, only (nearly) zero blocks are read whole."""

    FIRST, MAX = 4096, 4 << 20

    def __init__(self, file: ImageFile, unit: int):
        self.file = file
        self.buf = np.empty(unit, dtype=np.uint8)

    def read(self, lo: int, n: int) -> memoryview:
        view = memoryview(self.buf)[:n]
        # Stored data: a failed or short read is a ReadError. Read as zeros, it would make the
        # block a zero block and the compaction would drop what the file could not give.
        self.file.readinto_exact(view, lo)
        return view

    def data_is_zero(self, lo: int, n: int) -> bool:
        pos, step = 0, self.FIRST
        while pos < n:
            m = min(step, n - pos)
            if not _is_zero(self.read(lo + pos, m)):
                return False
            pos += m
            step = min(step * 4, self.MAX)
        return True


def _scan(sf: SparseFile, below: Optional[Engine], size: int, progress: Progress,
          free: Optional[np.ndarray] = None) -> _Scan:
    layer = sf.layer
    bs, unit, skip = layer.block_size, sf.unit, sf.skip
    starts = sf.unit_starts()
    blocks = np.flatnonzero(starts >= 0)
    blocks = blocks[np.argsort(starts[blocks], kind="stable")]
    new_map = layer.block_map.copy()
    dropped: dict[int, bool] = {}
    dstarts, dends = _data_intervals(layer.file, sf.meta_end, layer.file.size())
    granular = layer.sector_granular
    spb = bs // SECTOR
    diff = layer.is_differencing
    reader = _BlockReader(layer.file, unit)
    total = len(blocks)

    below_zero = _below_zero(below, bs, size) or (lambda b: True)

    for i, b in enumerate(blocks.tolist()):
        start = int(starts[b])
        hole = not _has_data(dstarts, dends, start + skip, start + unit)
        fs_free = free is not None and bool(free[b])   # the guest's filesystem holds nothing here
        if granular:                                  # differencing VHD: per-sector presence
            raw = reader.read(start, -(-spb // 8))           # at least one byte (blocks under 4 KiB)
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:spb].astype(bool)
            if not bits.any():
                new_map[b] = ABSENT                   # nothing present: reads the parent already
                dropped[start] = hole
            elif hole or fs_free or _present_zero(reader, start + skip, bits, spb):
                if below_zero(b):
                    new_map[b] = ABSENT
                    dropped[start] = hole or reader.data_is_zero(start + skip, bs)
        elif hole or fs_free or reader.data_is_zero(start + skip, bs):
            # A filesystem-free block is neither read nor kept by the journal: should the run be
            # rolled back, its stale content may come back as zeros, as after a discard.
            if not diff or below_zero(b):
                new_map[b] = ABSENT
                dropped[start] = True
            elif sf.layer.can_mark_zero():
                new_map[b] = ZERO                     # hides non-zero parent data without storage
                dropped[start] = True
        if progress and (i & 63 == 63 or i == total - 1):
            progress((i + 1) * bs, total * bs)      # bytes examined, as ProgressBar shows
    if free is not None and diff and layer.can_mark_zero():
        # Free blocks the child does not store but the parent does: a ZERO entry costs no space.
        for b in np.flatnonzero(free & (layer.block_map == ABSENT)).tolist():
            if not below_zero(b):
                new_map[b] = ZERO
    return _Scan(new_map, dropped)


def _below_zero(below: Optional[Engine], bs: int, size: int) -> Optional[Callable[[int], bool]]:
    """For a child: whether the chain under it stores no data under block *b* (None: no parent)."""
    if below is None:
        return None

    def zero(b: int) -> bool:
        lo = b * bs
        n = min(bs, size - lo)
        return n <= 0 or all(r[2] != ExtentKind.DATA for r in below.resolve(lo, n))
    return zero


def _present_zero(reader: _BlockReader, lo: int, bits: np.ndarray, spb: int) -> bool:
    """True when every present sector of the block's data holds zeros."""
    data = np.frombuffer(reader.read(lo, spb * SECTOR), dtype=np.uint8).reshape(spb, SECTOR)
    nz = data.view(np.uint64).any(axis=1)
    return not (nz & bits).any()


def _dst_pieces(dst: int, unit: int, skip: int, dropped: dict, dropped_sorted: list[int]) -> list[tuple[int, int, str]]:
    """Split a hole [dst, dst+unit) by what it held: a dropped block (its metadata prefix must be
    journaled, its data is known zero or must be read) or nothing (unreferenced)."""
    pieces = []
    pos, end = dst, dst + unit
    i = max(0, bisect.bisect_right(dropped_sorted, dst) - 1)
    while pos < end:
        while i < len(dropped_sorted) and dropped_sorted[i] + unit <= pos:
            i += 1
        if i >= len(dropped_sorted) or dropped_sorted[i] >= end:
            pieces.append((pos, end, "unreferenced"))
            break
        s = dropped_sorted[i]
        if s > pos:
            pieces.append((pos, s, "unreferenced"))
            pos = s
        meta_end = s + skip
        if pos < meta_end:
            pieces.append((pos, min(meta_end, end), "read"))
            pos = min(meta_end, end)
        if pos < end:
            stop = min(s + unit, end)
            pieces.append((pos, stop, "zero" if dropped[s] else "read"))
            pos = stop
        i += 1
    return pieces


def compact(path: str, *, dry_run: bool = False, to: Optional[str] = None, verify: bool = False,
            parent_search: Sequence[str] = (), vbox_registry=None, progress: Progress = None,
            free_space: Optional[Callable] = None) -> CompactReport:
    """Compact the dynamic/differencing VHD or VDI at *path* in place (or into a new image *to*).

    *free_space(disk)*, when given, is asked (with the image open and locked) for a boolean array
    over the top layer's blocks: True where the guest's filesystems hold no data. Such blocks are
    given up like zero blocks, without being read (see :mod:`vdisk.fsaware`)."""
    import vdisk
    path = os.fspath(path)
    if to is not None:
        return compact_copy(path, to, verify=verify, parent_search=parent_search,
                            vbox_registry=vbox_registry, progress=progress)
    mode = "r" if dry_run else "r+"
    disk = vdisk.open(path, mode, parent_search=parent_search, vbox_registry=vbox_registry)
    try:
        before = content_digest(disk) if verify else None
        layer = disk.layers[0]
        free = free_space(disk) if free_space is not None else None
        below = Engine(disk.layers[1:]) if len(disk.layers) > 1 else None
        own = driver_for(layer).compact_own(layer, dry_run=dry_run, free=free, progress=progress,
                                            below_zero=_below_zero(below, layer.block_size, disk.size))
        if own is not None:
            report = CompactReport(path, layer.format, layer.subtype, dry_run=dry_run,
                                   allocated_before=int((layer.block_map >= 0).sum()))
            report.unallocated, report.moved, report.size_before, report.size_after = own
        else:
            sf = SparseFile(layer)
            size_before = layer.file.size()
            report = CompactReport(path, layer.format, layer.subtype, dry_run=dry_run, size_before=size_before,
                                   allocated_before=int((layer.block_map >= 0).sum()))
            scan = _scan(sf, below, disk.size, progress, free)
            new_map = scan.new_map
            report.unallocated = int(((layer.block_map >= 0) & (new_map == ABSENT)).sum())
            report.zero_marked = int(((layer.block_map >= 0) & (new_map == ZERO)).sum())
            starts = sf.unit_starts(new_map)
            live = [(int(b), int(starts[b])) for b in np.flatnonzero(starts >= 0)]
            moves, new_end = plan_moves(live, sf.unit, sf.meta_end, sf.grid)
            report.moved = len(moves)
            final_size = sf.final_size(new_end)
            changed = bool(moves) or not np.array_equal(new_map, layer.block_map) or final_size < size_before
            report.size_after = min(final_size, size_before) if changed else size_before
            if final_size > size_before:
                # Compaction only moves data down and cuts the end; a larger end means a layout claim
                # the file does not back. Refuse before anything is written.
                raise VDiskError(f"{path}: compaction would grow the file from {size_before} to {final_size} bytes "
                                 f"(its metadata claims room the file does not have); run 'vdisk check {path}'")
            if changed and not dry_run:
                for blk, src, dst in moves:
                    new_map[blk] = dst + sf.skip
                _apply(sf, layer, new_map, moves, scan.dropped, live, final_size, new_end)
                report.size_after = layer.file.size()
    finally:
        disk.close()
    if verify and not dry_run:
        report.verified = _verify(path, before, parent_search, vbox_registry)
    return report


def _apply(sf: SparseFile, layer, new_map: np.ndarray, moves, dropped: dict, live, final_size: int,
           new_end: int) -> None:
    file = layer.file
    dropped_sorted = sorted(dropped)
    with journal.Transaction(file, "compact") as tx:
        batch: list[tuple] = []
        pending = 0
        for blk, src, dst in moves:
            for lo, hi, mode in _dst_pieces(dst, sf.unit, sf.skip, dropped, dropped_sorted):
                batch.append((src + lo - dst, lo, hi - lo, mode))
            pending += sf.unit
            if pending >= MOVE_BATCH:
                tx.copy_many(batch)
                batch, pending = [], 0
        meta = sf.table_writes(layer.block_map, new_map)
        meta += sf.count_writes(int((new_map >= 0).sum()))
        tx.copy_many(batch, then_write=meta)        # the last moves and the new tables: one barrier
        redo = [(new_end, sf.trailer)] if sf.trailer else []
        tx.commit(final_size=final_size, redo=redo)
    layer.block_map[:] = new_map


def _verify(path: str, before: str, parent_search, vbox_registry) -> bool:
    import vdisk
    with vdisk.open(path, parent_search=parent_search, vbox_registry=vbox_registry) as d:
        after = content_digest(d)
    if after != before:
        raise VDiskError(f"{path}: VERIFY FAILED: virtual content changed (sha256 {before} -> {after})")
    return True


# ---------------------------------------------------------------------------------------------
# Compaction by copy
# ---------------------------------------------------------------------------------------------
def compact_copy(path: str, target: str, *, verify: bool = False, parent_search: Sequence[str] = (),
                 vbox_registry=None, progress: Progress = None) -> CompactReport:
    """Write a compacted copy of *path* to the new file *target* (same format, same parent)."""
    import vdisk
    target = os.fspath(target)
    if os.path.exists(target):
        raise VDiskError(f"{target}: already exists")
    src = vdisk.open(path, parent_search=parent_search, vbox_registry=vbox_registry)
    try:
        top = src.layers[0]
        if top.format == "raw":
            raise UnsupportedError(f"{path}: raw images cannot be compacted")
        report = CompactReport(path, top.format, top.subtype, target=target, size_before=top.file.size(),
                               allocated_before=int((top.block_map >= 0).sum()))
        before = content_digest(src) if verify else None
        parent = src.chain[1].path if len(src.chain) > 1 else None
        if parent is not None:
            dst = vdisk.create(target, format=top.format, parent=parent)
        else:
            dst = vdisk.create(target, src.size, format=top.format, subtype="dynamic", block_size=top.block_size)
        try:
            _copy_top(src, dst, progress)
            dst.flush()
            kept = int((dst.layers[0].block_map >= 0).sum())
        finally:
            dst.close()
        report.unallocated = max(0, report.allocated_before - kept)
        report.size_after = os.path.getsize(target)
    except BaseException:
        src.close()
        if os.path.exists(target):
            os.unlink(target)
        raise
    src.close()
    if verify:
        report.verified = _verify(target, before, parent_search, vbox_registry)
    return report


def _copy_top(src, dst, progress: Progress) -> None:
    """Copy what the top layer of *src* stores, skipping zeros the parent also reads as zeros."""
    bs = dst.block_size
    below = Engine(src.layers[1:]) if len(src.layers) > 1 else None
    runs = [e for e in src.extents() if e.layer == 0]
    total = sum(e.length for e in runs) or 1
    done = 0
    for ext in runs:
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(end - pos, bs - pos % bs)
            if ext.kind == ExtentKind.DATA:
                data = src.pread(n, pos)
                if np.frombuffer(data, dtype=np.uint8).any():
                    dst.pwrite(data, pos)
                elif below is not None:
                    dst.write_zeroes(pos, n)             # no-op where the parent reads zeros
            elif below is not None:                      # an explicit zero block over the parent
                dst.write_zeroes(pos, n)
            pos += n
            done += n
            if progress:
                progress(done, total)
