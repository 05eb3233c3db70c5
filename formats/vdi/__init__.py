"""VirtualBox VDI: fixed, dynamic and differencing images (spec digest VDI.md).

The package holds all of vdisk's VDI knowledge: ``structs`` (the on-disk declarations),
``image`` (open, the layer, create) and the driver below, which is what the generic code
talks to. A child names its parent by the parent's creation UUID; VirtualBox finds it through
its media registry, vdisk also by scanning folders.
"""
from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from typing import Iterable, Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk.errors import FormatError, ParentError, UnsupportedError, VDiskError
from vdisk.io import ImageFile
from ..base import Layer
from ..driver import Driver
from ..maintenance import LinkPlan, ResizePlan, SparseLayout
from .image import (DEFAULT_BLOCK_SIZE, MAX_BLOCKS, MAX_VIRTUAL_SIZE, NULL_UUID, VdiLayer, create_vdi,
                    encode_map, identity_from, is_vdi, new_file_size, open_vdi, vdi_remnant, vdi_signature_problem)
from .structs import PRE_HEADER_SIZE

__all__ = ["DRIVER", "DEFAULT_BLOCK_SIZE", "MAX_BLOCKS", "MAX_VIRTUAL_SIZE", "VdiLayer", "create_vdi",
           "is_vdi", "new_file_size", "open_vdi"]


def registry_locations(registry: str) -> Iterable[tuple[str, str]]:
    """(uuid, path) of every HardDisk a VirtualBox media registry (VirtualBox.xml, .vbox) lists."""
    try:
        tree = ET.parse(registry)
    except (OSError, ET.ParseError) as exc:
        raise VDiskError(f"{registry}: cannot read VirtualBox media registry: {exc}") from None
    base = os.path.dirname(os.path.abspath(registry))
    for el in tree.iter():
        if el.tag.rsplit("}", 1)[-1] == "HardDisk" and el.get("location"):
            uid = (el.get("uuid") or "").strip("{}")
            yield uid, os.path.normpath(os.path.join(base, el.get("location")))


class VdiDriver(Driver):
    name = "vdi"
    probe_rank = 1
    extensions = (".vdi",)
    default_block_size = DEFAULT_BLOCK_SIZE
    rewrites_links = True
    rearranges_blocks = True

    def probe(self, head: bytes, tail: bytes, size: int) -> int:
        return 100 if is_vdi(head) else 0

    def remnant(self, head: bytes) -> Optional[str]:
        return vdi_remnant(head)

    def refusal(self, path: str, head: bytes, size: int, signs: Sequence[str], hint: str) -> Exception:
        return FormatError(path, "pre-header", "signature", 0x40,
                           f"{' and '.join(signs)}, but {vdi_signature_problem(head)}: a damaged VDI, {hint}")

    def open(self, file: ImageFile, *, writable: bool, size_policy: str = "current") -> Layer:
        return open_vdi(file, strict=writable)

    def create(self, file: ImageFile, size: int, subtype: str, *, block_size: Optional[int],
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str], **options) -> Layer:
        return create_vdi(file, size, subtype, block_size=block_size, parent=parent)

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        return new_file_size(size, subtype, block_size, blocks_stored)

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: Layer) -> bytes:
        return layer.header["uuid_create"]

    def identity_from(self, head: bytes, tail: bytes) -> Optional[bytes]:
        return identity_from(head)

    def parent_uuid(self, child: Layer) -> Optional[uuidlib.UUID]:
        return None if child.parent_id is None else uuidlib.UUID(bytes_le=child.parent_id)

    def parent_candidates(self, child: Layer, search: Sequence[str],
                          registries: Sequence[str]) -> Iterable[tuple[str, str]]:
        """Registry entries with the parent's UUID, then every .vdi beside the child and in the
        search folders — those whose header names the wanted UUID first."""
        want = str(uuidlib.UUID(bytes_le=child.parent_id))
        for reg in registries:
            for uid, loc in registry_locations(reg):
                if uid.lower() == want:
                    yield loc, f"registry {reg}"
        here = os.path.dirname(os.path.abspath(child.path))
        for d in [here, *search]:
            # Peeking at headers first: opening each .vdi of the folder in turn (tables and all)
            # at every level made a deep chain's open quadratic. The others still follow, so a
            # miss reports what each file is.
            scan = [p for p in sorted(glob.glob(os.path.join(glob.escape(d), "*.vdi")))
                    if os.path.abspath(p) != os.path.abspath(child.path)]
            ids = [self.cached_peek_identity(p) for p in scan]
            for path, ident in zip(scan, ids):
                if ident == child.parent_id:
                    yield path, f"UUID scan of {d}"
            for path, ident in zip(scan, ids):
                if ident != child.parent_id:
                    yield path, f"UUID scan of {d}"

    def accept_parent(self, child: Layer, parent: Layer, allow_modified: bool) -> None:
        """VirtualBox records the parent's modification UUID: a parent written since the child
        was made no longer holds the data the child was diffed against."""
        want = child.header.get("uuid_parent_modify", NULL_UUID)
        if want != NULL_UUID and want != parent.header["uuid_modify"] and not allow_modified:
            raise ParentError(f"{child.path}: parent {parent.path} was modified after this differencing image "
                              f"was made (modification UUID {uuidlib.UUID(bytes_le=parent.header['uuid_modify'])}, "
                              f"expected {uuidlib.UUID(bytes_le=want)})")

    # -- maintenance ---------------------------------------------------------------------------
    #: its check module (formats/<name>/check.py: check() and REPAIRS), loaded when asked for
    check_module = __name__ + ".check"

    def sparse_layout(self, layer: Layer) -> SparseLayout:
        if layer.subtype not in ("dynamic", "differencing"):
            raise UnsupportedError(f"{layer.path}: a fixed VDI has no block table to rearrange")
        skip, unit, data = layer.block_extra, layer.slot_size, layer.offset_data
        entries = len(layer.block_map)

        def encode(block_map: np.ndarray) -> bytes:
            return encode_map(block_map[:entries], skip, data, unit).tobytes()

        def count_writes(used: int) -> list[tuple[int, bytes]]:
            layer.header.update(blocks_allocated=used)
            return [(PRE_HEADER_SIZE, layer.header_bytes())]

        return SparseLayout(skip=skip, unit=unit, table_offset=layer.offset_blocks, entries=entries,
                            table_len=4 * entries, meta_end=data,
                            end_of_data=data + layer.allocated * unit, grid=data, encode=encode,
                            count_writes=count_writes)

    def resize_plan(self, layer: Layer, new_size: int) -> ResizePlan:
        from . import resize
        return resize.resize_plan(layer, new_size)

    def link_writes(self, layer: Layer, parent_path: str, parent: Layer, *, apply: bool,
                    end: Optional[int] = None) -> LinkPlan:
        h, p = layer.header, parent.header
        changes = []
        if h["uuid_linkage"] != p["uuid_create"]:
            changes.append(f"set linkage UUID to {uuidlib.UUID(bytes_le=p['uuid_create'])}")
        if h.get("uuid_parent_modify") != p["uuid_modify"]:
            changes.append(f"set parent modification UUID to {uuidlib.UUID(bytes_le=p['uuid_modify'])}")
        if not changes:
            return LinkPlan([], [])
        saved = dict(h)
        h.update(uuid_linkage=p["uuid_create"], uuid_parent_modify=p["uuid_modify"])
        header = layer.header_bytes()
        if not apply:
            h.clear()
            h.update(saved)
        return LinkPlan([(PRE_HEADER_SIZE, header)], changes)

    def link_state(self, layer: Layer) -> object:
        return layer.header["uuid_modify"]

    def restore_link_state(self, layer: Layer, state: object) -> None:
        # Writing the image gives it a new modification UUID; its children record the old one.
        layer.header["uuid_modify"] = state
        layer._header_dirty = True

    def copies_whole_blocks_up(self, layer: Layer) -> bool:
        return True


DRIVER = VdiDriver()
