"""VHD on-disk structures, declared once (spec digest VHD.md §2-§4). All integers big-endian."""
from __future__ import annotations

from construct import Array, Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from ..fields import field_offsets

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
HEADER_SIZE = 1024
VHD_EPOCH = 946684800            # 2000-01-01T00:00:00Z as a Unix time
BAT_UNUSED = 0xFFFFFFFF
FEATURES_RESERVED = 0x00000002
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
SUBTYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

# Parent locator platform codes
PLAT_NONE = 0
PLAT_WI2R = 0x57693272   # relative, single-byte (deprecated)
PLAT_WI2K = 0x5769326B   # absolute, single-byte (deprecated)
PLAT_W2RU = 0x57327275   # relative, UTF-16LE
PLAT_W2KU = 0x57326B75   # absolute, UTF-16LE
PLAT_MAC = 0x4D616320    # Mac alias (opaque)
PLAT_MACX = 0x4D616358   # file URL, UTF-8

Footer = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "format_version" / Int32ub,
    "data_offset" / Int64ub,
    "timestamp" / Int32ub,
    "creator_app" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_host_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors_per_track" / Int8ub,
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)

ParentLocator = Struct(
    "platform_code" / Int32ub,
    "platform_data_space" / Int32ub,
    "platform_data_length" / Int32ub,
    "reserved" / Int32ub,
    "platform_data_offset" / Int64ub,
)

DynamicHeader = Struct(
    "cookie" / Bytes(8),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_unicode_name" / Bytes(512),
    "parent_locators" / Array(8, ParentLocator),
    "reserved2" / Bytes(256),
)

# Offsets of fields, for error messages and in-place updates.
FOOTER_FIELD_OFFSETS = field_offsets(Footer)
HEADER_FIELD_OFFSETS = field_offsets(DynamicHeader)
LOCATOR_OFFSET = HEADER_FIELD_OFFSETS["parent_locators"]
LOCATOR_SIZE = ParentLocator.sizeof()
FOOTER_CHECKSUM_OFFSET = FOOTER_FIELD_OFFSETS["checksum"]
HEADER_CHECKSUM_OFFSET = HEADER_FIELD_OFFSETS["checksum"]


def vhd_checksum(raw: bytes, checksum_offset: int) -> int:
    """Ones' complement of the byte sum, with the checksum field counted as zero (spec A1)."""
    total = sum(raw) - sum(raw[checksum_offset:checksum_offset + 4])
    return (~total) & 0xFFFFFFFF


def with_checksum(raw: bytes, checksum_offset: int) -> bytes:
    raw = bytearray(raw)
    raw[checksum_offset:checksum_offset + 4] = b"\0\0\0\0"
    raw[checksum_offset:checksum_offset + 4] = vhd_checksum(bytes(raw), checksum_offset).to_bytes(4, "big")
    return bytes(raw)
