"""Creating VHDX files laid out as Hyper-V does (VHDX.md A6): header section, log at 1 MiB,
metadata at 2 MiB, BAT at 3 MiB, payload after."""
from __future__ import annotations

import os
from typing import Optional
import uuid as uuidlib

import numpy as np

from vdisk import __version__ as VDISK_VERSION
from vdisk import limits
from vdisk.errors import UnsupportedError
from vdisk.io import ImageFile
from ..base import Layer, new_uuid
from .crc32c import with_crc
from .metadata import Region
from .structs import (BAT_GUID, HAS_PARENT, HEADER_OFFSETS, HEADER_SIG, IS_REQUIRED, IS_VIRTUAL_DISK,
                      ITEM_FILE_PARAMETERS, ITEM_LOGICAL_SECTOR_SIZE, ITEM_PARENT_LOCATOR, ITEM_PHYSICAL_SECTOR_SIZE,
                      ITEM_VIRTUAL_DISK_ID, ITEM_VIRTUAL_DISK_SIZE, LEAVE_BLOCK_ALLOCATED, LOCATOR_TYPE_VHDX,
                      MAX_BLOCK, MAX_VIRTUAL_SIZE, METADATA_GUID, METADATA_SIG, METADATA_TABLE_SIZE, MIN_BLOCK,
                      PAYLOAD_FULLY_PRESENT, REGION_OFFSETS, REGION_SIG, REGION_TABLE_SIZE, SECTOR_SIZES,
                      SIGNATURE, FileParameters, Header, KeyValueEntry, MetadataEntry, MetadataTableHeader, MiB,
                      ParentLocatorHeader, RegionEntry, RegionTableHeader, chunk_ratio)

DEFAULT_BLOCK_SIZE = 32 * MiB
DEFAULT_PHYSICAL_SECTOR = 4096
LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


def bat_layout(size: int, block_size: int, lss: int, where: str) -> tuple[int, int, int]:
    """(payload blocks, BAT entries, BAT region bytes) of a new image; the region holds the fixed
    sector-bitmap slot of every chunk (valid under both spec versions, VHDX.md §6)."""
    npb = limits.new_table_entries(where, size, block_size, format_max=1 << 32, format_name="VHDX",
                                   size_limit=MAX_VIRTUAL_SIZE, max_block_size=MAX_BLOCK)
    cr = chunk_ratio(block_size, lss)
    nsb = -(-npb // cr)
    entries = nsb * (cr + 1)
    return npb, entries, _round_up(entries * 8, MiB)


def new_file_size(size: int, subtype: str, block_size: Optional[int], blocks_stored: int,
                  where: str = "the output", logical_sector_size: int = 512) -> int:
    """File size of a base VHDX made by :func:`create_vhdx` once *blocks_stored* blocks are allocated."""
    bs = block_size or DEFAULT_BLOCK_SIZE
    npb, _entries, bat_len = bat_layout(size, bs, logical_sector_size, where)
    data = BAT_OFFSET + bat_len
    return data + (npb if subtype == "fixed" else blocks_stored) * bs


def region_table(regions: list[Region]) -> bytes:
    """A whole region table (64 KiB, checksummed) listing *regions*, as both copies hold it."""
    table = bytearray(REGION_TABLE_SIZE)
    table[:16] = RegionTableHeader.build(dict(signature=REGION_SIG, checksum=0, entry_count=len(regions),
                                              reserved=0))
    for i, r in enumerate(regions):
        table[16 + 32 * i:48 + 32 * i] = RegionEntry.build(dict(guid=r.guid, file_offset=r.offset, length=r.length,
                                                                required=int(r.required)))
    return with_crc(bytes(table))


def _metadata_region(items: list[tuple[bytes, int, bytes]]) -> bytes:
    table = bytearray(METADATA_TABLE_SIZE)
    table[:32] = MetadataTableHeader.build(dict(signature=METADATA_SIG, reserved=0, entry_count=len(items),
                                                reserved2=bytes(20)))
    body = bytearray()
    for i, (item_id, flags, data) in enumerate(items):
        table[32 + 32 * i:64 + 32 * i] = MetadataEntry.build(dict(
            item_id=item_id, offset=METADATA_TABLE_SIZE + len(body), length=len(data), flags=flags, reserved=0))
        body += data
    return bytes(table + body)


def _locator(pairs: list[tuple[str, str]]) -> bytes:
    head = ParentLocatorHeader.build(dict(locator_type=LOCATOR_TYPE_VHDX, reserved=0, key_value_count=len(pairs)))
    table, strings = bytearray(), bytearray()
    base = 20 + 12 * len(pairs)
    for key, value in pairs:
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        ko = base + len(strings)
        strings += k
        vo = base + len(strings)
        strings += v
        table += KeyValueEntry.build(dict(key_offset=ko, value_offset=vo, key_length=len(k), value_length=len(v)))
    return head + bytes(table) + bytes(strings)


def _parent_pairs(child_path: str, parent: Layer, parent_path: str) -> list[tuple[str, str]]:
    linkage = "{" + str(uuidlib.UUID(bytes_le=parent.headers.current["data_write_guid"])) + "}"
    ppath = os.path.abspath(parent_path)
    rel = os.path.relpath(ppath, os.path.dirname(os.path.abspath(child_path))).replace("/", "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    return [("parent_linkage", linkage), ("relative_path", rel),
            ("absolute_win32_path", "\\\\?\\" + ppath.replace("/", "\\"))]


def create_vhdx(file: ImageFile, size: int, subtype: str = "dynamic", *, block_size: Optional[int] = None,
                logical_sector_size: int = 512, physical_sector_size: Optional[int] = None,
                parent: Optional[Layer] = None, parent_path: Optional[str] = None) -> Layer:
    """Write a new VHDX into the empty *file* and open it read-write."""
    from .open import open_vhdx
    vdid = new_uuid().bytes_le
    if parent is not None:
        if parent.format != "vhdx":
            raise UnsupportedError(f"{file.path}: a VHDX differencing image needs a VHDX parent, not {parent.format}")
        md = parent.md
        size, bs, lss, pss = md.virtual_disk_size, md.block_size, md.logical_sector_size, md.physical_sector_size
        vdid = md.virtual_disk_id          # Windows keeps one VirtualDiskId across a chain
        subtype = "differencing"
    else:
        bs = block_size or DEFAULT_BLOCK_SIZE
        lss = logical_sector_size
        pss = physical_sector_size or DEFAULT_PHYSICAL_SECTOR
        if subtype not in ("dynamic", "fixed"):
            raise ValueError(f"unknown VHDX subtype {subtype!r}")
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise ValueError(f"block size {bs} must be a power of two between 1 MiB and 256 MiB")
    if lss not in SECTOR_SIZES or pss not in SECTOR_SIZES:
        raise ValueError(f"sector sizes must be 512 or 4096, not {lss}/{pss}")
    if size <= 0 or size % lss:
        raise ValueError(f"VHDX size {size} must be a positive multiple of the {lss}-byte logical sector")
    npb, entries, bat_len = bat_layout(size, bs, lss, file.path)
    data_start = BAT_OFFSET + bat_len
    flags = LEAVE_BLOCK_ALLOCATED if subtype == "fixed" else 0
    if subtype == "differencing":
        flags = HAS_PARENT
    items = [(ITEM_FILE_PARAMETERS, IS_REQUIRED, FileParameters.build(dict(block_size=bs, flags=flags))),
             (ITEM_VIRTUAL_DISK_SIZE, IS_REQUIRED | IS_VIRTUAL_DISK, size.to_bytes(8, "little")),
             (ITEM_LOGICAL_SECTOR_SIZE, IS_REQUIRED | IS_VIRTUAL_DISK, lss.to_bytes(4, "little")),
             (ITEM_PHYSICAL_SECTOR_SIZE, IS_REQUIRED | IS_VIRTUAL_DISK, pss.to_bytes(4, "little")),
             (ITEM_VIRTUAL_DISK_ID, IS_REQUIRED | IS_VIRTUAL_DISK, vdid)]
    if parent is not None:
        items.append((ITEM_PARENT_LOCATOR, IS_REQUIRED, _locator(_parent_pairs(file.path, parent, parent_path))))
    creator = f"vdisk {VDISK_VERSION}".encode("utf-16-le")
    fti = SIGNATURE + creator + bytes(512 - len(creator))
    region = region_table([Region(BAT_GUID, BAT_OFFSET, bat_len, True),
                           Region(METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, True)])
    fwg, dwg = new_uuid().bytes_le, new_uuid().bytes_le
    end = data_start + (npb * bs if subtype == "fixed" else 0)
    file.truncate(end)
    file.pwrite(fti, 0)
    for at in REGION_OFFSETS:
        file.pwrite(region, at)
    file.pwrite(_metadata_region(items), METADATA_OFFSET)
    if subtype == "fixed":
        cr = chunk_ratio(bs, lss)
        step = (limits.TABLE_CHUNK // (cr + 1) or 1) * (cr + 1)       # whole chunks per write
        for first in range(0, entries, step):
            idx = np.arange(first, min(entries, first + step), dtype=np.uint64)
            block = idx - idx // np.uint64(cr + 1)
            chunk = np.where((idx % np.uint64(cr + 1) == np.uint64(cr)) | (block >= np.uint64(npb)), np.uint64(0),
                             (np.uint64(data_start) + block * np.uint64(bs)) | np.uint64(PAYLOAD_FULLY_PRESENT))
            file.pwrite(chunk.astype("<u8").tobytes(), BAT_OFFSET + 8 * first)
    # The headers last: until they are there the file is no VHDX at all.
    for seq, at in enumerate(HEADER_OFFSETS):
        h = dict(signature=HEADER_SIG, checksum=0, sequence_number=seq, file_write_guid=fwg, data_write_guid=dwg,
                 log_guid=bytes(16), log_version=0, version=1, log_length=LOG_LENGTH, log_offset=LOG_OFFSET,
                 reserved=bytes(4016))
        file.pwrite(with_crc(Header.build(h)), at)
    file.sync()
    return open_vhdx(file)
