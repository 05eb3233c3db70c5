"""A chain of backups (full first) as a read-only :class:`vdisk.Disk` (a BlockDevice).

The full backup's entries cover the disk; each incremental's entries replace what lies under
them. The result is a sorted table of segments (numpy), each read from one entry of one file or
as zeros; a read decompresses the entries it touches (their SHA-256 checked) and keeps the last
few in a small cache, so sequential reads through a mount or NBD cost one decompression per chunk.
"""
from __future__ import annotations

import collections
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from vdisk.blockdev import Extent, ExtentKind
from vdisk.chain import LayerInfo
from vdisk.disk import Disk
from vdisk.io import ImageFile
from .container import KIND_ZERO
from .reader import BackupFile

#: Decompressed chunks kept for reuse (bytes); a few chunks, whatever the image size.
CACHE_BYTES = 32 << 20
FORMAT = "backup"


@dataclass
class BackupLayer:
    """One backup file of the chain, described with the fields `vdisk info` reads of a chain layer
    (``Disk.layers``); it is no image format, so it allocates nothing and nothing writes it."""
    file: ImageFile
    format: str
    subtype: str
    size: int
    block_size: int
    block_map: np.ndarray
    uuid: Optional[uuidlib.UUID] = None
    parent_id: Optional[bytes] = None
    backup: Optional[BackupFile] = None
    parent_hints: list = field(default_factory=list)
    geometry: Optional[tuple] = None
    creator: Optional[str] = None
    warnings: list = field(default_factory=list)
    sector_granular: bool = False
    logical_sector_size: int = 512

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def is_differencing(self) -> bool:
        return False

    @property
    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.file.close()

    def info(self) -> dict:
        h = self.backup.header
        return {"backup_id": h.backup_id, "kind": h.kind, "parent": h.parent, "base_shadow": h.base_shadow,
                "shadow": h.shadow, "image": h.image, "chunk_size": h.chunk_size, "level": h.level,
                "created": h.created, "entries": int(len(self.backup.entries))}


def _segments(files: list[BackupFile]) -> list[tuple[int, int, int, int]]:
    """(start, end, file index or -1 for zeros, entry index), sorted, covering the whole disk."""
    segs: list = []
    for src, bf in enumerate(files):
        e = bf.entries
        new = [(int(o), int(o + n), -1 if k == KIND_ZERO else src, i)
               for i, (o, n, k) in enumerate(zip(e["offset"].tolist(), e["length"].tolist(), e["kind"].tolist()))]
        segs = new if src == 0 else _overlay(segs, new)
    out: list = []
    for s in segs:                                   # zeros next to zeros: one segment
        if out and s[2] == -1 and out[-1][2] == -1 and out[-1][1] == s[0]:
            out[-1] = (out[-1][0], s[1], -1, -1)
        else:
            out.append(s if s[2] != -1 else (s[0], s[1], -1, -1))
    return out


def _overlay(old: list, new: list) -> list:
    """*new* segments (sorted, disjoint) laid over *old* (sorted, covering the disk)."""
    out: list = []
    j = 0
    for s, e, src, ent in new:
        while j < len(old) and old[j][1] <= s:
            out.append(old[j])
            j += 1
        if j < len(old) and old[j][0] < s:
            o = old[j]
            out.append((o[0], s, o[2], o[3]))
            old[j] = (s, o[1], o[2], o[3])
        out.append((s, e, src, ent))
        while j < len(old) and old[j][1] <= e:
            j += 1
        if j < len(old) and old[j][0] < e:
            o = old[j]
            old[j] = (e, o[1], o[2], o[3])
    out.extend(old[j:])
    return out


class BackupDisk(Disk):
    """Read-only Disk over a backup chain (``files`` full first); closing it closes the files."""

    def __init__(self, files: list[BackupFile]):
        self._files = files
        top = files[-1].header
        self._size = top.virtual_size
        self._layers = [BackupLayer(file=bf.file, format=FORMAT, subtype=bf.header.kind, size=bf.header.virtual_size,
                                    block_size=bf.header.chunk_size, block_map=np.zeros(0, np.int64),
                                    uuid=uuidlib.UUID(bf.header.backup_id),
                                    parent_id=None if bf.header.parent is None else uuidlib.UUID(bf.header.parent).bytes,
                                    backup=bf)
                        for bf in reversed(files)]
        self.chain = [LayerInfo(bf.path, FORMAT, bf.header.kind, uuidlib.UUID(bf.header.backup_id),
                                None if bf.header.parent is None else uuidlib.UUID(bf.header.parent),
                                "opened" if i == 0 else "parent backup id", bf.header.virtual_size,
                                bf.header.chunk_size)
                      for i, bf in enumerate(reversed(files))]
        self.read_only = True
        self._closed = False
        self._close_lock = threading.Lock()
        segs = _segments(files)
        self._starts = np.array([s[0] for s in segs], np.int64)
        self._ends = np.array([s[1] for s in segs], np.int64)
        self._srcs = np.array([s[2] for s in segs], np.int64)
        self._ents = np.array([s[3] for s in segs], np.int64)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    # -- identity -------------------------------------------------------------------------------
    size = property(lambda self: self._size)
    format = property(lambda self: FORMAT)
    subtype = property(lambda self: self._files[-1].header.kind)
    block_size = property(lambda self: self._files[-1].header.chunk_size)
    logical_sector_size = property(lambda self: 512)     # the header records none: bytes are bytes
    uuid = property(lambda self: uuidlib.UUID(self._files[-1].header.backup_id))
    path = property(lambda self: self._files[-1].path)
    geometry = property(lambda self: None)

    @property
    def backups(self) -> list[BackupFile]:
        """The files of the chain, full backup first."""
        return list(self._files)

    def __repr__(self) -> str:
        return f"<vdisk.backup.BackupDisk {self.path!r} {len(self._files)} backup(s) {self.size} bytes ro>"

    # -- reading --------------------------------------------------------------------------------
    def _span(self, offset: int, length: int):
        i = int(np.searchsorted(self._ends, offset, side="right"))
        end = offset + length
        while i < len(self._starts) and self._starts[i] < end:
            yield (max(int(self._starts[i]), offset), min(int(self._ends[i]), end), int(self._srcs[i]),
                   int(self._ents[i]))
            i += 1

    def _chunk(self, src: int, ent: int) -> bytes:
        key = (src, ent)
        with self._cache_lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        data = self._files[src].read_entry(ent)
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)
        return data

    def readinto(self, buffer, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        self._check_range(offset, n)
        for s, e, src, ent in self._span(offset, n):
            piece = view[s - offset:e - offset]
            if src < 0:
                piece[:] = bytes(e - s)
                continue
            base = int(self._files[src].entries[ent]["offset"])
            piece[:] = memoryview(self._chunk(src, ent))[s - base:e - base]
        return n

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def map_runs(self, offset: int, length: int):
        """(offset, length, kind, layer, file offset of the frame) runs; zeros are UNALLOCATED."""
        self._check_range(offset, length)
        top = len(self._files) - 1
        out: list = []
        for s, e, src, ent in self._span(offset, length):
            if src < 0:
                if out and out[-1][2] == ExtentKind.UNALLOCATED:
                    p = out.pop()
                    out.append((p[0], p[1] + e - s, p[2], -1, -1))
                else:
                    out.append((s, e - s, ExtentKind.UNALLOCATED, -1, -1))
            else:
                out.append((s, e - s, ExtentKind.DATA, top - src, int(self._files[src].entries[ent]["frame_offset"])))
        return out

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        out: list[Extent] = []
        for s, n, kind, level, _ in self.map_runs(offset, length):
            layer = None if level < 0 else level
            if out and out[-1].kind == kind and out[-1].layer == layer and out[-1].offset + out[-1].length == s:
                p = out.pop()
                out.append(Extent(p.offset, p.length + n, kind, layer))
            else:
                out.append(Extent(s, n, ExtentKind(kind), layer))
        return out

    def flush(self) -> None:
        """Nothing to make durable: a backup is never written through a Disk."""

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with self._cache_lock:
                self._cache.clear()
            for bf in self._files:
                bf.close()
