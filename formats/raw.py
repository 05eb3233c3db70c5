"""Raw images: the file is the disk. Holes (SEEK_HOLE) are reported as unallocated."""
from __future__ import annotations

from typing import Optional, Sequence

from vdisk.errors import UnsupportedError
from vdisk.io import ImageFile
from .base import Layer, data_runs_from_holes
from .driver import Driver
from .maintenance import ResizePlan

RAW_BLOCK = 1 << 20

class FlatLayer(Layer):
    """A layer whose guest data is one contiguous run of the file (raw, fixed VHD)."""

    data_start = 0
    flat = True

    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        base = self.data_start + block * self.block_size
        for off, data in pieces:
            self.file.pwrite(data, base + off)
        self.block_map[block] = base
        return base

    def punch(self, file_offset: int, length: int) -> bool:
        return self.file.punch_hole(file_offset, length)


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


class RawDriver(Driver):
    """A raw file is the disk itself: recognised only when no other format claims the file."""
    name = "raw"
    probe_rank = 9
    extensions = (".raw", ".img", ".bin", ".iso")
    subtypes = ("raw", "fixed", "dynamic")
    has_parents = False
    size_granule = 1

    def probe(self, head: bytes, tail: bytes, size: int) -> int:
        return 1                      # the fallback, after every format with a signature

    def open(self, file: ImageFile, *, writable: bool, size_policy: str = "current") -> Layer:
        return open_raw(file)

    def create(self, file: ImageFile, size: int, subtype: str, *, block_size: Optional[int],
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str], **options) -> Layer:
        if parent is not None:
            raise UnsupportedError("raw images have no parents")
        return create_raw(file, size)

    def check(self, file: ImageFile, report, plan) -> None:
        report.subtype = "raw"                        # nothing but data to check

    def resize_plan(self, layer: Layer, new_size: int) -> ResizePlan:
        return ResizePlan(final_size=new_size)        # the file is the disk


DRIVER = RawDriver()
