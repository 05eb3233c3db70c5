"""VhdxLayer: a VHDX file as the engine sees it (block map, sector bitmaps, allocation, flush).

Payload data is written in place or into new blocks at the end of the file; every metadata
change (BAT entries, sector-bitmap sectors) goes through the log: entry written, flushed,
applied, flushed (VHDX.md A5). The first mutation of a session first gives the file a new
FileWriteGuid and DataWriteGuid; closing clears the log GUID again so other readers see a
clean file.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk.errors import UnsupportedError
from ..base import SECTOR, ZERO, Layer, new_uuid
from ..raw import punch_hole
from .headers import HeaderPair
from .log import build_entry
from .metadata import Metadata, Region
from .structs import (LOG_SECTOR, OFFSET_MASK, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT,
                      PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNMAPPED, PAYLOAD_ZERO, SB_BLOCK_SIZE, SB_PRESENT, STATE_NAMES, MiB,
                      guid_text)
from .vfile import VhdxFile

SB_CACHE = 64                 # clean sector-bitmap blocks kept in memory (1 MiB each)
BITMAP_CACHE = 4096           # converted per-block bitmaps kept


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


class VhdxLayer(Layer):
    """One VHDX file. ``bat`` (uint64, the whole BAT region) is the truth; ``block_map`` is the
    engine's view of its payload entries."""

    def __init__(self, *, headers: HeaderPair, regions: list, bat_region: Region, metadata: Metadata,
                 bat: np.ndarray, chunk_ratio: int, creator: str, replay_info: dict, **kw):
        super().__init__(**kw)
        self.creator = creator
        self.headers = headers
        self.regions = regions
        self.bat_region = bat_region
        self.md = metadata
        self.bat = bat
        self.cr = chunk_ratio
        self.nblocks = len(self.block_map)
        self.replay_info = replay_info
        self.logical_sector_size = metadata.logical_sector_size
        self.sector_granular = self.subtype == "differencing"
        self.spb = self.block_size // metadata.logical_sector_size        # logical sectors per block
        self._sb: "OrderedDict[int, bytearray]" = OrderedDict()
        self._bits: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._dirty_bat: set[int] = set()
        self._dirty_sb: set[tuple[int, int]] = set()
        self._lock = threading.RLock()
        self._eof = _round_up(max(self.file.size(), self._used_end()), MiB)
        self._log_guid: Optional[bytes] = None        # set while this session's log is in use
        self._log_head = 0
        self._log_seq = 0
        self._punched: set[int] = set()               # UNMAPPED blocks' storage punched this session
        if self.file.writable:
            self.file.before_first_write = self._begin_session

    # -- indexes --------------------------------------------------------------------------------
    def payload_index(self, block: int) -> int:
        return block + block // self.cr

    def sb_index(self, chunk: int) -> int:
        return chunk * (self.cr + 1) + self.cr

    def state(self, block: int) -> int:
        return int(self.bat[self.payload_index(block)]) & 7

    def _used_end(self) -> int:
        e = self.bat
        present = (e & 7) >= PAYLOAD_FULLY_PRESENT
        offs = (e[present] & OFFSET_MASK).astype(np.int64)
        if not len(offs):
            return 0
        return int(offs.max()) + self.block_size

    @property
    def raw(self):
        return self.file.raw if isinstance(self.file, VhdxFile) else self.file

    # -- sector bitmaps -------------------------------------------------------------------------
    def _sb_block(self, chunk: int) -> bytearray:
        sb = self._sb.get(chunk)
        if sb is None:
            e = int(self.bat[self.sb_index(chunk)])
            sb = bytearray(SB_BLOCK_SIZE)
            self.file.readinto_exact(memoryview(sb), e & OFFSET_MASK)
            self._sb[chunk] = sb
            while len(self._sb) > SB_CACHE:
                old = next((c for c in self._sb if not any(d[0] == c for d in self._dirty_sb)), None)
                if old is None:
                    break
                del self._sb[old]
        return sb

    def _block_bits_span(self, block: int) -> tuple[int, int, int]:
        chunk = block // self.cr
        lo = (block % self.cr) * self.spb // 8
        return chunk, lo, lo + self.spb // 8

    def sector_bitmap(self, block: int) -> Optional[np.ndarray]:
        if not self.sector_granular or self.state(block) != PAYLOAD_PARTIALLY_PRESENT:
            return None
        bm = self._bits.get(block)
        if bm is None:
            with self._lock:
                chunk, lo, hi = self._block_bits_span(block)
                raw = np.frombuffer(bytes(self._sb_block(chunk)[lo:hi]), dtype=np.uint8)
                bits = np.unpackbits(raw, bitorder="little")           # VHDX: bit 0 = first sector
                if self.logical_sector_size != SECTOR:
                    bits = np.repeat(bits, self.logical_sector_size // SECTOR)
                bm = np.packbits(bits)                                  # engine: MSB first, 512 B
                self._bits[block] = bm
                while len(self._bits) > BITMAP_CACHE:
                    self._bits.popitem(last=False)
        return bm

    def set_sectors_present(self, block: int, first: int, count: int) -> None:
        if not self.sector_granular or count <= 0 or self.state(block) != PAYLOAD_PARTIALLY_PRESENT:
            return
        with self._lock:
            self._mark_present(block, first, count)

    def _mark_present(self, block: int, first: int, count: int) -> None:
        """Set the bits of 512-byte sectors [first, first+count) of *block* (whole logical sectors)."""
        per = self.logical_sector_size // SECTOR
        lfirst, lend = first // per, -(-(first + count) // per)
        chunk, lo, hi = self._block_bits_span(block)
        sb = self._sb_block(chunk)
        bits = np.unpackbits(np.frombuffer(bytes(sb[lo:hi]), dtype=np.uint8), bitorder="little")
        if bits[lfirst:lend].all():
            return
        bits[lfirst:lend] = 1
        sb[lo:hi] = np.packbits(bits, bitorder="little").tobytes()
        self._bits.pop(block, None)
        for s in range(lo // LOG_SECTOR, (hi - 1) // LOG_SECTOR + 1):
            self._dirty_sb.add((chunk, s))

    # -- allocation -----------------------------------------------------------------------------
    def can_mark_zero(self) -> bool:
        return not self.md.leave_block_allocated or self.md.has_parent

    def _set_entry(self, index: int, value: int) -> None:
        self.bat[index] = value
        self._dirty_bat.add(index)

    def _append(self, length: int) -> int:
        """Room for *length* bytes at the end of the file (1 MiB aligned), reading as zeros."""
        at = self._eof
        self._eof = at + _round_up(length, MiB)
        return at

    def deallocate(self, block: int) -> bool:
        """Discard a whole block of a dynamic image: its storage is punched (reads zeros at once)
        and the entry becomes UNMAPPED, keeping the offset (VHDX.md §6), so a later write to the
        same block reuses it. False where the file system cannot punch holes."""
        with self._lock:
            if self.subtype != "dynamic" or self.state(block) != PAYLOAD_FULLY_PRESENT:
                return False
            self._begin_if_needed()
            at = int(self.block_map[block])
            if not punch_hole(self.raw, at, self.block_size):
                return False
            self._punched.add(at)
            self._set_entry(self.payload_index(block), at | PAYLOAD_UNMAPPED)
            self.block_map[block] = ZERO
            return True

    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        with self._lock:
            was = self.state(block)
            kept = int(self.bat[self.payload_index(block)]) & OFFSET_MASK
            if was == PAYLOAD_UNMAPPED and kept in self._punched:
                # this block's own storage, punched by a discard of this session: reads zeros
                self._punched.discard(kept)
                for off, data in pieces:
                    self.file.pwrite(data, kept + off)
                self._set_entry(self.payload_index(block), kept | PAYLOAD_FULLY_PRESENT)
                self.block_map[block] = kept
                return kept
            data_at = self._append(self.block_size)
            end = data_at + self.block_size
            # The file may hold leftovers of an interrupted allocation past the used end: cut them
            # so the parts of the new block not written read as zeros.
            if self.file.size() > data_at:
                self.file.truncate(data_at)
            for off, data in pieces:
                self.file.pwrite(data, data_at + off)
            if self.file.size() < end:
                self.file.truncate(end)
            partial = (self.sector_granular and was == PAYLOAD_NOT_PRESENT and present is not None
                       and not (present[0] == 0 and present[1] * SECTOR >= self.block_size))
            if partial:
                chunk = block // self.cr
                si = self.sb_index(chunk)
                if si >= len(self.bat) or si * 8 >= self.bat_region.length:
                    raise UnsupportedError(f"{self.path}: the BAT has no sector-bitmap entry for chunk {chunk}")
                if int(self.bat[si]) & 7 != SB_PRESENT:
                    sb_at = self._append(SB_BLOCK_SIZE)
                    if self.file.size() > sb_at:
                        self.file.truncate(sb_at)
                    self.file.truncate(sb_at + SB_BLOCK_SIZE)
                    self._sb[chunk] = bytearray(SB_BLOCK_SIZE)
                    self._set_entry(si, sb_at | SB_PRESENT)
                # a block that was never present: its old bits mean nothing (VHDX.md §7)
                c, lo, hi = self._block_bits_span(block)
                sb = self._sb_block(c)
                if any(sb[lo:hi]):
                    sb[lo:hi] = bytes(hi - lo)
                    for s in range(lo // LOG_SECTOR, (hi - 1) // LOG_SECTOR + 1):
                        self._dirty_sb.add((c, s))
                self._set_entry(self.payload_index(block), data_at | PAYLOAD_PARTIALLY_PRESENT)
                self._bits.pop(block, None)
                if present[1]:
                    self._mark_present(block, present[0], present[1])
            else:
                # Fully present: new data plus zeros (a child's ZERO/UNMAPPED block reads zeros,
                # never the parent).
                self._set_entry(self.payload_index(block), data_at | PAYLOAD_FULLY_PRESENT)
            self.block_map[block] = data_at
            return data_at

    def mark_zero(self, block: int) -> None:
        with self._lock:
            self._begin_if_needed()
            self._set_entry(self.payload_index(block), PAYLOAD_ZERO)
            self._bits.pop(block, None)
            self.block_map[block] = ZERO

    def _begin_if_needed(self) -> None:
        f = self.file
        if isinstance(f, VhdxFile) and f.before_first_write is not None:
            f._first()

    # -- sessions and the log -------------------------------------------------------------------
    def _begin_session(self) -> None:
        """Before the first change of this session: new FileWriteGuid and DataWriteGuid (A5.1-2)."""
        self.headers.update(self.raw, file_write_guid=new_uuid().bytes_le, data_write_guid=new_uuid().bytes_le)
        self.uuid = uuidlib.UUID(bytes_le=self.headers.current["data_write_guid"])
        if isinstance(self.file, VhdxFile) and self.file.overlay is None:
            self.file = self.file.raw        # the session has begun: nothing more to intercept

    def _log_capacity(self) -> int:
        """Data sectors one entry may carry in this file's log."""
        sectors = self.headers.current["log_length"] // LOG_SECTOR
        return max(1, sectors - -(-(sectors + 2) // 128) - 1)

    def _log_write(self, sectors: list[tuple[int, bytes]]) -> None:
        h = self.headers.current
        log_off, log_len = h["log_offset"], h["log_length"]
        if not log_len:
            raise UnsupportedError(f"{self.path}: the image has no log, so its metadata cannot be updated safely")
        cap = self._log_capacity()
        raw = self.raw
        for i in range(0, len(sectors), cap):
            batch = sectors[i:i + cap]
            guid = self._log_guid or new_uuid().bytes_le
            self._log_seq += 1
            size = raw.size()
            at = self._log_head
            entry = build_entry(guid, self._log_seq, at, batch, size // MiB * MiB, _round_up(max(size, self._eof), MiB))
            if at + len(entry) > log_len:
                at = 0
                entry = build_entry(guid, self._log_seq, at, batch, size // MiB * MiB,
                                    _round_up(max(size, self._eof), MiB))
            raw.pwrite(entry, log_off + at)
            raw.sync()
            if self._log_guid is None:
                # The entry exists before the header names its log: a cut between the two leaves
                # a header without a log to replay (the old state), never the reverse.
                self.headers.update(raw, log_guid=guid)
                self._log_guid = guid
            self._log_head = at + len(entry)
            for off, data in batch:
                raw.pwrite(data, off)
            raw.sync()

    def _dirty_sectors(self) -> list[tuple[int, bytes]]:
        out = []
        bat_bytes = self.bat.view(np.uint8)
        base = self.bat_region.offset
        for s in sorted({i * 8 // LOG_SECTOR for i in self._dirty_bat}):
            sector = bytes(bat_bytes[s * LOG_SECTOR:(s + 1) * LOG_SECTOR]).ljust(LOG_SECTOR, b"\0")
            out.append((base + s * LOG_SECTOR, sector))
        for chunk, s in sorted(self._dirty_sb):
            sb_at = int(self.bat[self.sb_index(chunk)]) & OFFSET_MASK
            out.append((sb_at + s * LOG_SECTOR, bytes(self._sb[chunk][s * LOG_SECTOR:(s + 1) * LOG_SECTOR])))
        return out

    def flush(self) -> None:
        with self._lock:
            if not (self._dirty_bat or self._dirty_sb):
                self.file.sync()
                return
            self.file.sync()                                   # data before the metadata
            self._log_write(self._dirty_sectors())
            self._dirty_bat.clear()
            self._dirty_sb.clear()

    def close(self) -> None:
        try:
            if self.file.writable and not self.file.closed:
                self.flush()
                if self._log_guid is not None:
                    # Everything logged is applied: a clean file for readers that cannot replay.
                    self.headers.update(self.raw, log_guid=bytes(16))
                    self._log_guid = None
        finally:
            self.file.close()

    # -- reporting ------------------------------------------------------------------------------
    def state_counts(self) -> dict:
        nsb = -(-self.nblocks // self.cr)
        full = np.zeros(nsb * (self.cr + 1), dtype=np.uint64)
        k = min(len(full), len(self.bat))
        full[:k] = self.bat[:k]
        grid = full.reshape(nsb, self.cr + 1)
        states = (grid[:, :self.cr].ravel()[:self.nblocks] & 7).astype(np.int64)
        counts = np.bincount(states, minlength=8)
        out = {STATE_NAMES[i]: int(c) for i, c in enumerate(counts) if c}
        out["sector_bitmaps_present"] = int(((grid[:, self.cr] & 7) == SB_PRESENT).sum())
        return out

    def info(self) -> dict:
        h = self.headers.current
        md = self.md
        d = {
            "creator": self.creator,
            "header": {"current": self.headers.index + 1, "sequence_number": h["sequence_number"],
                       "file_write_guid": guid_text(h["file_write_guid"]),
                       "data_write_guid": guid_text(h["data_write_guid"]),
                       "log_guid": guid_text(h["log_guid"]), "version": h["version"],
                       "other_header": "valid" if self.headers.slots[1 - self.headers.index] is not None
                       else self.headers.problems[1 - self.headers.index]},
            "log": dict(offset=h["log_offset"], length=h["log_length"], **self.replay_info),
            "regions": [{"guid": guid_text(r.guid), "offset": r.offset, "length": r.length,
                         "required": r.required} for r in self.regions],
            "block_size": md.block_size, "leave_block_allocated": md.leave_block_allocated,
            "has_parent": md.has_parent, "virtual_disk_size": md.virtual_disk_size,
            "virtual_disk_id": guid_text(md.virtual_disk_id),
            "logical_sector_size": md.logical_sector_size, "physical_sector_size": md.physical_sector_size,
            "chunk_ratio": self.cr, "bat_entries": len(self.bat),
            "block_states": self.state_counts(),
            "metadata_items": [{"item": n, "offset": o, "length": ln, "flags": f} for n, o, ln, f in md.entries],
        }
        if md.has_parent:
            d["parent_locator"] = dict(md.locator)
        return d
