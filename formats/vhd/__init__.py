"""Microsoft VHD: fixed, dynamic and differencing images (spec digest VHD.md).

The package holds all of vdisk's VHD knowledge: ``structs`` (the on-disk declarations),
``locators`` (parent locators and quirk Q8), ``image`` (open, layers, create) and the driver
below, which is what the generic code talks to.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk.errors import FormatError, UnsupportedError
from vdisk.io import ImageFile
from ..base import SECTOR, Layer
from ..driver import Driver
from ..maintenance import LinkPlan, ResizePlan, SparseLayout
from . import locators
from .image import (DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MAX_DYNAMIC_SIZE, SparseVhdLayer, FixedVhdLayer,
                    bitmap_used_bytes, create_vhd, encode_bat, is_vhd, new_file_size, open_vhd, parent_id_bytes, plan_size,
                    vhd_remnant)
from .locators import LocatorExtent, locator_extents, locator_space_bytes
from .structs import FOOTER_COOKIE, FOOTER_FIELD_OFFSETS, FOOTER_SIZE, HEADER_SIZE, Footer

__all__ = ["DRIVER", "DEFAULT_BLOCK_SIZE", "MAX_BLOCK_SIZE", "MAX_DYNAMIC_SIZE", "SparseVhdLayer",
           "FixedVhdLayer", "LocatorExtent", "bitmap_used_bytes", "create_vhd", "is_vhd",
           "locator_extents", "locator_space_bytes", "new_file_size", "open_vhd", "parent_id_bytes",
           "plan_size", "vhd_remnant"]

_ID = slice(FOOTER_FIELD_OFFSETS["unique_id"], FOOTER_FIELD_OFFSETS["unique_id"] + 16)


class VhdDriver(Driver):
    name = "vhd"
    probe_rank = 2
    extensions = (".vhd", ".vpc", ".avhd")
    default_block_size = DEFAULT_BLOCK_SIZE
    rewrites_links = True
    rearranges_blocks = True
    links_by_path = True

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
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str], **options) -> Layer:
        return create_vhd(file, size, subtype, block_size=block_size, size_policy=size_policy,
                          parent=parent, parent_path=parent_path)

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        return new_file_size(size, subtype, block_size, blocks_stored)

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: Layer) -> bytes:
        return parent_id_bytes(layer)

    def identity_from(self, head: bytes, tail: bytes) -> Optional[bytes]:
        for raw in (tail, head):                 # the footer at the end, else its copy at 0
            if raw[:8] == FOOTER_COOKIE:
                return bytes(raw[_ID])
        return None

    def parent_candidates(self, child: Layer, search: Sequence[str],
                          registries: Sequence[str]) -> Iterable[tuple[str, str]]:
        return self.hint_candidates(child, search)

    def parent_uuid(self, child: Layer) -> Optional[uuidlib.UUID]:
        return None if child.parent_id is None else uuidlib.UUID(bytes=child.parent_id)

    # -- maintenance ---------------------------------------------------------------------------
    #: its check module (formats/<name>/check.py: check() and REPAIRS), loaded when asked for
    check_module = __name__ + ".check"

    def sparse_layout(self, layer: Layer) -> SparseLayout:
        if not isinstance(layer, SparseVhdLayer):
            raise UnsupportedError(f"{layer.path}: a fixed VHD has no block table to rearrange")
        if Footer.parse(layer.footer_raw).saved_state:
            raise UnsupportedError(f"{layer.path}: the image holds a saved VM state; refusing to modify it")
        skip = layer.bitmap_bytes
        entries = layer.bat_entries
        table_len = -(-4 * entries // SECTOR) * SECTOR
        regions = [(0, FOOTER_SIZE), (layer.header_offset, layer.header_offset + HEADER_SIZE),
                   (layer.bat_offset, layer.bat_offset + table_len)]
        # A locator's reserved space counts only as far as the file has room for it: the end of
        # metadata never lies past the data, so moving blocks never grows the file.
        regions += [(e.start, e.end) for e in layer.locator_extents()]

        def encode(block_map: np.ndarray) -> bytes:
            return encode_bat(block_map, entries, skip)

        return SparseLayout(skip=skip, unit=skip + layer.block_size, table_offset=layer.bat_offset,
                            entries=entries, table_len=table_len,
                            meta_end=-(-max(hi for _, hi in regions) // SECTOR) * SECTOR,
                            end_of_data=layer.footer_offset, grid=None, encode=encode,
                            trailer=bytes(layer.footer_raw))

    def resize_plan(self, layer: Layer, new_size: int) -> ResizePlan:
        from . import resize
        if isinstance(layer, SparseVhdLayer):
            return resize.dynamic_plan(layer, new_size, self.sparse_layout(layer))
        return resize.fixed_plan(layer, new_size)

    def link_writes(self, layer: Layer, parent_path: str, parent: Layer, *, apply: bool,
                    end: Optional[int] = None) -> LinkPlan:
        start = layer.footer_offset if end is None else end
        writes, new_end, changes = locators.link_writes(layer, parent_path, parent_id_bytes(parent), start)
        if new_end != start:
            writes.append((new_end, bytes(layer.footer_raw)))     # the footer follows the data
        if apply:
            layer.footer_offset = new_end
        return LinkPlan(writes, changes, new_end)

    def chs_size(self, layer: Layer) -> Optional[int]:
        from vdisk.geometry import MAX_GEOMETRY
        geo = layer.geometry
        if not geo or tuple(geo) == MAX_GEOMETRY:
            return None
        chs = geo[0] * geo[1] * geo[2] * 512
        return chs if chs != layer.size else None


DRIVER = VhdDriver()
