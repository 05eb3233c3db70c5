"""Microsoft VHD: fixed, dynamic and differencing images (spec digest VHD.md)."""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk import limits
from vdisk.errors import ChecksumError, FormatError, UnsupportedError
from vdisk.geometry import MAX_GEOMETRY, chs_bytes, chs_for_sectors, chs_round_up
from vdisk.io import ImageFile
from ..base import ABSENT, SECTOR, Layer, ParentHint, data_runs_from_holes, new_uuid, write_table_entries
from ..raw import FlatLayer
from .locators import LocatorExtent, locator_extents, new_locators, read_locators
from .structs import (BAT_UNUSED, DISK_DIFFERENCING, DISK_DYNAMIC, DISK_FIXED, FEATURES_RESERVED,
                          FOOTER_CHECKSUM_OFFSET, FOOTER_COOKIE, FOOTER_FIELD_OFFSETS, FOOTER_SIZE,
                          FORMAT_VERSION, HEADER_CHECKSUM_OFFSET, HEADER_COOKIE, HEADER_FIELD_OFFSETS,
                          HEADER_SIZE, HEADER_VERSION, NO_DATA_OFFSET,
                          SUBTYPE_NAMES,
                          VHD_EPOCH, DynamicHeader, Footer, vhd_checksum, with_checksum)

DEFAULT_BLOCK_SIZE = 2 << 20
MAX_BLOCK_SIZE = 256 << 20
MAX_DYNAMIC_SIZE = 0xFF000000 * 512          # 2040 GiB: u32 sector BAT entries (QEMU, Windows)
CREATOR_EXACT = b"win "                        # read at current_size by QEMU, vhdiinfo, Hyper-V
CREATOR_CHS = b"vdsk"                          # our own creator for CHS-exact images
CREATOR_VERSION = 0x000A0000
BITMAP_CACHE = 4096                            # clean bitmaps kept in memory


def bitmap_used_bytes(block_size: int) -> int:
    """Bytes of a block's sector bitmap that hold bits: one per sector, at least one byte."""
    return -(-(block_size // SECTOR) // 8)


def _bitmap_bytes(block_size: int) -> int:
    """On-disk size of a block's sector bitmap: its bits padded to whole sectors (VHD.md §5).

    Blocks of 512-2048 bytes have fewer than 8 sectors; their bitmap is still one sector, never
    zero bytes (an empty bitmap would read as "all present" and compact as "none present")."""
    return -(-bitmap_used_bytes(block_size) // SECTOR) * SECTOR


def encode_bat(block_map: np.ndarray, entries: int, bitmap_bytes: int) -> bytes:
    """The BAT of *entries* big-endian sector numbers for a block map (file offsets of the
    blocks' data, negative where unallocated): each entry points at the block's sector bitmap."""
    out = np.full(entries, BAT_UNUSED, dtype=">u4")
    n = min(len(block_map), entries)
    bm = block_map[:n]
    alloc = bm >= 0
    out[:n][alloc] = (bm[alloc] - bitmap_bytes) // SECTOR
    return out.tobytes()


def is_vhd(head: bytes, tail: bytes) -> bool:
    return tail[-512:-504] == FOOTER_COOKIE or tail[-511:-503] == FOOTER_COOKIE or head[:8] == FOOTER_COOKIE


def vhd_remnant(head: bytes) -> Optional[str]:
    """What in the first KiB of a file without a footer (nor its copy) still says it was a VHD:
    a dynamic header where every writer puts it, right after the footer copy. None if nothing."""
    if head[FOOTER_SIZE:FOOTER_SIZE + 8] == HEADER_COOKIE:
        return f"a 'cxsparse' dynamic header at offset {FOOTER_SIZE:#x}"
    return None


# ---------------------------------------------------------------------------------------------
# Footer handling
# ---------------------------------------------------------------------------------------------
class _FooterInfo:
    def __init__(self, raw: bytes, where: str, offset: int):
        self.raw, self.where, self.offset = raw, where, offset
        self.end_missing = False          # the copy at 0 stands in for a footer the end lacks
        self.fields = Footer.parse(raw)
        self.checksum_ok = vhd_checksum(raw, FOOTER_CHECKSUM_OFFSET) == self.fields.checksum


def _find_footer(file: ImageFile, file_size: int) -> tuple[_FooterInfo, list[str]]:
    path = file.path
    if file_size < FOOTER_SIZE:
        raise FormatError(path, "footer", None, 0, f"file is {file_size} bytes, too small for a VHD footer")
    notes: list[str] = []
    candidates = []
    tail = file.pread(FOOTER_SIZE, file_size - FOOTER_SIZE)
    if tail[:8] == FOOTER_COOKIE:
        candidates.append(_FooterInfo(tail, "end", file_size - FOOTER_SIZE))
    elif tail[1:9] == FOOTER_COOKIE:         # pre-2004 Virtual PC wrote 511-byte footers
        candidates.append(_FooterInfo(tail[1:] + b"\0", "end-511", file_size - 511))
    head = file.pread(FOOTER_SIZE, 0)
    copy = _FooterInfo(head, "copy", 0) if head[:8] == FOOTER_COOKIE else None
    if not candidates:
        if copy is None:
            raise FormatError(path, "footer", "cookie", file_size - FOOTER_SIZE, "no 'conectix' footer at the end or at offset 0")
        if copy.fields.disk_type == DISK_FIXED:
            raise FormatError(path, "footer", "cookie", file_size - FOOTER_SIZE, "fixed VHD has lost its footer")
        notes.append(f"{path}: footer at end of file is missing; using the copy at offset 0 (repairable)")
        copy.end_missing = True
        return copy, notes
    footer = candidates[0]
    if not footer.checksum_ok:
        if copy is not None and copy.checksum_ok and copy.fields.disk_type != DISK_FIXED:
            notes.append(f"{path}: footer at end of file has a bad checksum; using the copy at offset 0")
            return copy, notes
    return footer, notes


def _validate_footer(path: str, fi: _FooterInfo) -> None:
    f = fi.fields
    off = fi.offset

    def bad(field: str, problem: str):
        raise FormatError(path, "footer", field, off + FOOTER_FIELD_OFFSETS[field], problem)

    if f.format_version >> 16 != 1:
        bad("format_version", f"unsupported version {f.format_version:#010x} (want major 1)")
    if f.disk_type not in SUBTYPE_NAMES:
        bad("disk_type", f"unsupported disk type {f.disk_type}")
    if f.current_size == 0 or f.current_size % SECTOR:
        if f.current_size == 0:
            bad("current_size", "virtual size is 0")
    if f.disk_type != DISK_FIXED and f.current_size > (1 << 48):
        bad("current_size", f"absurd virtual size {f.current_size}")


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
class FixedVhdLayer(FlatLayer):
    """Fixed VHD: raw guest data followed by the footer."""

    def __init__(self, footer_raw: bytes, **kw):
        super().__init__(**kw)
        self.footer_raw = footer_raw

    def info(self) -> dict:
        return _footer_info(Footer.parse(self.footer_raw))


class SparseVhdLayer(Layer):
    """Dynamic or differencing VHD: footer copy, dynamic header, BAT, blocks, footer."""

    def __init__(self, footer_raw: bytes, header_raw: bytes, header_offset: int, bat_offset: int,
                 bat_entries: int, footer_offset: int, **kw):
        super().__init__(**kw)
        self.footer_raw = footer_raw
        self.header_raw = header_raw
        self.header_offset = header_offset
        self.bat_offset = bat_offset
        self.bat_entries = bat_entries
        self.footer_offset = footer_offset          # where the EOF footer sits = end of data
        self.bitmap_bytes = _bitmap_bytes(self.block_size)
        self.sectors_per_block = self.block_size // SECTOR
        self._bitmaps: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._dirty_bitmaps: set[int] = set()
        self._dirty_bat: set[int] = set()
        self._lock = threading.RLock()
        self.sector_granular = self.subtype == "differencing"

    def locator_extents(self) -> list[LocatorExtent]:
        """Where the used parent locators lie, each reservation cut to the room the file has
        for it (see :func:`locator_extents`): what compact, resize and relink may rely on."""
        h = DynamicHeader.parse(self.header_raw)
        units = self.block_map[self.block_map >= 0] - self.bitmap_bytes
        others = np.concatenate([units, np.array([0, self.header_offset, self.bat_offset], dtype=np.int64)])
        return locator_extents(h.parent_locators, others, self.footer_offset)

    # -- bitmaps ------------------------------------------------------------------------------
    def _bitmap_at(self, block: int) -> int:
        return int(self.block_map[block]) - self.bitmap_bytes

    def sector_bitmap(self, block: int) -> Optional[np.ndarray]:
        if not self.sector_granular:
            return None
        bm = self._bitmaps.get(block)
        if bm is None:
            raw = bytearray(self.bitmap_bytes)            # the file must hold it: short is an error
            self.file.readinto_exact(memoryview(raw), self._bitmap_at(block))
            bm = np.frombuffer(raw, dtype=np.uint8)[: bitmap_used_bytes(self.block_size)].copy()
            with self._lock:
                self._bitmaps[block] = bm
                self._trim_cache()
        return bm

    def _trim_cache(self) -> None:
        while len(self._bitmaps) > BITMAP_CACHE:
            for key in self._bitmaps:
                if key not in self._dirty_bitmaps:
                    del self._bitmaps[key]
                    break
            else:
                return

    def set_sectors_present(self, block: int, first: int, count: int) -> None:
        if not self.sector_granular or count <= 0:
            return
        bm = self.sector_bitmap(block)
        bits = np.unpackbits(bm)
        if bits[first:first + count].all():
            return
        bits[first:first + count] = 1
        with self._lock:
            self._bitmaps[block] = np.packbits(bits)
            self._dirty_bitmaps.add(block)

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        with self._lock:
            start = self.footer_offset                      # new block replaces the EOF footer
            data_at = start + self.bitmap_bytes
            new_footer_at = data_at + self.block_size
            # 1. the new footer first, so the file always ends in a valid footer (a crash leaks
            #    at most this block); 2. bitmap and data; 3. the BAT entry, deferred to flush().
            self.file.pwrite(self.footer_raw, new_footer_at)
            if self.sector_granular:
                bits = np.zeros(self.sectors_per_block, dtype=np.uint8)
                if present:
                    bits[present[0]:present[0] + present[1]] = 1
                packed = np.packbits(bits)
            else:
                packed = np.full(bitmap_used_bytes(self.block_size), 0xFF, dtype=np.uint8)
            bitmap = packed.tobytes().ljust(self.bitmap_bytes, b"\0")
            self.file.pwrite(bitmap, start)
            for off, data in pieces:
                self.file.pwrite(data, data_at + off)
            self.footer_offset = new_footer_at
            self.block_map[block] = data_at
            if self.sector_granular:
                self._bitmaps[block] = packed
                self._trim_cache()
            self._dirty_bat.add(block)
            return data_at

    def deallocate(self, block: int) -> bool:
        """Unlink a block (dynamic VHD only); its space stays until compaction."""
        if self.subtype != "dynamic":
            return False
        with self._lock:
            self.block_map[block] = ABSENT
            self._bitmaps.pop(block, None)
            self._dirty_bitmaps.discard(block)
            self._dirty_bat.add(block)
        return True

    # -- persistence --------------------------------------------------------------------------
    def bat_bytes(self) -> bytes:
        return encode_bat(self.block_map, self.bat_entries, self.bitmap_bytes)

    def flush(self) -> None:
        with self._lock:
            if not (self._dirty_bat or self._dirty_bitmaps):
                self.file.sync()
                return
            self.file.sync()                                   # data before the metadata
            for block in sorted(self._dirty_bitmaps):
                packed = self._bitmaps[block]
                self.file.pwrite(packed.tobytes(), self._bitmap_at(block))
            self._dirty_bitmaps.clear()
            if self._dirty_bat:
                write_table_entries(self.file, self.bat_bytes(), self.bat_offset, self._dirty_bat)
                self._dirty_bat.clear()
            self.file.sync()

    def info(self) -> dict:
        d = _footer_info(Footer.parse(self.footer_raw))
        h = DynamicHeader.parse(self.header_raw)
        d.update(bat_entries=self.bat_entries, table_offset=self.bat_offset,
                 allocated_blocks=int((self.block_map >= 0).sum()))
        if self.subtype == "differencing":
            d.update(parent_uuid=str(uuidlib.UUID(bytes=h.parent_unique_id)),
                     parent_name=_decode_utf16(h.parent_unicode_name, "utf-16-be"),
                     parent_timestamp=h.parent_timestamp + VHD_EPOCH)
        return d


def _footer_info(f) -> dict:
    return {
        "creator_app": f.creator_app.decode("latin-1"),
        "creator_version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
        "creator_host_os": f.creator_host_os.decode("latin-1"),
        "current_size": f.current_size, "original_size": f.original_size,
        "chs_size": f.cylinders * f.heads * f.sectors_per_track * SECTOR,
        "timestamp": f.timestamp + VHD_EPOCH, "saved_state": bool(f.saved_state),
    }


def _decode_utf16(raw: bytes, encoding: str) -> str:
    text = raw.decode(encoding, errors="replace")
    return text.split("\0", 1)[0]


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------
def open_vhd(file: ImageFile, size_policy: str = "current", strict_checksums: bool = False) -> Layer:
    path = file.path
    file_size = file.size()
    fi, notes = _find_footer(file, file_size)
    _validate_footer(path, fi)
    f = fi.fields
    warnings = list(notes)
    if not fi.checksum_ok:
        msg = f"{path}: footer checksum mismatch (stored {f.checksum:#010x}, computed {vhd_checksum(fi.raw, FOOTER_CHECKSUM_OFFSET):#010x})"
        if strict_checksums:
            raise ChecksumError(path, "footer", "checksum", fi.offset + FOOTER_CHECKSUM_OFFSET,
                                "checksum mismatch; run 'vdisk check --repair' before writing")
        warnings.append(msg)
    if notes and strict_checksums and not fi.end_missing:
        raise FormatError(path, "footer", None, file_size - FOOTER_SIZE,
                          notes[0] + "; run 'vdisk check --repair' before writing")
    geometry = (f.cylinders, f.heads, f.sectors_per_track)
    size = f.current_size
    if size_policy == "chs" and geometry != MAX_GEOMETRY and chs_bytes(geometry):
        size = chs_bytes(geometry)
    elif size_policy not in ("current", "chs"):
        raise ValueError(f"size_policy must be 'current' or 'chs', not {size_policy!r}")
    common = dict(file=file, format="vhd", subtype=SUBTYPE_NAMES[f.disk_type], size=size,
                  uuid=uuidlib.UUID(bytes=f.unique_id), geometry=geometry,
                  creator=f.creator_app.decode("latin-1"), warnings=warnings)
    if f.disk_type == DISK_FIXED:
        data_len = file_size - (FOOTER_SIZE if fi.where == "end" else 511)
        if data_len < f.current_size:
            raise FormatError(path, "footer", "current_size", fi.offset + FOOTER_FIELD_OFFSETS["current_size"],
                              f"fixed image holds {data_len} data bytes but claims {f.current_size} (truncated file?)")
        granule = limits.flat_block_size(size, DEFAULT_BLOCK_SIZE)
        block_map = data_runs_from_holes(file, 0, size, granule)
        common["warnings"] = []
        layer = FixedVhdLayer(fi.raw, block_size=granule, block_map=block_map, **common)
        for w in warnings:
            layer.warn(w)
        return layer
    return _open_sparse(file, file_size, fi, common, strict_checksums)


def _open_sparse(file: ImageFile, file_size: int, fi: _FooterInfo, common: dict, strict: bool) -> SparseVhdLayer:
    path = file.path
    f = fi.fields
    hoff = f.data_offset
    if hoff % SECTOR or hoff + HEADER_SIZE > file_size or hoff < FOOTER_SIZE:
        raise FormatError(path, "footer", "data_offset", fi.offset + FOOTER_FIELD_OFFSETS["data_offset"],
                          f"dynamic header offset {hoff:#x} is not a sector inside the file")
    raw = file.pread(HEADER_SIZE, hoff)
    h = DynamicHeader.parse(raw)

    def bad(field: str, problem: str, cls=FormatError):
        return cls(path, "dynamic header", field, hoff + HEADER_FIELD_OFFSETS[field], problem)

    if h.cookie != HEADER_COOKIE:
        raise bad("cookie", f"expected 'cxsparse', found {h.cookie!r}")
    if vhd_checksum(raw, HEADER_CHECKSUM_OFFSET) != h.checksum:
        if strict:
            raise bad("checksum", "checksum mismatch; run 'vdisk check --repair' before writing", ChecksumError)
        common["warnings"].append(f"{path}: dynamic header checksum mismatch")
    if h.header_version >> 16 != 1:
        raise bad("header_version", f"unsupported version {h.header_version:#010x}")
    bs = h.block_size
    if bs < SECTOR or bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
        raise bad("block_size", f"block size {bs} is not a power of two between 512 and {MAX_BLOCK_SIZE}")
    n = h.max_table_entries
    needed = -(-f.current_size // bs)
    if n < needed:
        raise bad("max_table_entries", f"{n} entries cannot cover {f.current_size} bytes in blocks of {bs}")
    toff = h.table_offset
    bat_len = -(-n * 4 // SECTOR) * SECTOR
    if toff % SECTOR:
        raise bad("table_offset", f"block allocation table at {toff:#x} is not sector aligned")
    # Bounded by the format (u32 sector entries address 2040 GiB) and by the file, before reading.
    limits.check_table(path, "dynamic header", "max_table_entries", hoff + HEADER_FIELD_OFFSETS["max_table_entries"],
                       entries=n, entry_bytes=4, table_offset=toff, file_size=file_size,
                       format_max=max(needed + 1, MAX_DYNAMIC_SIZE // bs))
    # Metadata regions that blocks must not overlap.
    regions = [(0, FOOTER_SIZE), (hoff, hoff + HEADER_SIZE), (toff, toff + bat_len)]
    hints = []
    footer_offset = fi.offset if fi.where != "copy" else None
    if f.disk_type == DISK_DIFFERENCING:
        hints, locator_regions = read_locators(file, file_size, h, hoff)
        regions += locator_regions
        common["parent_id"] = bytes(h.parent_unique_id)
        name = _decode_utf16(h.parent_unicode_name, "utf-16-be")
        if name:
            hints.append(ParentHint("name", name.replace("\\", "/").rsplit("/", 1)[-1]))
    bitmap_bytes = _bitmap_bytes(bs)
    unit = bitmap_bytes + bs
    limit = file_size if footer_offset is None else footer_offset

    def check_chunk(first: int, chunk: np.ndarray) -> None:
        """Entries that end past the data or overlap metadata fail with their chunk, before the
        rest of a (possibly huge, possibly zeroed) table is read."""
        idx = np.flatnonzero(chunk != BAT_UNUSED)
        starts = chunk[idx] * SECTOR
        past = np.flatnonzero(starts + unit > limit)
        if len(past):
            blk = first + int(idx[past[0]])
            raise FormatError(path, "BAT", f"entry[{blk}]", toff + 4 * blk,
                              f"block at {int(starts[past[0]]):#x} ends past the end of data ({limit:#x}); truncated file?")
        for lo, hi in regions:
            hit = np.flatnonzero((starts < hi) & (starts + unit > lo))
            if len(hit):
                blk = first + int(idx[hit[0]])
                raise FormatError(path, "BAT", f"entry[{blk}]", toff + 4 * blk,
                                  f"block at {int(starts[hit[0]]):#x} overlaps metadata at {lo:#x}-{hi:#x}")
    recovered = False

    block_map = limits.read_table(file.pread, toff, n, ">u4", check_chunk)
    alloc = block_map != BAT_UNUSED
    # In place: the table becomes the block map (data offsets), one array of 8 bytes per entry.
    np.multiply(block_map, SECTOR, out=block_map, where=alloc)
    starts = np.sort(block_map[alloc])
    overlap = np.flatnonzero(starts[1:] - starts[:-1] < unit)
    if len(overlap):
        va, vb = starts[overlap[0]], starts[overlap[0] + 1]
        a = int(np.flatnonzero(block_map == va)[0])
        b = int(np.flatnonzero(block_map == vb)[1 if va == vb else 0])
        raise FormatError(path, "BAT", f"entry[{b}]", toff + 4 * b, f"block overlaps block {a}")
    if footer_offset is None:           # footer lost: end of data is after the last structure
        reserved = []
        if f.disk_type == DISK_DIFFERENCING:
            others = np.concatenate([starts, np.array([0, hoff, toff], dtype=np.int64)])
            reserved = [e.end for e in locator_extents(h.parent_locators, others, file_size)]
        footer_offset = max([hi for _, hi in regions] + reserved + [int(starts[-1]) + unit if len(starts) else 0])
        footer_offset = -(-footer_offset // SECTOR) * SECTOR
        if file.writable and fi.end_missing:
            _restore_end_footer(file, fi.raw, footer_offset)
            recovered = True
    del starts
    block_map[alloc] += bitmap_bytes
    block_map[~alloc] = ABSENT
    nblocks = -(-common["size"] // bs)
    if len(block_map) < nblocks:      # CHS size larger than the table: the rest reads as zeros
        block_map = np.concatenate([block_map, np.full(nblocks - len(block_map), ABSENT, np.int64)])
    warnings, common["warnings"] = common["warnings"], []
    layer = SparseVhdLayer(fi.raw, raw, hoff, toff, n, footer_offset, block_size=bs, block_map=block_map,
                           parent_hints=hints, **common)
    if recovered:
        warnings = [w for w in warnings if "footer at end of file is missing" not in w]
        warnings.append(f"{path}: footer at the end of the file was missing (a write cut short by a crash "
                        f"or power loss?); restored it from the copy at offset 0 at {footer_offset:#x}")
    for w in warnings:
        layer.warn(w)
    return layer


def _restore_end_footer(file: ImageFile, footer: bytes, end_of_data: int) -> None:
    """Put the footer back after the last block, dropping whatever an interrupted allocation left
    beyond it (nothing the BAT references lies there). The footer is written before the file is
    cut, so an interruption here leaves an image that recovers the same way again."""
    file.pwrite(footer, end_of_data)
    file.sync()
    file.truncate(end_of_data + FOOTER_SIZE)
    file.sync()


# ---------------------------------------------------------------------------------------------
# Creating
# ---------------------------------------------------------------------------------------------
def build_footer(*, disk_type: int, size: int, original_size: int, geometry: tuple, unique_id: bytes,
                 creator: bytes, data_offset: int, timestamp: Optional[int] = None) -> bytes:
    raw = Footer.build(dict(
        cookie=FOOTER_COOKIE, features=FEATURES_RESERVED, format_version=FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=(int(time.time()) - VHD_EPOCH if timestamp is None else timestamp) & 0xFFFFFFFF,
        creator_app=creator, creator_version=CREATOR_VERSION, creator_host_os=b"Wi2k",
        original_size=original_size, current_size=size, cylinders=geometry[0], heads=geometry[1],
        sectors_per_track=geometry[2], disk_type=disk_type, checksum=0, unique_id=unique_id,
        saved_state=0, reserved=bytes(427)))
    return with_checksum(raw, FOOTER_CHECKSUM_OFFSET)


def plan_size(size: int, size_policy: str) -> tuple[int, tuple, bytes]:
    """(virtual size, geometry, creator) for a new image; see README 'VHD sizes'."""
    if size <= 0:
        raise ValueError("size must be positive")
    if size_policy == "chs":
        size, geometry = chs_round_up(size)
        return size, geometry, CREATOR_CHS
    if size_policy != "exact":
        raise ValueError(f"size_policy must be 'exact' or 'chs', not {size_policy!r}")
    if size % SECTOR:
        raise ValueError(f"VHD size {size} is not a multiple of 512 bytes")
    geometry = chs_for_sectors(size // SECTOR)
    if chs_bytes(geometry) == size:
        return size, geometry, CREATOR_CHS
    if size >= 65535 * 16 * 255 * SECTOR:
        return size, MAX_GEOMETRY, CREATOR_CHS
    # Not CHS-exact: QEMU reads current_size only for known creators such as Windows'.
    return size, geometry, CREATOR_EXACT


def dynamic_layout(size: int, block_size: int, where: str) -> tuple[int, int, int]:
    """(blocks, BAT offset, BAT bytes) of a new dynamic or differencing VHD; raises if impossible.

    The BAT follows the footer copy and the header; parent locators (if any), then the blocks
    (each its sector bitmap and data), then the footer follow the BAT.
    """
    bs = block_size
    if bs < SECTOR or bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
        raise ValueError(f"block size {bs} must be a power of two between 512 and {MAX_BLOCK_SIZE}")
    if size > MAX_DYNAMIC_SIZE:
        raise UnsupportedError(f"{where}: a dynamic VHD holds at most 2040 GiB ({MAX_DYNAMIC_SIZE} bytes)")
    n = limits.new_table_entries(where, size, bs, format_max=0xFFFFFFFF, format_name="VHD",
                                 max_block_size=MAX_BLOCK_SIZE)
    return n, FOOTER_SIZE + HEADER_SIZE, -(-n * 4 // SECTOR) * SECTOR


def new_file_size(size: int, subtype: str, block_size: Optional[int], blocks_stored: int,
                  where: str = "the output") -> int:
    """File size of a base VHD made by :func:`create_vhd` once *blocks_stored* blocks are allocated.

    *size* is the exact virtual size (size policy ``exact``); a fixed VHD is its data and a footer.
    """
    if subtype == "fixed":
        return size + FOOTER_SIZE
    if subtype != "dynamic":
        raise ValueError(f"unknown VHD subtype {subtype!r}")
    bs = block_size or DEFAULT_BLOCK_SIZE
    _n, table_offset, bat_len = dynamic_layout(size, bs, where)
    return table_offset + bat_len + blocks_stored * (_bitmap_bytes(bs) + bs) + FOOTER_SIZE


def create_vhd(file: ImageFile, size: int, subtype: str, *, block_size: Optional[int] = None,
               size_policy: str = "exact", parent: Optional[Layer] = None,
               parent_path: Optional[str] = None) -> Layer:
    unique_id = new_uuid().bytes
    if parent is not None:
        size = parent.size
        geometry = parent.geometry or chs_for_sectors(size // SECTOR)
        creator = CREATOR_EXACT
        subtype = "differencing"
    else:
        size, geometry, creator = plan_size(size, size_policy)
    if subtype == "fixed":
        footer = build_footer(disk_type=DISK_FIXED, size=size, original_size=size, geometry=geometry,
                              unique_id=unique_id, creator=creator, data_offset=NO_DATA_OFFSET)
        file.truncate(size)
        file.pwrite(footer, size)
        file.sync()
        return open_vhd(file)
    if subtype not in ("dynamic", "differencing"):
        raise ValueError(f"unknown VHD subtype {subtype!r}")
    bs = block_size or (parent.block_size if parent is not None and parent.format == "vhd" else DEFAULT_BLOCK_SIZE)
    n, table_offset, bat_len = dynamic_layout(size, bs, file.path)
    end = table_offset + bat_len
    disk_type = DISK_DIFFERENCING if parent is not None else DISK_DYNAMIC
    locators = []
    parent_fields = dict(parent_unique_id=bytes(16), parent_timestamp=0, parent_unicode_name=bytes(512))
    locator_blobs = []
    if parent is not None:
        ppath = os.path.abspath(parent_path)
        locators, locator_blobs, end = new_locators(ppath, file.path, end)
        name = os.path.basename(ppath).encode("utf-16-be")[:512]
        parent_fields = dict(parent_unique_id=parent_id_bytes(parent),
                             parent_timestamp=max(0, int(os.stat(ppath).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF,
                             parent_unicode_name=name.ljust(512, b"\0"))
    while len(locators) < 8:
        locators.append(dict(platform_code=0, platform_data_space=0, platform_data_length=0, reserved=0,
                             platform_data_offset=0))
    header = DynamicHeader.build(dict(cookie=HEADER_COOKIE, data_offset=NO_DATA_OFFSET, table_offset=table_offset,
                                      header_version=HEADER_VERSION, max_table_entries=n, block_size=bs,
                                      checksum=0, reserved1=0, parent_locators=locators,
                                      reserved2=bytes(256), **parent_fields))
    header = with_checksum(header, HEADER_CHECKSUM_OFFSET)
    footer = build_footer(disk_type=disk_type, size=size, original_size=size, geometry=geometry,
                          unique_id=unique_id, creator=creator, data_offset=FOOTER_SIZE)
    file.pwrite(footer, 0)
    file.pwrite(header, FOOTER_SIZE)
    limits.write_new_table(file.pwrite, table_offset, n, fill=BAT_UNUSED, pad_to=SECTOR)
    for off, blob in locator_blobs:
        file.pwrite(blob, off)
    file.pwrite(footer, end)
    file.sync()
    return open_vhd(file)


def parent_id_bytes(parent: Layer) -> bytes:
    """The 16 bytes a VHD child stores to name its parent: the parent footer's id, verbatim."""
    raw = getattr(parent, "footer_raw", None)
    if raw is not None:
        at = FOOTER_FIELD_OFFSETS["unique_id"]
        return bytes(raw[at:at + 16])
    return parent.uuid.bytes
