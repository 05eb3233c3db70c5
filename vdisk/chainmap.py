"""The resolved map of a chain: for each top-layer block, which layer holds which bytes.

Resolving a read through a differencing chain asks every layer in turn ("is it here? which
sectors?"), so its cost grows with the chain's depth. :class:`ChainMap` resolves a block once, on
its first read, into a short list of runs (start, layer, file offset) and serves later reads of
that block with one dictionary lookup and a bisection, whatever the depth.

Bounded memory: at most ``max_blocks`` blocks and ``max_runs`` runs in all are kept (by default
4096 and 65536, about 8 MiB at worst); beyond that the oldest resolved blocks are dropped first.
A block fragmented into more than an eighth of the run budget is served without being kept.

Consistency: every write, zeroing or discard through any engine invalidates the blocks it touched
in every map built over the written layer (:func:`changed`); an entry also records the top layer's
block-map entry it was built from and is rebuilt when that entry changed (allocation, compaction,
unmap by a maintenance operation). Layers below the top are opened read-only.
"""
from __future__ import annotations

import threading
import weakref
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vdisk.formats.base import Layer

#: default budget: resolved blocks kept, and runs kept over all of them
MAX_BLOCKS = 4096
MAX_RUNS = 65536

_DATA = 0     # ExtentKind.DATA (engine.py); the other kinds read as zeros


class ChainMap:
    """Lazily resolved runs of an engine's chain, one entry per top-layer block."""

    def __init__(self, engine, max_blocks: int = MAX_BLOCKS, max_runs: int = MAX_RUNS):
        self.engine = engine
        self.max_blocks = max(1, max_blocks)
        self.max_runs = max(1, max_runs)
        self.block_size = engine.top.block_size
        #: block -> (top block-map entry, run starts (+ end sentinel), layer levels (-1: zeros), file offsets,
        #: the (level, file delta) read first across runs or None)
        self.entries: dict[int, tuple] = {}
        self.runs = 0
        self._gen = 0
        self._lock = threading.Lock()
        for layer in engine.layers:
            _watchers(layer).add(self)

    def read(self, view: memoryview, offset: int, block: int, top_entry: int) -> None:
        """Fill *view* (inside *block*) from the chain, resolving the block on first use."""
        ent = self.entries.get(block)
        if ent is None or ent[0] != top_entry:
            ent = self._build(block, top_entry)
        _, starts, levels, foffs, dom = ent
        end = offset + len(view)
        i = bisect_right(starts, offset) - 1
        last = bisect_left(starts, end) - 1
        layers = self.engine.layers
        if dom is not None and last - i >= 2:
            # Many runs: one read of the layer holding most of the block, across the runs of the
            # others too, then the others on top of it: about half the system calls.
            level, delta = dom
            mine = [k for k in range(i, last + 1) if levels[k] == level and foffs[k] - starts[k] == delta]
            if len(mine) > 1:
                lo, hi = max(offset, starts[mine[0]]), min(end, starts[mine[-1] + 1])
                self._pread(layers[level], view[lo - offset:hi - offset], lo + delta)
                for k in range(i, last + 1):
                    lv = levels[k]
                    if lv != level or foffs[k] - starts[k] != delta:
                        self._piece(layers, view, offset, end, starts, lv, foffs[k], k)
                return
        for k in range(i, last + 1):
            self._piece(layers, view, offset, end, starts, levels[k], foffs[k], k)

    def _piece(self, layers, view: memoryview, offset: int, end: int, starts: list, level: int,
               foff: int, k: int) -> None:
        pos = starts[k]
        if pos < offset:
            foff += offset - pos
            pos = offset
        stop = starts[k + 1]
        if stop > end:
            stop = end
        piece = view[pos - offset: stop - offset] if (pos != offset or stop != end) else view
        if level < 0:
            piece[:] = bytes(stop - pos)
        else:
            self._pread(layers[level], piece, foff)

    def _pread(self, layer, piece: memoryview, foff: int) -> None:
        # Through the I/O seam like every read: an error or an early end of file is a ReadError.
        layer.file.readinto_exact(piece, foff)

    def _build(self, block: int, top_entry: int) -> tuple:
        with self._lock:
            gen = self._gen
        bs = self.block_size
        start = block * bs
        end = min(start + bs, self.engine.size)
        runs = self.engine.resolve(start, end - start)
        starts = [r[0] for r in runs]
        starts.append(end)
        levels = [r[3] if r[2] == _DATA else -1 for r in runs]
        foffs = [r[4] for r in runs]
        ent = (top_entry, starts, levels, foffs, _dominant(runs))
        n = len(runs)
        if n <= self.max_runs // 8 or n == 1:
            with self._lock:
                if gen == self._gen:           # no write ran meanwhile: the runs are current
                    old = self.entries.pop(block, None)
                    if old is not None:
                        self.runs -= len(old[2])
                    self.entries[block] = ent
                    self.runs += n
                    self._evict()
        return ent

    def _evict(self) -> None:
        entries = self.entries
        while len(entries) > self.max_blocks or (self.runs > self.max_runs and len(entries) > 1):
            oldest = next(iter(entries))
            self.runs -= len(entries.pop(oldest)[2])

    def invalidate(self, offset: int, length: int) -> None:
        """Forget the blocks overlapping [offset, offset+length)."""
        bs = self.block_size
        with self._lock:
            self._gen += 1
            if not self.entries:
                return
            b0, b1 = offset // bs, (offset + max(length, 1) - 1) // bs + 1
            if b1 - b0 > len(self.entries):
                drop = [b for b in self.entries if b0 <= b < b1]
            else:
                drop = [b for b in range(b0, b1) if b in self.entries]
            for b in drop:
                self.runs -= len(self.entries.pop(b)[2])

    def clear(self) -> None:
        """Forget everything (after a change this map cannot see block by block)."""
        with self._lock:
            self._gen += 1
            self.entries.clear()
            self.runs = 0


def _dominant(runs: list) -> Optional[tuple[int, int]]:
    """(layer level, file offset - virtual offset) of the stored runs covering most bytes, if several."""
    sizes: dict[tuple[int, int], list[int]] = {}
    for voff, n, kind, level, foff in runs:
        if kind == _DATA:
            acc = sizes.setdefault((level, foff - voff), [0, 0])
            acc[0] += n
            acc[1] += 1
    if not sizes:
        return None
    key, (_, count) = max(sizes.items(), key=lambda kv: kv[1][0])
    return key if count > 1 else None


def _watchers(layer: "Layer") -> "weakref.WeakSet[ChainMap]":
    w = layer.__dict__.get("_chain_maps")
    if w is None:
        w = layer.__dict__["_chain_maps"] = weakref.WeakSet()
    return w


def changed(layer: "Layer", offset: int, length: int) -> None:
    """A write to *layer* changed [offset, offset+length): invalidate every map built over it."""
    w = layer.__dict__.get("_chain_maps")
    if w:
        for m in list(w):
            m.invalidate(offset, length)
