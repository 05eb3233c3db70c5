"""Find the volumes of a disk and the filesystem on each.

A disk whose first sectors carry a filesystem (no partition table) is one volume. Otherwise the
MBR/GPT is read strictly (an anomaly refuses: a damaged table is no ground for discarding) and
every partition is probed by its superblock. Unpartitioned gaps count as free only where no
structure can live: on GPT disks between and after partitions (the last MiB, which holds the
backup GPT, excepted), on MBR disks only without logical partitions (their EBRs live in gaps).
Space before the first partition is never free: boot loaders are embedded there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from vdisk.mount.partitions import Partition, read_partitions

from . import exfat, ext, fat, ntfs, swap
from .base import FreeChunk, FreeMap, Refusal, Region

GPT_TAIL = 1 << 20
READERS = {"ext": ext.read_free, "fat": fat.read_free, "exfat": exfat.read_free, "ntfs": ntfs.read_free,
           "swap": swap.read_free}


@dataclass
class Volume:
    """One region of the disk: a partition, the whole disk, or an unpartitioned gap."""
    name: str                      # "p1", "disk", "gap@1048576"
    start: int
    length: int
    kind: Optional[str]            # reader key, "gap", or None when nothing is recognised
    filesystem: Optional[str] = None
    free_bytes: int = 0
    reclaimable: int = 0


class _Named:
    """The BlockDevice, named by its image's path in what the partition reader reports."""

    def __init__(self, dev, path: str):
        self.dev, self.size, self.path = dev, dev.size, path
        self.logical_sector_size = dev.logical_sector_size

    def readinto(self, buffer, offset: int) -> int:
        return self.dev.readinto(buffer, offset)


def identify(region: Region) -> Optional[str]:
    """The reader key for what *region* holds, or None."""
    if region.length < 4096:
        return None
    head = region.read(0, 2048, "superblock area")
    if ext.probe(head):
        return "ext"
    if ntfs.probe(head):
        return "ntfs"
    if exfat.probe(head):
        return "exfat"
    if fat.probe(head):
        return "fat"
    if swap.probe(region):
        return "swap"
    return None


def volumes(dev, path: str) -> list[Volume]:
    """The volumes of the block device *dev* (the image at *path*), in disk order."""
    whole = Region(dev, 0, dev.size, f"{path}: disk")
    kind = identify(whole)
    # A FAT/NTFS/exFAT boot sector carries 0x55AA like an MBR: it wins. An ext superblock or a
    # swap header on the whole disk only counts without a partition table (a boot loader in the
    # MBR gap could look like one).
    if kind in ("fat", "ntfs", "exfat"):
        return [Volume("disk", 0, dev.size, kind)]
    parts = read_partitions(_Named(dev, path), strict=True)
    if not parts:
        return [Volume("disk", 0, dev.size, kind)] if kind is not None else []
    out = []
    for p in sorted(parts, key=lambda p: p.start):
        out.append(Volume(f"p{p.index}", p.start, p.length, identify(Region(dev, p.start, p.length, f"{path}: partition {p.index}"))))
    out += _gaps(parts, dev.size)
    return sorted(out, key=lambda v: v.start)


def _gaps(parts: list[Partition], size: int) -> list[Volume]:
    if not parts:
        return []
    scheme = parts[0].scheme
    if scheme == "mbr" and any(p.logical for p in parts):
        return []
    end = size - GPT_TAIL if scheme == "gpt" else size
    out = []
    ordered = sorted(parts, key=lambda p: p.start)
    pos = ordered[0].end
    for p in ordered[1:] + [None]:
        stop = min(p.start if p is not None else end, end)
        if stop > pos:
            out.append(Volume(f"gap@{pos}", pos, stop - pos, "gap", "unpartitioned"))
        if p is not None:
            pos = max(pos, p.end)
    return out


def read_free(dev, path: str, vol: Volume, sink: Optional[Callable[[FreeChunk], None]] = None,
              force: bool = False) -> Optional[FreeMap]:
    """The free space of *vol* (None when nothing is recognised there). Raises :class:`Refusal`.
    *force* reaches only the NTFS reader (dirty / hibernated volumes: trust the bitmap)."""
    if vol.kind is None:
        return None
    if vol.kind == "gap":
        fm = FreeMap("unpartitioned", vol.length, 1, sink=sink)      # one unit: the whole gap
        fm.add(0, np.ones(1, dtype=bool))
        return fm
    label = f"{path}: {'partition ' + vol.name[1:] if vol.name.startswith('p') else vol.name}"
    region = Region(dev, vol.start, vol.length, label)
    reader = READERS[vol.kind]
    try:
        if vol.kind == "ntfs":
            return ntfs.read_free(region, sink=sink, force=force)
        return reader(region, sink=sink)
    except Refusal:
        raise
    except (ValueError, IndexError, OverflowError) as exc:      # a structure too short to parse
        raise Refusal(f"{label}: {vol.kind} metadata is malformed ({exc})") from None
