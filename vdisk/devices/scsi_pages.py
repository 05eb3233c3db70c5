"""Data-in builders for the SCSI disk: INQUIRY standard data, VPD pages and mode pages.

Pure functions of the disk's identity and limits; :mod:`vdisk.devices.scsi` decides when to call
them. All multi-byte fields are big-endian (SPC-4 / SBC-3).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional

BLOCK = 512

# Version descriptors (SPC-4 annex): libiscsi runs its SBC checks only when SBC-3 is listed.
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0

SUPPORTED_VPD = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


@dataclass(frozen=True)
class Identity:
    """What the disk says about itself in INQUIRY."""
    vendor: str
    product: str
    revision: str
    serial: str
    unique_id: bytes  # 16 bytes, stable per image: its UUID, or a hash of the raw file's path


@dataclass(frozen=True)
class Limits:
    """Block limits advertised in VPD 0xB0 (units: logical blocks)."""
    granularity: int
    max_transfer: int
    optimal_transfer: int
    max_unmap_lba_count: int
    max_unmap_descriptors: int
    unmap_granularity: int
    max_write_same: int
    max_compare_and_write: int


def ascii_field(text: str, width: int) -> bytes:
    """Printable ASCII, left-aligned and space padded (SPC-4 4.3.1)."""
    raw = "".join(ch if 0x20 <= ord(ch) < 0x7F else "_" for ch in text)
    return raw.encode("ascii")[:width].ljust(width, b" ")


def unique_id_for(uuid_bytes: Optional[bytes], path: str) -> bytes:
    if uuid_bytes and any(uuid_bytes):
        return bytes(uuid_bytes[:16])
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()[:16]


def standard_inquiry(ident: Identity) -> bytes:
    """96 bytes of standard INQUIRY data for a fixed direct-access disk."""
    data = bytearray(96)
    data[0] = 0x00          # qualifier 0 (connected), device type 0 (direct access)
    data[1] = 0x00          # RMB=0: not removable
    data[2] = 0x06          # SPC-4
    data[3] = 0x12          # HISUP | response data format 2
    data[4] = 96 - 5
    data[7] = 0x02          # CMDQUE
    data[8:16] = ascii_field(ident.vendor, 8)
    data[16:32] = ascii_field(ident.product, 16)
    data[32:36] = ascii_field(ident.revision, 4)
    struct.pack_into(">HH", data, 58, VERSION_SPC4, VERSION_SBC3)
    return bytes(data)


def _vpd(page: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, page, len(payload)) + payload


def _designator(code_set: int, assoc: int, kind: int, value: bytes) -> bytes:
    return bytes((code_set, (assoc << 4) | kind, 0, len(value))) + value


def naa_designator(unique_id: bytes) -> bytes:
    """NAA IEEE Registered (5): 4-bit NAA, 24-bit company id, 36-bit vendor-specific id.

    The company id field is taken from the image's own identity hash, so two images never share
    an NAA by accident; it is a stable name, not a claim to a registered OUI.
    """
    digest = int.from_bytes(hashlib.sha256(unique_id).digest()[:8], "big")
    return ((0x5 << 60) | (digest & ((1 << 60) - 1))).to_bytes(8, "big")


def vpd_page(page: int, ident: Identity, limits: Limits, *, lbprz: bool = True) -> Optional[bytes]:
    """The VPD page ``page``, or None when it is not supported."""
    if page == 0x00:
        return _vpd(0x00, bytes(SUPPORTED_VPD))
    if page == 0x80:
        return _vpd(0x80, ascii_field(ident.serial, len(ident.serial)))
    if page == 0x83:
        t10 = ascii_field(ident.vendor, 8) + ident.unique_id.hex().encode("ascii")
        payload = (_designator(0x02, 0, 0x1, t10)
                   + _designator(0x01, 0, 0x3, naa_designator(ident.unique_id)))
        return _vpd(0x83, payload)
    if page == 0xB0:
        payload = bytearray(0x3C)
        payload[0] = 0x01                                    # WSNZ: WRITE SAME needs a length
        payload[1] = limits.max_compare_and_write
        struct.pack_into(">H", payload, 2, limits.granularity)   # optimal transfer granularity
        struct.pack_into(">I", payload, 4, limits.max_transfer)
        struct.pack_into(">I", payload, 8, limits.optimal_transfer)
        struct.pack_into(">I", payload, 16, limits.max_unmap_lba_count)
        struct.pack_into(">I", payload, 20, limits.max_unmap_descriptors)
        struct.pack_into(">I", payload, 24, limits.unmap_granularity)
        struct.pack_into(">I", payload, 28, 0x80000000)      # UGAVALID, alignment 0
        struct.pack_into(">Q", payload, 32, limits.max_write_same)
        return _vpd(0xB0, bytes(payload))
    if page == 0xB1:
        payload = bytearray(0x3C)
        struct.pack_into(">H", payload, 0, 0x0001)           # medium rotation rate: non-rotating
        return _vpd(0xB1, bytes(payload))                    # (form factor: not reported)
    if page == 0xB2:
        b1 = 0x80 | 0x40 | 0x20 | (0x04 if lbprz else 0)   # LBPU, LBPWS, LBPWS10, LBPRZ
        return _vpd(0xB2, bytes((0x00, b1, 0x02, 0x00)))  # provisioning type 2: thin
    return None


# -- mode pages ---------------------------------------------------------------------------------
# Each page: (current, changeable mask, default). Only WCE (caching page byte 2 bit 2) changes.
MODE_PAGE_ORDER = (0x01, 0x04, 0x08, 0x0A)


def mode_page(code: int, *, wce: bool, geometry: tuple[int, int, int]) -> tuple[bytes, bytes, bytes]:
    """(current, changeable, default) images of mode page ``code`` (header bytes included)."""
    if code == 0x01:    # read-write error recovery: nothing to configure
        page = bytes((0x01, 0x0A)) + bytes(10)
        return page, bytes((0x01, 0x0A)) + bytes(10), page
    if code == 0x04:    # rigid disk drive geometry
        cyl, heads, _spt = geometry
        cur = bytearray(0x18)
        cur[0], cur[1] = 0x04, 0x16
        cur[2:5] = min(cyl, 0xFFFFFF).to_bytes(3, "big")
        cur[5] = min(heads, 0xFF)
        struct.pack_into(">H", cur, 20, 1)                  # medium rotation rate: non-rotating
        return bytes(cur), bytes((0x04, 0x16)) + bytes(0x16), bytes(cur)
    if code == 0x08:    # caching
        def caching(wce_bit: bool) -> bytes:
            p = bytearray(0x14)
            p[0], p[1] = 0x08, 0x12
            p[2] = 0x04 if wce_bit else 0x00
            return bytes(p)
        mask = bytearray(0x14)
        mask[0], mask[1], mask[2] = 0x08, 0x12, 0x04
        return caching(wce), bytes(mask), caching(True)
    if code == 0x0A:    # control: D_SENSE 0, QERR 0, SWP 0, TAS 0
        cur = bytearray(0x0C)
        cur[0], cur[1] = 0x0A, 0x0A
        struct.pack_into(">H", cur, 8, 0xFFFF)               # busy timeout: unlimited
        return bytes(cur), bytes((0x0A, 0x0A)) + bytes(10), bytes(cur)
    raise KeyError(code)


def chs_geometry(blocks: int, hint: Optional[tuple[int, int, int]]) -> tuple[int, int, int]:
    """Geometry for mode page 4: the image's own CHS when it has one, else 16 heads x 63 sectors."""
    if hint:
        return hint
    return (max(1, min(blocks // (16 * 63), 0xFFFFFF)), 16, 63)


# -- REPORT SUPPORTED OPERATION CODES -------------------------------------------------------------
# (opcode, service action or None) -> CDB usage data: byte 0 is the opcode, the other bytes mark
# the bits the device looks at. The CDB length is the length of the usage data.
_USAGE_HEX = {
    (0x00, None): "00 00 00 00 00 00",                      # TEST UNIT READY
    (0x03, None): "03 01 00 00 ff 00",                      # REQUEST SENSE
    (0x08, None): "08 1f ff ff ff 00",                      # READ(6)
    (0x0A, None): "0a 1f ff ff ff 00",                      # WRITE(6)
    (0x12, None): "12 01 ff ff ff 00",                      # INQUIRY
    (0x15, None): "15 11 00 00 ff 00",                      # MODE SELECT(6)
    (0x1A, None): "1a 08 ff ff ff 00",                      # MODE SENSE(6)
    (0x1B, None): "1b 00 00 00 f7 00",                      # START STOP UNIT
    (0x25, None): "25 00 ff ff ff ff 00 00 01 00",          # READ CAPACITY(10)
    (0x28, None): "28 f8 ff ff ff ff 00 ff ff 00",          # READ(10)
    (0x2A, None): "2a f8 ff ff ff ff 00 ff ff 00",          # WRITE(10)
    (0x2E, None): "2e f2 ff ff ff ff 00 ff ff 00",          # WRITE AND VERIFY(10)
    (0x2F, None): "2f f6 ff ff ff ff 00 ff ff 00",          # VERIFY(10)
    (0x34, None): "34 02 ff ff ff ff 00 ff ff 00",          # PRE-FETCH(10)
    (0x35, None): "35 02 ff ff ff ff 00 ff ff 00",          # SYNCHRONIZE CACHE(10)
    (0x41, None): "41 f8 ff ff ff ff 00 ff ff 00",          # WRITE SAME(10)
    (0x42, None): "42 01 00 00 00 00 00 ff ff 00",          # UNMAP
    (0x55, None): "55 11 00 00 00 00 00 ff ff 00",          # MODE SELECT(10)
    (0x5A, None): "5a 18 ff ff 00 00 00 ff ff 00",          # MODE SENSE(10)
    (0x88, None): "88 f8" + " ff" * 12 + " 00 00",          # READ(16)
    (0x89, None): "89 f8" + " ff" * 8 + " 00 00 00 ff 00 00",  # COMPARE AND WRITE
    (0x8A, None): "8a f8" + " ff" * 12 + " 00 00",          # WRITE(16)
    (0x8E, None): "8e f2" + " ff" * 12 + " 00 00",          # WRITE AND VERIFY(16)
    (0x8F, None): "8f f6" + " ff" * 12 + " 00 00",          # VERIFY(16)
    (0x90, None): "90 02" + " ff" * 12 + " 00 00",          # PRE-FETCH(16)
    (0x91, None): "91 02" + " ff" * 12 + " 00 00",          # SYNCHRONIZE CACHE(16)
    (0x93, None): "93 f9" + " ff" * 12 + " 00 00",          # WRITE SAME(16)
    (0x9E, 0x10): "9e 10" + " ff" * 12 + " 00 00",          # READ CAPACITY(16)
    (0x9E, 0x12): "9e 12" + " ff" * 12 + " 00 00",          # GET LBA STATUS
    (0xA0, None): "a0 00 ff 00 00 00 ff ff ff ff 00 00",    # REPORT LUNS
    (0xA3, 0x0C): "a3 0c 87 ff ff ff ff ff ff ff 00 00",    # REPORT SUPPORTED OPERATION CODES
    (0xA8, None): "a8 f8 ff ff ff ff ff ff ff ff 00 00",    # READ(12)
    (0xAA, None): "aa f8 ff ff ff ff ff ff ff ff 00 00",    # WRITE(12)
    (0xAE, None): "ae f2 ff ff ff ff ff ff ff ff 00 00",    # WRITE AND VERIFY(12)
    (0xAF, None): "af f6 ff ff ff ff ff ff ff ff 00 00",    # VERIFY(12)
}
COMMAND_USAGE: dict[tuple[int, Optional[int]], bytes] = {
    key: bytes.fromhex(value) for key, value in sorted(_USAGE_HEX.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
}
OPCODES_WITH_SERVICE_ACTIONS = frozenset(op for op, sa in COMMAND_USAGE if sa is not None)

_TIMEOUTS = struct.pack(">HxBII", 0x0A, 0, 0, 0)    # timeouts descriptor: nominal/recommended unknown


def all_commands(rctd: bool) -> bytes:
    """REPORTING OPTIONS 000b: every supported command, one 8-byte descriptor each."""
    body = b""
    for (op, sa), usage in COMMAND_USAGE.items():
        flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
        body += struct.pack(">BxHxBH", op, sa or 0, flags, len(usage))
        if rctd:
            body += _TIMEOUTS
    return struct.pack(">I", len(body)) + body


def one_command(op: int, sa: Optional[int], rctd: bool) -> bytes:
    """REPORTING OPTIONS 001b-011b: support (3 = as in the standard, 1 = not) and CDB usage."""
    usage = COMMAND_USAGE.get((op, sa))
    if usage is None:
        return bytes((0, 0x01, 0, 0))
    return bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(usage)) + usage + (
        _TIMEOUTS if rctd else b"")
