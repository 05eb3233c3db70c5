"""VHD parent locators: reading the eight entries of a dynamic header, the space they hold, and
the locator data a child writes to name its parent (spec digest VHD.md §4, quirk Q8)."""
from __future__ import annotations

import os
import uuid as uuidlib
from typing import NamedTuple
from urllib.parse import quote

import numpy as np

from vdisk.errors import FormatError
from vdisk.io import ImageFile
from ..base import SECTOR, ParentHint
from .structs import (HEADER_CHECKSUM_OFFSET, LOCATOR_OFFSET, LOCATOR_SIZE, PLAT_MAC, PLAT_MACX, PLAT_W2KU,
                      PLAT_W2RU, PLAT_WI2K, PLAT_WI2R, VHD_EPOCH, DynamicHeader, with_checksum)

#: the room a new locator's data gets (Hyper-V and Virtual PC reserve one 1 KiB slot)
LOCATOR_SLOT = 1024
RELATIVE = {PLAT_W2RU, PLAT_WI2R}
ABSOLUTE = {PLAT_W2KU, PLAT_WI2K}
CODE_NAMES = {PLAT_W2RU: "W2ru", PLAT_W2KU: "W2ku", PLAT_WI2R: "Wi2r", PLAT_WI2K: "Wi2k", PLAT_MACX: "MacX",
              PLAT_MAC: "Mac "}


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


# ---------------------------------------------------------------------------------------------
# Writing a link
# ---------------------------------------------------------------------------------------------
def _relative(parent_path: str, child_path: str) -> str:
    rel = os.path.relpath(os.path.abspath(parent_path), os.path.dirname(os.path.abspath(child_path)))
    win = rel.replace("/", "\\")
    return win if win.startswith("..") else ".\\" + win


def _blob(code: int, parent_path: str, child_path: str) -> bytes:
    absolute = os.path.abspath(parent_path)
    if code == PLAT_W2RU:
        return _relative(parent_path, child_path).encode("utf-16-le")
    if code == PLAT_W2KU:
        return absolute.replace("/", "\\").encode("utf-16-le")
    if code == PLAT_WI2R:
        return _relative(parent_path, child_path).encode("latin-1", "replace")
    if code == PLAT_WI2K:
        return absolute.replace("/", "\\").encode("latin-1", "replace")
    if code == PLAT_MACX:
        return ("file://" + quote(absolute)).encode("utf-8")
    raise ValueError(code)


def _decode(code: int, data: bytes) -> str:
    enc = "utf-16-le" if code in (PLAT_W2RU, PLAT_W2KU) else "utf-8" if code == PLAT_MACX else "latin-1"
    return data.decode(enc, "replace").rstrip("\0")


def new_locators(parent_path: str, child_path: str, at: int) -> tuple[list[dict], list[tuple[int, bytes]], int]:
    """The W2ru and W2ku locators a new child at *child_path* gets for its parent, their data
    placed from file offset *at*: (entries, (offset, data) pieces, end of the data)."""
    entries, blobs = [], []
    for code in (PLAT_W2RU, PLAT_W2KU):
        blob = _blob(code, parent_path, child_path)
        space = max(LOCATOR_SLOT, -(-len(blob) // SECTOR) * SECTOR)
        entries.append(dict(platform_code=code, platform_data_space=space, platform_data_length=len(blob),
                            reserved=0, platform_data_offset=at))
        blobs.append((at, blob))
        at += space
    return entries, blobs, at


def link_writes(layer, parent_path: str, parent_id: bytes, end: int) -> tuple[list[tuple[int, bytes]], int, list[str]]:
    """Writes that make the VHD *layer* name *parent_path*: (writes, new end of data, changes).

    *parent_id* is what the child must record (the parent footer's id). Locator data that no
    longer fits its reserved space moves to *end*, the end of the data area, which then grows
    (the caller moves the footer there).
    """
    file = layer.file
    h = dict(DynamicHeader.parse(layer.header_raw))
    h.pop("_io", None)
    locs = [{k: v for k, v in loc.items() if k != "_io"} for loc in h["parent_locators"]]
    changes, writes = [], []
    room = {e.index: e.end - e.start for e in layer.locator_extents()}
    if not any(loc["platform_code"] in RELATIVE | ABSOLUTE | {PLAT_MACX} for loc in locs):
        free = [i for i, loc in enumerate(locs) if not loc["platform_code"]]
        for code, i in zip((PLAT_W2RU, PLAT_W2KU), free):
            locs[i].update(platform_code=code, platform_data_space=0, platform_data_length=0, platform_data_offset=0)
    for i, loc in enumerate(locs):
        code = loc["platform_code"]
        if not code:
            continue
        if code == PLAT_MAC:
            changes.append(f"drop stale Mac alias locator {i}")
            locs[i] = dict(platform_code=0, platform_data_space=0, platform_data_length=0, reserved=0,
                           platform_data_offset=0)
            continue
        if code not in CODE_NAMES:
            continue
        blob = _blob(code, parent_path, layer.path)
        old = b""
        if loc["platform_data_length"] and loc["platform_data_offset"] + loc["platform_data_length"] <= file.size():
            old = file.pread(loc["platform_data_length"], loc["platform_data_offset"])
        if old == blob:
            continue
        # The room the file really has there, not what the entry claims (a claim of 0xFFFFFFFF
        # bytes would let a longer path overwrite the block after it).
        space = room.get(i, 0)
        if loc["platform_data_offset"] and len(blob) <= space and space >= SECTOR:
            at = loc["platform_data_offset"]
            writes.append((at, blob + bytes(min(space, -(-len(blob) // SECTOR) * SECTOR) - len(blob))))
        else:
            at = end
            space = max(LOCATOR_SLOT, -(-len(blob) // SECTOR) * SECTOR)
            writes.append((at, blob.ljust(space, b"\0")))
            end += space
        changes.append(f"rewrite {CODE_NAMES[code]} locator {i}: {_decode(code, old)!r} -> {_decode(code, blob)!r}")
        loc.update(platform_data_offset=at, platform_data_space=space, platform_data_length=len(blob))
    name = os.path.basename(parent_path).encode("utf-16-be")[:512].ljust(512, b"\0")
    if name != h["parent_unicode_name"]:
        changes.append(f"set parent name to {os.path.basename(parent_path)!r}")
    pid = parent_id
    if pid != h["parent_unique_id"]:
        changes.append(f"set parent id to {uuidlib.UUID(bytes=pid)} (was {uuidlib.UUID(bytes=h['parent_unique_id'])})")
    stamp = max(0, int(os.stat(parent_path).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF
    if stamp != h["parent_timestamp"] and changes:
        changes.append("record the parent's timestamp")
    h.update(parent_unicode_name=name, parent_unique_id=pid, parent_locators=locs, checksum=0,
             parent_timestamp=stamp if changes else h["parent_timestamp"])
    header = with_checksum(DynamicHeader.build(h), HEADER_CHECKSUM_OFFSET)
    if header != layer.header_raw:
        writes.append((layer.header_offset, header))
    return writes, end, changes
