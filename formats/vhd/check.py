"""`vdisk check` for VHD: the footer (both copies), the dynamic header, the BAT, parent locators
and sector bitmaps, parsed leniently from the structure declarations (the open refuses much of
what is reported here). Repairs go into a RepairPlan the generic check applies in one journal
transaction."""
from __future__ import annotations

import numpy as np

from vdisk import limits
from vdisk.errors import VDiskError
from vdisk.io import ImageFile
from ..base import SECTOR
from .. import findings
from ..findings import EXAMPLES, CheckReport, Finding, RepairPlan, examples_of, first_rows
from .image import MAX_DYNAMIC_SIZE, _bitmap_bytes, bitmap_used_bytes
from .locators import locator_extents
from .structs import (BAT_UNUSED, DISK_DIFFERENCING, DISK_FIXED, FOOTER_CHECKSUM_OFFSET, FOOTER_COOKIE,
                      FOOTER_SIZE, HEADER_CHECKSUM_OFFSET, HEADER_COOKIE, HEADER_FIELD_OFFSETS, HEADER_SIZE,
                      LOCATOR_OFFSET, LOCATOR_SIZE, SUBTYPE_NAMES as VHD_SUBTYPES, DynamicHeader, Footer,
                      vhd_checksum, with_checksum)

#: what --repair says it did, per kind of finding it fixed
REPAIRS = {
    "footer-missing": "wrote the footer at the end of the file from the copy at offset 0",
    "footer-checksum": "rewrote the footer at the end of the file",
    "footer-copy-missing": "rewrote the footer copy at offset 0",
    "footer-copy-checksum": "rewrote the footer copy at offset 0",
    "footer-mismatch": "rewrote the footer copy at offset 0 from the footer at the end",
    "header-checksum": "recomputed the dynamic header checksum",
    "bat-range": "dropped BAT entries that pointed outside the data area",
    "bat-overlap": "dropped BAT entries whose blocks overlapped other blocks or metadata",
    "bitmap-mismatch": "marked the sectors that hold data as written in the sector bitmaps",
    "leak-tail": "truncated the unreferenced bytes at the end of the file",
    "locator-space": "cut the reserved space of parent locators to the room the file has for them",
}


def _footer_sane(f) -> bool:
    return (f.cookie == FOOTER_COOKIE and f.format_version >> 16 == 1 and f.disk_type in VHD_SUBTYPES
            and 0 < f.current_size <= (1 << 48))


def check(file: ImageFile, report: CheckReport, plan: RepairPlan) -> None:
    """Every VHD finding about *file*, leniently parsed; the repair writes into *plan*."""
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
    plan.trailer = footer_raw
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
    for c0 in range(0, n, findings.CHECK_CHUNK):
        part = bat[c0:c0 + findings.CHECK_CHUNK]
        alloc = np.flatnonzero(part != BAT_UNUSED)
        starts = part[alloc] * SECTOR
        bad = (starts + unit > end_of_data) | (starts < FOOTER_SIZE)
        if bad.any():
            add(Finding.many("bat-range", "corruption", int(bad.sum()),
                             f"BAT entries pointing outside the data area, which ends at {end_of_data:#x}",
                             examples_of(lambda blk, s: f"entry {c0 + blk} -> {s:#x}..{s + unit:#x}",
                                       *first_rows(bad, alloc, starts)), fixable=True))
        region = np.full(len(alloc), -1, dtype=np.int8)   # the first metadata region each block overlaps
        for i, (lo, hi) in reversed(list(enumerate(meta))):
            region[~bad & (starts < hi) & (starts + unit > lo)] = i
        hit = region >= 0
        if hit.any():
            add(Finding.many("bat-overlap", "corruption", int(hit.sum()), "blocks overlapping metadata or other blocks",
                             examples_of(lambda blk, s, i: f"block {c0 + blk} at {s:#x} overlaps metadata at "
                                                         f"{meta[i][0]:#x}..{meta[i][1]:#x}",
                                       *first_rows(hit, alloc, starts, region)), fixable=True))
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
                         examples_of(lambda blk, s, other: f"block {blk} at {s:#x} overlaps block {other}",
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
        plan.trailer_at = new_end
    plan.check_parent = f.disk_type == DISK_DIFFERENCING


def _check_locators(h, hraw: bytes, hoff: int, size: int, end_of_data: int, bat: np.ndarray, meta: list,
                    differencing: bool, add, plan: RepairPlan) -> list:
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


def _check_dynamic_bitmaps(file: ImageFile, live: np.ndarray, bs: int, report: CheckReport, plan: RepairPlan) -> None:
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
