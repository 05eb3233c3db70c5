"""VSS-style shadow copies of an image file: read-only point-in-time views, copy-on-write.

    from vdisk import shadow
    with shadow.open_shadowed("disk.vhd", "r+") as d:
        s = d.create_shadow("before upgrade")
        d.pwrite(b"new", 0)                      # the old block is preserved first
        with d.shadow_view(s.id) as old:
            old.pread(3, 0)                      # what the disk held when the shadow was made

Any ``vdisk.open(IMAGE, "r+")`` of an image that has a diff area (``IMAGE.vdisk-shadows/``)
returns a :class:`ShadowedDisk`, so every writer that goes through vdisk (API, mount, devices,
NBD) keeps the shadows intact. See docs/shadows.md.
"""
from __future__ import annotations

import os
from typing import Optional

from vdisk.disk import Disk
from vdisk.disk import open as _open_disk
from .catalog import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_SHADOWS, store_dir
from .filter import ShadowedDisk, ShadowView
from .shadowset import ShadowInfo

__all__ = ["ShadowedDisk", "ShadowView", "ShadowInfo", "open_shadowed", "open_shadow_view", "wrap_writable",
           "export_shadow", "has_shadows", "list_shadows", "store_dir", "DEFAULT_BLOCK_SIZE", "DEFAULT_MAX_SHADOWS"]

def has_shadows(image_path: str) -> bool:
    """True when a diff area exists beside the image."""
    return os.path.isdir(store_dir(os.fspath(image_path)))


def wrap_writable(disk: Disk) -> Disk:
    """Hook for :func:`vdisk.open`: a writable disk with a diff area gets the copy-on-write filter."""
    if isinstance(disk, ShadowedDisk) or disk.read_only or not has_shadows(disk.path):
        return disk
    return ShadowedDisk(disk)


def open_shadowed(path, mode: str = "r", **kwargs) -> ShadowedDisk:
    """Open an image with its shadows (the diff area is created by the first ``create_shadow``)."""
    disk = _open_disk(path, mode, **kwargs)
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


def export_shadow(image_path, shadow_id: str, dst, *, format: Optional[str] = None,
                  subtype: Optional[str] = None, force: bool = False, progress=None):
    """Write one shadow as a standalone image *dst* (format from the name unless given).

    Returns :class:`vdisk.convert.ConvertResult`; only the shadow's data runs are copied.
    """
    from vdisk.convert import convert
    with open_shadow_view(image_path, shadow_id) as view:
        return convert(view, dst, format, subtype, force=force, progress=progress)


def list_shadows(image_path) -> list[ShadowInfo]:
    """The shadows of an image, oldest first (opens it read-only)."""
    with open_shadowed(image_path, "r") as d:
        return d.shadows

