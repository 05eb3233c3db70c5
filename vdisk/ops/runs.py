"""The runs of a whole disk in bounded memory: ``Disk.map_runs`` one window at a time.

    for start, length, kind, layer, file_offset in iter_runs(disk):
        ...

``Disk.map_runs(0, disk.size)`` builds one list of every run; a differencing VHD written every
other sector has a run per sector, so that list grows with the virtual size. :func:`iter_runs`
yields the same runs (identical tuples: runs are merged across windows exactly as within one)
while holding at most about :data:`WINDOW_RUNS` of them. Each window is as large as the block
maps allow: before resolving a stretch, the runs it can produce are bounded from the maps alone
(an allocated block of a sector-granular layer can split into one run per sector, any other
stored or zero block into three), so sparse stretches are crossed in a few large windows and
dense ones in small windows.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from vdisk.formats.base import ABSENT, SECTOR

from vdisk.disk import Disk
from vdisk.engine import DATA

#: Upper bound of the runs one window may produce (each a 5-tuple: a few MiB at most).
WINDOW_RUNS = 1 << 15
#: Smallest and first window; a window never covers more than WINDOW_BLOCKS blocks of a layer.
MIN_WINDOW = 64 << 10
WINDOW_BLOCKS = 1 << 20


def _run_bound(layers, start: int, end: int) -> int:
    """At most how many runs ``resolve(start, end - start)`` yields, from the block maps alone."""
    by_sectors = len(layers) * ((end - start) // SECTOR + 3)
    total = 1
    for layer in layers:
        stop = min(end, layer.size)
        total += 1                                    # the layer's end can cut a run
        if start >= stop:
            continue
        bs = layer.block_size
        entries = layer.block_map[start // bs: -(-stop // bs)]
        if layer.sector_granular:
            stored = int(np.count_nonzero(entries >= 0))
            total += stored * (bs // SECTOR + 2) + 3 * int(np.count_nonzero(entries < ABSENT))
        else:
            total += 3 * int(np.count_nonzero(entries != ABSENT))
        if total >= by_sectors:
            return by_sectors
    return total


def iter_runs(disk: Disk, offset: int = 0, length: Optional[int] = None) -> Iterator[tuple]:
    """(offset, length, kind, layer or -1, file offset or -1) runs of ``disk`` over
    [offset, offset + length), equal to ``disk.map_runs(offset, length)`` but produced in windows."""
    end = disk.size if length is None else offset + length
    if end <= offset:
        return
    layers = disk.layers
    cap = WINDOW_BLOCKS * min(layer.block_size for layer in layers)
    window = MIN_WINDOW
    pending = None
    pos = offset
    while pos < end:
        while window < cap and pos + window < end and _run_bound(layers, pos, pos + 2 * window) <= WINDOW_RUNS:
            window *= 2
        while window > MIN_WINDOW and _run_bound(layers, pos, min(end, pos + window)) > WINDOW_RUNS:
            window //= 2
        stop = min(end, pos + window)
        for run in disk.map_runs(pos, stop - pos):
            if pending is None:
                pending = run
            elif (run[2] == pending[2] and run[3] == pending[3] and pending[0] + pending[1] == run[0]
                  and (run[2] != DATA or pending[4] + pending[1] == run[4])):
                pending = (pending[0], pending[1] + run[1], pending[2], pending[3], pending[4])
            else:
                yield pending
                pending = run
        pos = stop
    if pending is not None:
        yield pending
