"""Recognise an image's format from its bytes, and open one file as a Layer."""
from __future__ import annotations

import os
from typing import Optional

from .errors import FormatError, VDiskError
from .io import ImageFile
from vdisk.formats.base import Layer
from vdisk.formats.raw import open_raw
from vdisk.formats.vdi import is_vdi, open_vdi, vdi_remnant, vdi_signature_problem
from vdisk.formats.vhd import is_vhd, open_vhd, vhd_remnant
from vdisk.formats.vhdx import is_vhdx, open_vhdx

FORMATS = ("raw", "vhd", "vdi", "vhdx")


def probe_file(file: ImageFile) -> str:
    """'vhdx', 'vdi', 'vhd' or 'raw'. Raw only for a file with no sign of another format: a name ending in
    .vhd/.vdi, a VHD dynamic header or VDI header text without the signature that makes the
    format are a damaged image, refused with a FormatError rather than read as a raw disk."""
    size = file.size()
    head = file.pread(1024, 0)
    if is_vhdx(head):
        return "vhdx"
    if is_vdi(head):
        return "vdi"
    tail = file.pread(512, max(0, size - 512)) if size >= 512 else b""
    if size >= 512 and is_vhd(head, tail):
        return "vhd"
    _refuse_remnants(file.path, head, size)
    return "raw"


RAW_HINT = 'not read as raw; -f raw (format="raw") opens it as a raw disk on purpose'


def _refuse_remnants(path: str, head: bytes, size: int) -> None:
    """Raise a FormatError if the file carries a sign of being a VHD or a VDI."""
    name = os.path.basename(path).lower()
    vhd_header, vdi_text = vhd_remnant(head), vdi_remnant(head)
    vhd_signs = [vhd_header] if vhd_header else []
    vdi_signs = [vdi_text] if vdi_text else []
    if name.endswith(".vhd"):
        vhd_signs.insert(0, "the name ends in .vhd")
    if name.endswith(".vdi"):
        vdi_signs.insert(0, "the name ends in .vdi")
    if name.endswith((".vhdx", ".avhdx")):
        raise FormatError(path, "file type identifier", "signature", 0,
                          f"the name ends in .{name.rsplit('.', 1)[1]}, but the file does not start with "
                          f"'vhdxfile' ({head[:8]!r}): a damaged VHDX, {RAW_HINT}")
    if vdi_text or (vdi_signs and not vhd_header):
        # What the bytes say outweighs what the name says when they disagree.
        raise FormatError(path, "pre-header", "signature", 0x40,
                          f"{' and '.join(vdi_signs)}, but {vdi_signature_problem(head)}: a damaged VDI, {RAW_HINT}")
    if vhd_signs:
        if size < 512:
            lack = f"the file is {size} bytes, too small for a VHD footer"
        else:
            lack = "no 'conectix' footer at the end nor its copy at offset 0"
        raise FormatError(path, "footer", "cookie", size - 512 if size >= 512 else None,
                          f"{' and '.join(vhd_signs)}, but {lack}: a damaged VHD, {RAW_HINT}")


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
        if kind == "vhdx":
            return open_vhdx(file, strict=writable)
        if kind == "vhd":
            return open_vhd(file, size_policy=size_policy, strict_checksums=writable)
        return open_raw(file)
    except BaseException:
        file.close()
        raise
