"""VHDX on-disk structures, each declared once (spec digest VHDX.md §2-§8). All integers
little-endian; GUIDs are 16 raw bytes in Windows layout (``uuid.UUID(bytes_le=...)``)."""
from __future__ import annotations

import uuid as uuidlib

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

KiB, MiB = 1 << 10, 1 << 20

SIGNATURE = b"vhdxfile"
HEADER_SIG = b"head"
REGION_SIG = b"regi"
METADATA_SIG = b"metadata"
LOG_SIG = b"loge"
DESC_SIG = b"desc"
ZERO_SIG = b"zero"
DATA_SIG = b"data"

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
HEADER_SECTION = 1 * MiB
LOG_SECTOR = 4 * KiB
SB_BLOCK_SIZE = 1 * MiB
CHUNK_SECTORS = 1 << 23

MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_ITEM_LENGTH = 1 * MiB
MIN_BLOCK, MAX_BLOCK = 1 * MiB, 256 * MiB
MAX_VIRTUAL_SIZE = 64 * (1 << 40)          # 64 TiB (qemu's limit; the spec says 64 TB)
SECTOR_SIZES = (512, 4096)


def guid(text: str) -> bytes:
    """The on-disk bytes of a GUID written as text."""
    return uuidlib.UUID(text).bytes_le


def guid_text(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes_le=bytes(raw)))


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")

ITEM_FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
ITEM_VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
ITEM_VIRTUAL_DISK_ID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
ITEM_LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
ITEM_PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
ITEM_PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ITEM_NAMES = {ITEM_FILE_PARAMETERS: "file_parameters", ITEM_VIRTUAL_DISK_SIZE: "virtual_disk_size",
              ITEM_VIRTUAL_DISK_ID: "virtual_disk_id", ITEM_LOGICAL_SECTOR_SIZE: "logical_sector_size",
              ITEM_PHYSICAL_SECTOR_SIZE: "physical_sector_size", ITEM_PARENT_LOCATOR: "parent_locator"}
LOCATOR_TYPE_VHDX = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# metadata entry flags
IS_USER, IS_VIRTUAL_DISK, IS_REQUIRED = 1, 2, 4
# file parameters flags
LEAVE_BLOCK_ALLOCATED, HAS_PARENT = 1, 2

# BAT states
PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED = 0, 1, 2, 3
PAYLOAD_UNMAPPED_V095 = 5
PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 6, 7
SB_NOT_PRESENT, SB_PRESENT = 0, 6
STATE_NAMES = {0: "not_present", 1: "undefined", 2: "zero", 3: "unmapped", 4: "reserved(4)",
               5: "unmapped_v095", 6: "fully_present", 7: "partially_present"}
OFFSET_MASK = 0xFFFFFFFFFFF00000

FileTypeIdentifier = Struct(
    "signature" / Bytes(8),
    "creator" / Bytes(512),
)

Header = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),
    "log_version" / Int16ul,
    "version" / Int16ul,
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
    "reserved" / Bytes(4016),
)

RegionTableHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)

RegionEntry = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,
)

MetadataTableHeader = Struct(
    "signature" / Bytes(8),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
)

MetadataEntry = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "reserved" / Int32ul,
)

FileParameters = Struct(
    "block_size" / Int32ul,
    "flags" / Int32ul,
)

ParentLocatorHeader = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)

KeyValueEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)

LogEntryHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Bytes(16),
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)

# Both descriptor kinds share one 32-byte shape: for "zero" the second field is reserved and the
# third is ZeroLength; for "desc" they are TrailingBytes and LeadingBytes.
Descriptor = Struct(
    "signature" / Bytes(4),
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)

DataSector = Struct(
    "signature" / Bytes(4),
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)

HEADER_FIELD_OFFSETS = {"signature": 0, "checksum": 4, "sequence_number": 8, "file_write_guid": 0x10,
                        "data_write_guid": 0x20, "log_guid": 0x30, "log_version": 0x40, "version": 0x42,
                        "log_length": 0x44, "log_offset": 0x48}
LOG_HEADER_SIZE = 64
DESCRIPTOR_SIZE = 32
ENTRIES_PER_DESCRIPTOR_SECTOR = LOG_SECTOR // DESCRIPTOR_SIZE


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors that the entry header and *count* descriptors occupy (VHDX.md §5)."""
    return -(-(count + 2) // ENTRIES_PER_DESCRIPTOR_SECTOR)


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector-bitmap block (VHDX.md §6)."""
    return (CHUNK_SECTORS * logical_sector_size) // block_size
