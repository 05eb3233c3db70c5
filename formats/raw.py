"""Raw images: the file is the disk. Holes (SEEK_HOLE) are reported as unallocated."""
from __future__ import annotations

from typing import Optional, Sequence

from vdisk.io import ImageFile
from .base import Layer, data_runs_from_holes

RAW_BLOCK = 1 << 20

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def punch_hole(file: ImageFile, offset: int, length: int) -> bool:
    """Deallocate a byte range of a file (reads back zeros); False where unsupported."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        import ctypes                                  # only images that punch holes pay for it
        _libc = ctypes.CDLL(None, use_errno=True)      # the C library this Python runs on
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    file._check("write", offset, length)
    return _libc.fallocate(file.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


class FlatLayer(Layer):
    """A layer whose guest data is one contiguous run of the file (raw, fixed VHD)."""

    data_start = 0

    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        base = self.data_start + block * self.block_size
        for off, data in pieces:
            self.file.pwrite(data, base + off)
        self.block_map[block] = base
        return base

    def punch(self, file_offset: int, length: int) -> bool:
        return punch_hole(self.file, file_offset, length)


class RawLayer(FlatLayer):
    def info(self) -> dict:
        return {}


def open_raw(file: ImageFile, size: Optional[int] = None) -> RawLayer:
    size = file.size() if size is None else size
    block_map = data_runs_from_holes(file, 0, size, RAW_BLOCK)
    return RawLayer(file=file, format="raw", subtype="raw", size=size, block_size=RAW_BLOCK,
                    block_map=block_map)


def create_raw(file: ImageFile, size: int) -> RawLayer:
    file.truncate(size)
    return open_raw(file, size)
