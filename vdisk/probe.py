"""Recognise an image's format from its bytes, and open one file as a Layer."""
from __future__ import annotations

import os
from typing import Optional

from .errors import VDiskError
from .io import ImageFile
from vdisk.formats import registry
from vdisk.formats.base import Layer

FORMATS = registry.NAMES


def probe_file(file: ImageFile) -> str:
    """The name of the format whose driver is surest of the file (raw is the fallback). Raw
    only for a file with no sign of another format: a name ending in another format's extension,
    or a remnant of its header without the signature that makes the format, is a damaged image,
    refused with a FormatError rather than read as a raw disk."""
    size = file.size()
    head = file.pread(1024, 0)
    tail = file.pread(512, max(0, size - 512)) if size >= 512 else b""
    drivers = registry.drivers()
    scores = [d.probe(head, tail, size) for d in drivers]
    best = max(range(len(drivers)), key=lambda i: scores[i])      # the first of equals wins
    if drivers[best].name == "raw":
        _refuse_remnants(file.path, head, size, drivers)
    return drivers[best].name


RAW_HINT = 'not read as raw; -f raw (format="raw") opens it as a raw disk on purpose'


def _refuse_remnants(path: str, head: bytes, size: int, drivers) -> None:
    """Raise a FormatError if the file carries a sign of being an image of another format.
    What the bytes say outweighs what the name says when they disagree."""
    by_bytes = [(d, d.remnant(head)) for d in drivers]
    by_bytes = [(d, sign) for d, sign in by_bytes if sign]
    named = [d for d in drivers if d.name != "raw" and d.named(path)]
    if by_bytes:
        d, sign = by_bytes[0]
        signs = ([f"the name ends in {_ending(d, path)}"] if d in named else []) + [sign]
        raise d.refusal(path, head, size, signs, RAW_HINT)
    if named:
        d = named[0]
        raise d.refusal(path, head, size, [f"the name ends in {_ending(d, path)}"], RAW_HINT)


def _ending(driver, path: str) -> str:
    name = path.lower()
    return next(e for e in driver.extensions if name.endswith(e))


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
        return registry.driver(kind).open(file, writable=writable, size_policy=size_policy)
    except BaseException:
        file.close()
        raise
