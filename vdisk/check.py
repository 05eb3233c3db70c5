"""Consistency check and repair of VHD and VDI images (``vdisk check [--repair]``).

The core's open refuses many corruptions, so this module parses the files itself, leniently,
with the structure declarations of ``formats/vhd_structs.py`` and ``formats/vdi_structs.py``, and
reports every problem it finds. Exit codes follow qemu-img: 0 clean, 1 the check could not run,
2 corruption found, 3 only leaks found. ``repair=True`` fixes what is safely fixable inside one
journaled transaction and reports what it did; the exit code then describes the repaired image.

Findings are summarised by kind: ``report.findings`` holds one :class:`Finding` per kind, with
how many times it was found and the first :data:`EXAMPLES` messages, so a crafted table of a
million bad entries costs ten messages, not a million. A check adds a finding with
``report.findings.append(Finding(...))`` (once per problem, or once per batch with ``count``
and ``examples`` from vectorized code); the grouping happens there. Tables are bounded by the
format and the file (vdisk.limits) before they are read, and examined with numpy, a chunk at a
time where the check allows it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import journal, limits
from .errors import VDiskError
from .io import ImageFile
from vdisk.formats.vhd_structs import (BAT_UNUSED, DISK_DIFFERENCING, DISK_FIXED, FOOTER_CHECKSUM_OFFSET,
                                       FOOTER_COOKIE, FOOTER_SIZE, HEADER_CHECKSUM_OFFSET, HEADER_COOKIE,
                                       HEADER_FIELD_OFFSETS, HEADER_SIZE, LOCATOR_OFFSET, LOCATOR_SIZE,
                                       SUBTYPE_NAMES as VHD_SUBTYPES,
                                       DynamicHeader, Footer, vhd_checksum, with_checksum)
from vdisk.formats.vhd import MAX_DYNAMIC_SIZE, _bitmap_bytes, bitmap_used_bytes, locator_extents
from vdisk.formats.vdi import MAX_BLOCKS as VDI_MAX_BLOCKS
from vdisk.formats.vdi_structs import (BLOCK_ZERO, HEADER_V1, HEADER_V1_PLUS, PRE_HEADER_SIZE,
                                       SIGNATURE, SUBTYPE_NAMES as VDI_SUBTYPES, VERSION_0, HeaderV1, PreHeader)

SECTOR = 512
EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3
#: Messages kept per kind of finding; the others are only counted.
EXAMPLES = 10
#: Table entries examined at a time (the temporaries of a check stay at a few MiB).
CHECK_CHUNK = 1 << 18


@dataclass
class Finding:
    """A kind of problem: *kind* is a stable identifier, *severity* 'corruption' or 'leak',
    *count* how many times it was found, *examples* the first instances (at most EXAMPLES).
    A single problem's *message* is its only example; a batch found at once (:meth:`many`)
    has a *message* about all of them and short examples."""
    kind: str
    severity: str
    message: str
    fixable: bool = False
    count: int = 1
    examples: list = field(default_factory=list)

    def __post_init__(self):
        self.examples = list(self.examples[:EXAMPLES]) if self.examples else [self.message]

    @classmethod
    def many(cls, kind: str, severity: str, count: int, message: str, examples: Sequence[str],
             fixable: bool = False) -> "Finding":
        """*count* problems of one kind found at once, e.g. by numpy over a table."""
        return cls(kind, severity, message, fixable, count, list(examples))

    def text(self) -> str:
        """One line: a single problem's message, or the kind, its count and the first examples."""
        if self.count == 1 and self.examples == [self.message]:
            return self.message
        about = "" if self.examples[:1] == [self.message] else f", {self.message}"
        which = f"first {len(self.examples)}: " if len(self.examples) < self.count else ""
        return f"{self.kind}: {self.count} found{about} ({which}{'; '.join(self.examples)})"


class Findings(list):
    """A report's findings, one :class:`Finding` per kind: appending a kind already present adds
    to its count and, while there is room, to its examples."""

    def append(self, finding: Finding) -> None:
        for known in self:
            if known.kind == finding.kind:
                known.count += finding.count
                known.examples.extend(finding.examples[:EXAMPLES - len(known.examples)])
                known.fixable = known.fixable or finding.fixable
                return
        super().append(finding)

    def extend(self, findings) -> None:
        for finding in findings:
            self.append(finding)


def _examples(describe, *columns) -> list[str]:
    """Messages for the first EXAMPLES rows of parallel numpy columns."""
    return [describe(*row) for row in zip(*(c[:EXAMPLES].tolist() for c in columns))]


def _table_chunks(file: ImageFile, offset: int, entries: int, dtype: str):
    """(first index, int64 piece) of a u32 table, CHECK_CHUNK entries at a time."""
    for first, chunk in limits.iter_table(file.pread, offset, entries, dtype):
        for i in range(0, len(chunk), CHECK_CHUNK):
            yield first + i, chunk[i:i + CHECK_CHUNK]


def _first(mask: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """The first EXAMPLES rows of *columns* where *mask* is set (without copying the rest)."""
    rows = np.flatnonzero(mask)[:EXAMPLES]
    return [c[rows] for c in columns]


@dataclass
class CheckReport:
    path: str
    format: Optional[str] = None
    subtype: Optional[str] = None
    findings: Findings = field(default_factory=Findings)   # one entry per kind (see Finding)
    repairs: list = field(default_factory=list)     # what --repair did, one sentence each
    repaired_kinds: list = field(default_factory=list)
    error: Optional[str] = None                     # why the check could not run
    leaked_bytes: int = 0
    allocated_blocks: int = 0

    @property
    def corruptions(self) -> list:
        return [f for f in self.findings if f.severity == "corruption"]

    @property
    def leaks(self) -> list:
        return [f for f in self.findings if f.severity == "leak"]

    @property
    def clean(self) -> bool:
        return self.error is None and not self.findings

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_FAILED
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["findings"] = [asdict(f) for f in self.findings]
        d["exit_code"] = self.exit_code
        d["clean"] = self.clean
        return d

    def summary(self) -> str:
        lines = [f"{f.severity}: {f.text()}" for f in self.findings]
        lines += [f"repaired: {r}" for r in self.repairs]
        if self.error:
            lines.append(f"check failed: {self.error}")
        elif not self.findings:
            lines.append(f"{self.path}: no errors found ({self.format} {self.subtype}, "
                         f"{self.allocated_blocks} allocated blocks)")
        else:
            corrupt, leaks = (sum(f.count for f in group) for group in (self.corruptions, self.leaks))
            lines.append(f"{self.path}: {corrupt} corruption(s), {leaks} leak(s)"
                         + (f", {self.leaked_bytes} bytes leaked" if self.leaked_bytes else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# VHD
# ---------------------------------------------------------------------------------------------
def _footer_sane(f) -> bool:
    return (f.cookie == FOOTER_COOKIE and f.format_version >> 16 == 1 and f.disk_type in VHD_SUBTYPES
            and 0 < f.current_size <= (1 << 48))


class _Plan:
    """The writes that would repair what was found, and the file size afterwards."""

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []
        self.final_size: Optional[int] = None
        self.footer: Optional[bytes] = None          # VHD: the footer to put at the end of data
        self.footer_at: Optional[int] = None


def _check_vhd(file: ImageFile, report: CheckReport, plan: _Plan) -> None:
    path, size = file.path, file.size()
    add = report.findings.append
    if size < FOOTER_SIZE:
        report.error = f"{path}: file is {size} bytes, too small for a VHD"
        return
    tail = file.pread(FOOTER_SIZE, size - FOOTER_SIZE)
    head = file.pread(FOOTER_SIZE, 0)
    eof = Footer.parse(tail) if tail[:8] == FOOTER_COOKIE else None
    copy = Footer.parse(head) if head[:8] == FOOTER_COOKIE else None
    eof_ok = eof is not None and vhd_checksum(tail, FOOTER_CHECKSUM_OFFSET) == eof.checksum
    copy_ok = copy is not None and vhd_checksum(head, FOOTER_CHECKSUM_OFFSET) == copy.checksum
    # Choose the footer to trust: EOF (primary) when valid, else the copy, else a sane-looking one.
    if eof_ok:
        footer_raw, f = tail, eof
    elif copy_ok and copy.disk_type != DISK_FIXED:
        footer_raw, f = head, copy
    elif eof is not None and _footer_sane(eof):
        footer_raw, f = with_checksum(tail, FOOTER_CHECKSUM_OFFSET), eof
    elif copy is not None and _footer_sane(copy) and copy.disk_type != DISK_FIXED:
        footer_raw, f = with_checksum(head, FOOTER_CHECKSUM_OFFSET), copy
    else:
        report.error = f"{path}: no usable VHD footer at the end of the file or at offset 0"
        return
    if not _footer_sane(f):
        report.error = f"{path}: footer describes an unsupported image (type {f.disk_type}, version {f.format_version:#x})"
        return
    report.subtype = VHD_SUBTYPES[f.disk_type]
    plan.footer = footer_raw
    sparse = f.disk_type != DISK_FIXED
    if eof is None:
        add(Finding("footer-missing", "corruption", "footer at the end of the file is missing"
                    + ("; the copy at offset 0 is intact" if copy_ok else ""), fixable=sparse))
    elif not eof_ok:
        add(Finding("footer-checksum", "corruption",
                    f"footer checksum mismatch (stored {eof.checksum:#010x}, computed "
                    f"{vhd_checksum(tail, FOOTER_CHECKSUM_OFFSET):#010x})", fixable=True))
    if not sparse:
        data_len = size - FOOTER_SIZE
        if data_len < f.current_size:
            add(Finding("size-mismatch", "corruption",
                        f"fixed image holds {data_len} data bytes but its footer claims {f.current_size}"))
        if eof is not None and not eof_ok:
            plan.writes.append((size - FOOTER_SIZE, footer_raw))
        report.allocated_blocks = -(-f.current_size // (2 << 20))
        return
    if copy is None:
        add(Finding("footer-copy-missing", "corruption", "footer copy at offset 0 is missing", fixable=True))
    elif not copy_ok:
        add(Finding("footer-copy-checksum", "corruption", "footer copy at offset 0 has a bad checksum", fixable=True))
    elif eof_ok and head != tail:
        add(Finding("footer-mismatch", "corruption", "footer copy at offset 0 differs from the footer at the end",
                    fixable=True))
    if head != footer_raw:
        plan.writes.append((0, footer_raw))
    # Dynamic header.
    hoff = f.data_offset
    if hoff % SECTOR or hoff < FOOTER_SIZE or hoff + HEADER_SIZE > size:
        report.error = f"{path}: dynamic header offset {hoff:#x} lies outside the file"
        return
    hraw = file.pread(HEADER_SIZE, hoff)
    h = DynamicHeader.parse(hraw)
    bs, n, toff = h.block_size, h.max_table_entries, h.table_offset
    header_sane = (h.cookie == HEADER_COOKIE and h.header_version >> 16 == 1 and SECTOR <= bs <= (256 << 20)
                   and not bs & (bs - 1) and toff % SECTOR == 0 and toff + 4 * n <= size and n > 0)
    if not header_sane:
        report.error = (f"{path}: dynamic header at {hoff:#x} is damaged (cookie {h.cookie!r}, block size {bs}, "
                        f"table {n} entries at {toff:#x})")
        return
    try:                                      # the format's and vdisk's bounds, as when opening
        limits.check_table(path, "dynamic header", "max_table_entries",
                           hoff + HEADER_FIELD_OFFSETS["max_table_entries"], entries=n, entry_bytes=4,
                           table_offset=toff, file_size=size,
                           format_max=max(-(-f.current_size // bs) + 1, MAX_DYNAMIC_SIZE // bs))
    except VDiskError as exc:
        report.error = str(exc)
        return
    if vhd_checksum(hraw, HEADER_CHECKSUM_OFFSET) != h.checksum:
        add(Finding("header-checksum", "corruption", "dynamic header checksum mismatch", fixable=True))
        plan.writes.append((hoff, with_checksum(hraw, HEADER_CHECKSUM_OFFSET)))
    if n * bs < f.current_size:
        add(Finding("size-mismatch", "corruption",
                    f"the table's {n} blocks of {bs} bytes cannot hold the virtual size {f.current_size}"))
    bat = limits.read_table(file.pread, toff, n, ">u4")
    bat_len = -(-4 * n // SECTOR) * SECTOR
    meta = [(0, FOOTER_SIZE), (hoff, hoff + HEADER_SIZE), (toff, toff + bat_len)]
    end_of_data = size - FOOTER_SIZE if eof is not None else size
    unit = _bitmap_bytes(bs) + bs
    meta += _check_locators(h, hraw, hoff, size, end_of_data, bat, meta, f.disk_type == DISK_DIFFERENCING,
                            add, plan)
    meta_end = max(hi for _, hi in meta)
    # The table a chunk at a time, each with numpy: a zeroed table of millions of entries is one
    # finding per kind, and the temporaries stay at one chunk.
    drop = np.zeros(n, dtype=bool)                     # entries --repair clears
    kept_blocks, kept_starts = [], []
    for c0 in range(0, n, CHECK_CHUNK):
        part = bat[c0:c0 + CHECK_CHUNK]
        alloc = np.flatnonzero(part != BAT_UNUSED)
        starts = part[alloc] * SECTOR
        bad = (starts + unit > end_of_data) | (starts < FOOTER_SIZE)
        if bad.any():
            add(Finding.many("bat-range", "corruption", int(bad.sum()),
                             f"BAT entries pointing outside the data area, which ends at {end_of_data:#x}",
                             _examples(lambda blk, s: f"entry {c0 + blk} -> {s:#x}..{s + unit:#x}",
                                       *_first(bad, alloc, starts)), fixable=True))
        region = np.full(len(alloc), -1, dtype=np.int8)   # the first metadata region each block overlaps
        for i, (lo, hi) in reversed(list(enumerate(meta))):
            region[~bad & (starts < hi) & (starts + unit > lo)] = i
        hit = region >= 0
        if hit.any():
            add(Finding.many("bat-overlap", "corruption", int(hit.sum()), "blocks overlapping metadata or other blocks",
                             _examples(lambda blk, s, i: f"block {c0 + blk} at {s:#x} overlaps metadata at "
                                                         f"{meta[i][0]:#x}..{meta[i][1]:#x}",
                                       *_first(hit, alloc, starts, region)), fixable=True))
        bad |= hit
        drop[c0 + alloc[bad]] = True
        kept_blocks.append(c0 + alloc[~bad])
        kept_starts.append(starts[~bad])
    # Blocks overlapping each other: in order of offset, a block starting before the end of the
    # last kept one is dropped. Kept blocks do not overlap, so the loop runs once per block the
    # file really holds.
    blocks, starts = np.concatenate(kept_blocks), np.concatenate(kept_starts)
    del kept_blocks, kept_starts
    order = np.lexsort((blocks, starts))
    blocks, starts = blocks[order], starts[order]
    kept = np.ones(len(order), dtype=bool)
    if len(order) > 1 and (starts[1:] < starts[:-1] + unit).any():
        kept[:] = False
        i = 0
        while i < len(order):
            kept[i] = True
            i = int(np.searchsorted(starts, starts[i] + unit, side="left"))
        lost = np.flatnonzero(~kept)
        last = np.flatnonzero(kept)
        some = lost[:EXAMPLES]
        owners = last[np.searchsorted(last, some, side="right") - 1]
        add(Finding.many("bat-overlap", "corruption", len(lost), "blocks overlapping metadata or other blocks",
                         _examples(lambda blk, s, other: f"block {blk} at {s:#x} overlaps block {other}",
                                   blocks[some], starts[some], blocks[owners]), fixable=True))
        drop[blocks[lost]] = True
    live = starts[kept]                               # offsets of the blocks kept, ascending
    report.allocated_blocks = len(live)
    if drop.any():
        newbat = bat.astype(">u4")
        newbat[drop] = BAT_UNUSED
        plan.writes.append((toff, newbat.tobytes()))
        del newbat
    if f.disk_type != DISK_DIFFERENCING:
        _check_dynamic_bitmaps(file, live, bs, report, plan)
    # Leaks: data-area bytes nothing references.
    # Gaps smaller than a block are alignment padding (Windows aligns data to 4 KiB), not leaks.
    used_end = max(meta_end, int(live[-1]) + unit) if len(live) else meta_end
    before = np.maximum(np.concatenate(([meta_end], live[:-1] + unit)), meta_end)
    gap = live - before
    gaps = int(gap[gap >= unit].sum())
    tail_leak = end_of_data - used_end
    tail_leak = tail_leak if tail_leak >= unit else 0
    if gaps:
        add(Finding("leak", "leak", f"{gaps} bytes between blocks are referenced by nothing (vdisk compact reclaims them)"))
    if tail_leak:
        add(Finding("leak-tail", "leak", f"{tail_leak} bytes at the end of the data area are referenced by nothing",
                    fixable=True))
    report.leaked_bytes = gaps + tail_leak
    new_end = -(-used_end // SECTOR) * SECTOR
    if tail_leak or eof is None or (eof is not None and not eof_ok):
        plan.final_size = new_end + FOOTER_SIZE
        plan.footer_at = new_end
    if f.disk_type == DISK_DIFFERENCING:
        _check_parent_identity(file.path, report)


def _check_locators(h, hraw: bytes, hoff: int, size: int, end_of_data: int, bat: np.ndarray, meta: list,
                    differencing: bool, add, plan: _Plan) -> list:
    """Parent locators: data inside the file, reserved space no larger than the room the file
    has for it (a claim past the data or over a block would make compaction or a repair grow
    the file, or drop the blocks). Returns the metadata regions they hold (differencing only;
    a dynamic image's locators point at nothing the format reads)."""
    # A locator's room ends at the first block at or after it: that block per locator, found a
    # chunk of the table at a time (never a copy of the whole table).
    points = [loc.platform_data_offset for loc in h.parent_locators if loc.platform_code]
    nearest = np.full(len(points), np.iinfo(np.int64).max, dtype=np.int64)
    for c0 in range(0, len(bat), 1 << 20):
        part = bat[c0:c0 + (1 << 20)]
        starts = part[part != BAT_UNUSED] * SECTOR
        starts = starts[(starts >= FOOTER_SIZE) & (starts < end_of_data)]
        for i, lo in enumerate(points):
            after = starts[starts >= lo]
            if len(after):
                nearest[i] = min(nearest[i], int(after.min()))
    blocks = nearest[nearest < np.iinfo(np.int64).max]
    others = np.concatenate([blocks, np.array([lo for lo, _ in meta], dtype=np.int64)])
    regions, cut = [], []
    for e in locator_extents(h.parent_locators, others, end_of_data):
        if differencing and e.data_end > size:
            add(Finding("locator-range", "corruption", f"parent locator {e.index} points outside the file"))
            continue
        if differencing:
            regions.append((e.start, e.end))
        if e.overclaimed:
            cut.append(e)
    for e in cut:
        add(Finding("locator-space", "corruption",
                    f"parent locator {e.index} at {e.start:#x} claims reserved space up to {e.claimed_end:#x}, "
                    f"beyond the next structure or the end of data at {e.end:#x}", fixable=True))
    if cut:
        fixed = bytearray(next((d for o, d in plan.writes if o == hoff), hraw))
        for e in cut:
            room = e.end - e.start
            at = LOCATOR_OFFSET + LOCATOR_SIZE * e.index + 4           # platform_data_space
            fixed[at:at + 4] = (room if room >= SECTOR else 0).to_bytes(4, "big")
        plan.writes[:] = [(o, d) for o, d in plan.writes if o != hoff]
        plan.writes.append((hoff, with_checksum(bytes(fixed), HEADER_CHECKSUM_OFFSET)))
    return regions


def _check_dynamic_bitmaps(file: ImageFile, live: np.ndarray, bs: int, report: CheckReport, plan: _Plan) -> None:
    """Dynamic VHD: a clear bitmap bit promises a zero sector. QEMU and vdisk read the data
    regardless, libvhdi trusts the bit: non-zero data under a clear bit reads differently in
    different tools. Only blocks whose bitmap is not all ones are read. *live*: block offsets."""
    nbytes = _bitmap_bytes(bs)
    spb = bs // SECTOR
    bad_blocks, bad_sectors = 0, 0
    for start in live.tolist():
        raw = file.pread(nbytes, start)
        bits = np.unpackbits(np.frombuffer(raw[: bitmap_used_bytes(bs)], dtype=np.uint8))[:spb].astype(bool)
        if bits.all():
            continue
        data = file.pread(bs, start + nbytes).ljust(bs, b"\0")
        nz = np.frombuffer(data, dtype=np.uint8).reshape(spb, SECTOR).any(axis=1)
        wrong = nz & ~bits
        if wrong.any():
            bad_blocks += 1
            bad_sectors += int(wrong.sum())
            fixed = np.packbits(np.concatenate([bits | nz, np.unpackbits(np.frombuffer(
                raw[: bitmap_used_bytes(bs)], dtype=np.uint8))[spb:].astype(bool)])).tobytes()
            plan.writes.append((start, fixed + raw[len(fixed):]))
    if bad_blocks:
        report.findings.append(Finding(
            "bitmap-mismatch", "corruption",
            f"{bad_sectors} sectors in {bad_blocks} blocks hold data but are marked unwritten in the sector "
            f"bitmap (tools disagree on what they read)", fixable=True))


def _check_parent_identity(path: str, report: CheckReport) -> None:
    """Find the parent the way the core does (locators / UUID scan) and verify its identity."""
    from .chain import find_parent
    from .probe import open_layer
    try:
        layer = open_layer(path, lock=False)
    except VDiskError:
        return                                   # the structural findings already explain why
    try:
        parent, _ = find_parent(layer, parent_search=report._search, vbox_registry=report._registry)
        parent.close()
    except VDiskError as exc:
        report.findings.append(Finding("parent", "corruption", f"parent: {exc}"))
    finally:
        layer.close()


# ---------------------------------------------------------------------------------------------
# VDI
# ---------------------------------------------------------------------------------------------
def _check_vdi(file: ImageFile, report: CheckReport, plan: _Plan) -> None:
    path, size = file.path, file.size()
    add = report.findings.append
    if size < PRE_HEADER_SIZE + HEADER_V1:
        report.error = f"{path}: file is {size} bytes, too small for a VDI"
        return
    pre = PreHeader.parse(file.pread(PRE_HEADER_SIZE, 0))
    if pre.signature != SIGNATURE:
        report.error = f"{path}: no VDI signature"
        return
    if pre.version == VERSION_0 or pre.version >> 16 != 1:
        report.error = f"{path}: VDI version {pre.version:#010x} cannot be checked (v1.1 only)"
        return
    raw = file.pread(HEADER_V1_PLUS, PRE_HEADER_SIZE)
    hsize = int.from_bytes(raw[:4], "little")
    if hsize < HEADER_V1:
        report.error = f"{path}: VDI header size {hsize:#x} is too small"
        return
    if len(raw) < min(hsize, HEADER_V1_PLUS):
        report.error = f"{path}: the {hsize}-byte VDI header runs past the end of the {size}-byte file"
        return
    if hsize < HEADER_V1_PLUS:
        raw = raw[:HEADER_V1] + bytes(HEADER_V1_PLUS - HEADER_V1)
    hdr = {k: v for k, v in HeaderV1.parse(raw).items() if not k.startswith("_")}
    itype, bs, extra = hdr["image_type"], hdr["block_size"], hdr["block_extra"]
    n, ob, od, counted = hdr["blocks_in_image"], hdr["offset_blocks"], hdr["offset_data"], hdr["blocks_allocated"]
    if itype not in VDI_SUBTYPES:
        report.error = f"{path}: unknown VDI image type {itype}"
        return
    report.subtype = VDI_SUBTYPES[itype]
    if bs < 512 or bs & (bs - 1) or n == 0 or ob + 4 * n > size or od < ob + 4 * n:
        report.error = f"{path}: VDI header is damaged (block size {bs}, {n} blocks, map at {ob:#x}, data at {od:#x})"
        return
    if n * bs < hdr["disk_size"]:
        add(Finding("size-mismatch", "corruption",
                    f"{n} blocks of {bs} bytes cannot hold the virtual size {hdr['disk_size']}"))
    if hdr["uuid_create"] == bytes(16) or hdr["uuid_modify"] == bytes(16):
        add(Finding("uuid-null", "corruption", "image or modification UUID is null"))
    try:                                      # the format's and vdisk's bounds, as when opening
        limits.check_table(path, "header", "blocks_in_image", None, entries=n, entry_bytes=4, table_offset=ob,
                           file_size=size, format_max=VDI_MAX_BLOCKS)
    except VDiskError as exc:
        report.error = str(exc)
        return
    slot = extra + bs
    fixed = itype == 2
    file_slots = max(0, (size - od) // slot) if not fixed else n
    # The map a chunk at a time, each chunk with numpy; owner[s] is the first entry using slot s.
    # Slots beyond the file are out of range, so owner is bounded by what the file holds.
    nobody = 0xFFFFFFFF
    owner = np.full(min(n, file_slots), nobody, dtype=np.uint32)
    unmapped, first_unmapped = 0, None                 # fixed images: entries without a slot
    for first, entries in _table_chunks(file, ob, n, "<u4"):
        if fixed:
            nomap = np.flatnonzero(entries >= BLOCK_ZERO)
            if len(nomap) and first_unmapped is None:
                first_unmapped = (first + int(nomap[0]), int(entries[nomap[0]]))
            unmapped += len(nomap)
        far = np.flatnonzero((entries < BLOCK_ZERO) & (entries >= len(owner)))
        if len(far):
            add(Finding.many("map-range", "corruption", len(far),
                             f"block map entries pointing past the image's {n} blocks or the file's "
                             f"{file_slots} slots",
                             _examples(lambda i, s: f"entry {first + i} -> slot {s}", far, entries[far[:EXAMPLES]]),
                             fixable=True))
        near = np.flatnonzero(entries < len(owner))
        slots = entries[near]
        taken, at = np.unique(slots, return_index=True)         # the first entry of each slot
        new = owner[taken] == nobody
        owner[taken[new]] = near[at[new]] + first
        shared = np.ones(len(near), dtype=bool)
        shared[at[new]] = False
        shared = np.flatnonzero(shared)
        if len(shared):
            some = slots[shared[:EXAMPLES]]
            add(Finding.many("map-overlap", "corruption", len(shared),
                             "block map entries sharing a slot with an earlier entry",
                             _examples(lambda i, s, other: f"entry {first + i} -> slot {s} of entry {other}",
                                       near[shared[:EXAMPLES]], some, owner[some]), fixable=True))
        if len(far) or len(shared):
            repaired = entries.astype("<u4")
            repaired[far] = 0xFFFFFFFF
            repaired[near[shared]] = 0xFFFFFFFF
            plan.writes.append((ob + 4 * first, repaired.tobytes()))
    in_use = np.flatnonzero(owner != nobody)
    used = len(in_use)
    report.allocated_blocks = used
    if unmapped:
        _check_fixed_vdi_map(unmapped, first_unmapped, n, used, add)
    top = int(in_use[-1]) + 1 if used else 0
    new_count = counted
    if counted < top:
        add(Finding("allocated-count", "corruption",
                    f"header counts {counted} allocated blocks but the map uses slot {top - 1} "
                    f"(the next allocation would overwrite it)", fixable=True))
        new_count = top
    elif counted > top and not fixed:
        add(Finding("allocated-count", "corruption",
                    f"header counts {counted} allocated blocks, the map references {used}", fixable=True))
        new_count = top
    if not fixed:
        holes = top - used
        tail = size - (od + top * slot)
        if holes:
            add(Finding("leak", "leak", f"{holes} slot(s) below the last used one are referenced by nothing "
                        f"(qemu-img check calls this an allocated-blocks mismatch; vdisk compact reclaims them)"))
        if tail > 0:
            add(Finding("leak-tail", "leak", f"{tail} bytes after the last used slot are referenced by nothing",
                        fixable=True))
            plan.final_size = od + top * slot
        report.leaked_bytes = holes * slot + max(0, tail)
    if new_count != counted:
        hdr["blocks_allocated"] = new_count
        plan.writes.append((PRE_HEADER_SIZE, HeaderV1.build(hdr)[:min(hsize, HEADER_V1_PLUS)]))
    if itype in (3, 4):
        _check_parent_identity(path, report)


def _check_fixed_vdi_map(unmapped: int, first: tuple[int, int], n: int, used: int, add) -> None:
    """A fixed VDI stores every block in its own slot: a free or zero map entry contradicts the
    image type (QEMU: "allocated blocks mismatch") and leaves a slot that nothing references."""
    index, value = first
    what = "zero" if value == BLOCK_ZERO else "free"
    add(Finding("fixed-unmapped", "corruption",
                f"fixed image: {unmapped} of {n} block map entries hold no slot (first: entry {index} is "
                f"{what}, {value:#010x}); {n - used} slot(s) in the file are referenced by nothing"))


def _check_vhdx(file: ImageFile, report: CheckReport) -> None:
    """VHDX: the driver's findings (formats/vhdx/check.py); nothing is repaired yet."""
    from vdisk.formats.vhdx.check import check_vhdx
    result = check_vhdx(file)
    report.subtype = result.subtype
    report.allocated_blocks = result.allocated_blocks
    report.leaked_bytes = result.leaked_bytes
    for f in result.findings:
        report.findings.append(Finding(f.kind, f.severity, f.message, fixable=f.fixable))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _analyse(path: str, report: CheckReport, plan: _Plan) -> None:
    from .probe import probe_file
    try:
        file = ImageFile(path, lock=False)
    except VDiskError as exc:
        report.error = str(exc)
        return
    try:
        try:
            kind = probe_file(file)
        except VDiskError as exc:                # a damaged VHD or VDI, not taken for raw
            report.error = str(exc)
            return
        report.format = kind
        if kind == "vhd":
            _check_vhd(file, report, plan)
        elif kind == "vdi":
            _check_vdi(file, report, plan)
        elif kind == "vhdx":
            _check_vhdx(file, report)
        else:
            report.subtype = "raw"
    finally:
        file.close()


def check(path: str, repair: bool = False, *, parent_search: Sequence[str] = (),
          vbox_registry=None) -> CheckReport:
    """Check one image file (and its link to its parent); with *repair*, fix what is safely fixable."""
    path = os.fspath(path)
    report = _new_report(path, parent_search, vbox_registry)
    if not os.path.exists(path):
        report.error = f"{path}: no such file"
        return report
    if os.path.isdir(path):
        report.error = f"{path}: is a directory"
        return report
    if journal.pending(path):
        if not repair:
            report.findings.append(Finding("journal-pending", "corruption",
                                           f"an interrupted in-place operation is pending; run 'vdisk recover {path}'",
                                           fixable=True))
            return report
        try:
            report.repairs.append(str(journal.recover(path)))
        except VDiskError as exc:
            report.error = str(exc)
            return report
    plan = _Plan()
    _analyse(path, report, plan)
    if not repair or report.error is not None or not any(f.fixable for f in report.findings):
        return report
    before = report
    try:
        done = _repair(path, before, plan)
    except VDiskError as exc:
        before.error = f"repair failed: {exc}"
        return before
    after = _new_report(path, parent_search, vbox_registry)
    after.repairs = before.repairs + done
    after.repaired_kinds = sorted({f.kind for f in before.findings if f.fixable})
    _analyse(path, after, _Plan())
    return after


def _new_report(path, parent_search, vbox_registry) -> CheckReport:
    report = CheckReport(path)
    report._search = tuple(parent_search)
    report._registry = vbox_registry
    return report


def _repair(path: str, report: CheckReport, plan: _Plan) -> list[str]:
    if report.format == "vhdx":
        from vdisk.formats.vhdx.check import repair_vhdx
        return repair_vhdx(path, {f.kind for f in report.findings if f.fixable})
    done = []
    file = ImageFile(path, writable=True)
    try:
        if plan.final_size is not None and plan.final_size > file.size() + FOOTER_SIZE:
            # A repair cuts or puts back a footer; more growth means a layout claim the file
            # does not back. Refuse before anything is written.
            raise VDiskError(f"{path}: the repair would grow the file from {file.size()} to {plan.final_size} bytes")
        with journal.Transaction(file, "repair") as tx:
            if plan.writes:
                tx.write_many(plan.writes)
            redo = []
            final = plan.final_size
            if report.format == "vhd" and plan.footer is not None and final is not None:
                redo.append((plan.footer_at if plan.footer_at is not None else final - FOOTER_SIZE, plan.footer))
            tx.commit(final_size=final, redo=redo)
    finally:
        file.close()
    kinds = {f.kind for f in report.findings if f.fixable}
    messages = {
        "footer-missing": "wrote the footer at the end of the file from the copy at offset 0",
        "footer-checksum": "rewrote the footer at the end of the file",
        "footer-copy-missing": "rewrote the footer copy at offset 0",
        "footer-copy-checksum": "rewrote the footer copy at offset 0",
        "footer-mismatch": "rewrote the footer copy at offset 0 from the footer at the end",
        "header-checksum": "recomputed the dynamic header checksum",
        "bat-range": "dropped BAT entries that pointed outside the data area",
        "bat-overlap": "dropped BAT entries whose blocks overlapped other blocks or metadata",
        "map-range": "dropped block map entries that pointed beyond the image",
        "map-overlap": "dropped block map entries that shared a slot",
        "allocated-count": "corrected the header's allocated-block counter",
        "bitmap-mismatch": "marked the sectors that hold data as written in the sector bitmaps",
        "leak-tail": "truncated the unreferenced bytes at the end of the file",
        "locator-space": "cut the reserved space of parent locators to the room the file has for them",
    }
    for kind in sorted(kinds):
        if kind in messages:
            done.append(messages[kind])
    return done
