"""The one content digest the operations' ``--verify`` compares: SHA-256 of what a guest reads."""
from __future__ import annotations

import hashlib
from typing import Optional

from vdisk.blockdev import ExtentKind

CHUNK = 16 << 20


def content_digest(device, length: Optional[int] = None, *, chunk: int = CHUNK) -> str:
    """SHA-256 of the first *length* bytes (default: all) of a disk, or of a chain view (an
    Engine) an operation builds. Unallocated and zero runs are hashed without being read."""
    length = device.size if length is None else length
    if hasattr(device, "extents"):
        runs = ((e.offset, e.length, e.kind) for e in device.extents(0, length))
    else:
        runs = ((o, n, k) for o, n, k, _, _ in device.resolve(0, length))
    h = hashlib.sha256()
    zero = bytes(chunk)
    buf = bytearray(chunk)
    for offset, n, kind in runs:
        pos, end = offset, offset + n
        while pos < end:
            m = min(chunk, end - pos)
            if kind != ExtentKind.DATA:
                h.update(memoryview(zero)[:m])
            else:
                view = memoryview(buf)[:m]
                device.readinto(view, pos)
                h.update(view)
            pos += m
    return h.hexdigest()


def path_digest(path: str, **open_args) -> str:
    """content_digest of the image at *path*, opened read-only with *open_args*."""
    import vdisk
    with vdisk.open(path, **open_args) as d:
        return content_digest(d)
