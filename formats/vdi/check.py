"""`vdisk check` for VDI: the pre-header and header, the block map (range, sharing, the
allocated count) and the slots, parsed leniently from the structure declarations. Repairs go
into a RepairPlan the generic check applies in one journal transaction."""
from __future__ import annotations

import numpy as np

from vdisk import limits
from vdisk.errors import VDiskError
from vdisk.io import ImageFile
from ..findings import EXAMPLES, CheckReport, Finding, RepairPlan, examples_of, table_chunks
from .image import MAX_BLOCKS as VDI_MAX_BLOCKS
from .structs import (BLOCK_ZERO, HEADER_V1, HEADER_V1_PLUS, PRE_HEADER_SIZE, SIGNATURE,
                      SUBTYPE_NAMES as VDI_SUBTYPES, TYPE_DIFF, TYPE_UNDO, VERSION_0, HeaderV1, PreHeader)

#: what --repair says it did, per kind of finding it fixed
REPAIRS = {
    "map-range": "dropped block map entries that pointed beyond the image",
    "map-overlap": "dropped block map entries that shared a slot",
    "allocated-count": "corrected the header's allocated-block counter",
    "leak-tail": "truncated the unreferenced bytes at the end of the file",
}


def check(file: ImageFile, report: CheckReport, plan: RepairPlan) -> None:
    """Every VDI finding about *file*, leniently parsed; the repair writes into *plan*."""
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
    for first, entries in table_chunks(file, ob, n, "<u4"):
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
                             examples_of(lambda i, s: f"entry {first + i} -> slot {s}", far, entries[far[:EXAMPLES]]),
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
                             examples_of(lambda i, s, other: f"entry {first + i} -> slot {s} of entry {other}",
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
    plan.check_parent = itype in (TYPE_UNDO, TYPE_DIFF)


def _check_fixed_vdi_map(unmapped: int, first: tuple[int, int], n: int, used: int, add) -> None:
    """A fixed VDI stores every block in its own slot: a free or zero map entry contradicts the
    image type (QEMU: "allocated blocks mismatch") and leaves a slot that nothing references."""
    index, value = first
    what = "zero" if value == BLOCK_ZERO else "free"
    add(Finding("fixed-unmapped", "corruption",
                f"fixed image: {unmapped} of {n} block map entries hold no slot (first: entry {index} is "
                f"{what}, {value:#010x}); {n - used} slot(s) in the file are referenced by nothing"))
