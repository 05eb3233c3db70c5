"""The open pipeline behind :func:`vdisk.open`: the steps around the core's image-chain open.

The core (:func:`vdisk.disk.open`) opens an image file and its parents as a :class:`vdisk.Disk`
and knows nothing else. What files *beside* or *instead of* an image change is a step here, run
in the order of :data:`STEPS`:

- ``backup``: a vdisk backup (``.vbk``, vdisk/backup) opens as a read-only view instead of an
  image chain;
- ``snapshot tree``: an ``IMAGE.snapshots/`` folder (vdisk/snapshot.py) adds the folders where
  the frozen parents live to the parent search;
- ``shadows``: a diff area (``IMAGE.vdisk-shadows/``, vdisk/shadow) wraps a writable disk in the
  copy-on-write filter, so every writer that goes through vdisk keeps the shadows intact.

A step's ``before`` may adjust the request or answer it with a device of its own (the pipeline
ends there); its ``after`` may wrap the device the core opened. Steps import their packages when
they run; the core imports nothing from here (tests/test_layering.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, cast

from .blockdev import BlockDevice
from .disk import Disk, check_open_args
from .disk import open as open_image_chain
from . import sidecars
from .errors import ReadOnlyError


@dataclass
class OpenRequest:
    """What :func:`open` was asked for; ``before`` steps may extend ``parent_search``."""
    path: str
    mode: str
    writable: bool
    format: Optional[str]
    parent_search: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)     # passed to the core unchanged


@dataclass(frozen=True)
class Step:
    """One stage of the pipeline: a name (for docs and errors) and up to two hooks."""
    name: str
    before: Optional[Callable[[OpenRequest], Optional[BlockDevice]]] = None
    after: Optional[Callable[[BlockDevice, OpenRequest], BlockDevice]] = None


def _open_backup(req: OpenRequest) -> Optional[BlockDevice]:
    if req.format is not None:
        return None
    from .backup.reader import is_backup            # the header peek alone, not the package
    if not is_backup(req.path):
        return None
    from .backup import open_backup
    if req.writable:
        raise ReadOnlyError(f"{req.path}: a vdisk backup is read-only (restore it to get a writable image)")
    return open_backup(req.path)


def _snapshot_search(req: OpenRequest) -> None:
    folder = req.path + sidecars.SNAPSHOTS
    if os.path.isdir(folder):
        req.parent_search = (*req.parent_search, folder, os.path.dirname(os.path.abspath(req.path)))
    return None


def _wrap_shadows(device: BlockDevice, req: OpenRequest) -> BlockDevice:
    if not req.writable:
        return device
    if not os.path.isdir(req.path + sidecars.SHADOWS):
        return device
    from .shadow import wrap_writable
    return cast(BlockDevice, wrap_writable(cast(Disk, device)))


#: The pipeline, in order. The core's chain open runs between the ``before`` and ``after`` hooks.
STEPS: list[Step] = [
    Step("backup", before=_open_backup),
    Step("snapshot tree", before=_snapshot_search),
    Step("shadows", after=_wrap_shadows),
]


def open(path, mode: str = "r", *, parent_search: Sequence[str] = (), vbox_registry=None,
         size_policy: str = "current", format: Optional[str] = None, parent: Optional[str] = None,
         allow_parent_modified: bool = False) -> Disk:
    """Open an image (and its parents) as a :class:`vdisk.Disk`.

    mode "r" (shared lock) or "r+" (exclusive lock, top image writable). *format* forces the
    format instead of probing; *parent* names the top image's parent explicitly. A vdisk backup
    opens read-only; a writable image with shadow copies comes back as a
    :class:`vdisk.shadow.ShadowedDisk`, which offers the same methods (see :data:`STEPS`).
    """
    writable = check_open_args(mode, size_policy)
    req = OpenRequest(os.fspath(path), mode, writable, format, tuple(parent_search),
                      dict(vbox_registry=vbox_registry, size_policy=size_policy, parent=parent,
                           allow_parent_modified=allow_parent_modified))
    for step in STEPS:
        if step.before is not None:
            answer = step.before(req)
            if answer is not None:
                return cast(Disk, answer)
    device: BlockDevice = open_image_chain(req.path, req.mode, format=req.format,
                                           parent_search=req.parent_search, **req.options)
    for step in STEPS:
        if step.after is not None:
            try:
                device = step.after(device, req)
            except BaseException:
                cast(Disk, device).close()
                raise
    # A wrapper offers every public Disk method; callers keep the one type they know.
    return cast(Disk, device)
