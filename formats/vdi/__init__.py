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

from vdisk.errors import FormatError, ParentError, VDiskError
from vdisk.io import ImageFile
from ..base import Layer
from ..driver import Driver
from .image import (DEFAULT_BLOCK_SIZE, MAX_BLOCKS, MAX_VIRTUAL_SIZE, NULL_UUID, VdiLayer, create_vdi,
                    is_vdi, new_file_size, open_vdi, peek_identity, vdi_remnant, vdi_signature_problem)

__all__ = ["DRIVER", "DEFAULT_BLOCK_SIZE", "MAX_BLOCKS", "MAX_VIRTUAL_SIZE", "VdiLayer", "create_vdi",
           "is_vdi", "new_file_size", "open_vdi", "peek_identity"]


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
    probe_rank = 0
    extensions = (".vdi",)
    default_block_size = DEFAULT_BLOCK_SIZE

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
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str]) -> Layer:
        return create_vdi(file, size, subtype, block_size=block_size, parent=parent)

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        return new_file_size(size, subtype, block_size, blocks_stored)

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: Layer) -> bytes:
        return layer.header["uuid_create"]

    def peek_identity(self, path: str) -> Optional[bytes]:
        return peek_identity(path)

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

    def copies_whole_blocks_up(self, layer: Layer) -> bool:
        return True


DRIVER = VdiDriver()
