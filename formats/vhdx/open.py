"""Opening a VHDX file (VHDX.md A2): headers, log replay, region table, metadata, BAT, checked in
that order, every claimed size bounded by the format and the real file before it is used."""
from __future__ import annotations

import uuid as uuidlib
from typing import Optional

import numpy as np

from vdisk import limits
from vdisk.errors import FormatError, UnsupportedError, VDiskError
from vdisk.io import ImageFile
from ..base import ABSENT, ZERO, ParentHint, new_uuid
from .headers import HeaderPair
from .layer import VhdxLayer
from .log import Overlay, Update, check_replay, find_active
from .metadata import linkage_bytes, read_metadata, read_region_table
from .structs import (BAT_GUID, HEADER_OFFSETS, HEADER_SECTION, HEADER_SIZE, LOG_SECTOR, METADATA_GUID,
                      OFFSET_MASK, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT,
                      PAYLOAD_UNMAPPED_V095, SB_BLOCK_SIZE, SB_NOT_PRESENT, SB_PRESENT, SIGNATURE, MiB, chunk_ratio)
from .vfile import VhdxFile

#: A log to replay is read into memory whole; larger ones are refused rather than held.
MAX_REPLAY_LOG = 256 * MiB
MIN_FILE = HEADER_SECTION + LOG_SECTOR


def is_vhdx(head: bytes) -> bool:
    return head[:8] == SIGNATURE


def open_vhdx(file: ImageFile, strict: bool = False) -> VhdxLayer:
    """Open *file* as a VHDX layer; a writable file has its log replayed into it first."""
    path = file.path
    file_size = file.size()
    if file_size < MIN_FILE:
        raise FormatError(path, "file type identifier", None, 0,
                          f"file is {file_size} bytes, too small for a VHDX (at least {MIN_FILE})")
    fti = file.pread(HEADER_SIZE, 0)
    if not is_vhdx(fti):
        raise FormatError(path, "file type identifier", "signature", 0, f"expected 'vhdxfile', found {fti[:8]!r}")
    creator = fti[8:520].decode("utf-16-le", "replace").split("\0", 1)[0]
    headers = HeaderPair(path, [file.pread(HEADER_SIZE, at) for at in HEADER_OFFSETS])
    headers.validate(file_size)
    warnings = [f"{path}: header {i + 1} is damaged ({p}); header {headers.index + 1} is current"
                for i, p in enumerate(headers.problems) if p]
    h = headers.current
    if file.writable and not h["log_length"]:
        raise UnsupportedError(f"{path}: the image has no log, so vdisk cannot update its metadata safely; "
                               f"open it read-only")
    log_span = (h["log_offset"], h["log_offset"] + h["log_length"]) if h["log_length"] else None

    overlay: Optional[Overlay] = None
    replay_info = {"state": "empty"}
    if h["log_guid"] != bytes(16):
        if h["log_length"] > MAX_REPLAY_LOG:
            raise UnsupportedError(f"{path}: a {h['log_length']}-byte log to replay exceeds vdisk's limit of "
                                   f"{MAX_REPLAY_LOG}")
        log = file.pread(h["log_length"], h["log_offset"])
        replay = find_active(path, log, h["log_guid"], h["log_offset"])
        new_size = check_replay(path, replay, file_size, h["log_offset"])
        replay_info = {"state": "replayed", "entries": len(replay.entries), "updates": len(replay.updates),
                       "sequence": [replay.entries[0].sequence, replay.entries[-1].sequence]}
        if file.writable:
            _replay_in_place(file, headers, replay.updates, new_size)
            replay_info["where"] = "file"
        else:
            overlay = Overlay(replay.updates, new_size)
            replay_info["where"] = "memory (file unchanged)"
        file_size = max(file_size, new_size)
    vf = VhdxFile(file, overlay)

    def read(n: int, off: int) -> bytes:
        return vf.pread(n, off)

    regions, region_copy, w = read_region_table(path, read, file_size, log_span)
    warnings += w
    bat_region = next(r for r in regions if r.guid == BAT_GUID)
    md_region = next(r for r in regions if r.guid == METADATA_GUID)
    md = read_metadata(path, read, md_region)
    bs, lss, size = md.block_size, md.logical_sector_size, md.virtual_disk_size
    cr = chunk_ratio(bs, lss)
    npb = -(-size // bs)
    nsb = -(-npb // cr)
    need = npb + (npb - 1) // cr                  # payload entries up to the last block
    region_entries = bat_region.length // 8
    if region_entries < need:
        raise FormatError(path, "BAT", None, bat_region.offset,
                          f"{bat_region.length}-byte region holds {region_entries} entries, {need} are needed for "
                          f"{npb} blocks")
    limits.check_table(path, "BAT", None, bat_region.offset, entries=region_entries, entry_bytes=8,
                       table_offset=bat_region.offset, file_size=file_size, format_max=1 << 32)
    bat = np.zeros(max(region_entries, nsb * (cr + 1)), dtype="<u8")
    raw = read(bat_region.length, bat_region.offset)
    bat[:region_entries] = np.frombuffer(raw, dtype="<u8")
    grid = bat[:nsb * (cr + 1)].reshape(nsb, cr + 1)
    payload = grid[:, :cr].ravel()[:npb]
    sbe = grid[:, cr].copy()
    diff = md.has_parent
    state = (payload & 7).astype(np.int8)
    offs = (payload & OFFSET_MASK).astype(np.int64)
    present = state >= PAYLOAD_FULLY_PRESENT

    def entry_error(block: int, problem: str) -> FormatError:
        idx = block + block // cr
        return FormatError(path, "BAT", f"entry[{idx}]", bat_region.offset + 8 * idx, problem)

    bad = np.flatnonzero(state == 4)
    if len(bad):
        raise entry_error(int(bad[0]), "reserved payload block state 4")
    if not diff:
        bad = np.flatnonzero(state == PAYLOAD_PARTIALLY_PRESENT)
        if len(bad):
            raise entry_error(int(bad[0]), "PARTIALLY_PRESENT block in an image without a parent")
    if (state == PAYLOAD_UNMAPPED_V095).any():
        warnings.append(f"{path}: BAT uses the pre-1.0 UNMAPPED state 5 (read as zeros)")
    # Sector bitmaps: only SB_BLOCK_PRESENT in differencing files, nothing else anywhere.
    sb_state = (sbe & 7).astype(np.int8)
    if diff:
        bad_sb = np.flatnonzero((sb_state != SB_NOT_PRESENT) & (sb_state != SB_PRESENT))
    else:
        bad_sb = np.flatnonzero(sb_state != SB_NOT_PRESENT)
        if len(bad_sb) and (sb_state[bad_sb] == SB_PRESENT).all():
            warnings.append(f"{path}: sector bitmap entries marked present in an image without a parent (ignored)")
            sbe[:] = 0
            bad_sb = bad_sb[:0]
    if len(bad_sb):
        c = int(bad_sb[0])
        idx = c * (cr + 1) + cr
        raise FormatError(path, "BAT", f"entry[{idx}]", bat_region.offset + 8 * idx,
                          f"invalid sector bitmap state {int(sb_state[c])}")
    if diff:
        part = state == PAYLOAD_PARTIALLY_PRESENT
        chunks_needing = np.unique(np.flatnonzero(part) // cr)
        missing = chunks_needing[(sbe[chunks_needing] & 7) != SB_PRESENT]
        for c in missing.tolist():
            # v8.0 wording (VHDX.md §6, A4): the last chunk's bitmap entry right after its blocks
            alt = npb + nsb - 1
            if c == nsb - 1 and alt < region_entries and int(bat[alt]) & 7 == SB_PRESENT:
                sbe[c] = bat[alt]
                grid[c, cr] = bat[alt]
                continue
            b = int(np.flatnonzero(part & (np.arange(npb) // cr == c))[0])
            raise entry_error(b, f"PARTIALLY_PRESENT block in chunk {c}, whose sector bitmap is not present")
    # Where blocks lie: after the header section, inside the file (a partial last block is
    # tolerated, as qemu does), not over a region or the log, and not over each other.
    spans_start = [offs[present]]
    spans_len = [np.full(int(present.sum()), bs, dtype=np.int64)]
    sb_present = (sbe & 7) == SB_PRESENT if diff else np.zeros(len(sbe), dtype=bool)
    sb_offs = (sbe[sb_present] & OFFSET_MASK).astype(np.int64)
    spans_start.append(sb_offs)
    spans_len.append(np.full(len(sb_offs), SB_BLOCK_SIZE, dtype=np.int64))
    starts = np.concatenate(spans_start)
    lens = np.concatenate(spans_len)
    if len(starts):
        low = np.flatnonzero(starts < HEADER_SECTION)
        if len(low):
            raise FormatError(path, "BAT", None, bat_region.offset,
                              f"a block at {int(starts[low[0]]):#x} lies inside the header section")
        past = np.flatnonzero(starts >= file_size)
        if len(past):
            raise FormatError(path, "BAT", None, bat_region.offset,
                              f"a block at {int(starts[past[0]]):#x} lies past the end of the {file_size}-byte file "
                              f"(truncated?)")
        fixed_spans = [(r.offset, r.offset + r.length) for r in regions]
        if log_span:
            fixed_spans.append(log_span)
        for lo, hi in fixed_spans:
            hit = np.flatnonzero((starts < hi) & (starts + lens > lo))
            if len(hit):
                raise FormatError(path, "BAT", None, bat_region.offset,
                                  f"a block at {int(starts[hit[0]]):#x} overlaps the structure at {lo:#x}")
        order = np.argsort(starts, kind="stable")
        s, ln = starts[order], lens[order]
        clash = np.flatnonzero(s[1:] < s[:-1] + ln[:-1])
        if len(clash):
            raise FormatError(path, "BAT", None, bat_region.offset,
                              f"blocks at {int(s[clash[0]]):#x} and {int(s[clash[0] + 1]):#x} overlap")
        # whole blocks inside the file, but for the last one within the virtual size
        block_end = offs + np.where(np.arange(npb) == npb - 1, size - (npb - 1) * bs, bs)
        short = np.flatnonzero(present & (block_end > file_size))
        if len(short) and not (len(short) == 1 and int(offs[short[0]]) == int(starts.max())):
            raise entry_error(int(short[0]), f"block at {int(offs[short[0]]):#x} runs past the end of the "
                                             f"{file_size}-byte file (truncated?)")
    if overlay is not None:
        # Sectors the log replays into payload or bitmap blocks must be read through the overlay;
        # otherwise the data path reads the file directly.
        touches_data = any(overlay.touches(int(a), int(a) + int(b)) for a, b in zip(starts, lens)) \
            if len(overlay.updates) < 64 else True
        if not touches_data:
            vf.overlay = None
    block_map = np.where(present, offs, np.where(state == PAYLOAD_NOT_PRESENT, ABSENT, ZERO)).astype(np.int64)
    subtype = "differencing" if diff else ("fixed" if md.leave_block_allocated else "dynamic")
    parent_id = None
    hints: list[ParentHint] = []
    if diff:
        parent_id = linkage_bytes(md.locator.get("parent_linkage"))
        if parent_id is None:
            raise FormatError(path, "parent locator", "parent_linkage", md_region.offset,
                              f"missing or not a GUID: {md.locator.get('parent_linkage')!r}")
        hints = locator_hints(md.locator)
    layer = VhdxLayer(headers=headers, regions=regions, bat_region=bat_region, metadata=md, bat=bat,
                      chunk_ratio=cr, creator=creator, replay_info=replay_info,
                      file=vf, format="vhdx", subtype=subtype, size=size, block_size=bs, block_map=block_map,
                      uuid=uuidlib.UUID(bytes_le=h["data_write_guid"]), parent_id=parent_id,
                      parent_hints=hints, warnings=[])
    layer.region_copy = region_copy
    for w in warnings:
        layer.warn(w)
    if vf.overlay is None and not file.writable:
        layer.file = file            # nothing to add to reads, no writes: the engine reads the file itself
    return layer


def _replay_in_place(file: ImageFile, headers: HeaderPair, updates: list[Update], new_size: int) -> None:
    """A5/A3 on a writable file: new FileWriteGuid first, then the updates, then LogGuid 0."""
    headers.update(file, file_write_guid=new_uuid().bytes_le)
    for u in updates:
        if u.data is not None:
            file.pwrite(u.data, u.offset)
        else:
            pos, end = u.offset, u.offset + u.length
            while pos < end:
                n = min(end - pos, MiB)
                file.pwrite(bytes(n), pos)
                pos += n
    if file.size() < new_size:
        file.truncate(new_size)
    file.sync()
    headers.update(file, log_guid=bytes(16))


def _windows_to_host(path: str) -> str:
    path = path.rstrip("\0")
    if path.startswith("\\\\?\\"):
        path = path[4:]
    path = path.replace("\\", "/")
    if len(path) >= 2 and path[1] == ":":
        path = path[2:]
    while path.startswith("./"):
        path = path[2:]
    return path


def locator_hints(locator: dict) -> list[ParentHint]:
    """Where the parent may be, in the spec's order: relative, volume (its path part), absolute."""
    hints = []
    rel = locator.get("relative_path")
    if rel:
        hints.append(ParentHint("relative", _windows_to_host(rel)))
    vol = locator.get("volume_path")
    if vol and vol.startswith("\\\\?\\Volume{") and "}\\" in vol:
        hints.append(ParentHint("absolute", "/" + _windows_to_host(vol.split("}\\", 1)[1])))
    ab = locator.get("absolute_win32_path")
    if ab:
        hints.append(ParentHint("absolute", _windows_to_host(ab) if ab[1:3] == ":\\" or ab.startswith("\\\\?\\")
                                else ab))
    names = {h.path.rsplit("/", 1)[-1] for h in hints}
    for n in sorted(names):
        hints.append(ParentHint("name", n))
    return hints


def peek_identity(path: str) -> Optional[bytes]:
    """The current header's DataWriteGuid of the VHDX at *path* (what a child's parent_linkage
    names), from the headers only; None when the file is not a VHDX this can read."""
    try:
        f = ImageFile(path, lock=False)
    except (OSError, VDiskError):
        return None
    try:
        if not is_vhdx(f.pread(8, 0)):
            return None
        return HeaderPair(path, [f.pread(HEADER_SIZE, at) for at in HEADER_OFFSETS]).current["data_write_guid"]
    except (OSError, VDiskError):
        return None
    finally:
        f.close()
