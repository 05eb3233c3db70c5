"""VSS-style shadow copies of an image file: read-only point-in-time views, copy-on-write.

    from vdisk import shadow
    with shadow.open_shadowed("disk.vhd", "r+") as d:
        s = d.create_shadow("before upgrade")
        d.pwrite(b"new", 0)                      # the old block is preserved first
        with d.shadow_view(s.id) as old:
            old.pread(3, 0)                      # what the disk held when the shadow was made

Any ``vdisk.open(IMAGE, "r+")`` of an image that has a diff area (``IMAGE.vdisk-shadows/``)
returns a :class:`ShadowedDisk` (a wrapper around the Disk, installed by the open pipeline in
vdisk/openers.py), so every writer that goes through vdisk (API, mount, devices,
NBD) keeps the shadows intact. See docs/shadows.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from vdisk.disk import Disk
from vdisk.errors import VDiskError
from .catalog import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_SHADOWS, store_dir
from .filter import ShadowedDisk, ShadowView
from .shadowset import ShadowInfo

__all__ = ["ShadowedDisk", "ShadowView", "ShadowInfo", "open_shadowed", "open_shadow_view", "wrap_writable",
           "export_shadow", "ExportResult", "has_shadows", "list_shadows", "shadow_views", "diff", "store_dir",
           "DEFAULT_BLOCK_SIZE", "DEFAULT_MAX_SHADOWS"]

COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    subtype: str
    size: int
    bytes_copied: int


def has_shadows(image_path: str) -> bool:
    """True when a diff area exists beside the image."""
    return os.path.isdir(store_dir(os.fspath(image_path)))


def wrap_writable(disk: Disk) -> "Disk | ShadowedDisk":
    """The open pipeline's step: a writable disk with a diff area gets the copy-on-write filter."""
    if isinstance(disk, ShadowedDisk) or disk.read_only or not has_shadows(disk.path):
        return disk
    return ShadowedDisk(disk)


def open_shadowed(path, mode: str = "r", **kwargs) -> ShadowedDisk:
    """Open an image with its shadows (the diff area is created by the first ``create_shadow``)."""
    import vdisk
    disk = vdisk.open(path, mode, **kwargs)
    if isinstance(disk, ShadowedDisk):
        return disk
    return ShadowedDisk(disk)


def open_shadow_view(image_path, shadow_id: str, **kwargs) -> ShadowView:
    """Open one shadow of an image read-only as a Disk-like object (for mount and NBD export).

    Closing the view closes the image. The image must not be open read-write in another process
    (its exclusive lock makes this raise :class:`vdisk.LockError`).
    """
    disk = open_shadowed(image_path, "r", **kwargs)
    try:
        return ShadowView(disk, shadow_id, owns_disk=True)
    except BaseException:
        disk.close()
        raise


def shadow_views(disk: Disk) -> dict[str, ShadowView]:
    """Read-only views of every valid shadow of an opened image, as ``{"shadows/<id>": view}``.

    Made for ``vdisk.mount.mount_image(..., extra_views=shadow_views)``: a read-write mount's
    disk is a :class:`ShadowedDisk` and its views share it; for a read-only mount each view opens
    the image once more (read-only) and owns that open.
    """
    if isinstance(disk, ShadowedDisk):
        return {f"shadows/{s.id}": disk.shadow_view(s.id) for s in disk.shadows if s.valid}
    if not has_shadows(disk.path):
        return {}
    with open_shadowed(disk.path, "r") as probe:
        ids = [s.id for s in probe.shadows if s.valid]
    return {f"shadows/{sid}": open_shadow_view(disk.path, sid) for sid in ids}


def export_shadow(image_path, shadow_id: str, dst, *, format: Optional[str] = None,
                  subtype: Optional[str] = None, force: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None) -> ExportResult:
    """Write one shadow as a standalone image *dst* (format from its name unless given).

    Only the shadow's data runs are read and written; the image appears under its name only
    when complete (it is written as ``DST.vdisk-partial`` first).
    """
    import vdisk
    from vdisk.formats import registry
    dst = os.fspath(dst)
    fmt = format or registry.format_from_name(dst)
    sub = subtype or "dynamic"
    if os.path.isdir(dst):
        raise VDiskError(f"{dst}: is a directory")
    if os.path.lexists(dst) and not force:
        raise VDiskError(f"{dst}: already exists (use --force to overwrite)")
    tmp = dst + ".vdisk-partial"
    with open_shadow_view(image_path, shadow_id) as view:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        out = vdisk.create(tmp, view.size, format=fmt, subtype=sub)
        try:
            runs = [e for e in view.extents() if e.kind == vdisk.ExtentKind.DATA]
            total, done = sum(e.length for e in runs), 0
            buf = bytearray(COPY_CHUNK)
            for e in runs:
                for pos in range(e.offset, e.offset + e.length, COPY_CHUNK):
                    piece = memoryview(buf)[:min(COPY_CHUNK, e.offset + e.length - pos)]
                    view.readinto(piece, pos)
                    out.pwrite(piece, pos)
                    done += len(piece)
                    if progress is not None:
                        progress(done, total)
            out.close()
        except BaseException:
            out.close()
            os.unlink(tmp)
            raise
        os.replace(tmp, dst)
        return ExportResult(dst, fmt, sub, view.size, done)


def diff(image_path, shadow_a: str, shadow_b: Optional[str] = "live", **kwargs) -> list[tuple[int, int]]:
    """Changed-block tracking: byte ranges (offset, length), ascending, that differ between shadow
    *shadow_a* and shadow *shadow_b* (or the live image); opens the image read-only."""
    with open_shadowed(image_path, "r", **kwargs) as d:
        return d.diff(shadow_a, shadow_b)


def list_shadows(image_path) -> list[ShadowInfo]:
    """The shadows of an image, oldest first (opens it read-only)."""
    with open_shadowed(image_path, "r") as d:
        return d.shadows

