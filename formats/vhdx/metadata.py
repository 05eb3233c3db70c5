"""Region table and metadata region of a VHDX: parsed, bounded and checked (VHDX.md §4, §8, A2.4-5)."""
from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from vdisk.errors import FormatError, UnsupportedError
from .crc32c import crc_ok
from .structs import (BAT_GUID, HAS_PARENT, HEADER_SECTION, IS_REQUIRED, IS_USER, ITEM_FILE_PARAMETERS,
                      ITEM_LOGICAL_SECTOR_SIZE, ITEM_NAMES, ITEM_PARENT_LOCATOR, ITEM_PHYSICAL_SECTOR_SIZE,
                      ITEM_VIRTUAL_DISK_ID, ITEM_VIRTUAL_DISK_SIZE, LEAVE_BLOCK_ALLOCATED, LOCATOR_TYPE_VHDX,
                      MAX_BLOCK, MAX_ITEM_LENGTH, MAX_METADATA_ENTRIES, MAX_REGION_ENTRIES, MAX_VIRTUAL_SIZE,
                      METADATA_GUID, METADATA_SIG, METADATA_TABLE_SIZE, MIN_BLOCK, REGION_OFFSETS, REGION_SIG,
                      REGION_TABLE_SIZE, SECTOR_SIZES, FileParameters, KeyValueEntry, MetadataEntry,
                      MetadataTableHeader, MiB, ParentLocatorHeader, RegionEntry, RegionTableHeader, guid_text)

Reader = Callable[[int, int], bytes]


@dataclass
class Region:
    guid: bytes
    offset: int
    length: int
    required: bool


@dataclass
class Metadata:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    virtual_disk_id: bytes
    logical_sector_size: int
    physical_sector_size: int
    locator_type: Optional[bytes] = None
    locator: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)       # (name or guid text, offset, length, flags)


def read_region_table(path: str, read: Reader, file_size: int, log_span: Optional[tuple[int, int]]
                      ) -> tuple[list[Region], int, list[str]]:
    """The regions of the first valid region table (copy 1, else copy 2), checked; and its index."""
    warnings, problems = [], []
    for copy, at in enumerate(REGION_OFFSETS):
        raw = read(REGION_TABLE_SIZE, at)
        if len(raw) < REGION_TABLE_SIZE or raw[:4] != REGION_SIG:
            problems.append(f"copy {copy + 1}: bad signature")
            continue
        if not crc_ok(raw):
            problems.append(f"copy {copy + 1}: checksum mismatch")
            continue
        break
    else:
        raise FormatError(path, "region table", None, REGION_OFFSETS[0], f"no valid copy ({'; '.join(problems)})")
    if copy:
        warnings.append(f"{path}: region table copy 1 is damaged ({problems[0]}); using copy 2")
    head = RegionTableHeader.parse(raw[:16])
    if head.entry_count > MAX_REGION_ENTRIES:
        raise FormatError(path, "region table", "entry_count", at + 8,
                          f"{head.entry_count} entries exceed the limit of {MAX_REGION_ENTRIES}")
    regions, seen = [], set()
    for i in range(head.entry_count):
        e = RegionEntry.parse(raw[16 + 32 * i:48 + 32 * i])
        where = at + 16 + 32 * i

        def bad(fieldname: str, problem: str) -> FormatError:
            return FormatError(path, "region table", f"entry[{i}].{fieldname}", where, problem)

        known = e.guid in (BAT_GUID, METADATA_GUID)
        if e.guid in seen:
            raise bad("guid", f"region {guid_text(e.guid)} is listed twice")
        seen.add(e.guid)
        if not known and e.required & 1:
            raise UnsupportedError(f"{path}: region table: required region {guid_text(e.guid)} is unknown to vdisk")
        if e.file_offset % MiB or e.file_offset < HEADER_SECTION:
            raise bad("file_offset", f"region at {e.file_offset:#x} is not 1 MiB aligned past the header section")
        if e.length % MiB or e.length == 0:
            raise bad("length", f"region length {e.length:#x} is not a non-zero multiple of 1 MiB")
        if e.file_offset + e.length > file_size:
            raise bad("file_offset", f"region ({e.length} bytes at {e.file_offset:#x}) lies past the end of the "
                                     f"{file_size}-byte file")
        regions.append(Region(e.guid, e.file_offset, e.length, bool(e.required & 1)))
    for name, g in (("BAT", BAT_GUID), ("metadata", METADATA_GUID)):
        if g not in seen:
            raise FormatError(path, "region table", None, at, f"no {name} region")
    spans = [(r.offset, r.offset + r.length, f"region {guid_text(r.guid)}") for r in regions]
    if log_span is not None:
        spans.append((log_span[0], log_span[1], "the log"))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(path, "region table", None, at, f"{n1} at {s1:#x} overlaps {n0} at {s0:#x}")
    return regions, copy, warnings


def read_metadata(path: str, read: Reader, region: Region) -> Metadata:
    """Parse the metadata table and its items; refuse what is missing, unknown-required or out of bounds."""
    base = region.offset
    table = read(METADATA_TABLE_SIZE, base)
    if len(table) < METADATA_TABLE_SIZE or table[:8] != METADATA_SIG:
        raise FormatError(path, "metadata table", "signature", base, "no 'metadata' signature")
    head = MetadataTableHeader.parse(table[:32])
    if head.entry_count > MAX_METADATA_ENTRIES:
        raise FormatError(path, "metadata table", "entry_count", base + 10,
                          f"{head.entry_count} entries exceed the limit of {MAX_METADATA_ENTRIES}")
    items: dict[bytes, bytes] = {}
    entries, spans = [], []
    for i in range(head.entry_count):
        where = base + 32 + 32 * i
        e = MetadataEntry.parse(table[32 + 32 * i:64 + 32 * i])

        def bad(fieldname: str, problem: str) -> FormatError:
            return FormatError(path, "metadata table", f"entry[{i}].{fieldname}", where, problem)

        name = ITEM_NAMES.get(e.item_id) if not e.flags & IS_USER else None
        if e.length > MAX_ITEM_LENGTH:
            raise bad("length", f"item of {e.length} bytes exceeds the limit of {MAX_ITEM_LENGTH}")
        if e.length and (e.offset < METADATA_TABLE_SIZE or e.offset + e.length > region.length):
            raise bad("offset", f"item ({e.length} bytes at {e.offset:#x}) lies outside the metadata region "
                                f"({region.length} bytes)")
        if name is None and e.flags & IS_REQUIRED and not e.flags & IS_USER:
            raise UnsupportedError(f"{path}: metadata item {guid_text(e.item_id)} is required but unknown to vdisk")
        if name is not None and e.item_id in items:
            raise bad("item_id", f"item {name} is listed twice")
        entries.append((name or guid_text(e.item_id), e.offset, e.length, e.flags))
        if e.length:
            spans.append((e.offset, e.offset + e.length, name or guid_text(e.item_id)))
        if name is not None:
            items[e.item_id] = read(e.length, base + e.offset) if e.length else b""
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(path, "metadata table", None, base, f"item {n1} overlaps item {n0}")

    def item(item_id: bytes, size: int) -> bytes:
        raw = items.get(item_id)
        if raw is None:
            raise FormatError(path, "metadata", ITEM_NAMES[item_id], base, "required item is missing")
        if len(raw) < size:
            raise FormatError(path, "metadata", ITEM_NAMES[item_id], base, f"item is {len(raw)} bytes, not {size}")
        return raw[:size]

    fp = FileParameters.parse(item(ITEM_FILE_PARAMETERS, 8))
    bs = fp.block_size
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise FormatError(path, "metadata", "file_parameters.block_size", base,
                          f"block size {bs} is not a power of two between 1 MiB and 256 MiB")
    size = int.from_bytes(item(ITEM_VIRTUAL_DISK_SIZE, 8), "little")
    lss = int.from_bytes(item(ITEM_LOGICAL_SECTOR_SIZE, 4), "little")
    pss = int.from_bytes(item(ITEM_PHYSICAL_SECTOR_SIZE, 4), "little")
    if lss not in SECTOR_SIZES:
        raise FormatError(path, "metadata", "logical_sector_size", base, f"logical sector size {lss} is not 512 or 4096")
    if pss not in SECTOR_SIZES:
        raise FormatError(path, "metadata", "physical_sector_size", base, f"physical sector size {pss} is not 512 or 4096")
    if size == 0 or size % lss:
        raise FormatError(path, "metadata", "virtual_disk_size", base,
                          f"virtual size {size} is not a positive multiple of the {lss}-byte logical sector")
    if size > MAX_VIRTUAL_SIZE:
        raise FormatError(path, "metadata", "virtual_disk_size", base,
                          f"virtual size {size} exceeds the format's limit of {MAX_VIRTUAL_SIZE} bytes")
    md = Metadata(block_size=bs, leave_block_allocated=bool(fp.flags & LEAVE_BLOCK_ALLOCATED),
                  has_parent=bool(fp.flags & HAS_PARENT), virtual_disk_size=size,
                  virtual_disk_id=item(ITEM_VIRTUAL_DISK_ID, 16), logical_sector_size=lss,
                  physical_sector_size=pss, entries=entries)
    if md.has_parent:
        item(ITEM_PARENT_LOCATOR, 20)
        md.locator_type, md.locator = parse_locator(path, items[ITEM_PARENT_LOCATOR], base)
    return md


def parse_locator(path: str, raw: bytes, where: int) -> tuple[bytes, dict]:
    """The key/value pairs of a parent locator item (UTF-16LE strings; VHDX.md §8)."""
    head = ParentLocatorHeader.parse(raw[:20])
    if head.locator_type != LOCATOR_TYPE_VHDX:
        raise UnsupportedError(f"{path}: parent locator type {guid_text(head.locator_type)} is not the VHDX one")
    n = head.key_value_count
    if 20 + 12 * n > len(raw):
        raise FormatError(path, "parent locator", "key_value_count", where,
                          f"{n} key/value entries do not fit in the {len(raw)}-byte item")
    out: dict[str, str] = {}
    for i in range(n):
        kv = KeyValueEntry.parse(raw[20 + 12 * i:32 + 12 * i])
        strings = []
        for off, length, what in ((kv.key_offset, kv.key_length, "key"), (kv.value_offset, kv.value_length, "value")):
            if off == 0 or length == 0 or length % 2 or off + length > len(raw):
                raise FormatError(path, "parent locator", f"entry[{i}].{what}", where,
                                  f"{what} ({length} bytes at {off:#x}) lies outside the {len(raw)}-byte item")
            try:
                strings.append(raw[off:off + length].decode("utf-16-le"))
            except UnicodeDecodeError:
                raise FormatError(path, "parent locator", f"entry[{i}].{what}", where,
                                  f"{what} is not UTF-16LE text") from None
        key, value = strings
        if key in out:
            raise FormatError(path, "parent locator", f"entry[{i}].key", where, f"key {key!r} appears twice")
        out[key] = value
    return head.locator_type, out


def linkage_bytes(text: Optional[str]) -> Optional[bytes]:
    """A parent_linkage value ('{xxxxxxxx-...}') as on-disk GUID bytes; None if absent or not a GUID."""
    if not text:
        return None
    try:
        return uuidlib.UUID(text.strip().strip("{}")).bytes_le
    except ValueError:
        return None
