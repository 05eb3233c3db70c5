"""Recognise an image's format from its bytes, and open one file as a Layer."""
from __future__ import annotations

import os
from typing import Optional

from .errors import VDiskError
from .io import ImageFile
from vdisk.formats.base import Layer
from vdisk.formats.raw import open_raw
from vdisk.formats.vdi import is_vdi, open_vdi
from vdisk.formats.vhd import is_vhd, open_vhd

FORMATS = ("raw", "vhd", "vdi")


def probe_file(file: ImageFile) -> str:
    """'vdi', 'vhd' or 'raw' (a file with no known signature is raw)."""
    size = file.size()
    head = file.pread(512, 0)
    if is_vdi(head):
        return "vdi"
    tail = file.pread(512, max(0, size - 512)) if size >= 512 else b""
    if size >= 512 and is_vhd(head, tail):
        return "vhd"
    return "raw"


def probe(path: str) -> str:
    f = ImageFile(path, lock=False)
    try:
        return probe_file(f)
    finally:
        f.close()


def open_layer(path: str, *, writable: bool = False, fmt: Optional[str] = None,
               size_policy: str = "current", lock: bool = True) -> Layer:
    """Open one image file (no parents) as a Layer of its probed or forced format."""
    if fmt is not None and fmt not in FORMATS:
        raise VDiskError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if os.path.isdir(path):
        raise VDiskError(f"{path}: is a directory")
    file = ImageFile(path, writable=writable, lock=lock)
    try:
        # An interrupted in-place operation: a writable open completes or rolls it back first,
        # a read-only open refuses (JournalPendingError).
        from . import journal
        journal.check_on_open(file)
        kind = fmt or probe_file(file)
        if kind == "vdi":
            return open_vdi(file, strict=writable)
        if kind == "vhd":
            return open_vhd(file, size_policy=size_policy, strict_checksums=writable)
        return open_raw(file)
    except BaseException:
        file.close()
        raise
