"""Opening one backup file: header, footer and index checked, chunks read back verified."""
from __future__ import annotations

import hashlib
import os
import stat
import threading

import numpy as np
import zstandard

from vdisk.errors import ChecksumError, FormatError, VDiskError
from vdisk.io import ImageFile
from .container import (DIGEST_SIZE, ENTRY_DTYPE, FOOTER_SIZE, FRAME_HEAD, KIND_DATA, KIND_ZERO, MAX_HEADER,
                        SKIPPABLE_MAGIC, ZSTD_MAGIC, Header, decode_footer, decode_header, decode_index,
                        is_backup_head)

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstandard objects are not thread-safe; each reading thread keeps its own.
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def is_backup(path) -> bool:
    """True when the file at *path* starts with a vdisk backup header frame."""
    try:
        # Only a regular file can be a backup; opening a FIFO to peek would block forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(os.fspath(path), "rb") as f:
            return is_backup_head(f.read(16))
    except OSError:
        return False


class BackupFile:
    """One backup file, opened read-only: its :class:`Header` and its index (numpy, ENTRY_DTYPE).

    Opening checks everything but the data: header and index checksums, the footer, that every
    entry lies inside the disk and every frame inside the file, in order, without overlap. The
    data of an entry is checked (SHA-256) each time :meth:`read_entry` decompresses it.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.file = ImageFile(self.path)
        try:
            self._load()
        except BaseException:
            self.file.close()
            raise

    def _load(self) -> None:
        path, f = self.path, self.file
        size = f.size()
        head = f.pread(FRAME_HEAD.size + 8, 0)
        if not is_backup_head(head):
            raise FormatError(path, "backup header", None, 0, "not a vdisk backup (no header frame)")
        _, hlen = FRAME_HEAD.unpack_from(head)
        if hlen > MAX_HEADER or FRAME_HEAD.size + hlen > size:
            raise FormatError(path, "backup header", "length", 4, f"header of {hlen} bytes does not fit the file (truncated?)")
        self.header: Header = decode_header(path, f.pread(hlen, FRAME_HEAD.size))
        self.data_start = FRAME_HEAD.size + hlen
        footer = decode_footer(path, f.pread(FOOTER_SIZE, max(0, size - FOOTER_SIZE)) if size >= FOOTER_SIZE else b"",
                               size)
        if footer.index_offset < self.data_start:
            raise FormatError(path, "backup footer", "index_offset", size - FOOTER_SIZE,
                              f"index at {footer.index_offset} overlaps the header")
        raw = f.pread(footer.index_length, footer.index_offset)
        magic, n = FRAME_HEAD.unpack_from(raw)
        if magic != SKIPPABLE_MAGIC or n != footer.index_length - FRAME_HEAD.size:
            raise FormatError(path, "backup index", None, footer.index_offset, "no index frame where the footer says")
        self.entries: np.ndarray = decode_index(path, raw[FRAME_HEAD.size:], footer.index_offset, footer.count)
        if footer.backup_id != _uuid_bytes(self.header.backup_id):
            raise FormatError(path, "backup footer", "backup_id", size - FOOTER_SIZE,
                              "does not match the header (pieces of two backups?)")
        self.index_offset = footer.index_offset
        self._check_entries()

    def _check_entries(self) -> None:
        e, h, path = self.entries, self.header, self.path
        if not len(e):
            if h.kind == "full" and h.virtual_size:
                raise FormatError(path, "backup index", None, self.index_offset, "a full backup with no entries")
            return
        off, ln = e["offset"].astype(np.int64), e["length"].astype(np.int64)
        foff, flen = e["frame_offset"].astype(np.int64), e["frame_length"].astype(np.int64)
        kind = e["kind"]

        def bad(i: int, problem: str) -> FormatError:
            return FormatError(path, "backup index", f"entry[{i}]", self.index_offset, problem)

        checks = [
            ((kind != KIND_DATA) & (kind != KIND_ZERO), "unknown kind"),
            ((ln <= 0) | (ln > h.chunk_size), f"length outside 1..{h.chunk_size}"),
            ((off < 0) | (off + ln > h.virtual_size), f"lies outside the disk ({h.virtual_size} bytes)"),
            ((kind == KIND_DATA) & (flen <= FRAME_HEAD.size), "data entry without a frame"),
            ((flen > 0) & ((foff < self.data_start) | (foff + flen > self.index_offset)),
             "frame outside the data area"),
        ]
        if h.kind == "full":
            checks.append(((kind == KIND_ZERO) & (flen == 0), "zero entry of a full backup without a frame"))
        for mask, problem in checks:
            if mask.any():
                raise bad(int(np.flatnonzero(mask)[0]), problem)
        if (off[1:] < off[:-1] + ln[:-1]).any():
            raise bad(int(np.flatnonzero(off[1:] < off[:-1] + ln[:-1])[0]) + 1, "overlaps the entry before it")
        framed = flen > 0
        fo, fl = foff[framed], flen[framed]
        if len(fo) and (fo[0] != self.data_start or (fo[1:] != fo[:-1] + fl[:-1]).any()
                        or fo[-1] + fl[-1] != self.index_offset):
            raise FormatError(path, "backup index", "frame_offset", self.index_offset,
                              "frames do not follow each other from the header to the index")
        if h.kind == "full" and (off[0] != 0 or (off[1:] != off[:-1] + ln[:-1]).any() or off[-1] + ln[-1] != h.virtual_size):
            raise FormatError(path, "backup index", None, self.index_offset,
                              "a full backup's entries do not cover the whole disk")

    # -- data ----------------------------------------------------------------------------------
    def read_frame(self, i: int) -> bytes:
        e = self.entries[i]
        return self.file.pread(int(e["frame_length"]), int(e["frame_offset"]))

    def read_entry(self, i: int) -> bytes:
        """The content of entry *i* (zeros for a zero entry), its checksum verified."""
        e = self.entries[i]
        length = int(e["length"])
        if e["kind"] == KIND_ZERO:
            return bytes(length)
        frame = self.read_frame(i)
        data = self.decompress(frame, length, int(e["offset"]), int(e["frame_offset"]))
        if hashlib.sha256(data).digest() != bytes(e["digest"]):
            raise ChecksumError(self.path, f"backup chunk for disk offset {int(e['offset'])}", None,
                                int(e["frame_offset"]), "SHA-256 mismatch (the backup is damaged)")
        return data

    def decompress(self, frame: bytes, length: int, voff: int, foff: int) -> bytes:
        """Decompress one frame that must hold exactly *length* bytes (never more is allocated)."""
        where = f"backup chunk for disk offset {voff}"
        if len(frame) < 4 or int.from_bytes(frame[:4], "little") != ZSTD_MAGIC:
            raise FormatError(self.path, where, None, foff, "not a zstd frame (the backup is damaged)")
        try:
            params = zstandard.get_frame_parameters(frame)
            if params.content_size != length:
                raise FormatError(self.path, where, None, foff,
                                  f"frame holds {params.content_size} bytes, the index says {length}")
            data = _decompressor().decompress(frame, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise FormatError(self.path, where, None, foff, f"cannot decompress ({exc}): the backup is damaged") from None
        if len(data) != length:
            raise FormatError(self.path, where, None, foff, f"decompressed to {len(data)} bytes, not {length}")
        return data

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "BackupFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BackupFile {self.path!r} {self.header.kind} {self.header.backup_id}>"


def _uuid_bytes(text: str) -> bytes:
    import uuid
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise VDiskError(f"invalid backup id {text!r}") from None


__all__ = ["BackupFile", "is_backup", "DIGEST_SIZE", "ENTRY_DTYPE"]
