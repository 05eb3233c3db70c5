"""The VHDX log: finding the active sequence, replaying it, and writing new entries (VHDX.md §5, A3, A5).

A replay is a list of :class:`Update` (a 4 KiB sector of data, or a run of zeros, at a file
offset). A writable open applies it to the file; a read-only open lays it over the file with
:class:`Overlay`, so the image reads as replayed while not one byte of it changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from vdisk.errors import FormatError
from .crc32c import crc32c
from .structs import (DATA_SIG, DESC_SIG, DESCRIPTOR_SIZE, LOG_HEADER_SIZE, LOG_SECTOR, LOG_SIG, MiB, ZERO_SIG,
                      DataSector, Descriptor, LogEntryHeader, descriptor_sectors)

#: Entries' checksums are computed over at most this many times the log's length: the entries of
#: a sound log do not overlap, so a log that needs more is hostile (overlapping claims).
CRC_BUDGET_FACTOR = 4
#: A replay may extend the file by at most this much past its size (LastFileOffset claims).
MAX_REPLAY_GROWTH = 1 << 30


@dataclass
class Update:
    """One replayed write: *data* (a 4 KiB sector) or, when data is None, *length* zero bytes."""
    offset: int
    length: int
    data: Optional[bytes] = None


@dataclass
class Entry:
    offset: int                  # log-relative
    length: int
    tail: int
    sequence: int
    flushed_file_offset: int
    last_file_offset: int
    updates: list = field(default_factory=list)


@dataclass
class Replay:
    """The active sequence of a log: what to write, and the sizes its head entry records."""
    entries: list
    updates: list
    flushed_file_offset: int
    last_file_offset: int

    @property
    def empty(self) -> bool:
        return not self.updates


def _ring(log: bytes, start: int, length: int) -> bytes:
    """*length* bytes of the ring buffer from *start*, wrapping at its end."""
    n = len(log)
    start %= n
    if start + length <= n:
        return log[start:start + length]
    return log[start:] + log[:start + length - n]


def _parse_entry(log: bytes, p: int, log_guid: bytes, budget: list) -> Optional[Entry]:
    """The valid entry at log offset *p*, or None (A3: every field and the checksum checked)."""
    head = LogEntryHeader.parse(log[p:p + LOG_HEADER_SIZE])
    n = len(log)
    if head.signature != LOG_SIG or head.log_guid != log_guid or head.sequence_number == 0:
        return None
    length, count = head.entry_length, head.descriptor_count
    if length == 0 or length % LOG_SECTOR or length > n or head.tail % LOG_SECTOR or head.tail >= n:
        return None
    dsec = descriptor_sectors(count)
    if dsec * LOG_SECTOR > length:
        return None
    budget[0] -= length                 # charged before any work that grows with the entry's claims
    if budget[0] < 0:
        raise _Hostile()
    raw = _ring(log, p, length)
    seq = head.sequence_number
    descs = []
    for i in range(count):
        at = LOG_HEADER_SIZE + DESCRIPTOR_SIZE * i
        d = Descriptor.parse(raw[at:at + DESCRIPTOR_SIZE])
        if d.signature not in (DESC_SIG, ZERO_SIG) or d.sequence_number != seq or d.file_offset % LOG_SECTOR:
            return None
        if d.signature == ZERO_SIG and int.from_bytes(d.leading_bytes, "little") % LOG_SECTOR:
            return None
        descs.append(d)
    ndata = sum(1 for d in descs if d.signature == DESC_SIG)
    if (dsec + ndata) * LOG_SECTOR > length:
        return None
    sectors = []
    for k in range(ndata):
        at = (dsec + k) * LOG_SECTOR
        s = DataSector.parse(raw[at:at + LOG_SECTOR])
        if s.signature != DATA_SIG or (s.sequence_high << 32 | s.sequence_low) != seq:
            return None
        sectors.append(s)
    buf = bytearray(raw)
    buf[4:8] = bytes(4)
    if crc32c(buf) != head.checksum:
        return None
    updates, k = [], 0
    for d in descs:
        if d.signature == ZERO_SIG:
            zlen = int.from_bytes(d.leading_bytes, "little")
            if zlen:
                updates.append(Update(d.file_offset, zlen))
        else:
            s = sectors[k]
            k += 1
            updates.append(Update(d.file_offset, LOG_SECTOR, d.leading_bytes + s.data + d.trailing_bytes))
    return Entry(p, length, head.tail, seq, head.flushed_file_offset, head.last_file_offset, updates)


class _Hostile(Exception):
    pass


def find_active(path: str, log: bytes, log_guid: bytes, log_offset: int) -> Replay:
    """The active sequence of the log held in *log* (the whole log area), per VHDX.md A3.

    Raises FormatError when the header names a log but no complete sequence carries its GUID.
    Time and memory grow with the log's length, whatever its entries claim.
    """
    n = len(log)
    budget = [CRC_BUDGET_FACTOR * n]
    entries: dict[int, Entry] = {}
    try:
        for p in range(0, n, LOG_SECTOR):
            e = _parse_entry(log, p, log_guid, budget)
            if e is not None:
                entries[p] = e
    except _Hostile:
        raise FormatError(path, "log", None, log_offset,
                          "log entries claim overlapping space beyond any sound log (hostile or damaged log)") from None

    def successor(e: Entry) -> Optional[Entry]:
        s = entries.get((e.offset + e.length) % n)
        return s if s is not None and s.sequence == e.sequence + 1 else None

    # Heads of longest runs: valid entries with no valid successor. Newest first.
    heads = sorted((e for e in entries.values() if successor(e) is None), key=lambda e: -e.sequence)
    for h in heads:
        t = entries.get(h.tail)
        if t is None or t.sequence > h.sequence or h.sequence - t.sequence >= len(entries):
            continue
        run, cur = [t], t
        while cur is not h:
            cur = successor(cur)
            if cur is None or cur.sequence > h.sequence:
                break
            run.append(cur)
        else:
            updates = [u for e in run for u in e.updates]
            return Replay(run, updates, h.flushed_file_offset, h.last_file_offset)
    raise FormatError(path, "log", None, log_offset,
                      f"the header names log {_guid(log_guid)} but the log holds no complete sequence of its "
                      f"entries ({len(entries)} valid entries)")


def _guid(raw: bytes) -> str:
    import uuid
    return str(uuid.UUID(bytes_le=raw))


def check_replay(path: str, replay: Replay, file_size: int, log_offset: int) -> int:
    """Refuse a replay that the file cannot take; returns the size the file must have after it."""
    if file_size < replay.flushed_file_offset:
        raise FormatError(path, "log", "flushed_file_offset", log_offset,
                          f"the log says {replay.flushed_file_offset} bytes were stable, the file has "
                          f"{file_size} (truncated?)")
    last = replay.last_file_offset
    if last > file_size + MAX_REPLAY_GROWTH:
        raise FormatError(path, "log", "last_file_offset", log_offset,
                          f"the log claims a file of {last} bytes, far past the file's {file_size}")
    limit = max(file_size, last)
    for u in replay.updates:
        if u.offset + u.length > limit:
            raise FormatError(path, "log", "descriptor", log_offset,
                              f"replay would write {u.length} bytes at {u.offset:#x}, past the end of the "
                              f"file ({limit} bytes)")
    return max(file_size, -(-last // MiB) * MiB if last > file_size else file_size)


class Overlay:
    """The replayed view of a file opened read-only: reads see the updates, the file is untouched."""

    def __init__(self, updates: Sequence[Update], size: int):
        self.updates = list(updates)
        self.size = size

    def touches(self, start: int, end: int) -> bool:
        return any(u.offset < end and u.offset + u.length > start for u in self.updates)

    def apply(self, buf: bytearray | memoryview, offset: int) -> None:
        """Lay the updates over *buf*, which holds the file's bytes from *offset*."""
        view = memoryview(buf).cast("B")
        end = offset + len(view)
        for u in self.updates:
            lo, hi = max(offset, u.offset), min(end, u.offset + u.length)
            if lo >= hi:
                continue
            if u.data is None:
                view[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                view[lo - offset:hi - offset] = u.data[lo - u.offset:hi - u.offset]


def build_entry(log_guid: bytes, sequence: int, tail: int, sectors: Sequence[tuple[int, bytes]],
                flushed_file_offset: int, last_file_offset: int) -> bytes:
    """A log entry that writes each (file offset, 4 KiB sector) of *sectors* (VHDX.md §5)."""
    count = len(sectors)
    dsec = descriptor_sectors(count)
    length = (dsec + count) * LOG_SECTOR
    desc = bytearray(dsec * LOG_SECTOR)
    data = bytearray()
    for i, (off, sector) in enumerate(sectors):
        at = LOG_HEADER_SIZE + DESCRIPTOR_SIZE * i
        desc[at:at + DESCRIPTOR_SIZE] = Descriptor.build(dict(
            signature=DESC_SIG, trailing_bytes=sector[4092:4096], leading_bytes=sector[:8],
            file_offset=off, sequence_number=sequence))
        data += DataSector.build(dict(signature=DATA_SIG, sequence_high=sequence >> 32, data=sector[8:4092],
                                      sequence_low=sequence & 0xFFFFFFFF))
    desc[:LOG_HEADER_SIZE] = LogEntryHeader.build(dict(
        signature=LOG_SIG, checksum=0, entry_length=length, tail=tail, sequence_number=sequence,
        descriptor_count=count, reserved=0, log_guid=log_guid, flushed_file_offset=flushed_file_offset,
        last_file_offset=last_file_offset))
    raw = desc + data
    raw[4:8] = crc32c(raw).to_bytes(4, "little")
    return bytes(raw)


class SectorEdits:
    """Byte changes gathered into the whole 4 KiB sectors a log entry carries: each sector is read
    from the file once, then patched."""

    def __init__(self, file):
        self.file = file
        self.sectors: dict[int, bytearray] = {}

    def put(self, file_offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            sector = (file_offset + pos) // LOG_SECTOR * LOG_SECTOR
            if sector not in self.sectors:
                self.sectors[sector] = bytearray(self.file.pread(LOG_SECTOR, sector).ljust(LOG_SECTOR, b"\0"))
            inner = file_offset + pos - sector
            n = min(LOG_SECTOR - inner, len(data) - pos)
            self.sectors[sector][inner:inner + n] = data[pos:pos + n]
            pos += n

    def writes(self) -> list[tuple[int, bytes]]:
        return sorted((off, bytes(data)) for off, data in self.sectors.items())

