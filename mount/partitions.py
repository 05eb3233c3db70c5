"""Partition tables of a virtual disk: MBR (primary and logical partitions) and GPT.

    from vdisk.mount.partitions import read_partitions
    for p in read_partitions(disk):
        print(p.index, p.start, p.length, p.type, p.name)

Only ``size``, ``logical_sector_size`` and ``readinto`` of the :class:`vdisk.blockdev.BlockDevice`
protocol are used, so any block device works. MBR and EBR addresses count the disk's logical
sectors (512 bytes, or 4096 for an image made so); GPT is looked for at the disk's own sector
size first, then the other common one.

Numbering follows Linux, so that ``p5`` here is what the guest calls ``/dev/sda5``: MBR primary
partitions are numbered by their slot (1-4), logical partitions inside an extended partition from 5
in chain order, GPT partitions by their entry slot + 1. The extended container itself is not a
partition (it holds only the chain of EBRs) and is not listed.

Hostile tables never hang or exhaust memory: EBR chains are walked with a visited set, a length
limit and bounds checks; GPT entry arrays are capped in size; every partition is checked against
the disk size and against the partitions already accepted. An anomaly is reported through the
*warn* callback and the offending partition (or the rest of a broken chain) is skipped; with
``strict=True`` it raises :class:`PartitionTableError` instead.
"""
from __future__ import annotations

import bisect
import logging
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

from vdisk.errors import FormatError
from vdisk.units import SECTOR

log = logging.getLogger("vdisk.mount")

MBR_SIGNATURE = b"\x55\xaa"
MBR_TABLE_OFFSET = 446
MBR_ENTRY = struct.Struct("<B3sB3sII")          # status, CHS first, type, CHS last, LBA start, sectors
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_PROTECTIVE_TYPE = 0xEE
MAX_LOGICAL = 1024                               # longest EBR chain we follow

GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
GPT_HEADER_MIN = GPT_HEADER.size
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")       # 128 bytes
GPT_MAX_ARRAY = 4 << 20                          # bytes of entry array we are willing to read
GPT_SECTOR_SIZES = (512, 4096)

MBR_TYPE_NAMES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "NTFS/exFAT/HPFS",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Extended (LBA)",
    0x11: "Hidden FAT12", 0x12: "Compaq diagnostics", 0x14: "Hidden FAT16 <32M", 0x16: "Hidden FAT16",
    0x17: "Hidden NTFS", 0x1B: "Hidden W95 FAT32", 0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)", 0x27: "Windows recovery", 0x42: "Windows dynamic (LDM)",
    0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM", 0xA5: "FreeBSD",
    0xA6: "OpenBSD", 0xA8: "Darwin UFS", 0xA9: "NetBSD", 0xAF: "HFS/HFS+", 0xEE: "GPT protective",
    0xEF: "EFI System", 0xFD: "Linux RAID autodetect",
}

GPT_TYPE_NAMES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3": "Windows LDM metadata",
    "af9b60a0-1431-4f62-bc68-3311714a69ad": "Windows LDM data",
    "e75caf8f-f680-4cee-afa3-b001e56efc2d": "Windows Storage Spaces",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
    "516e7cb4-6ecf-11d6-8ff8-00022d09712b": "FreeBSD UFS",
}


class PartitionTableError(FormatError):
    """A partition table entry or structure is invalid (raised only with ``strict=True``)."""


@dataclass(frozen=True)
class Partition:
    """One partition: byte offset and length on the virtual disk, and what the table says of it."""

    index: int             # Linux-style number: p1..p4 MBR primary / GPT slot + 1; p5.. MBR logical
    start: int             # byte offset on the disk
    length: int            # bytes
    type: str              # MBR: "0x83"; GPT: the partition type GUID, lower case
    name: str = ""         # GPT partition name (UTF-16LE in the table); "" for MBR
    scheme: str = "mbr"    # "mbr" or "gpt"
    uuid: str = ""         # GPT unique partition GUID
    bootable: bool = False  # MBR active flag
    attributes: int = 0    # GPT attribute bits
    logical: bool = False  # MBR logical partition (inside an extended partition)

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def type_name(self) -> str:
        if self.scheme == "mbr":
            return MBR_TYPE_NAMES.get(int(self.type, 16), "Unknown")
        return GPT_TYPE_NAMES.get(self.type, "Unknown")


class _Reader:
    """Shared state of one table scan: the disk, the accepted partitions, how to report anomalies."""

    def __init__(self, disk, strict: bool, warn: Optional[Callable[[str], None]]):
        self.disk = disk
        self.size = int(disk.size)
        self.sector = int(disk.logical_sector_size)      # the unit of MBR/EBR addresses
        self.where = str(getattr(disk, "path", None) or "disk")
        self.strict = strict
        self.warn_fn = warn or log.warning
        self.found: list[Partition] = []
        self._starts: list[int] = []     # sorted starts of accepted partitions, for overlap checks
        self._by_start: list[Partition] = []

    def problem(self, structure: str, field: Optional[str], offset: Optional[int], text: str) -> None:
        err = PartitionTableError(self.where, structure, field, offset, text)
        if self.strict:
            raise err
        self.warn_fn(str(err))

    def read(self, offset: int, length: int) -> Optional[bytes]:
        """Bytes at *offset*, or None when the range is not (wholly) on the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            return None
        buf = bytearray(length)
        self.disk.readinto(buf, offset)
        return bytes(buf)

    def accept(self, part: Partition, structure: str, offset: int) -> None:
        """Keep *part* unless it is empty, off the disk or overlaps one already kept."""
        label = f"partition {part.index}"
        if part.length <= 0:
            return
        if part.start >= self.size:
            self.problem(structure, "start", offset,
                         f"{label} starts at byte {part.start}, past the end of the disk ({self.size}); skipped")
            return
        if part.end > self.size:
            self.problem(structure, "length", offset,
                         f"{label} ends at byte {part.end}, past the end of the disk ({self.size}); "
                         f"cut to {self.size - part.start} bytes")
            part = _replace(part, length=self.size - part.start)
        i = bisect.bisect_right(self._starts, part.start)
        neighbours = self._by_start[max(0, i - 1):i + 1]
        for other in neighbours:
            if part.start < other.end and other.start < part.end:
                self.problem(structure, None, offset,
                             f"{label} (bytes {part.start}-{part.end}) overlaps partition {other.index} "
                             f"(bytes {other.start}-{other.end}); skipped")
                return
        self._starts.insert(i, part.start)
        self._by_start.insert(i, part)
        self.found.append(part)


def _replace(part: Partition, **changes) -> Partition:
    fields = {k: getattr(part, k) for k in part.__dataclass_fields__}
    fields.update(changes)
    return Partition(**fields)


def read_partitions(disk, *, strict: bool = False, warn: Optional[Callable[[str], None]] = None) -> list[Partition]:
    """The partitions of *disk* (MBR, including logical partitions, or GPT), ordered by number.

    A disk without a partition table gives an empty list. Anomalies go to *warn* (default: the
    ``vdisk.mount`` logger) and the offending entries are skipped; ``strict=True`` raises
    :class:`PartitionTableError` instead. Only I/O errors of the disk itself propagate otherwise.
    """
    r = _Reader(disk, strict, warn)
    mbr = r.read(0, SECTOR)
    entries = _mbr_entries(mbr) if mbr is not None else None
    protective = entries is not None and any(e[2] == MBR_PROTECTIVE_TYPE for e in entries)

    if protective or entries is None:
        gpt = _find_gpt(r, quiet=not protective)
        if gpt is not None:
            _read_gpt(r, *gpt)
            return sorted(r.found, key=lambda p: p.index)
        if protective:
            r.problem("MBR", "partition_type", MBR_TABLE_OFFSET,
                      "protective MBR (type 0xEE) but no valid GPT header at either end of the disk")
    if entries is None:
        return []
    _read_mbr(r, entries)
    return sorted(r.found, key=lambda p: p.index)


# -- MBR ---------------------------------------------------------------------------------------
def _mbr_entries(sector: bytes) -> Optional[list[tuple]]:
    """The four entries of an MBR/EBR sector, or None if it is not one (no 0x55AA, bad status)."""
    if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
        return None
    entries = [MBR_ENTRY.unpack_from(sector, MBR_TABLE_OFFSET + 16 * i) for i in range(4)]
    # Like Linux: an active flag other than 0x00/0x80 means this is a boot sector of a
    # filesystem (a "superfloppy") or garbage, not a partition table.
    if any(e[0] not in (0x00, 0x80) for e in entries):
        return None
    return entries


def _read_mbr(r: _Reader, entries: list[tuple]) -> None:
    extended = []
    for slot, (status, _, ptype, _, lba, count) in enumerate(entries):
        offset = MBR_TABLE_OFFSET + 16 * slot
        if ptype == 0 or count == 0:
            continue
        if ptype == MBR_PROTECTIVE_TYPE:
            continue
        if lba == 0:
            r.problem("MBR", f"partition[{slot}].first_lba", offset + 8,
                      f"partition {slot + 1} starts at sector 0 (the MBR itself); skipped")
            continue
        if ptype in MBR_EXTENDED_TYPES:
            extended.append((slot, lba, count))
            continue
        r.accept(Partition(slot + 1, lba * r.sector, count * r.sector, f"0x{ptype:02x}",
                           bootable=status == 0x80), "MBR", offset)
    number = 5
    visited: set[int] = set()
    for slot, lba, count in extended:
        number = _read_ebr_chain(r, slot, lba, count, number, visited)


def _read_ebr_chain(r: _Reader, slot: int, ext_lba: int, ext_count: int, number: int, visited: set) -> int:
    """Walk one extended partition's chain of EBRs; returns the next free logical number."""
    ext_end = min(ext_lba + ext_count, r.size // r.sector)
    cur = ext_lba
    while True:
        where = cur * r.sector
        if cur in visited:
            r.problem("EBR", "next_lba", where, f"the chain of logical partitions loops back to sector {cur}; "
                      "the rest of the chain is ignored")
            return number
        if len(visited) >= MAX_LOGICAL:
            r.problem("EBR", None, where, f"more than {MAX_LOGICAL} logical partitions; the rest is ignored")
            return number
        if not ext_lba <= cur < ext_end:
            r.problem("EBR", "next_lba", where, f"EBR at sector {cur} lies outside extended partition {slot + 1} "
                      f"(sectors {ext_lba}-{ext_lba + ext_count - 1}) or past the end of the disk; "
                      "the rest of the chain is ignored")
            return number
        visited.add(cur)
        sector = r.read(where, SECTOR)
        entries = _mbr_entries(sector) if sector is not None else None
        if entries is None:
            if cur != ext_lba or (sector is not None and any(sector)):
                r.problem("EBR", "signature", where + 510, f"no valid EBR at sector {cur}; "
                          "the rest of the chain is ignored")
            return number
        nxt = None
        data_done = False
        # Slots 3 and 4 of an EBR are unused (often garbage), as Linux also assumes.
        for i, (status, _, ptype, _, rel, count) in enumerate(entries[:2]):
            offset = where + MBR_TABLE_OFFSET + 16 * i
            if ptype == 0 or count == 0:
                continue
            if ptype in MBR_EXTENDED_TYPES:
                if nxt is None:
                    nxt = ext_lba + rel
                continue
            if data_done:
                continue
            data_done = True
            start = cur + rel
            if rel == 0:
                r.problem("EBR", "first_lba", offset + 8, f"logical partition {number} starts on its own EBR "
                          f"(sector {cur}); skipped")
            elif start + count > ext_lba + ext_count:
                r.problem("EBR", "sectors", offset + 12, f"logical partition {number} (sectors {start}-"
                          f"{start + count - 1}) runs past its extended partition (ends at sector "
                          f"{ext_lba + ext_count - 1}); skipped")
            else:
                r.accept(Partition(number, start * r.sector, count * r.sector, f"0x{ptype:02x}",
                                   bootable=status == 0x80, logical=True), "EBR", offset)
            number += 1
        if nxt is None:
            return number
        cur = nxt


# -- GPT ---------------------------------------------------------------------------------------
def _find_gpt(r: _Reader, quiet: bool):
    """(header fields, entry array bytes, sector size) from the primary GPT, else the backup one.

    *quiet*: say nothing when no GPT signature is found at all (the disk has no protective MBR,
    so it need not be a GPT disk).
    """
    problems: list[tuple] = []
    seen = False
    for ss in sorted(GPT_SECTOR_SIZES, key=lambda size: size != r.sector):   # the disk's own first
        total = r.size // ss
        if total < 3:
            continue
        found: list[tuple] = []
        primary = _gpt_header(r, 1, ss, total, found)
        if primary is not None:
            return primary + (ss,)
        backup = _gpt_header(r, total - 1, ss, total, found)
        if backup is not None:
            for p in found:
                r.problem(*p)
            r.problem("GPT", None, ss, "primary GPT missing or damaged; using the backup GPT at the end "
                      "of the disk")
            return backup + (ss,)
        problems += found
        if r.read(ss, 8) == GPT_SIGNATURE or r.read((total - 1) * ss, 8) == GPT_SIGNATURE:
            seen = True
            break
    if seen or not quiet:
        for p in problems:
            r.problem(*p)
    return None


def _gpt_header(r: _Reader, lba: int, ss: int, total: int, problems: list):
    where = lba * ss
    raw = r.read(where, ss)
    if raw is None or raw[:8] != GPT_SIGNATURE:
        return None
    (sig, revision, hsize, hcrc, _reserved, my_lba, alt_lba, first_usable, last_usable, disk_guid,
     entries_lba, n_entries, entry_size, entries_crc) = GPT_HEADER.unpack_from(raw)
    label = "GPT header" if lba == 1 else "backup GPT header"

    def bad(field, off, text):
        problems.append(("GPT", field, where + off, f"{label}: {text}"))
        return None

    if not GPT_HEADER_MIN <= hsize <= ss:
        return bad("header_size", 12, f"header size {hsize} is not between {GPT_HEADER_MIN} and {ss}")
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        return bad("header_crc32", 16, "header CRC32 does not match")
    if my_lba != lba:
        return bad("my_lba", 24, f"says it is at sector {my_lba}, found at sector {lba}")
    if entry_size < GPT_ENTRY.size or entry_size % 8:
        return bad("entry_size", 84, f"entry size {entry_size} is invalid (must be >= 128 and a multiple of 8)")
    array_bytes = n_entries * entry_size
    if array_bytes > GPT_MAX_ARRAY:
        return bad("num_entries", 80, f"{n_entries} entries of {entry_size} bytes is more than "
                   f"{GPT_MAX_ARRAY} bytes")
    array_sectors = -(-array_bytes // ss)
    if entries_lba < 2 and lba == 1 or entries_lba + array_sectors > total:
        return bad("partition_entry_lba", 72, f"entry array at sector {entries_lba} "
                   f"({array_sectors} sectors) is not on the disk")
    if entries_lba <= lba < entries_lba + array_sectors:
        return bad("partition_entry_lba", 72, "entry array overlaps the header")
    array = r.read(entries_lba * ss, array_bytes) if array_bytes else b""
    if array is None or zlib.crc32(array) != entries_crc:
        return bad("partition_entry_array_crc32", 88, "entry array CRC32 does not match")
    if first_usable > last_usable + 1 or last_usable >= total:
        return bad("last_usable_lba", 48, f"usable sectors {first_usable}-{last_usable} are not on the disk "
                   f"({total} sectors)")
    reserved = entries_lba + array_sectors if lba == 1 else 2 + array_sectors
    return (dict(first_usable=first_usable, last_usable=last_usable, entries_lba=entries_lba, reserved=reserved,
                 n_entries=n_entries, entry_size=entry_size, disk_guid=str(uuid.UUID(bytes_le=disk_guid))),
            array)


def _read_gpt(r: _Reader, header: dict, array: bytes, ss: int) -> None:
    esize = header["entry_size"]
    base = header["entries_lba"] * ss
    for slot in range(header["n_entries"]):
        type_guid, uniq, first, last, attrs, name = GPT_ENTRY.unpack_from(array, slot * esize)
        if type_guid == b"\0" * 16:
            continue
        offset = base + slot * esize
        number = slot + 1
        if last < first:
            r.problem("GPT", f"entry[{slot}].last_lba", offset + 40,
                      f"partition {number} ends (sector {last}) before it starts (sector {first}); skipped")
            continue
        if first < header["reserved"]:
            r.problem("GPT", f"entry[{slot}].first_lba", offset + 32,
                      f"partition {number} (sectors {first}-{last}) overlaps the GPT header or its entry "
                      "array; skipped")
            continue
        if first < header["first_usable"] or last > header["last_usable"]:
            r.problem("GPT", f"entry[{slot}].first_lba", offset + 32,
                      f"partition {number} (sectors {first}-{last}) lies outside the usable sectors "
                      f"{header['first_usable']}-{header['last_usable']}; kept")
        r.accept(Partition(number, first * ss, (last - first + 1) * ss,
                           str(uuid.UUID(bytes_le=type_guid)), _gpt_name(name), "gpt",
                           str(uuid.UUID(bytes_le=uniq)), attributes=attrs), "GPT", offset)


def _gpt_name(raw: bytes) -> str:
    units = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    end = next((i for i, u in enumerate(units) if u == b"\0\0"), len(units))
    return b"".join(units[:end]).decode("utf-16-le", errors="replace")
