"""Finding and verifying the parents of differencing images (VHD by locator, VDI by UUID, VHDX by
locator and DataWriteGuid)."""
from __future__ import annotations

import glob
import os
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .errors import ParentError, VDiskError
from .probe import open_layer
from vdisk.formats.base import Layer
from vdisk.formats.vdi import peek_identity
from vdisk.formats.vhd import parent_id_bytes
from vdisk.formats.vhdx import peek_identity as vhdx_peek_identity

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
    if layer.parent_id is None:
        return None
    if layer.format in ("vdi", "vhdx"):
        return uuidlib.UUID(bytes_le=layer.parent_id)
    return uuidlib.UUID(bytes=layer.parent_id)


def layer_info(layer: Layer, found_by: str) -> LayerInfo:
    return LayerInfo(layer.path, layer.format, layer.subtype, layer.uuid, _describe_id(layer), found_by,
                     layer.size, layer.block_size)


def _identity(layer: Layer) -> bytes:
    if layer.format == "vdi":
        return layer.header["uuid_create"]
    if layer.format == "vhdx":
        return layer.headers.current["data_write_guid"]
    return parent_id_bytes(layer)


def _vhdx_accepts(child: Layer, parent: Layer) -> bool:
    """A VHDX parent is the one whose DataWriteGuid the child's parent_linkage (or a non-zero
    parent_linkage2) names (VHDX.md A7)."""
    ident = _identity(parent)
    if ident == child.parent_id:
        return True
    from vdisk.formats.vhdx.metadata import linkage_bytes
    alt = linkage_bytes(child.md.locator.get("parent_linkage2"))
    return alt is not None and alt != bytes(16) and alt == ident


def _vhdx_candidates(child: Layer, search: Sequence[str]) -> Iterable[tuple[str, str]]:
    """Locator paths first; then, as Hyper-V files are often renamed, every .vhdx/.avhdx beside
    the child (and in the search folders) whose DataWriteGuid is the linkage."""
    yield from _vhd_candidates(child, search)
    here = os.path.dirname(os.path.abspath(child.path))
    for d in [here, *search]:
        for pattern in ("*.vhdx", "*.avhdx"):
            for p in sorted(glob.glob(os.path.join(glob.escape(d), pattern))):
                if os.path.abspath(p) != os.path.abspath(child.path) and vhdx_peek_identity(p) == child.parent_id:
                    yield p, f"DataWriteGuid scan of {d}"


def _vhd_candidates(child: Layer, search: Sequence[str]) -> Iterable[tuple[str, str]]:
    here = os.path.dirname(os.path.abspath(child.path))
    names = []
    for hint in child.parent_hints:
        if hint.kind == "relative":
            yield os.path.normpath(os.path.join(here, hint.path)), f"relative locator '{hint.path}'"
        elif hint.kind == "absolute":
            yield hint.path, f"absolute locator '{hint.path}'"
        names.append(os.path.basename(hint.path))
    for hint in child.parent_hints:
        if hint.kind == "name":
            yield os.path.join(here, hint.path), "parent name beside the child"
    for d in search:
        for name in dict.fromkeys(names):
            yield os.path.join(d, name), f"search folder {d}"


def _vdi_registry_locations(registry: str) -> Iterable[tuple[str, str]]:
    try:
        tree = ET.parse(registry)
    except (OSError, ET.ParseError) as exc:
        raise VDiskError(f"{registry}: cannot read VirtualBox media registry: {exc}") from None
    base = os.path.dirname(os.path.abspath(registry))
    for el in tree.iter():
        if el.tag.rsplit("}", 1)[-1] == "HardDisk" and el.get("location"):
            uid = (el.get("uuid") or "").strip("{}")
            yield uid, os.path.normpath(os.path.join(base, el.get("location")))


def _vdi_candidates(child: Layer, search: Sequence[str], registries: Sequence[str]) -> Iterable[tuple[str, str]]:
    want = str(uuidlib.UUID(bytes_le=child.parent_id))
    for reg in registries:
        for uid, loc in _vdi_registry_locations(reg):
            if uid.lower() == want:
                yield loc, f"registry {reg}"
    here = os.path.dirname(os.path.abspath(child.path))
    for d in [here, *search]:
        # Files whose header names the wanted UUID first: opening each .vdi of the folder in
        # turn (tables and all) at every level made a deep chain's open quadratic. The others
        # still follow, so a miss reports what each file is.
        scan = [p for p in sorted(glob.glob(os.path.join(glob.escape(d), "*.vdi")))
                if os.path.abspath(p) != os.path.abspath(child.path)]
        ids = [_peeked_identity(p) for p in scan]
        for path, ident in zip(scan, ids):
            if ident == child.parent_id:
                yield path, f"UUID scan of {d}"
        for path, ident in zip(scan, ids):
            if ident != child.parent_id:
                yield path, f"UUID scan of {d}"


#: (device, inode, size, mtime) -> creation UUID of VDI headers already read; bounded.
_PEEKED: dict[tuple, Optional[bytes]] = {}
_PEEKED_MAX = 4096


def _peeked_identity(path: str) -> Optional[bytes]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _PEEKED:
        if len(_PEEKED) >= _PEEKED_MAX:
            _PEEKED.clear()
        _PEEKED[key] = peek_identity(path)
    return _PEEKED[key]


def find_parent(child: Layer, *, parent_search: Sequence[str] = (), vbox_registry=None,
                size_policy: str = "current", explicit: Optional[str] = None,
                allow_parent_modified: bool = False) -> tuple[Layer, str]:
    """Open and verify the parent of *child*; ParentError lists every place tried."""
    tried: list[str] = []
    registries = [vbox_registry] if isinstance(vbox_registry, (str, os.PathLike)) else list(vbox_registry or ())
    if explicit is not None:
        candidates: Iterable[tuple[str, str]] = [(explicit, "given explicitly")]
    elif child.format == "vhd":
        candidates = _vhd_candidates(child, parent_search)
    elif child.format == "vhdx":
        candidates = _vhdx_candidates(child, parent_search)
    else:
        candidates = _vdi_candidates(child, parent_search, registries)
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
            parent = open_layer(path, size_policy=size_policy, fmt=None if explicit is None else None)
        except VDiskError as exc:
            tried.append(f"{path} ({how}): {exc}")
            continue
        if parent.format != child.format:
            tried.append(f"{path} ({how}): is {parent.format}, not {child.format}")
            parent.close()
            continue
        if child.format == "vhdx" and parent.format == "vhdx" and \
                parent.logical_sector_size != child.logical_sector_size:
            tried.append(f"{path} ({how}): logical sector size {parent.logical_sector_size}, the child has "
                         f"{child.logical_sector_size}")
            parent.close()
            continue
        if child.format == "vhdx" and _vhdx_accepts(child, parent):
            pass
        elif _identity(parent) != child.parent_id:
            tried.append(f"{path} ({how}): identity {parent.uuid} does not match {_describe_id(child)}")
            parent.close()
            continue
        if child.format == "vdi":
            want_mod = child.header.get("uuid_parent_modify", bytes(16))
            if want_mod != bytes(16) and want_mod != parent.header["uuid_modify"] and not allow_parent_modified:
                parent.close()
                raise ParentError(f"{child.path}: parent {path} was modified after this differencing image "
                                  f"was made (modification UUID {uuidlib.UUID(bytes_le=parent.header['uuid_modify'])}, "
                                  f"expected {uuidlib.UUID(bytes_le=want_mod)})")
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
