"""What `vdisk info` and `vdisk map` report about an image, as plain JSON-ready data.

    with vdisk.open("disk.vhd") as d:
        facts = image_info(d)          # dict with the stable keys listed in INFO_KEYS
        for run in iter_map(d):        # dicts with the keys in MAP_KEYS, one run at a time
            ...

:func:`info_for_path` also describes a differencing image whose parent cannot be found (the
image's own facts, with ``parent_error`` saying what is missing) instead of failing.

Memory: both walk the disk with :func:`vdisk.ops.runs.iter_runs`, so beyond the block maps the open
image holds anyway (8 bytes per table entry) they keep a bounded window of runs, whatever the
number of runs; :func:`image_map` alone builds the whole list, for callers that want one.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

from vdisk.chain import layer_info
from vdisk.disk import Disk
from vdisk.engine import ExtentKind
from vdisk.formats.registry import driver_for
from vdisk.errors import ParentError
from vdisk.probe import open_layer
from vdisk.ops.runs import iter_runs

#: Keys of :func:`image_info`'s dict (always present; null where they do not apply).
INFO_KEYS = ("path", "format", "subtype", "virtual_size", "chs_size", "block_size", "file_size",
             "disk_usage", "allocated_bytes", "zero_bytes", "unallocated_bytes", "uuid", "parent_uuid",
             "creator", "geometry", "chain", "chain_complete", "parent_error", "warnings", "details")
#: Keys of each entry of ``info["chain"]`` (top image first).
CHAIN_KEYS = ("path", "format", "subtype", "uuid", "parent_uuid", "found_by", "virtual_size",
              "block_size", "file_size", "allocated_blocks")
#: Keys of each entry of :func:`image_map`.
MAP_KEYS = ("start", "length", "kind", "layer", "file", "offset")

KIND_NAMES = {ExtentKind.DATA: "data", ExtentKind.ZERO: "zero", ExtentKind.UNALLOCATED: "unallocated"}


def _uuid(value) -> Optional[str]:
    return None if value is None else str(value)


def _file_stats(path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_blocks * 512


def _chs_size(layer) -> Optional[int]:
    """The C*H*S size when a format's geometry makes another size visible (what qemu may show)."""
    return driver_for(layer).chs_size(layer)


def _chain_entry(layer, info) -> dict:
    file_size, _ = _file_stats(layer.path)
    bmap = layer.block_map
    return {
        "path": layer.path, "format": layer.format, "subtype": layer.subtype,
        "uuid": _uuid(info.uuid), "parent_uuid": _uuid(info.parent_uuid), "found_by": info.found_by,
        "virtual_size": layer.size, "block_size": layer.block_size, "file_size": file_size,
        "allocated_blocks": int((bmap >= 0).sum()),
        "details": layer.info(),
    }


def _usage(disk: Disk) -> dict:
    by_kind = {kind: 0 for kind in KIND_NAMES}
    for _, length, kind, _, _ in iter_runs(disk):
        by_kind[kind] += length
    return {KIND_NAMES[kind]: total for kind, total in by_kind.items()}


def image_info(disk: Disk, *, parent_error: Optional[str] = None) -> dict:
    """Everything `vdisk info` shows about an open Disk (see INFO_KEYS and docs/cli.md)."""
    top = disk.layers[0]
    file_size, usage = _file_stats(disk.path)
    totals = _usage(disk)
    geo = disk.geometry
    chain = [_chain_entry(layer, info) for layer, info in zip(disk.layers, disk.chain)]
    return {
        "path": disk.path,
        "format": disk.format,
        "subtype": disk.subtype,
        "virtual_size": disk.size,
        "chs_size": _chs_size(top),
        "block_size": disk.block_size,
        "file_size": file_size,
        "disk_usage": usage,
        "allocated_bytes": totals["data"],
        "zero_bytes": totals["zero"],
        "unallocated_bytes": totals["unallocated"],
        "uuid": _uuid(disk.uuid),
        "parent_uuid": _uuid(disk.chain[0].parent_uuid),
        "creator": top.creator,
        "geometry": None if not geo else {"cylinders": geo[0], "heads": geo[1], "sectors_per_track": geo[2]},
        "chain": chain,
        "chain_complete": parent_error is None,
        "parent_error": parent_error,
        "warnings": list(disk.warnings),
        "details": top.info(),
    }


def info_for_path(path: str, *, format: Optional[str] = None, parent_search: Sequence[str] = (),
                  size_policy: str = "current") -> dict:
    """:func:`image_info` for a file; a missing parent is reported, not raised."""
    from vdisk import open as vopen
    try:
        with vopen(path, format=format, parent_search=parent_search, size_policy=size_policy) as d:
            return image_info(d)
    except ParentError as exc:
        from vdisk.backup import is_backup
        if format is None and is_backup(path):
            raise                       # an incremental backup alone is no disk (not a raw file either)
        layer = open_layer(os.fspath(path), fmt=format, size_policy=size_policy)
        alone = Disk([layer], [layer_info(layer, "opened")], read_only=True)
        try:
            return image_info(alone, parent_error=str(exc))
        finally:
            alone.close()


def iter_map(disk: Disk) -> Iterator[dict]:
    """Runs of the virtual disk like `qemu-img map`: where each is stored (layer, file, offset),
    one dict at a time (memory stays flat however many runs the disk has)."""
    paths = [info.path for info in disk.chain]
    for voff, length, kind, level, foff in iter_runs(disk):
        data = kind == ExtentKind.DATA
        yield {
            "start": int(voff), "length": int(length), "kind": KIND_NAMES[kind],
            "layer": None if level < 0 else int(level),
            "file": paths[level] if data else None,
            "offset": int(foff) if data else None,
        }


def image_map(disk: Disk) -> list[dict]:
    """:func:`iter_map` as one list."""
    return list(iter_map(disk))
