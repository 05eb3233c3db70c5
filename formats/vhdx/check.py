"""What ``vdisk check`` reports about a VHDX file: structure, header and region-table copies, the
log, and space no structure uses (VHDX.md A2). Read-only: a pending log is examined in memory."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vdisk.errors import VDiskError
from vdisk.io import ImageFile
from .structs import HEADER_SECTION, OFFSET_MASK, SB_BLOCK_SIZE, SB_PRESENT, MiB


@dataclass
class VhdxFinding:
    kind: str
    severity: str            # "corruption" or "leak"
    message: str
    fixable: bool = False


#: What :func:`repair_vhdx` does for each fixable kind.
REPAIRS = {
    "log-pending": "replayed the log into the file and cleared it",
    "header-copy": "rewrote the damaged header from the current one",
    "region-table-copy": "rewrote region table copy 1 from copy 2",
}


@dataclass
class VhdxCheck:
    subtype: str = "unknown"
    allocated_blocks: int = 0
    leaked_bytes: int = 0
    findings: list = None


def check_vhdx(file: ImageFile) -> VhdxCheck:
    """Open *file* read-only as a VHDX and list what is wrong with it."""
    from .open import open_vhdx
    out = VhdxCheck(findings=[])
    try:
        layer = open_vhdx(file)
    except VDiskError as exc:
        out.findings.append(VhdxFinding("structure", "corruption", str(exc)))
        return out
    path = file.path
    out.subtype = layer.subtype
    out.allocated_blocks = int((layer.block_map >= 0).sum())
    h = layer.headers
    other = 1 - h.index
    if h.slots[other] is None:
        # A cut during a header update leaves this; the next update rewrites that slot first.
        out.findings.append(VhdxFinding("header-copy", "leak",
                                        f"{path}: header {other + 1} is damaged ({h.problems[other]}); header "
                                        f"{h.index + 1} is current and the next write rewrites the other", fixable=True))
    for w in layer.warnings:
        if "region table copy 1" in w:
            out.findings.append(VhdxFinding("region-table-copy", "corruption", w, fixable=True))
    log = layer.replay_info
    if log.get("state") == "replayed":
        out.findings.append(VhdxFinding("log-pending", "leak",
                                        f"{path}: the log holds {log['entries']} entries ({log['updates']} updates) "
                                        f"not yet applied; a read-write open replays them", fixable=True))
    # Space no structure uses: between and after blocks, in 1 MiB units.
    spans = [(0, HEADER_SECTION)]
    cur = h.current
    if cur["log_length"]:
        spans.append((cur["log_offset"], cur["log_offset"] + cur["log_length"]))
    spans += [(r.offset, r.offset + r.length) for r in layer.regions]
    bat = layer.bat
    # UNMAPPED entries may keep their block's storage (VHDX.md §6): used, not leaked
    present = ((bat & 7) >= 6) | (((bat & 7) == 3) & ((bat & OFFSET_MASK) != 0))
    idx = np.flatnonzero(present)
    offs = (bat[idx] & OFFSET_MASK).astype(np.int64)
    is_sb = (idx % (layer.cr + 1)) == layer.cr
    lens = np.where(is_sb & ((bat[idx] & 7) == SB_PRESENT) & layer.md.has_parent, SB_BLOCK_SIZE, layer.block_size)
    starts = np.concatenate([np.array([s for s, _ in spans], dtype=np.int64), offs])
    ends = np.concatenate([np.array([e for _, e in spans], dtype=np.int64), offs + lens])
    order = np.argsort(starts)
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    size = file.size()
    gaps = np.clip(starts[1:], None, size) - np.clip(ends[:-1], None, size)
    # Space between the fixed structures and the first block is layout (qemu puts its first
    # block at 8 MiB), not a leak; space after it is.
    first = int(offs.min()) if len(offs) else size
    inner = int(gaps[(gaps > 0) & (ends[:-1] >= first)].sum())
    tail = max(0, size - int(ends[-1]))
    if tail < MiB:                                       # a partial last MiB is alignment, not a leak
        tail = 0
    out.leaked_bytes = inner + tail
    if out.leaked_bytes:
        out.findings.append(VhdxFinding("leak", "leak", f"{path}: {out.leaked_bytes} bytes of the file are used by "
                                                        f"no structure (blocks of an interrupted allocation?)"))
    return out


def repair_vhdx(path: str, kinds: set) -> list[str]:
    """Fix what :func:`check_vhdx` marks fixable: a read-write open replays a pending log (A3);
    a header update rewrites the damaged slot first; copy 2 of the region table replaces a
    damaged copy 1 (copy 2 stays valid throughout, so a cut leaves a readable file)."""
    from .open import open_vhdx
    from .structs import REGION_OFFSETS, REGION_TABLE_SIZE
    file = ImageFile(path, writable=True)
    try:
        layer = open_vhdx(file)                        # replays the log in place
        h = layer.headers
        if "header-copy" in kinds and h.slots[1 - h.index] is None:
            h.update(file)
        if "region-table-copy" in kinds and getattr(layer, "region_copy", 0) == 1:
            file.pwrite(file.pread(REGION_TABLE_SIZE, REGION_OFFSETS[1]), REGION_OFFSETS[0])
            file.sync()
    finally:
        file.close()
    return [REPAIRS[k] for k in sorted(kinds) if k in REPAIRS]
