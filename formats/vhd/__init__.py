"""Microsoft VHD: fixed, dynamic and differencing images (spec digest VHD.md).

The package holds all of vdisk's VHD knowledge: ``structs`` (the on-disk declarations),
``locators`` (parent locators and quirk Q8), ``image`` (open, layers, create) and the driver
below, which is what the generic code talks to.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence
import uuid as uuidlib

from vdisk.errors import FormatError
from vdisk.io import ImageFile
from ..base import Layer
from ..driver import Driver
from .image import (DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MAX_DYNAMIC_SIZE, SparseVhdLayer, FixedVhdLayer,
                    bitmap_used_bytes, create_vhd, is_vhd, new_file_size, open_vhd, parent_id_bytes, plan_size,
                    vhd_remnant)
from .locators import LocatorExtent, locator_extents, locator_space_bytes
from .structs import FOOTER_COOKIE, FOOTER_FIELD_OFFSETS, FOOTER_SIZE

__all__ = ["DRIVER", "DEFAULT_BLOCK_SIZE", "MAX_BLOCK_SIZE", "MAX_DYNAMIC_SIZE", "SparseVhdLayer",
           "FixedVhdLayer", "LocatorExtent", "bitmap_used_bytes", "create_vhd", "is_vhd",
           "locator_extents", "locator_space_bytes", "new_file_size", "open_vhd", "parent_id_bytes",
           "plan_size", "vhd_remnant"]

_ID = slice(FOOTER_FIELD_OFFSETS["unique_id"], FOOTER_FIELD_OFFSETS["unique_id"] + 16)


class VhdDriver(Driver):
    name = "vhd"
    probe_rank = 1
    extensions = (".vhd", ".vpc", ".avhd")
    default_block_size = DEFAULT_BLOCK_SIZE

    def probe(self, head: bytes, tail: bytes, size: int) -> int:
        return 100 if size >= FOOTER_SIZE and is_vhd(head, tail) else 0

    def remnant(self, head: bytes) -> Optional[str]:
        return vhd_remnant(head)

    def refusal(self, path: str, head: bytes, size: int, signs: Sequence[str], hint: str) -> Exception:
        if size < FOOTER_SIZE:
            lack = f"the file is {size} bytes, too small for a VHD footer"
        else:
            lack = "no 'conectix' footer at the end nor its copy at offset 0"
        return FormatError(path, "footer", "cookie", size - FOOTER_SIZE if size >= FOOTER_SIZE else None,
                           f"{' and '.join(signs)}, but {lack}: a damaged VHD, {hint}")

    def open(self, file: ImageFile, *, writable: bool, size_policy: str = "current") -> Layer:
        return open_vhd(file, size_policy=size_policy, strict_checksums=writable)

    def create(self, file: ImageFile, size: int, subtype: str, *, block_size: Optional[int],
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str]) -> Layer:
        return create_vhd(file, size, subtype, block_size=block_size, size_policy=size_policy,
                          parent=parent, parent_path=parent_path)

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        return new_file_size(size, subtype, block_size, blocks_stored)

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: Layer) -> bytes:
        return parent_id_bytes(layer)

    def peek_identity(self, path: str) -> Optional[bytes]:
        try:
            f = ImageFile(path, lock=False)
        except (OSError, ValueError):
            return None
        try:
            size = f.size()
            head = f.pread(FOOTER_SIZE, 0)
            tail = f.pread(FOOTER_SIZE, max(0, size - FOOTER_SIZE))
        except OSError:
            return None
        finally:
            f.close()
        for raw in (tail, head):
            if raw[:8] == FOOTER_COOKIE:
                return bytes(raw[_ID])
        return None

    def parent_candidates(self, child: Layer, search: Sequence[str],
                          registries: Sequence[str]) -> Iterable[tuple[str, str]]:
        """Relative locators, then absolute ones, then the stored name beside the child and in
        each search folder."""
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

    def parent_uuid(self, child: Layer) -> Optional[uuidlib.UUID]:
        return None if child.parent_id is None else uuidlib.UUID(bytes=child.parent_id)

    def chs_size(self, layer: Layer) -> Optional[int]:
        from vdisk.geometry import MAX_GEOMETRY
        geo = layer.geometry
        if not geo or tuple(geo) == MAX_GEOMETRY:
            return None
        chs = geo[0] * geo[1] * geo[2] * 512
        return chs if chs != layer.size else None


DRIVER = VhdDriver()
