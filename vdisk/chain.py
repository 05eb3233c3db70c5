"""Finding and verifying the parents of differencing images: where to look and what identity to
expect are the child's driver's answers; the chain walks them and keeps depth and loops in check."""
from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .errors import ParentError, VDiskError
from .probe import open_layer
from vdisk.formats.base import Layer
from vdisk.formats.registry import driver_for

MAX_DEPTH = 256


@dataclass
class LayerInfo:
    """What `Disk.chain` reports about one image of a chain (top first)."""
    path: str
    format: str
    subtype: str
    uuid: Optional[uuidlib.UUID]
    parent_uuid: Optional[uuidlib.UUID]
    found_by: str
    size: int
    block_size: int


def _describe_id(layer: Layer) -> Optional[uuidlib.UUID]:
    return driver_for(layer).parent_uuid(layer)


def layer_info(layer: Layer, found_by: str) -> LayerInfo:
    return LayerInfo(layer.path, layer.format, layer.subtype, layer.uuid, _describe_id(layer), found_by,
                     layer.size, layer.block_size)


def find_parent(child: Layer, *, parent_search: Sequence[str] = (), vbox_registry=None,
                size_policy: str = "current", explicit: Optional[str] = None,
                allow_parent_modified: bool = False) -> tuple[Layer, str]:
    """Open and verify the parent of *child*; ParentError lists every place tried."""
    tried: list[str] = []
    registries = [vbox_registry] if isinstance(vbox_registry, (str, os.PathLike)) else list(vbox_registry or ())
    driver = driver_for(child)
    if explicit is not None:
        candidates: Iterable[tuple[str, str]] = [(explicit, "given explicitly")]
    else:
        candidates = driver.parent_candidates(child, parent_search, registries)
    seen = set()
    for path, how in candidates:
        if "\0" in path:                   # a hostile or damaged locator: no OS call takes it
            how = how.replace("\0", "\\x00")
            tried.append(f"{path!r} ({how}): the stored path contains a NUL byte")
            continue
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        if not os.path.isfile(real):
            tried.append(f"{path} ({how}): not found")
            continue
        try:
            parent = open_layer(path, size_policy=size_policy)
        except VDiskError as exc:
            tried.append(f"{path} ({how}): {exc}")
            continue
        if parent.format != child.format:
            tried.append(f"{path} ({how}): is {parent.format}, not {child.format}")
            parent.close()
            continue
        if parent.logical_sector_size != child.logical_sector_size:
            tried.append(f"{path} ({how}): logical sector size {parent.logical_sector_size}, the child has "
                         f"{child.logical_sector_size}")
            parent.close()
            continue
        if not driver.matches_parent(child, parent):
            tried.append(f"{path} ({how}): identity {parent.uuid} does not match {_describe_id(child)}")
            parent.close()
            continue
        try:
            driver.accept_parent(child, parent, allow_parent_modified)
        except BaseException:
            parent.close()
            raise
        return parent, how
    name = next((h.path for h in child.parent_hints if h.kind == "name"), None)
    what = f"'{name}' " if name else ""
    places = "; ".join(tried) if tried else "no candidate locations"
    raise ParentError(f"{child.path}: parent {what}{{{_describe_id(child)}}} not found; tried: {places}")


def open_chain(path: str, *, writable: bool, fmt: Optional[str] = None, parent_search: Sequence[str] = (),
               vbox_registry=None, size_policy: str = "current", allow_parent_modified: bool = False,
               explicit_parent: Optional[str] = None) -> tuple[list[Layer], list[LayerInfo]]:
    top = open_layer(path, writable=writable, fmt=fmt, size_policy=size_policy)
    layers, infos = [top], [layer_info(top, "opened")]
    real_paths = {os.path.realpath(path)}
    try:
        current = top
        while current.is_differencing:
            if len(layers) > MAX_DEPTH:
                raise ParentError(f"{path}: differencing chain is deeper than {MAX_DEPTH} images")
            parent, how = find_parent(current, parent_search=parent_search, vbox_registry=vbox_registry,
                                      size_policy=size_policy, allow_parent_modified=allow_parent_modified,
                                      explicit=explicit_parent if current is top else None)
            real = os.path.realpath(parent.path)
            if real in real_paths:
                parent.close()
                raise ParentError(f"{current.path}: parent chain forms a cycle through {parent.path}")
            real_paths.add(real)
            layers.append(parent)
            infos.append(layer_info(parent, how))
            current = parent
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return layers, infos
