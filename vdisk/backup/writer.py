"""Writing one backup file: frames appended to a temporary file, published only when complete.

The file gets its name (atomically, never replacing another unless forced) only after the
footer is written and the data is fsynced, so an interrupted backup leaves nothing that looks
like a backup: at most a ``.NAME.*.vdisk-tmp`` file without a footer, which no reader accepts.
"""
from __future__ import annotations

import os
import uuid as uuidlib
import numpy as np
import zstandard

from vdisk.errors import VDiskError
from .container import (DIGEST_SIZE, ENTRY_DTYPE, KIND_DATA, KIND_ZERO, Header, encode_footer, encode_header,
                        encode_index)

ZERO_DIGEST = bytes(DIGEST_SIZE)         # zero entries carry no checksum (their content is known)
#: Buffered appends: frames are small, writes big.
WRITE_BUFFER = 4 << 20


def compressor(level: int) -> zstandard.ZstdCompressor:
    """The frame settings every data frame uses: content size and XXH64 checksum in the frame
    (so ``zstd -d`` can check it too), one thread per frame (frames are compressed side by side)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


class BackupWriter:
    """Append entries in virtual order; :meth:`finish` writes index and footer and publishes."""

    def __init__(self, dst, header: Header, *, force: bool = False):
        from vdisk.ops.convert import _probe_creatable, _temp_path
        self.dst = os.fspath(dst)
        self.header = header
        self.force = force
        if os.path.isdir(self.dst):
            raise VDiskError(f"{self.dst}: is a directory")
        if os.path.lexists(self.dst) and not force:
            raise VDiskError(f"{self.dst}: already exists (use --force to overwrite)")
        folder = os.path.dirname(os.path.abspath(self.dst))
        if not os.path.isdir(folder):
            raise VDiskError(f"{folder}: no such directory")
        self.tmp = _temp_path(self.dst)
        _probe_creatable(self.tmp, self.dst)
        self._f = open(self.tmp, "xb", buffering=WRITE_BUFFER)
        # The index rows, 72 bytes each, in an array that doubles as it fills.
        self._rows = np.zeros(1024, ENTRY_DTYPE)
        self._n = 0
        self._zero_frames: dict[int, bytes] = {}
        self._cctx = compressor(header.level)
        self._pos = 0
        self._append(encode_header(header))
        self.zero_bytes = 0
        self.data_bytes = 0

    def _append(self, data: bytes) -> int:
        at = self._pos
        self._f.write(data)
        self._pos += len(data)
        return at

    def add_data(self, offset: int, length: int, frame: bytes, digest: bytes) -> None:
        """One chunk of data: its zstd frame and the SHA-256 of its uncompressed bytes."""
        at = self._append(frame)
        self._row(offset, length, at, len(frame), KIND_DATA, digest)
        self.data_bytes += length

    def add_zero(self, offset: int, length: int) -> None:
        """A chunk that reads as zeros: a frame of zeros in a full backup (``zstd -d`` must yield
        them), no frame at all in an incremental one. The frame is compressed once per length."""
        if self.header.kind == "full":
            frame = self._zero_frames.get(length)
            if frame is None:
                frame = self._zero_frames[length] = self._cctx.compress(bytes(length))
            at = self._append(frame)
            self._row(offset, length, at, len(frame), KIND_ZERO, ZERO_DIGEST)
        else:
            self._row(offset, length, 0, 0, KIND_ZERO, ZERO_DIGEST)
        self.zero_bytes += length

    def _row(self, offset: int, length: int, frame_offset: int, frame_length: int, kind: int,
             digest: bytes) -> None:
        if self._n == len(self._rows):
            grown = np.zeros(2 * len(self._rows), ENTRY_DTYPE)
            grown[:self._n] = self._rows
            self._rows = grown
        row = self._rows[self._n]
        row["offset"], row["length"], row["frame_offset"], row["frame_length"], row["kind"] = \
            offset, length, frame_offset, frame_length, kind
        row["digest"] = np.frombuffer(digest, np.uint8)
        self._n += 1

    @property
    def entries(self) -> int:
        return self._n

    def finish(self) -> int:
        """Index, footer, fsync, rename into place, fsync the folder; returns the file size."""
        from vdisk.ops.convert import _publish
        n = self._n
        index = encode_index(self._rows[:n])
        self._rows = self._rows[:0]
        at = self._append(index)
        self._append(encode_footer(at, len(index), n, uuidlib.UUID(self.header.backup_id).bytes))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        _publish(self.tmp, self.dst, self.force)
        return self._pos

    def abort(self) -> None:
        """Drop the temporary file (an exception or a signal interrupted the backup)."""
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def check_level(level: int) -> int:
    if not 1 <= level <= 22:
        raise ValueError(f"--level must be 1..22 (zstd levels), not {level}")
    return level


__all__ = ["BackupWriter", "compressor", "check_level"]
