"""Filesystem-aware compaction: give back the blocks the guest's filesystems do not use.

    from vdisk.fsaware import compact_fs
    report = compact_fs("guest.vhd")               # or dry_run=True
    for v in report.volumes: print(v.name, v.filesystem, v.free_bytes, v.reclaimable)

The image's partitions are found (MBR/GPT), each filesystem is recognised by its superblock and
its allocation map is read (ext2/3/4 block bitmaps, FAT, exFAT and NTFS bitmaps, Linux swap).
Image blocks that lie wholly in free space are then given up by the ordinary compaction (one
journaled transaction), without being read or zero-filled. A volume nothing here recognises is
left byte-identical; a filesystem that is dirty, needs recovery, uses features not understood or
whose map fails its own consistency checks refuses the whole run before a byte is written.
Disks are spoken to only through the BlockDevice protocol (``size``, ``block_size``, ``readinto``,
``discard``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from vdisk.errors import VDiskError
from vdisk.sidecars import SHADOWS

from .base import Refusal
from .detect import Volume, read_free, volumes
from .plan import BlockPlan, PartialRuns

__all__ = ["Refusal", "FsReport", "analyse", "compact_fs", "free_blocks", "sparsify", "subtract"]


@dataclass
class FsReport:
    """What a filesystem-aware compaction found and did."""
    path: str
    block_size: int
    dry_run: bool
    volumes: list[Volume] = field(default_factory=list)
    free_blocks: int = 0            # image blocks in free space (or whose used bytes read zeros)
    size_before: int = 0
    size_after: int = 0
    method: str = "compact"         # "compact" (dynamic/differencing) or "punch" (raw/fixed)

    @property
    def reclaimed(self) -> int:
        return self.size_before - self.size_after

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reclaimed"] = self.reclaimed
        d["partitions"] = d.pop("volumes")
        for v in d["partitions"]:
            v["released" if not self.dry_run else "reclaimable"] = v.pop("reclaimable")
        return d

    def summary(self) -> str:
        lines = []
        for v in self.volumes:
            fs = v.filesystem or "not recognised (left as is)"
            lines.append(f"{self.path}: {v.name}: {fs}, {v.length} bytes, {v.free_bytes} free, "
                         f"{v.reclaimable} {'reclaimable' if self.dry_run else 'released'}")
        verb = "would reclaim" if self.dry_run else "reclaimed"
        lines.append(f"{self.path}: {self.free_blocks} blocks of {self.block_size} bytes hold nothing the "
                     f"filesystems use; {verb} "
                     f"{self.reclaimed} bytes ({self.size_before} -> {self.size_after})")
        return "\n".join(lines)


def analyse(dev, path: str, block_size: Optional[int] = None, *,
            force: bool = False) -> tuple[list[Volume], np.ndarray, BlockPlan]:
    """Read every volume's allocation map on the BlockDevice *dev*: the volumes (with free and
    reclaimable bytes filled in) and a boolean array over blocks of *block_size* (default: the
    device's allocation unit), True where every byte is free. Raises :class:`Refusal`.
    *force*: trust the bitmap of an NTFS volume marked dirty or hibernated."""
    bs = int(block_size or dev.block_size)
    if bs <= 0:
        raise VDiskError(f"{path}: block size {bs} is invalid")
    plan = BlockPlan(dev.size, bs)
    vols = volumes(dev, path)
    for v in vols:
        fm = read_free(dev, path, v, sink=plan.sink(v.start, v.start + v.length), force=force)
        if fm is not None:
            v.filesystem = fm.filesystem if v.kind != "gap" else "unpartitioned"
            v.free_bytes = min(fm.free_bytes, v.length)
    mask = plan.free_blocks()
    _zero_used_parts(dev, path, vols, plan, mask, force)
    for v in vols:
        if v.kind is not None:
            v.reclaimable = plan.bytes_in(mask, v.start, v.start + v.length)
    return vols, mask, plan


ZERO_PROBE = 4096


def _zero_used_parts(dev, path: str, vols: list[Volume], plan: BlockPlan, mask: np.ndarray,
                     force: bool = False) -> None:
    """Also plan the partly free blocks whose used bytes all read as zeros (a never-written
    inode table, say): giving them up changes no used byte. The maps are read a second time for
    the free runs inside those blocks only; then only their used bytes are read, and a block is
    abandoned at the first non-zero byte, so data blocks cost one small read."""
    partial = plan.partial_blocks()
    if not len(partial):
        return
    runs = PartialRuns(partial, plan.bs)
    for v in vols:
        read_free(dev, path, v, sink=runs.sink(v.start, v.start + v.length), force=force)
    buf = bytearray(plan.bs)
    for b in partial.tolist():
        lo, hi = b * plan.bs, min(plan.size, (b + 1) * plan.bs)
        if _used_is_zero(dev, buf, lo, hi, sorted(runs.runs.get(b, ()))):
            mask[b] = True


def _used_is_zero(dev, buf: bytearray, lo: int, hi: int, free: list[tuple[int, int]]) -> bool:
    pos = lo
    for a, z in free + [(hi, hi)]:
        while pos < a:                                # [pos, a) is used: must read as zeros
            n = min(a - pos, ZERO_PROBE if pos == lo else len(buf))
            view = memoryview(buf)[:n]
            dev.readinto(view, pos)
            if np.frombuffer(view, dtype=np.uint8).any():
                return False
            pos += n
        pos = max(pos, z)
    return True


def free_blocks(dev, path: str, block_size: Optional[int] = None) -> np.ndarray:
    """The boolean block mask of :func:`analyse` alone (``vdisk convert --sparsify`` uses it)."""
    return analyse(dev, path, block_size)[1]


def compact_fs(path, *, dry_run: bool = False, parent_search: Sequence[str] = (), vbox_registry=None,
               progress=None, force: bool = False, punch: bool = False) -> FsReport:
    """Give up the image blocks of *path* that its filesystems do not use, then compact.

    Dynamic and differencing images: the blocks join the compaction's zero blocks (in a
    differencing image they read as zeros afterwards where the child can say so for free: unlinked
    over a zero parent, a ZERO entry; otherwise they are left), then blocks move and the file is
    cut. *punch*, and always for raw and fixed images: nothing is given up or moved; the storage
    behind the free space is punched out of the file instead (see :func:`_punch`). ``dry_run``
    writes nothing. *force* trusts the bitmap of an NTFS volume marked dirty or hibernated (every
    other refusal stands)."""
    import vdisk
    from vdisk.ops.compact import compact
    path = os.fspath(path)
    holder: dict = {}

    with vdisk.open(path, parent_search=parent_search, vbox_registry=vbox_registry) as probe_disk:
        top = probe_disk.layers[0]
        flat = top.preallocated
        chained = len(probe_disk.layers) > 1
        block_size = probe_disk.block_size
    # Write bits, not access(2) alone: root may write anything, but a file made read-only says
    # "do not change me" (a backing image other children rely on, typically).
    if not dry_run and (not os.stat(path).st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise VDiskError(f"{path}: the image is read-only (file permissions); nothing was changed")
    if flat or punch:
        return _punch(path, dry_run, parent_search, vbox_registry, force)
    if os.path.isdir(path + SHADOWS):
        # Free space now may hold a file in a shadow's point in time; the compaction's own
        # writes do not go through the shadows' copy-on-write, the punch does.
        raise VDiskError(f"{path}: the image has shadow copies, which may still need what its filesystems "
                         f"freed since; use --punch (it preserves them first) or delete the shadows")

    def find(disk) -> np.ndarray:
        vols, mask, _ = analyse(disk, path, force=force)
        if len(mask) != len(disk.layers[0].block_map):
            raise VDiskError(f"{path}: block map has {len(disk.layers[0].block_map)} entries, "
                             f"the disk {len(mask)} blocks")
        holder["volumes"], holder["mask"] = vols, mask
        return mask

    rep = compact(path, dry_run=dry_run, parent_search=parent_search, vbox_registry=vbox_registry,
                  progress=progress, free_space=find)
    report = FsReport(path, block_size, dry_run, holder["volumes"],
                      int(holder["mask"].sum()), rep.size_before, rep.size_after,
                      "compact (differencing)" if chained else "compact")
    return report


def _punch(path: str, dry_run: bool, parent_search, vbox_registry, force: bool) -> FsReport:
    """Give the host back the storage behind the guest's free space, in place, without moving or
    giving up a block: every free run is punched out of the top image file in whole host pages
    (:meth:`vdisk.Disk.release`). No table changes, so a cut anywhere leaves each free byte as it
    was or zero and every used byte as it was; the file keeps its length and loses storage. The
    maps are read twice: once whole, so every refusal comes before the first hole, then again
    to punch run by run (memory stays bounded by one chunk of a map)."""
    import vdisk
    mode = "r" if dry_run else "r+"
    with vdisk.open(path, mode, parent_search=parent_search, vbox_registry=vbox_registry) as disk:
        bs = disk.block_size
        vols, mask, _ = analyse(disk, path, bs, force=force)
        page = max(4096, os.statvfs(path).f_bsize)
        before = os.stat(path).st_blocks * 512
        for v in vols:
            if v.kind is None:
                continue
            punched = [0]
            read_free(disk, path, v, sink=_releaser(disk, v, page, dry_run, punched), force=force)
            v.reclaimable = punched[0]
        if not dry_run:
            disk.layers[0].file.sync()
    after = os.stat(path).st_blocks * 512
    if dry_run:
        after = max(0, before - sum(v.reclaimable for v in vols))
    return FsReport(path, bs, dry_run, vols, int(mask.sum()), before, after, "punch")


def _releaser(disk, vol: Volume, page: int, dry_run: bool, punched: list):
    """A FreeMap sink releasing (in a dry run: counting) the stored pages of each free run."""
    from .base import chunk_runs
    lo, hi = vol.start, vol.start + vol.length
    act = disk.releasable if dry_run else disk.release

    def take(chunk) -> None:
        s, e = chunk_runs(chunk)
        s, e = np.clip(s + lo, lo, hi), np.clip(e + lo, lo, hi)
        keep = e - s >= page                      # a run shorter than a page frees nothing
        for a, z in zip(s[keep].tolist(), e[keep].tolist()):
            punched[0] += act(a, z - a, page)
    return take


def sparsify(path: str):
    """A ``skip`` hook for :func:`vdisk.ops.convert.convert`: drops from the ranges to copy every
    granule wholly in free space of the source's filesystems (they read as zeros in the output)."""
    from .base import mask_runs

    def skip(src, granule: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        mask = free_blocks(src, path, granule)
        s, e = mask_runs(mask)
        free = list(zip((s * granule).tolist(), np.minimum(e * granule, src.size).tolist()))
        return subtract(ranges, free)
    return skip


def subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """*ranges* minus *holes* (both sorted, each internally disjoint [start, end) lists)."""
    out, j = [], 0
    for s, e in ranges:
        while j < len(holes) and holes[j][1] <= s:
            j += 1
        k, pos = j, s
        while k < len(holes) and holes[k][0] < e:
            if holes[k][0] > pos:
                out.append((pos, holes[k][0]))
            pos = max(pos, holes[k][1])
            k += 1
        if pos < e:
            out.append((pos, e))
    return out
