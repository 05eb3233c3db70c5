"""Streaming a source into a :class:`BackupWriter`: read, zero-test, compress and hash in threads.

Each chunk becomes an independent zstd frame, so *threads* workers compress different chunks
side by side (zstandard and hashlib release the GIL) while the calling thread appends the
finished frames in order. At most ``2 * threads`` chunks are in flight: memory is bounded by
the chunk size, never by the image.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from .writer import BackupWriter, compressor

#: A piece to store: (virtual offset, length, must_read). must_read False: known to read as zeros.
Piece = tuple[int, int, bool]
Progress = Callable[[int, int], None]


class FullGrid:
    """The chunk grid over the whole disk, generated piece by piece from one flag per chunk
    (so a full backup's plan costs a byte per chunk, not a tuple). Chunks without any DATA
    extent need no reading."""

    def __init__(self, source, chunk: int):
        from vdisk.engine import ExtentKind
        self.size, self.chunk = source.size, chunk
        n = -(-self.size // chunk)
        self.has_data = np.zeros(n, dtype=bool)
        for e in source.extents(0, self.size) if self.size else []:
            if e.kind == ExtentKind.DATA:
                self.has_data[e.offset // chunk:(e.offset + e.length - 1) // chunk + 1] = True

    def __iter__(self) -> Iterator[Piece]:
        size, chunk = self.size, self.chunk
        for i, read in enumerate(self.has_data.tolist()):
            yield i * chunk, min(chunk, size - i * chunk), read

    @property
    def covered(self) -> int:
        """Bytes of the disk the pieces cover (all of it)."""
        return self.size

    @property
    def to_read(self) -> int:
        """Bytes of the pieces that must be read."""
        n = len(self.has_data)
        if not n:
            return 0
        last = self.size - (n - 1) * self.chunk
        return int(self.has_data[:-1].sum()) * self.chunk + (last if self.has_data[-1] else 0)


def full_pieces(source, chunk: int) -> FullGrid:
    """The pieces of a full backup of *source*: every chunk of the disk, in order."""
    return FullGrid(source, chunk)


#: Changed ranges closer than this are stored as one piece (fewer entries and frames).
COALESCE = 64 << 10


def changed_pieces(ranges: Iterable[tuple[int, int]], chunk: int, size: int) -> list[Piece]:
    """Changed byte ranges (ascending) merged across small gaps and cut at the chunk grid."""
    merged: list[list[int]] = []
    for off, ln in ranges:
        if ln <= 0:
            continue
        if merged and off - merged[-1][1] < COALESCE:
            merged[-1][1] = max(merged[-1][1], off + ln)
        else:
            merged.append([off, off + ln])
    out: list[Piece] = []
    for start, end in merged:
        end = min(end, size)
        pos = start
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            out.append((pos, stop - pos, True))
            pos = stop
    return out


Pieces = Union[FullGrid, list]


def bytes_to_read(pieces: Pieces) -> int:
    return pieces.to_read if isinstance(pieces, FullGrid) else sum(n for _, n, read in pieces if read)


def bytes_covered(pieces: Pieces) -> int:
    return pieces.covered if isinstance(pieces, FullGrid) else sum(n for _, n, _ in pieces)


def store(source, pieces: Pieces, writer: BackupWriter, *, threads: int, level: int, chunk: int,
          progress: Optional[Progress] = None) -> int:
    """Read every piece from *source* and append it to *writer*; returns the bytes read."""
    total = bytes_to_read(pieces)
    local = threading.local()
    done = 0
    stop = threading.Event()
    if progress:
        progress(0, total)

    def work(offset: int, length: int):
        if stop.is_set():
            return None
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk)
            local.cctx = compressor(level)
        view = memoryview(buf)[:length]
        source.readinto(view, offset)
        if not np.frombuffer(view, np.uint8).any():
            return None
        return local.cctx.compress(view), hashlib.sha256(view).digest()

    def reap(item) -> None:
        nonlocal done
        offset, length, fut = item
        result = None if fut is None else fut.result()
        if result is None:
            writer.add_zero(offset, length)
        else:
            writer.add_data(offset, length, *result)
        if fut is None:
            return
        done += length
        if progress:
            progress(done, total)

    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="vdisk-backup") as pool:
        try:
            for offset, length, read in pieces:
                while len(pending) >= 2 * max(1, threads):
                    reap(pending.popleft())
                # A piece known to be zeros has no job; it waits in line so entries stay in order.
                pending.append((offset, length, pool.submit(work, offset, length) if read else None))
            while pending:
                reap(pending.popleft())
        except BaseException:
            stop.set()
            for _, _, fut in pending:
                if fut is not None:
                    fut.cancel()
            raise
    return done
