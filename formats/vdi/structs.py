"""VDI on-disk structures, declared once (spec digest VDI.md §2-§3). All integers little-endian."""
from __future__ import annotations

from construct import Array, Bytes, Int32ul, Int64ul, Struct

from ..fields import field_offsets

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
VERSION_0 = 0x00000002
HEADER_V1 = 0x180
HEADER_V1_PLUS = 0x190
BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE
TEXT = b"<<< vdisk Virtual Disk Image >>>\n"

TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
SUBTYPE_NAMES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "fixed", TYPE_UNDO: "differencing", TYPE_DIFF: "differencing"}

PreHeader = Struct(
    "text" / Bytes(64),
    "signature" / Int32ul,
    "version" / Int32ul,
)
PRE_HEADER_SIZE = PreHeader.sizeof()

# Header v1.1+ (starts at 0x48). The LCHS fields exist only when header_size >= 0x190.
HeaderV1 = Struct(
    "header_size" / Int32ul,
    "image_type" / Int32ul,
    "image_flags" / Int32ul,
    "comment" / Bytes(256),
    "offset_blocks" / Int32ul,
    "offset_data" / Int32ul,
    "legacy_geometry" / Array(4, Int32ul),     # cylinders, heads, sectors, sector size
    "unused1" / Int32ul,
    "disk_size" / Int64ul,
    "block_size" / Int32ul,
    "block_extra" / Int32ul,
    "blocks_in_image" / Int32ul,
    "blocks_allocated" / Int32ul,
    "uuid_create" / Bytes(16),
    "uuid_modify" / Bytes(16),
    "uuid_linkage" / Bytes(16),
    "uuid_parent_modify" / Bytes(16),
    "lchs_geometry" / Array(4, Int32ul),       # cylinders, heads, sectors, sector size
)

# Legacy header v0 (pre-header version 0x00000002), read-only support.
HeaderV0 = Struct(
    "image_type" / Int32ul,
    "image_flags" / Int32ul,
    "comment" / Bytes(256),
    "legacy_geometry" / Array(4, Int32ul),
    "disk_size" / Int64ul,
    "block_size" / Int32ul,
    "blocks_in_image" / Int32ul,
    "blocks_allocated" / Int32ul,
    "uuid_create" / Bytes(16),
    "uuid_modify" / Bytes(16),
    "uuid_linkage" / Bytes(16),
)
# Absolute file offsets of v1 fields, for error messages and in-place updates.
V1_FIELD_OFFSETS = {name: PRE_HEADER_SIZE + at for name, at in field_offsets(HeaderV1).items()}
HEADER_V0_END = PRE_HEADER_SIZE + HeaderV0.sizeof()
