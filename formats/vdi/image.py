"""VirtualBox VDI: fixed, dynamic and differencing images (spec digest VDI.md)."""
from __future__ import annotations

import threading
from typing import Optional, Sequence
import uuid as uuidlib

import numpy as np

from vdisk import limits
from vdisk.errors import FormatError, UnsupportedError
from vdisk.io import ImageFile
from ..base import ABSENT, SECTOR, ZERO, Layer, new_uuid, write_table_entries
from .structs import (BLOCK_FREE, BLOCK_ZERO, HEADER_V0_END, HEADER_V1, HEADER_V1_PLUS, PRE_HEADER_SIZE,
                          SIGNATURE, SUBTYPE_NAMES, TEXT, TYPE_DIFF, TYPE_FIXED, TYPE_NORMAL, V1_FIELD_OFFSETS,
                          VERSION_0, VERSION_1_1, HeaderV0, HeaderV1, PreHeader)

DEFAULT_BLOCK_SIZE = 1 << 20
ALIGN = 1 << 20                     # VirtualBox's VDI_DATA_ALIGN
MIN_BLOCK, MAX_BLOCK = 1 << 12, 256 << 20
#: VirtualBox creates VDIs below 4 PiB - 3 MiB (cbDisk), the largest size it accepts.
MAX_VIRTUAL_SIZE = (4 << 50) - (3 << 20) - SECTOR
MAX_BLOCKS = 0xFFFFFFFE - 1
NULL_UUID = bytes(16)
MAX_HEADER_MAP_GAP = 4 << 20        # beyond this the count and the map are written separately


def is_vdi(head: bytes) -> bool:
    return len(head) >= PRE_HEADER_SIZE and int.from_bytes(head[0x40:0x44], "little") == SIGNATURE


def vdi_remnant(head: bytes) -> Optional[str]:
    """What in the pre-header of a file without the VDI signature still says it was a VDI: the
    text line every writer puts at offset 0 ("<<< ... Disk Image >>>"). None if nothing."""
    text = head[:64].split(b"\n", 1)[0]
    if text.startswith(b"<<< ") and b" >>>" in text:
        return f"VDI header text {text.decode('ascii', 'replace')!r} at offset 0"
    return None


def vdi_signature_problem(head: bytes) -> str:
    """The pre-header's signature field, said as found against expected."""
    if len(head) < PRE_HEADER_SIZE:
        return f"the file is {len(head)} bytes, too small for a VDI pre-header"
    return f"signature {int.from_bytes(head[0x40:0x44], 'little'):#010x} is not {SIGNATURE:#x}"


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


def encode_map(block_map: np.ndarray, block_extra: int, offset_data: int, slot_size: int) -> np.ndarray:
    """The little-endian block map for a Layer block map (file offsets of the blocks' data;
    ABSENT free, ZERO zero): slot numbers counted from *offset_data*."""
    out = np.full(len(block_map), BLOCK_FREE, dtype="<u4")
    alloc = block_map >= 0
    out[alloc] = (block_map[alloc] - block_extra - offset_data) // slot_size
    out[block_map == ZERO] = BLOCK_ZERO
    return out


class VdiLayer(Layer):
    def __init__(self, header: dict, header_raw_len: int, version: int, **kw):
        super().__init__(**kw)
        self.header = header                         # mutable dict of header fields (v1)
        self.header_len = header_raw_len
        self.version = version
        self.offset_blocks = header["offset_blocks"]
        self.offset_data = header["offset_data"]
        self.block_extra = header.get("block_extra", 0)
        self.slot_size = self.block_extra + self.block_size
        self.allocated = header["blocks_allocated"]
        self._dirty_entries: set[int] = set()
        self._header_dirty = False
        self._modified = False
        self._truncate_pending: Optional[int] = None   # file end after discarding the last slot
        self._durable_allocated = self.allocated       # the count the file's header holds
        self._gap: Optional[bytes] = None              # file bytes between the header and the map
        self._lock = threading.RLock()

    @property
    def linkage(self) -> bytes:
        return self.header["uuid_linkage"]

    def can_mark_zero(self) -> bool:
        return True

    def _slot_offset(self, slot: int) -> int:
        return self.offset_data + slot * self.slot_size + self.block_extra

    def _touch(self) -> None:
        if not self._modified:
            # VirtualBox gives an image a new modification UUID on its first change after opening.
            self._modified = True
            self.header["uuid_modify"] = new_uuid().bytes_le
            self._header_dirty = True

    def allocate(self, block: int, pieces: Sequence[tuple[int, bytes]],
                 present: Optional[tuple[int, int]] = None) -> int:
        if self.subtype == "fixed":
            return self._allocate_fixed(block, pieces)
        with self._lock:
            self._touch()
            if self.allocated < self._durable_allocated:
                # The slot was freed by a discard the file does not know of yet: its map still
                # points a block at it. Make the discard durable before the slot is reused.
                self.flush()
            slot = self._next_slot()
            start = self.offset_data + slot * self.slot_size
            self._truncate_pending = None                  # the freed tail is in use again
            # Anything past the last counted slot is a leftover of an interrupted allocation:
            # cut it so the parts of the new block we do not write read as zeros.
            if self.file.size() > start:
                self.file.truncate(start)
            data_at = start + self.block_extra
            for off, data in pieces:
                self.file.pwrite(data, data_at + off)
            end = start + self.slot_size
            if self.file.size() < end:
                self.file.truncate(end)
            self.allocated = slot + 1
            self.header["blocks_allocated"] = self.allocated
            self._header_dirty = True
            self.block_map[block] = data_at
            self._dirty_entries.add(block)
            return data_at

    def _next_slot(self) -> int:
        """The slot after the counted ones, unless the count claims slots the file does not hold
        (a damaged count): then the first slot past both the file's whole slots and every slot
        in use, so one write never grows the file by a gap of slots nobody wrote."""
        slot = self.allocated
        held = (self.file.size() - self.offset_data) // self.slot_size
        if slot <= held:
            return slot
        bm = self.block_map
        used = (bm[bm >= 0] - self.block_extra - self.offset_data) // self.slot_size
        return max(int(held), int(used.max()) + 1 if len(used) else 0)

    def _allocate_fixed(self, block: int, pieces: Sequence[tuple[int, bytes]]) -> int:
        """A fixed image already holds a slot for every block: a block whose map entry is free or
        zero gets one of the slots no entry references (its own slot when free), never a new one
        past the end (that would make a slot number the image cannot have). The slot's old bytes
        are unreferenced, so the parts of the block not written are zeroed."""
        with self._lock:
            used = np.zeros(len(self.block_map), dtype=bool)
            bm = self.block_map
            slots = (bm[bm >= 0] - self.block_extra - self.offset_data) // self.slot_size
            used[slots[(slots >= 0) & (slots < len(used))]] = True
            if block < len(used) and not used[block]:
                slot = block
            else:
                free = np.flatnonzero(~used)
                if not len(free):
                    raise FormatError(self.path, "block map", f"entry[{block}]", self.offset_blocks + 4 * block,
                                      "a fixed image with no unreferenced slot has an entry without one")
                slot = int(free[0])
            self._touch()
            data_at = self._slot_offset(slot)
            written = sorted((off, off + len(data)) for off, data in pieces)
            pos = 0
            for lo, hi in written + [(self.block_size, self.block_size)]:
                while pos < lo:                            # zero what the pieces leave, in chunks
                    n = min(lo - pos, 1 << 20)
                    self.file.pwrite(bytes(n), data_at + pos)
                    pos += n
                pos = max(pos, hi)
            for off, data in pieces:
                self.file.pwrite(data, data_at + off)
            self.block_map[block] = data_at
            self._dirty_entries.add(block)
            return data_at

    def mark_zero(self, block: int) -> None:
        with self._lock:
            self._touch()
            self.block_map[block] = ZERO
            self._dirty_entries.add(block)

    def deallocate(self, block: int) -> bool:
        """Free a block only when it occupies the last slot (so slots stay dense); else False."""
        with self._lock:
            e = int(self.block_map[block])
            if self.subtype == "fixed" or e < 0 or (e - self.block_extra - self.offset_data) // self.slot_size != self.allocated - 1:
                return False
            self._touch()
            self.block_map[block] = ZERO if self.is_differencing else ABSENT
            self._dirty_entries.add(block)
            self.allocated -= 1
            self.header["blocks_allocated"] = self.allocated
            self._header_dirty = True
            self._truncate_pending = self.offset_data + self.allocated * self.slot_size
            return True

    def map_entries(self) -> np.ndarray:
        return encode_map(self.block_map, self.block_extra, self.offset_data, self.slot_size)

    def header_bytes(self) -> bytes:
        h = dict(self.header)
        raw = HeaderV1.build(h)
        return raw[: self.header_len]

    def flush(self) -> None:
        with self._lock:
            if not (self._dirty_entries or self._header_dirty):
                self.file.sync()
                return
            self.file.sync()                                      # data before the metadata
            together = self.allocated != self._durable_allocated and bool(self._dirty_entries)
            if not (together and self._write_header_and_map()):
                if self._header_dirty:
                    self.file.pwrite(self.header_bytes(), PRE_HEADER_SIZE)
                if self._dirty_entries:
                    write_table_entries(self.file, self.map_entries().tobytes(), self.offset_blocks,
                                        self._dirty_entries)
            self._header_dirty = False
            self._dirty_entries.clear()
            self._durable_allocated = self.allocated
            pending = self._truncate_pending
            if pending is not None:
                self.file.sync()
                self.file.truncate(pending)
                self._truncate_pending = None
            self.file.sync()

    def _write_header_and_map(self) -> bool:
        """Write the header and the block map up to its last dirty sector in ONE write.

        The allocated-block count and the entries that use the counted slots must change
        together: with the count first, an interruption leaves a count larger than the map
        (QEMU: "allocated blocks mismatch"); with the entries first, one smaller, which lets the
        next allocation overwrite a block in use. One write is never half issued, so a kill or a
        power cut leaves both old or both new. The bytes between header and map (padding, 1 MiB
        in VirtualBox's layout) are rewritten as they are. False (nothing written) when the map
        lies too far from the header for that to be sensible.
        """
        start = PRE_HEADER_SIZE
        header = self.header_bytes()
        gap_at = start + len(header)
        if self.offset_blocks < gap_at or self.offset_blocks - gap_at > MAX_HEADER_MAP_GAP:
            return False
        if self._gap is None:
            self._gap = self.file.pread(self.offset_blocks - gap_at, gap_at)
        last = max(self._dirty_entries)
        table = self.map_entries()
        map_end = min(len(table), ((last * 4) // SECTOR + 1) * SECTOR // 4)
        self.file.pwritev([header, self._gap, table[:map_end].tobytes()], start)
        return True

    def info(self) -> dict:
        h = self.header
        d = {
            "header_version": f"{self.version >> 16}.{self.version & 0xFFFF}",
            "header_size": self.header_len,
            "comment": h["comment"].split(b"\0", 1)[0].decode("utf-8", "replace"),
            "offset_blocks": self.offset_blocks, "offset_data": self.offset_data,
            "blocks": len(self.block_map), "blocks_allocated": self.allocated,
            "zero_blocks": int((self.block_map == ZERO).sum()),
            "uuid_modify": str(uuidlib.UUID(bytes_le=h["uuid_modify"])),
        }
        if self.is_differencing:
            d["uuid_linkage"] = str(uuidlib.UUID(bytes_le=h["uuid_linkage"]))
            d["uuid_parent_modify"] = str(uuidlib.UUID(bytes_le=h.get("uuid_parent_modify", NULL_UUID)))
        return d


def identity_from(head: bytes) -> Optional[bytes]:
    """The creation UUID (bytes_le) in the header of a VDI whose first 512 bytes are *head*;
    None when they are not a VDI header this can read. Lets a parent search skip the files that
    cannot be the parent without opening each one (tables and all)."""
    if len(head) < PRE_HEADER_SIZE + HEADER_V1:
        return None
    pre = PreHeader.parse(head[:PRE_HEADER_SIZE])
    if pre.signature != SIGNATURE:
        return None
    if pre.version == VERSION_0:
        return HeaderV0.parse(head[PRE_HEADER_SIZE:]).uuid_create
    if pre.version >> 16 == 1:
        return HeaderV1.parse(head[PRE_HEADER_SIZE:PRE_HEADER_SIZE + HEADER_V1_PLUS].ljust(HEADER_V1_PLUS, b"\0")).uuid_create
    return None


def open_vdi(file: ImageFile, strict: bool = False) -> VdiLayer:
    path = file.path
    file_size = file.size()
    if file_size < PRE_HEADER_SIZE + HEADER_V1:
        raise FormatError(path, "header", None, 0, f"file is {file_size} bytes, too small for a VDI header")
    pre = PreHeader.parse(file.pread(PRE_HEADER_SIZE, 0))
    if pre.signature != SIGNATURE:
        raise FormatError(path, "pre-header", "signature", 0x40, f"expected {SIGNATURE:#x}, found {pre.signature:#x}")

    def bad(field: str, problem: str):
        return FormatError(path, "header", field, V1_FIELD_OFFSETS.get(field), problem)

    if pre.version == VERSION_0:
        v0 = HeaderV0.parse(file.pread(HEADER_V0_END - PRE_HEADER_SIZE, PRE_HEADER_SIZE))
        header = dict(v0)
        header.update(header_size=0, offset_blocks=HEADER_V0_END,
                      offset_data=HEADER_V0_END + 4 * v0.blocks_in_image, block_extra=0,
                      uuid_parent_modify=NULL_UUID, lchs_geometry=[0, 0, 0, 0])
        header_len = HEADER_V0_END - PRE_HEADER_SIZE
    elif pre.version >> 16 == 1:
        raw = file.pread(HEADER_V1_PLUS, PRE_HEADER_SIZE)
        hdr_size = int.from_bytes(raw[:4], "little")
        if hdr_size < HEADER_V1:
            raise bad("header_size", f"header size {hdr_size:#x} is smaller than {HEADER_V1:#x}")
        if hdr_size > 4096:
            raise bad("header_size", f"absurd header size {hdr_size:#x}")
        if len(raw) < min(hdr_size, HEADER_V1_PLUS):
            raise bad("header_size", f"a {hdr_size}-byte header at {PRE_HEADER_SIZE:#x} runs past the end of the "
                                     f"{file_size}-byte file")
        if hdr_size < HEADER_V1_PLUS:
            raw = raw[:HEADER_V1] + bytes(HEADER_V1_PLUS - HEADER_V1)
        header = {k: v for k, v in HeaderV1.parse(raw).items() if not k.startswith("_")}
        header["legacy_geometry"] = list(header["legacy_geometry"])
        header["lchs_geometry"] = list(header["lchs_geometry"])
        header_len = min(hdr_size, HEADER_V1_PLUS)
    else:
        raise FormatError(path, "pre-header", "version", 0x44, f"unsupported VDI version {pre.version:#010x}")
    itype = header["image_type"]
    if itype not in SUBTYPE_NAMES:
        raise bad("image_type", f"unknown image type {itype}")
    if header["image_flags"] & ~1 and pre.version != VERSION_0:
        raise bad("image_flags", f"unknown flags {header['image_flags']:#x}")
    size, bs, n = header["disk_size"], header["block_size"], header["blocks_in_image"]
    extra = header.get("block_extra", 0)
    if size == 0:
        raise bad("disk_size", "virtual size is 0")
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise bad("block_size", f"block size {bs} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}")
    if extra and (extra & (extra - 1) or extra > MAX_BLOCK):
        raise bad("block_extra", f"block prefix {extra} is not 0 or a power of two")
    if n == 0 or n > MAX_BLOCKS:
        raise bad("blocks_in_image", f"absurd block count {n}")
    if n * bs < size:
        raise bad("blocks_in_image", f"{n} blocks of {bs} bytes cannot hold {size} bytes")
    if n > -(-size // bs) + 1 and n * 4 > file_size:
        raise bad("blocks_in_image", f"absurd block count {n} for a {size}-byte disk")
    if header["blocks_allocated"] > n:
        raise bad("blocks_allocated", f"{header['blocks_allocated']} allocated blocks exceed the {n} blocks")
    ob, od = header["offset_blocks"], header["offset_data"]
    if pre.version != VERSION_0:
        if ob < PRE_HEADER_SIZE + HEADER_V1:
            raise bad("offset_blocks", f"block map at {ob:#x} overlaps the header")
        if od < ob + 4 * n:
            raise bad("offset_data", f"data at {od:#x} overlaps the block map ({n} entries at {ob:#x})")
    if ob + 4 * n > file_size:
        raise bad("offset_blocks", f"block map ({n} entries at {ob:#x}) lies past the end of the file")
    # and within what vdisk holds in memory for one table (the same budget create keeps to)
    limits.check_table(path, "header", "blocks_in_image", V1_FIELD_OFFSETS.get("blocks_in_image"), entries=n,
                       entry_bytes=4, table_offset=ob, file_size=file_size, format_max=MAX_BLOCKS)
    if header["uuid_create"] == NULL_UUID:
        raise bad("uuid_create", "image UUID is null")
    if header["uuid_modify"] == NULL_UUID and pre.version != VERSION_0:
        raise bad("uuid_modify", "modification UUID is null")
    if size % SECTOR:
        size -= size % SECTOR            # VirtualBox rounds down (quirk V2)
    entries = np.frombuffer(file.pread(4 * n, ob), dtype="<u4").astype(np.int64)
    alloc = entries < BLOCK_ZERO
    slots = entries[alloc]
    slot_size = extra + bs
    if len(slots):
        worst = int(np.argmax(slots))
        if slots[worst] >= n:
            idx = int(np.flatnonzero(alloc)[worst])
            raise FormatError(path, "block map", f"entry[{idx}]", ob + 4 * idx,
                              f"slot {int(slots[worst])} is beyond the {n} blocks of the image")
        end_needed = od + (int(slots[worst]) + 1) * slot_size
        if end_needed > file_size and itype != TYPE_FIXED:
            idx = int(np.flatnonzero(alloc)[worst])
            raise FormatError(path, "block map", f"entry[{idx}]", ob + 4 * idx,
                              f"slot {int(slots[worst])} lies past the end of the file (truncated?)")
        uniq, counts = np.unique(slots, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[np.argmax(counts > 1)])
            idxs = np.flatnonzero(entries == dup)[:2]
            raise FormatError(path, "block map", f"entry[{int(idxs[1])}]", ob + 4 * int(idxs[1]),
                              f"shares slot {dup} with entry[{int(idxs[0])}]")
        if int(slots.max()) >= header["blocks_allocated"]:
            raise FormatError(path, "header", "blocks_allocated", V1_FIELD_OFFSETS["blocks_allocated"],
                              f"{header['blocks_allocated']} allocated blocks, but the map uses slot {int(slots.max())}")
    warnings = []
    if len(slots) != header["blocks_allocated"]:
        warnings.append(f"{path}: header counts {header['blocks_allocated']} allocated blocks, the map references {len(slots)}")
    block_map = np.where(alloc, od + entries * slot_size + extra,
                         np.where(entries == BLOCK_ZERO, ZERO, ABSENT)).astype(np.int64)
    lchs = header.get("lchs_geometry") or [0, 0, 0, 0]
    geometry = tuple(lchs[:3]) if header_len >= HEADER_V1_PLUS and all(lchs[:3]) else None
    subtype = SUBTYPE_NAMES[itype]
    layer = VdiLayer(header, header_len, pre.version, file=file, format="vdi", subtype=subtype, size=size,
                     block_size=bs, block_map=block_map, uuid=uuidlib.UUID(bytes_le=header["uuid_create"]),
                     parent_id=header["uuid_linkage"] if subtype == "differencing" else None,
                     geometry=geometry, creator=pre.text.split(b"\0", 1)[0].decode("latin-1").strip(),
                     warnings=[])
    for w in warnings:
        layer.warn(w)
    if file.writable and pre.version == VERSION_0:
        raise UnsupportedError(f"{path}: legacy v0 VDI images can be opened read-only only")
    return layer


def data_offset(blocks: int) -> int:
    """Where the first block of a new VDI goes: after the block map at ALIGN, both aligned."""
    return _align(ALIGN + 4 * blocks, ALIGN)


def new_file_size(size: int, subtype: str, block_size: Optional[int], blocks_stored: int,
                  where: str = "the output") -> int:
    """File size of a base VDI made by :func:`create_vdi` once *blocks_stored* blocks are allocated
    (a fixed VDI has all of them from the start). Every stored block takes a whole slot."""
    bs = block_size or DEFAULT_BLOCK_SIZE
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise ValueError(f"block size {bs} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}")
    if subtype not in ("fixed", "dynamic"):
        raise ValueError(f"unknown VDI subtype {subtype!r}")
    n = -(-size // bs)
    if n > MAX_BLOCKS:
        raise UnsupportedError(f"{where}: {size} bytes need more blocks than a VDI can address")
    return data_offset(n) + (n if subtype == "fixed" else blocks_stored) * bs


def create_vdi(file: ImageFile, size: int, subtype: str, *, block_size: Optional[int] = None,
               parent: Optional[VdiLayer] = None) -> VdiLayer:
    if parent is not None:
        if parent.format != "vdi":
            raise UnsupportedError(f"{file.path}: a VDI differencing image needs a VDI parent, not {parent.format}")
        size, bs, subtype = parent.header["disk_size"], parent.block_size, "differencing"
    else:
        bs = block_size or DEFAULT_BLOCK_SIZE
        if size <= 0 or size % SECTOR:
            raise ValueError(f"VDI size {size} must be a positive multiple of 512 bytes")
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise ValueError(f"block size {bs} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}")
    n = limits.new_table_entries(file.path, size, bs, format_max=MAX_BLOCKS, format_name="VDI",
                                 size_limit=MAX_VIRTUAL_SIZE if parent is None else None,
                                 max_block_size=MAX_BLOCK)
    itype = {"dynamic": TYPE_NORMAL, "fixed": TYPE_FIXED, "differencing": TYPE_DIFF}.get(subtype)
    if itype is None:
        raise ValueError(f"unknown VDI subtype {subtype!r}")
    ob = ALIGN
    od = data_offset(n)
    header = dict(header_size=HEADER_V1_PLUS, image_type=itype, image_flags=0, comment=bytes(256),
                  offset_blocks=ob, offset_data=od, legacy_geometry=[0, 0, 0, SECTOR], unused1=0,
                  disk_size=size, block_size=bs, block_extra=0, blocks_in_image=n,
                  blocks_allocated=n if itype == TYPE_FIXED else 0,
                  uuid_create=new_uuid().bytes_le, uuid_modify=new_uuid().bytes_le,
                  uuid_linkage=parent.header["uuid_create"] if parent else NULL_UUID,
                  uuid_parent_modify=parent.header["uuid_modify"] if parent else NULL_UUID,
                  lchs_geometry=[0, 0, 0, SECTOR])
    pre = PreHeader.build(dict(text=TEXT.ljust(64, b"\0"), signature=SIGNATURE, version=VERSION_1_1))
    file.truncate(od + n * bs if itype == TYPE_FIXED else od)
    file.pwrite(pre + HeaderV1.build(header), 0)
    limits.write_new_table(file.pwrite, ob, n, fill=None if itype == TYPE_FIXED else BLOCK_FREE)
    file.sync()
    return open_vdi(file)
