"""The backup container: zstd frames, with vdisk's metadata in zstd *skippable* frames.

A backup file is a plain sequence of zstd frames (RFC 8878), so every zstd tool reads it:

    header frame    skippable, magic 0x184D2A56, payload "VDBKHDR1" + JSON identity + SHA-256
    data frames     ordinary zstd frames, one per index entry that has data, in virtual order
    index frame     skippable, payload "VDBKIDX1" + fixed 72-byte entries + SHA-256
    footer frame    skippable, exactly 64 bytes, payload "VDBKEND1" + where the index is + CRC-32

A full backup has an entry (data or zeros) for every chunk of the disk, and its zero entries are
stored as zstd frames of zeros too, so ``zstd -d`` of a full backup yields the raw disk byte for
byte. An incremental backup has entries only for the ranges that changed; its zero entries have
no frame. This module only encodes and decodes those structures (docs/backup.md).
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vdisk.errors import ChecksumError, FormatError

#: zstd skippable frames carry magic 0x184D2A50..0x184D2A5F; vdisk uses this one for all of its own.
SKIPPABLE_MAGIC = 0x184D2A56
ZSTD_MAGIC = 0xFD2FB528
FRAME_HEAD = struct.Struct("<II")              # magic, payload length

HEADER_TAG = b"VDBKHDR1"
INDEX_TAG = b"VDBKIDX1"
FOOTER_TAG = b"VDBKEND1"
#: How many leading bytes identify a backup (frame magic, length, header tag): what vdisk.open() reads.
MAGIC_PREFIX_LEN = 16
FORMAT_NAME = "vdisk-backup"
VERSION = 1

DIGEST = "sha256"
DIGEST_SIZE = 32
#: Header JSON larger than this is refused (it holds a few identities, never data).
MAX_HEADER = 1 << 20
MIN_CHUNK = 64 << 10
MAX_CHUNK = 16 << 20
DEFAULT_CHUNK = 4 << 20

KIND_DATA = 0
KIND_ZERO = 1

#: One index entry, little-endian: virtual offset, length, file offset and length of its zstd
#: frame (0, 0 for an incremental's zero entry), kind, 7 reserved bytes, SHA-256 of the data.
ENTRY_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8"), ("frame_offset", "<u8"),
                        ("frame_length", "<u8"), ("kind", "u1"), ("reserved", "u1", (7,)),
                        ("digest", "u1", (DIGEST_SIZE,))])
assert ENTRY_DTYPE.itemsize == 72

FOOTER = struct.Struct("<8sQQQ16sII")          # tag, index offset, index frame length, entries,
FOOTER_SIZE = FRAME_HEAD.size + FOOTER.size     # backup id, reserved, CRC-32 of the payload before it
assert FOOTER_SIZE == 64


def skippable(payload: bytes) -> bytes:
    """One zstd skippable frame around *payload*."""
    return FRAME_HEAD.pack(SKIPPABLE_MAGIC, len(payload)) + payload


def is_backup_head(head: bytes) -> bool:
    """True when *head* (the first bytes of a file) starts a vdisk backup's header frame."""
    if len(head) < FRAME_HEAD.size + len(HEADER_TAG):
        return False
    magic, _ = FRAME_HEAD.unpack_from(head)
    return magic == SKIPPABLE_MAGIC and head[8:16] == HEADER_TAG


@dataclass(frozen=True)
class Header:
    """The identity of one backup (the JSON document of the header frame)."""
    backup_id: str
    kind: str                      # "full" or "incremental"
    parent: Optional[str]          # backup_id this one builds on (incremental only)
    base_shadow: Optional[str]     # the shadow the parent was taken from (incremental only)
    shadow: dict                   # {"id", "created", "description"} of the source shadow
    image: dict                    # {"name", "format", "subtype", "uuid"} of the source image
    virtual_size: int
    chunk_size: int
    level: int
    created: str
    digest: str = DIGEST

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": VERSION, "backup_id": self.backup_id, "kind": self.kind,
                "parent": self.parent, "base_shadow": self.base_shadow, "shadow": self.shadow,
                "image": self.image, "virtual_size": self.virtual_size, "chunk_size": self.chunk_size,
                "level": self.level, "digest": self.digest, "created": self.created}


def encode_header(h: Header) -> bytes:
    doc = json.dumps(h.to_json(), sort_keys=True, separators=(",", ":")).encode()
    body = HEADER_TAG + struct.pack("<I", len(doc)) + doc
    return skippable(body + hashlib.sha256(body).digest())


def decode_header(path: str, payload: bytes) -> Header:
    """Parse and check a header frame's payload (the bytes after the 8-byte frame head)."""
    if len(payload) < 12 + DIGEST_SIZE or payload[:8] != HEADER_TAG:
        raise FormatError(path, "backup header", None, 0, "not a vdisk backup header")
    (n,) = struct.unpack_from("<I", payload, 8)
    if 12 + n + DIGEST_SIZE != len(payload):
        raise FormatError(path, "backup header", "length", 16, f"JSON length {n} does not fit the frame")
    body = payload[:12 + n]
    if hashlib.sha256(body).digest() != payload[12 + n:]:
        raise ChecksumError(path, "backup header", "sha256", 8, "checksum mismatch (the header is damaged)")
    try:
        doc = json.loads(body[12:])
        if doc.get("format") != FORMAT_NAME:
            raise ValueError("not a vdisk backup")
        if doc.get("version") != VERSION:
            raise FormatError(path, "backup header", "version", 20, f"unsupported version {doc.get('version')!r}")
        h = Header(backup_id=str(doc["backup_id"]), kind=doc["kind"], parent=doc["parent"],
                   base_shadow=doc["base_shadow"], shadow=dict(doc["shadow"]), image=dict(doc["image"]),
                   virtual_size=int(doc["virtual_size"]), chunk_size=int(doc["chunk_size"]),
                   level=int(doc["level"]), created=str(doc["created"]), digest=str(doc["digest"]))
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(path, "backup header", None, 16, f"invalid identity document: {exc}") from None
    if h.kind not in ("full", "incremental") or (h.kind == "incremental") != (h.parent is not None):
        raise FormatError(path, "backup header", "kind", 16, f"inconsistent kind {h.kind!r} / parent {h.parent!r}")
    if h.digest != DIGEST:
        raise FormatError(path, "backup header", "digest", 16, f"unsupported digest {h.digest!r}")
    if h.virtual_size < 0 or not MIN_CHUNK <= h.chunk_size <= MAX_CHUNK:
        raise FormatError(path, "backup header", "chunk_size", 16,
                          f"chunk size {h.chunk_size} / virtual size {h.virtual_size} out of range")
    return h


def encode_index(entries: np.ndarray) -> bytes:
    body = INDEX_TAG + struct.pack("<II", len(entries), ENTRY_DTYPE.itemsize) + entries.astype(ENTRY_DTYPE).tobytes()
    return skippable(body + hashlib.sha256(body).digest())


def decode_index(path: str, payload: bytes, offset: int, count: int) -> np.ndarray:
    """Parse and check the index frame's payload (at file offset *offset*) holding *count* entries."""
    if len(payload) < 16 + DIGEST_SIZE or payload[:8] != INDEX_TAG:
        raise FormatError(path, "backup index", None, offset, "not a vdisk backup index")
    n, size = struct.unpack_from("<II", payload, 8)
    if size != ENTRY_DTYPE.itemsize or n != count or 16 + n * size + DIGEST_SIZE != len(payload):
        raise FormatError(path, "backup index", "count", offset + 16, f"{n} entries of {size} bytes do not fit the frame")
    body = payload[:16 + n * size]
    if hashlib.sha256(body).digest() != payload[16 + n * size:]:
        raise ChecksumError(path, "backup index", "sha256", offset, "checksum mismatch (the index is damaged)")
    return np.frombuffer(body, ENTRY_DTYPE, count=n, offset=16).copy()


def encode_footer(index_offset: int, index_length: int, count: int, backup_id: bytes) -> bytes:
    body = FOOTER.pack(FOOTER_TAG, index_offset, index_length, count, backup_id, 0, 0)[:-4]
    return FRAME_HEAD.pack(SKIPPABLE_MAGIC, FOOTER.size) + body + struct.pack("<I", zlib.crc32(body))


@dataclass(frozen=True)
class Footer:
    index_offset: int
    index_length: int
    count: int
    backup_id: bytes


def decode_footer(path: str, raw: bytes, file_size: int) -> Footer:
    """Parse the last 64 bytes of a backup; a file without them was not finished (truncated)."""
    offset = file_size - FOOTER_SIZE
    if len(raw) != FOOTER_SIZE:
        raise FormatError(path, "backup footer", None, max(offset, 0), "missing: the file is truncated or was never finished")
    magic, n = FRAME_HEAD.unpack_from(raw)
    tag, ioff, ilen, count, bid, _res, crc = FOOTER.unpack_from(raw, FRAME_HEAD.size)
    if magic != SKIPPABLE_MAGIC or n != FOOTER.size or tag != FOOTER_TAG:
        raise FormatError(path, "backup footer", None, offset, "missing: the file is truncated or was never finished")
    if zlib.crc32(raw[FRAME_HEAD.size:-4]) != crc:
        raise ChecksumError(path, "backup footer", "crc32", offset, "checksum mismatch (the footer is damaged)")
    if ioff + ilen != offset or ilen < FRAME_HEAD.size + 16 + DIGEST_SIZE \
            or ilen != FRAME_HEAD.size + 16 + count * ENTRY_DTYPE.itemsize + DIGEST_SIZE:
        raise FormatError(path, "backup footer", "index_offset", offset,
                          f"index at {ioff} ({ilen} bytes, {count} entries) does not end where the footer starts")
    return Footer(ioff, ilen, count, bid)
