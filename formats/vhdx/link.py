"""Rewriting a differencing VHDX's parent link (`vdisk relink` / `rebase`, VHDX.md §8, A7).

The parent locator is a metadata item: a new one (parent_linkage = the new parent's
DataWriteGuid, relative and absolute paths) is written in place when it fits the old item's room,
else after the last item of the metadata region, and the metadata table entry points at it. The
changed 4 KiB sectors go through the file's own log, so a cut at any write leaves a file that
Hyper-V, QEMU and vdisk replay to the old link or the new one. Only FileWriteGuid changes: the
data is the same, and the children of this image link to its DataWriteGuid.
"""
from __future__ import annotations

import uuid as uuidlib

from vdisk.errors import UnsupportedError
from ..base import Layer
from ..maintenance import LinkPlan
from .create import _locator, _parent_pairs
from .log import SectorEdits
from .metadata import linkage_bytes
from .open import locator_hints
from .structs import ITEM_PARENT_LOCATOR, LOG_SECTOR, METADATA_GUID, METADATA_TABLE_SIZE, MetadataEntry

#: locator keys a relink sets; the others (volume_path, parent_linkage2) would name the old parent
_DROPPED = ("volume_path", "parent_linkage2")


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


def link_writes(layer: Layer, parent_path: str, parent: Layer, apply: bool) -> LinkPlan:
    """Make the differencing VHDX *layer* name *parent* (a VHDX at *parent_path*)."""
    if parent.format != "vhdx":
        raise UnsupportedError(f"{layer.path}: a VHDX child needs a VHDX parent, not {parent.format}")
    old = dict(layer.md.locator)
    new = dict(_parent_pairs(layer.path, parent, parent_path))
    changes = []
    for key in ("parent_linkage", "relative_path", "absolute_win32_path"):
        if old.get(key) != new[key]:
            changes.append(f"set {key} to {new[key]!r} (was {old.get(key)!r})")
    for key in _DROPPED:
        if key in old:
            changes.append(f"drop {key} {old[key]!r} (it names the old parent)")
    if not changes or not apply:
        return LinkPlan([], changes)
    _rewrite_locator(layer, list(new.items()))
    layer.md.locator = new
    layer.parent_id = linkage_bytes(new["parent_linkage"])
    layer.parent_hints = locator_hints(new)
    return LinkPlan([], changes)


def _rewrite_locator(layer: Layer, pairs: list[tuple[str, str]]) -> None:
    raw = layer.raw
    region = next(r for r in layer.regions if r.guid == METADATA_GUID)
    table = bytearray(raw.pread(METADATA_TABLE_SIZE, region.offset))
    count = int.from_bytes(table[10:12], "little")
    entries = [MetadataEntry.parse(bytes(table[32 + 32 * i:64 + 32 * i])) for i in range(count)]
    index = next((i for i, e in enumerate(entries) if e.item_id == ITEM_PARENT_LOCATOR), None)
    if index is None:
        raise UnsupportedError(f"{layer.path}: no parent locator item to rewrite")
    item = _locator(pairs)
    here = entries[index]
    others = [e for i, e in enumerate(entries) if i != index and e.length]
    # The room the old item has: up to the next item (or the region's end).
    after = min((e.offset for e in others if e.offset >= here.offset + here.length), default=region.length)
    if len(item) <= after - here.offset:
        at = here.offset
    else:
        at = _round_up(max([e.offset + e.length for e in others] + [here.offset + here.length]), 8)
        if at + len(item) > region.length:
            raise UnsupportedError(f"{layer.path}: the new parent locator ({len(item)} bytes) does not fit in "
                                   f"the metadata region ({region.length} bytes)")
    entry = dict(item_id=here.item_id, offset=at, length=len(item), flags=here.flags, reserved=0)
    table[32 + 32 * index:64 + 32 * index] = MetadataEntry.build(entry)
    edits = SectorEdits(raw)
    put = edits.put

    put(region.offset + at, item)
    put(region.offset, bytes(table[:_round_up(32 + 32 * count, LOG_SECTOR)]))
    # A changed file, unchanged data: a new FileWriteGuid only (VHDX.md A5.1).
    layer.headers.update(raw, file_write_guid=uuidlib.uuid4().bytes_le)
    layer._log_write(edits.writes())
    raw.sync()
