"""VHD parent locators: reading the eight entries of a dynamic header, the space they hold, and
the locator data a child writes to name its parent (spec digest VHD.md §4, quirk Q8)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vdisk.errors import FormatError
from vdisk.io import ImageFile
from ..base import SECTOR, ParentHint
from .structs import LOCATOR_OFFSET, LOCATOR_SIZE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R


class LocatorExtent(NamedTuple):
    """The file bytes parent locator *index* holds: [start, end)."""
    index: int
    start: int
    data_end: int           # start + platform_data_length: the locator's data
    claimed_end: int        # start + the reserved space its entry claims
    end: int                # what vdisk honours: the data, plus as much of the claim as is free

    @property
    def overclaimed(self) -> bool:
        """The entry claims reserved space that overlaps something else or lies past the data."""
        return self.claimed_end > self.end


def locator_space_bytes(space: int) -> int:
    """platform_data_space in bytes. Units quirk Q8: the spec counts sectors, Virtual PC, Hyper-V,
    VirtualBox and libvhd write bytes; a value below 512 can only be sectors."""
    return space * SECTOR if space < SECTOR else space


def locator_extents(locators, occupied, end_of_data: int) -> list[LocatorExtent]:
    """Extents of the used parent locators (code and length non-zero) of a dynamic header.

    *occupied* holds the start offsets of everything else in the file (footer copy, header,
    BAT, blocks). The reserved space a locator claims beyond its data is a claim about free room,
    honoured only up to the next start (another locator's included) and *end_of_data*: a hostile
    claim (0xFFFFFFFF bytes) must never make compaction keep 4 GiB of "metadata", a repair grow
    the file to hold it, or the blocks after it look as if they overlapped it.
    """
    used = [(i, loc) for i, loc in enumerate(locators) if loc.platform_code and loc.platform_data_length]
    others = np.sort(np.asarray(occupied, dtype=np.int64).ravel())
    locs = np.sort(np.array([loc.platform_data_offset for _, loc in used], dtype=np.int64))
    out = []
    for i, loc in used:
        lo = int(loc.platform_data_offset)
        data_end = lo + int(loc.platform_data_length)
        claimed = lo + locator_space_bytes(int(loc.platform_data_space))
        limit = end_of_data
        k = int(np.searchsorted(others, lo, side="left"))      # a structure at lo itself bounds it
        if k < len(others):
            limit = min(limit, int(others[k]))
        k = int(np.searchsorted(locs, lo, side="right"))       # another locator after it
        if k < len(locs):
            limit = min(limit, int(locs[k]))
        out.append(LocatorExtent(i, lo, data_end, claimed, max(data_end, min(claimed, limit))))
    return out


def read_locators(file: ImageFile, file_size: int, h, hoff: int) -> tuple[list[ParentHint], list[tuple[int, int]]]:
    """The parent hints (relative first) and the file regions their data occupies."""
    hints, regions = [], []
    for i, loc in enumerate(h.parent_locators):
        code = loc.platform_code
        if code == 0:
            continue
        length, off = loc.platform_data_length, loc.platform_data_offset
        where = hoff + LOCATOR_OFFSET + LOCATOR_SIZE * i
        if length > 64 * 1024 or off + length > file_size:
            raise FormatError(file.path, "parent locator", f"[{i}]", where,
                              f"locator data ({length} bytes at {off:#x}) lies outside the file")
        if length == 0:
            continue
        # Blocks must not overlap the data; the reserved space is only a claim (locator_extents).
        regions.append((off, off + length))
        data = file.pread(length, off)
        try:
            if code == PLAT_W2RU:
                hints.append(ParentHint("relative", windows_to_host(data.decode("utf-16-le"))))
            elif code == PLAT_W2KU:
                hints.append(ParentHint("absolute", windows_to_host(data.decode("utf-16-le"))))
            elif code == PLAT_WI2R:
                hints.append(ParentHint("relative", windows_to_host(data.decode("latin-1"))))
            elif code == PLAT_WI2K:
                hints.append(ParentHint("absolute", windows_to_host(data.decode("latin-1"))))
            elif code == PLAT_MACX:
                url = data.decode("utf-8").rstrip("\0")
                from urllib.parse import unquote, urlparse
                p = unquote(urlparse(url).path) if url.startswith("file:") else url
                hints.append(ParentHint("absolute" if p.startswith("/") else "relative", p))
        except UnicodeDecodeError:
            continue
    order = {"relative": 0, "absolute": 1}
    hints.sort(key=lambda h: order.get(h.kind, 2))
    return hints, regions


def windows_to_host(path: str) -> str:
    path = path.rstrip("\0").replace("\\", "/")
    if len(path) >= 2 and path[1] == ":":
        path = path[2:]
    if path.startswith("./"):
        path = path[2:]
    return path


