"""How big a file a new image would be, like ``qemu-img measure``.

    with vdisk.open("disk.vhd") as src:
        m = measure(src, format="vhd", subtype="fixed")     # what `vdisk convert -O vhd` writes
    m = measure(size=10 << 30, format="vdi")                # an empty new image of 10 GiB

``required`` is the file size :func:`vdisk.ops.convert.convert` produces from the source (or
:func:`vdisk.create` for a new empty image); ``fully_allocated`` the size once every block is
stored. Which output blocks hold data comes from the source's allocation map, without reading
it: convert's zero detection can only make the file smaller than ``required`` (never larger),
and ``convert --no-zero-detect`` produces exactly ``required``. The byte arithmetic of each
format is its driver's (``Driver.new_file_size``), the same the drivers
create files with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from vdisk.ops.convert import plan_output
from vdisk.disk import Disk
from vdisk.engine import ExtentKind
from vdisk.formats import registry



@dataclass(frozen=True)
class Measurement:
    """Sizes of the file a conversion (or creation) would write."""
    format: str
    subtype: str
    virtual_size: int
    block_size: Optional[int]          # dynamic VHD/VDI allocation unit, else None
    required: int                      # file size for the source's stored data
    fully_allocated: int               # file size with every block stored

    def as_dict(self) -> dict[str, Any]:
        """JSON form: qemu-img's keys ``required`` and ``fully-allocated``, then vdisk's own."""
        return {"required": self.required, "fully-allocated": self.fully_allocated,
                "format": self.format, "subtype": self.subtype, "virtual_size": self.virtual_size,
                "block_size": self.block_size}


def stored_blocks(source: Disk, block_size: int) -> int:
    """How many *block_size* blocks of the virtual disk hold any stored (DATA) byte of *source*."""
    if not source.size:
        return 0
    starts, ends = [], []
    for voff, length, kind, _level, _foff in source.map_runs(0, source.size):
        if kind == ExtentKind.DATA:
            starts.append(voff)
            ends.append(voff + length)
    if not starts:
        return 0
    first = np.asarray(starts, dtype=np.int64) // block_size
    last = (np.asarray(ends, dtype=np.int64) - 1) // block_size
    # Runs come in order; a block shared by the end of one run and the start of the next counts once.
    overlap = np.count_nonzero(first[1:] == last[:-1])
    return int((last - first + 1).sum()) - int(overlap)


def _new_file_size(fmt: str, subtype: str, size: int, block_size: Optional[int], blocks: int) -> int:
    return registry.driver(fmt).new_file_size(size, subtype, block_size, blocks)


def measure(source: Optional[Disk] = None, *, size: Optional[int] = None, format: str = "raw",
            subtype: Optional[str] = None, block_size: Optional[int] = None,
            target: Optional[str] = None) -> Measurement:
    """Sizes of the image `vdisk convert` would make of *source*, or `vdisk create` of *size* bytes.

    Give exactly one of *source* and *size*. *format*/*subtype*/*target* mean what they mean
    for :func:`vdisk.ops.convert.convert` (default raw, as qemu-img measure), *block_size* the
    output's allocation unit (dynamic VHD/VDI only). Raises ValueError for contradictions.
    """
    if source is not None and size is None:
        virtual = source.size
    elif size is not None and source is None:
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        virtual = size
    else:
        raise ValueError("measure needs either an image or a size (not both)")
    fmt, sub, out_size = plan_output(virtual, format, subtype, target, "")
    dynamic = fmt != "raw" and sub == "dynamic"
    if block_size is not None and not dynamic:
        raise ValueError("--block-size applies to dynamic VHD and VDI outputs only")
    bs = (block_size or registry.driver(fmt).default_block_size) if dynamic else None
    total = -(-out_size // bs) if bs else 0
    if source is not None and bs:
        blocks = stored_blocks(source, bs)
    else:
        blocks = 0                         # a new image stores nothing; fixed and raw ignore it
    required = _new_file_size(fmt, sub, out_size, bs, blocks)
    full = _new_file_size(fmt, sub, out_size, bs, total)
    return Measurement(fmt, sub, out_size, bs, required, full)
