"""One shadow's diff-area store: an append-only log of preserved blocks.

File layout (little-endian)::

    file header, 64 bytes:  magic b"VDSHSTOR" | version u32 | block_size u32 | shadow id (16 bytes)
                            | reserved (28 bytes) | crc32 of the first 60 bytes u32
    records, back to back:  magic b"VDSR" | kind u8 (1 data, 2 zeros) | 3 reserved | block u64
                            | length u32 | data crc32 u32 | reserved u32 | header crc32 u32   (32 bytes)
                            then *length* bytes of data for kind 1, nothing for kind 2

A record is the index entry and the data it points to in one piece, protected by two checksums, so
"data before the index that points at it" holds by construction: a record whose data did not reach
the disk fails its data checksum and is ignored. Records below the length the catalog recorded as
synced are trusted on their header checksum alone (they were fsync'd before that length was
written); records past it are verified against their data checksum when the store is opened.
Appends always go through :class:`vdisk.io.ImageFile`, the fault-injection seam.
"""
from __future__ import annotations

import os
import struct
import threading
import uuid as uuidlib
import zlib
from typing import Iterable, Optional

from vdisk.errors import FormatError, VDiskError
from vdisk.io import ImageFile

FILE_MAGIC = b"VDSHSTOR"
FILE_VERSION = 1
FILE_HEADER = struct.Struct("<8sII16s28s")          # + crc32 u32 = 64 bytes
FILE_HEADER_SIZE = 64
REC_MAGIC = b"VDSR"
REC = struct.Struct("<4sB3xQIII")                   # + header crc32 u32 = 32 bytes
REC_SIZE = 32
KIND_DATA, KIND_ZERO = 1, 2


class StoreEntry:
    __slots__ = ("kind", "offset", "length")

    def __init__(self, kind: int, offset: int, length: int):
        self.kind, self.offset, self.length = kind, offset, length


def _file_header(block_size: int, shadow_id: uuidlib.UUID) -> bytes:
    raw = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, block_size, shadow_id.bytes, bytes(28))
    return raw + struct.pack("<I", zlib.crc32(raw))


def _record_header(kind: int, block: int, length: int, data_crc: int) -> bytes:
    raw = REC.pack(REC_MAGIC, kind, block, length, data_crc, 0)
    return raw + struct.pack("<I", zlib.crc32(raw))


class ShadowStore:
    """The preserved blocks of one shadow: ``{block: content}`` backed by a log file."""

    def __init__(self, path: str, file: ImageFile, block_size: int, shadow_id: uuidlib.UUID):
        self.path = path
        self.file = file
        self.block_size = block_size
        self.shadow_id = shadow_id
        self.entries: dict[int, StoreEntry] = {}
        self.end = FILE_HEADER_SIZE          # end of the valid log
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, block_size: int, shadow_id: uuidlib.UUID) -> "ShadowStore":
        file = ImageFile(path, create=True, lock=False)
        try:
            file.pwrite(_file_header(block_size, shadow_id), 0)
            file.sync()
        except BaseException:
            file.close()
            raise
        return cls(path, file, block_size, shadow_id)

    @classmethod
    def open(cls, path: str, block_size: int, shadow_id: uuidlib.UUID, *, synced: int,
             writable: bool) -> "ShadowStore":
        """Open and index a store; a torn tail (an interrupted append) is ignored, or cut if writable."""
        file = ImageFile(path, writable=writable, lock=False)
        try:
            head = file.pread(FILE_HEADER_SIZE, 0)
            if len(head) < FILE_HEADER_SIZE or zlib.crc32(head[:60]) != struct.unpack_from("<I", head, 60)[0]:
                raise FormatError(path, "shadow store header", None, 0, "bad checksum or truncated")
            magic, version, bs, sid, _ = FILE_HEADER.unpack_from(head)
            if magic != FILE_MAGIC or version != FILE_VERSION:
                raise FormatError(path, "shadow store header", "magic", 0, "not a vdisk shadow store")
            if bs != block_size or sid != shadow_id.bytes:
                raise FormatError(path, "shadow store header", "block_size", 8,
                                  f"belongs to shadow {uuidlib.UUID(bytes=sid)} with {bs}-byte blocks, "
                                  f"expected {shadow_id} with {block_size}-byte blocks")
            store = cls(path, file, block_size, shadow_id)
            store._scan(FILE_HEADER_SIZE, synced)
            if writable and file.size() > store.end:
                file.truncate(store.end)
                file.sync()
            return store
        except BaseException:
            file.close()
            raise

    def _scan(self, pos: int, synced: int) -> None:
        size = self.file.size()
        while pos + REC_SIZE <= size:
            raw = self.file.pread(REC_SIZE, pos)
            if len(raw) < REC_SIZE or zlib.crc32(raw[:28]) != struct.unpack_from("<I", raw, 28)[0]:
                break
            magic, kind, block, length, data_crc, _ = REC.unpack_from(raw)
            if magic != REC_MAGIC or kind not in (KIND_DATA, KIND_ZERO) or length > self.block_size:
                break
            stored = length if kind == KIND_DATA else 0
            if pos + REC_SIZE + stored > size:
                break
            if kind == KIND_DATA and pos + REC_SIZE + stored > synced:
                if zlib.crc32(self.file.pread(stored, pos + REC_SIZE)) != data_crc:
                    break
            # A block is preserved once; a repeat (a move replayed after a crash) keeps the first.
            self.entries.setdefault(block, StoreEntry(kind, pos + REC_SIZE, length))
            pos += REC_SIZE + stored
        self.end = pos

    # -- the store as a map --------------------------------------------------------------------
    def __contains__(self, block: int) -> bool:
        return block in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def blocks(self) -> Iterable[int]:
        return self.entries.keys()

    @property
    def nbytes(self) -> int:
        """Bytes this store occupies in the diff area."""
        return self.end

    def read_into(self, block: int, view: memoryview, start: int = 0) -> None:
        """Copy bytes [start, start+len(view)) of a preserved block into *view*."""
        e = self.entries[block]
        if e.kind == KIND_ZERO:
            view[:] = bytes(len(view))
            return
        got = self.file.readinto(view, e.offset + start)
        if got != len(view):
            raise VDiskError(f"{self.path}: shadow store is truncated (block {block})")

    def read_block(self, block: int) -> bytes:
        e = self.entries[block]
        buf = bytearray(e.length)
        self.read_into(block, memoryview(buf))
        return bytes(buf)

    # -- appending -----------------------------------------------------------------------------
    @staticmethod
    def record_size(data: Optional[bytes]) -> int:
        return REC_SIZE + (len(data) if data is not None else 0)

    def append(self, items: list[tuple[int, int, Optional[bytes]]]) -> None:
        """Append (block, length, data-or-None-for-zeros) records and make them durable.

        The caller writes the live image only after this returns: the old content is on stable
        storage first.
        """
        if not items:
            return
        with self._lock:
            bufs: list = []
            pos = self.end
            new: list[tuple[int, StoreEntry]] = []
            for block, length, data in items:
                if block in self.entries:
                    continue
                if data is None:
                    bufs.append(_record_header(KIND_ZERO, block, length, 0))
                    new.append((block, StoreEntry(KIND_ZERO, pos + REC_SIZE, length)))
                    pos += REC_SIZE
                else:
                    bufs.append(_record_header(KIND_DATA, block, length, zlib.crc32(data)))
                    bufs.append(data)
                    new.append((block, StoreEntry(KIND_DATA, pos + REC_SIZE, length)))
                    pos += REC_SIZE + length
            if not new:
                return
            self.file.pwritev(bufs, self.end)
            self.file.sync()
            self.end = pos
            for block, entry in new:
                self.entries[block] = entry

    def close(self) -> None:
        self.file.close()

    def unlink(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
