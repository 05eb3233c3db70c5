"""Turn free runs into image blocks that may be given up.

Every image block gets a count of the free bytes that lie in it; a block is reclaimable only when
that count is its whole length. Free runs of one filesystem never overlap, and volumes never
overlap, so the count can only reach the length when every byte of the block is free: a block
that holds one used byte of any cluster is never planned. Memory is one int64 per image block.
"""
from __future__ import annotations

import numpy as np

from .base import FreeChunk, chunk_runs


class BlockPlan:
    """Accumulates free runs (absolute byte offsets) into per-block free-byte counts."""

    def __init__(self, disk_size: int, block_size: int):
        self.size, self.bs = disk_size, block_size
        self.nblocks = -(-disk_size // block_size)
        self.counts = np.zeros(self.nblocks, dtype=np.int64)
        self._full = np.zeros(self.nblocks + 1, dtype=np.int64)     # difference array of whole blocks

    def add_runs(self, starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> None:
        """Add the runs [starts, ends) clipped to the volume [lo, hi)."""
        s = np.clip(np.asarray(starts, dtype=np.int64), lo, hi)
        e = np.clip(np.asarray(ends, dtype=np.int64), lo, hi)
        keep = e > s
        s, e = s[keep], e[keep]
        if not len(s):
            return
        bs = self.bs
        b0, b1 = s // bs, (e - 1) // bs
        one = b0 == b1
        np.add.at(self.counts, b0[one], (e - s)[one])
        m = ~one
        b0, b1, s, e = b0[m], b1[m], s[m], e[m]
        np.add.at(self.counts, b0, (b0 + 1) * bs - s)
        np.add.at(self.counts, b1, e - b1 * bs)
        inner = b1 > b0 + 1
        np.add.at(self._full, b0[inner] + 1, bs)
        np.add.at(self._full, b1[inner], -bs)

    def sink(self, lo: int, hi: int):
        """A FreeMap sink adding chunks of a volume that starts at byte *lo* and ends at *hi*."""
        def take(chunk: FreeChunk) -> None:
            s, e = chunk_runs(chunk)
            self.add_runs(s + lo, e + lo, lo, hi)
        return take

    def free_blocks(self) -> np.ndarray:
        """True for every image block whose every byte is free."""
        total = self.counts + np.cumsum(self._full)[: self.nblocks]
        lengths = np.full(self.nblocks, self.bs, dtype=np.int64)
        if self.nblocks:
            lengths[-1] = self.size - (self.nblocks - 1) * self.bs
        return total == lengths

    def bytes_in(self, mask: np.ndarray, lo: int, hi: int) -> int:
        """Bytes of [lo, hi) that lie in blocks marked in *mask*."""
        if hi <= lo:
            return 0
        bs = self.bs
        b0, b1 = lo // bs, (hi - 1) // bs
        if b0 == b1:
            return int(mask[b0]) * (hi - lo)
        inner = int(np.count_nonzero(mask[b0 + 1:b1])) * bs
        last = min(self.size, (b1 + 1) * bs)
        return inner + int(mask[b0]) * ((b0 + 1) * bs - lo) + int(mask[b1]) * (min(hi, last) - b1 * bs)

    def partial_blocks(self) -> np.ndarray:
        """Indices of blocks holding some free bytes but not only free bytes."""
        total = self.counts + np.cumsum(self._full)[: self.nblocks]
        return np.flatnonzero((total > 0) & ~self.free_blocks())


class PartialRuns:
    """Free runs inside chosen (partly free) blocks: a second pass over the maps fills it."""

    def __init__(self, blocks: np.ndarray, block_size: int):
        self.bs = block_size
        self.wanted = np.zeros(int(blocks.max()) + 1 if len(blocks) else 0, dtype=bool)
        self.wanted[blocks] = True
        self.runs: dict[int, list[tuple[int, int]]] = {}

    def sink(self, lo: int, hi: int):
        def take(chunk: FreeChunk) -> None:
            s, e = chunk_runs(chunk)
            s, e = np.clip(s + lo, lo, hi), np.clip(e + lo, lo, hi)
            keep = e > s
            s, e = s[keep], e[keep]
            for edge in (s // self.bs, (e - 1) // self.bs):   # a partial block is a run's edge block
                sel = edge < len(self.wanted)
                sel[sel] = self.wanted[edge[sel]]
                for b, a, z in zip(edge[sel].tolist(), s[sel].tolist(), e[sel].tolist()):
                    a, z = max(a, b * self.bs), min(z, (b + 1) * self.bs)
                    runs = self.runs.setdefault(b, [])
                    if (a, z) not in runs[-2:]:                  # one-block runs are both edges
                        runs.append((a, z))
        return take
