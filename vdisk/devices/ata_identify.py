"""IDENTIFY DEVICE data for the ATA disk model: geometry, strings, the 256-word block.

Everything here is a pure function of its arguments, so the block can be built (and tested) without
a device. Layout per ATA8-ACS / ``BLOCK-BACKENDS.md`` §2.3; words are little-endian, ATA strings
put the first character of each pair in the *high* byte of the word.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

LBA28_LIMIT = 0x0FFFFFFF           # words 60-61 saturate here; LBA28 commands see at most this many
MAX_MULTIPLE = 16                  # word 47: READ/WRITE MULTIPLE block size limit
VHD_SIZE_MARKER = (65535, 16, 255)  # VHD footer CHS meaning "the size is current_size, no geometry"
DSM_MAX_BLOCKS = 8                 # word 105: 512-byte blocks of TRIM ranges per DSM command

# transfer-mode kinds for SET FEATURES 0x03 and words 62/63/88
PIO, SWDMA, MWDMA, UDMA = "pio", "swdma", "mwdma", "udma"
MODE_LIMITS = {PIO: 4, SWDMA: 2, MWDMA: 2, UDMA: 5}


@dataclass(frozen=True)
class Geometry:
    """Logical CHS geometry as reported in IDENTIFY words 1/3/6 (default) or 54-56 (current)."""
    cylinders: int
    heads: int
    sectors: int       # sectors per track

    @property
    def capacity(self) -> int:
        return self.cylinders * self.heads * self.sectors

    def to_lba(self, cylinder: int, head: int, sector: int) -> Optional[int]:
        """LBA of a CHS address, or None when the address is outside this geometry."""
        if not (0 <= cylinder < self.cylinders and 0 <= head < self.heads and 1 <= sector <= self.sectors):
            return None
        return (cylinder * self.heads + head) * self.sectors + sector - 1

    def to_chs(self, lba: int) -> Tuple[int, int, int]:
        per_cyl = self.heads * self.sectors
        cylinder, rest = divmod(lba, per_cyl)
        head, sector = divmod(rest, self.sectors)
        return cylinder, head, sector + 1


def default_geometry(total_sectors: int) -> Geometry:
    """The usual ATA translation: 16 heads, 63 sectors, cylinders = total/1008 capped at 16383.

    Disks smaller than one 16x63 cylinder get a smaller geometry that still fits inside them, so
    every CHS address the geometry allows is a real sector.
    """
    if total_sectors >= 16 * 63:
        return Geometry(min(16383, total_sectors // (16 * 63)), 16, 63)
    if total_sectors <= 0:
        return Geometry(0, 16, 63)
    sectors = min(63, total_sectors)
    heads = max(1, min(16, total_sectors // sectors))
    return Geometry(max(1, total_sectors // (heads * sectors)), heads, sectors)


def _geometry_tuple(value) -> Optional[Tuple[int, int, int]]:
    """Accept (c, h, s) tuples, dicts or objects with cylinders/heads/sectors attributes."""
    if value is None:
        return None
    if isinstance(value, Geometry):
        return value.cylinders, value.heads, value.sectors
    if isinstance(value, dict):
        get = value.get
    else:
        def get(name, default=None):
            return getattr(value, name, default)
    c = get("cylinders", None)
    h = get("heads", None)
    s = None
    for name in ("sectors", "sectors_per_track", "spt"):
        s = get(name, None)
        if s is not None:
            break
    if c is not None and h is not None and s is not None:
        return int(c), int(h), int(s)
    try:
        c, h, s = value
        return int(c), int(h), int(s)
    except (TypeError, ValueError):
        return None


def image_geometry(disk, total_sectors: int) -> Geometry:
    """Geometry from ``disk.geometry`` (VHD footer CHS, VDI LCHS) when it is usable for ATA.

    Usable: 1-16 heads (the Device register has 4 head bits), 1-255 sectors per track, 1-65535
    cylinders, and no more sectors than the disk has; the VHD 65535/16/255 "use current_size"
    marker is never a geometry. Otherwise the default derivation is used.
    """
    try:
        chs = _geometry_tuple(getattr(disk, "geometry", None))
    except Exception:       # a broken property must not stop the device from coming up
        chs = None
    if chs is not None:
        c, h, s = chs
        if (c, h, s) != VHD_SIZE_MARKER and 1 <= h <= 16 and 1 <= s <= 255 and 1 <= c <= 65535 \
                and c * h * s <= total_sectors:
            return Geometry(c, h, s)
    return default_geometry(total_sectors)


# -- strings -------------------------------------------------------------------------------------

def ata_string(text: str, length: int) -> bytes:
    """Encode an ATA string field of ``length`` bytes: printable ASCII, space padded, byte-swapped
    per word (the first character lands in the high byte of the first word)."""
    clean = "".join(ch if " " <= ch <= "~" else "_" for ch in text)[:length]
    raw = clean.ljust(length).encode("ascii")
    swapped = bytearray(length)
    swapped[0::2] = raw[1::2]
    swapped[1::2] = raw[0::2]
    return bytes(swapped)


def decode_ata_string(block: bytes, first_word: int, words: int) -> str:
    raw = block[first_word * 2:(first_word + words) * 2]
    out = bytearray(len(raw))
    out[0::2] = raw[1::2]
    out[1::2] = raw[0::2]
    return out.decode("ascii", "replace").strip()


def image_path(disk) -> Optional[str]:
    """The file behind a disk, if it has one (``path``: a shadow view or a fake may not)."""
    value = getattr(disk, "path", None)
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


def default_serial(disk) -> str:
    """20 characters: the image UUID's first 80 bits in hex, else a hash of the file name."""
    ident = disk.uuid
    if ident is not None and ident.int != 0:
        return ident.hex[:20].upper()
    path = image_path(disk)
    if path:
        return hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:20].upper()
    return "VDISK0000000000000000"[:20]


def default_model(disk) -> str:
    """Up to 40 characters: "VDISK " and the image file name (or "VDISK HARDDISK")."""
    path = image_path(disk)
    if path:
        return ("VDISK " + os.path.basename(path))[:40]
    return "VDISK HARDDISK"


def default_firmware() -> str:
    try:
        from .. import __version__
    except Exception:           # pragma: no cover - vdisk always has a version
        __version__ = "0"
    return str(__version__)[:8]


# -- the block ------------------------------------------------------------------------------------

@dataclass
class IdentifyState:
    """Everything IDENTIFY DEVICE reports; the device keeps one and updates it."""
    total_sectors: int
    default_geometry: Geometry
    current_geometry: Geometry
    serial: str
    model: str
    firmware: str
    max_multiple: int = MAX_MULTIPLE
    multiple: int = MAX_MULTIPLE
    write_cache: bool = True
    look_ahead: bool = True
    fua: bool = True
    trim: bool = True
    trim_zeroes: bool = True          # word 69 bit5: reads after TRIM return zeros
    dsm_max_blocks: int = DSM_MAX_BLOCKS
    rotation_rate: int = 1            # word 217: 1 = non-rotating
    physical_exponent: int = 0        # log2(physical / logical sector)
    xfer_mode: Tuple[str, int] = (UDMA, 5)


def identify_words(st: IdentifyState) -> list:
    w = [0] * 256
    total = st.total_sectors
    dg, cg = st.default_geometry, st.current_geometry
    w[0] = 0x0040                                   # fixed, non-removable ATA device
    w[1], w[3], w[6] = min(dg.cylinders, 0xFFFF), dg.heads, dg.sectors
    if st.max_multiple > 1:
        w[47] = 0x8000 | st.max_multiple
    w[49] = (1 << 11) | (1 << 9) | (1 << 8)         # IORDY, LBA, DMA
    w[50] = 0x4000
    w[53] = 0x0007                                  # words 54-58, 64-70 and 88 are valid
    w[54], w[55], w[56] = min(cg.cylinders, 0xFFFF), cg.heads, cg.sectors
    chs_capacity = min(cg.capacity, 0xFFFFFFFF)
    w[57], w[58] = chs_capacity & 0xFFFF, chs_capacity >> 16
    w[59] = 0x0100 | (st.multiple & 0xFF)
    lba28 = min(total, LBA28_LIMIT)
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    kind, n = st.xfer_mode
    w[62] = 0x0007 | ((1 << (8 + n)) if kind == SWDMA else 0)
    w[63] = 0x0007 | ((1 << (8 + n)) if kind == MWDMA else 0)
    w[64] = 0x0003                                  # PIO 3 and 4
    w[65] = w[66] = w[67] = w[68] = 120
    if st.trim:
        w[69] = (1 << 14) | ((1 << 5) if st.trim_zeroes else 0)
    w[80] = 0x01F0                                  # ATA-4 .. ATA8-ACS
    w[81] = 0x0000
    w[82] = (1 << 14) | (1 << 6) | (1 << 5)         # NOP, look-ahead, write cache
    w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)   # FLUSH CACHE EXT, FLUSH CACHE, LBA48
    w[84] = (1 << 14) | ((1 << 6) if st.fua else 0)
    w[85] = (1 << 14) | ((1 << 6) if st.look_ahead else 0) | ((1 << 5) if st.write_cache else 0)
    w[86] = (1 << 13) | (1 << 12) | (1 << 10)
    w[87] = (1 << 14) | ((1 << 6) if st.fua else 0)
    w[88] = 0x003F | ((1 << (8 + n)) if kind == UDMA else 0)
    w[93] = 0x6001                                  # hardware reset result, 80-conductor cable
    w[100], w[101], w[102], w[103] = (total & 0xFFFF, (total >> 16) & 0xFFFF,
                                      (total >> 32) & 0xFFFF, (total >> 48) & 0xFFFF)
    if st.trim:
        w[105] = st.dsm_max_blocks
    w[106] = 0x4000 | ((0x2000 | st.physical_exponent) if st.physical_exponent else 0)
    if st.trim:
        w[169] = 0x0001
    w[217] = st.rotation_rate
    return w


def build_identify(st: IdentifyState) -> bytes:
    """The 512-byte IDENTIFY DEVICE block with strings and the word-255 integrity checksum."""
    block = bytearray(struct.pack("<256H", *identify_words(st)))
    block[20:40] = ata_string(st.serial, 20)        # words 10-19
    block[46:54] = ata_string(st.firmware, 8)       # words 23-26
    block[54:94] = ata_string(st.model, 40)         # words 27-46
    block[510] = 0xA5
    block[511] = (-sum(block[:511])) & 0xFF
    return bytes(block)


def checksum_ok(block: bytes) -> bool:
    """Word 255: signature 0xA5 and all 512 bytes summing to 0 mod 256."""
    return len(block) == 512 and block[510] == 0xA5 and sum(block) & 0xFF == 0


def words(block: bytes) -> Tuple[int, ...]:
    return struct.unpack("<256H", block)


def hex_dump(block: bytes) -> str:
    """The ``hdparm --Istdin`` / ``/proc/ide/*/identify`` text form: 256 words, 8 per line."""
    ws = words(block)
    return "".join(" ".join(f"{x:04x}" for x in ws[i:i + 8]) + "\n" for i in range(0, 256, 8))
