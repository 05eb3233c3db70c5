"""The generic block layer: a chain of Layers turned into extents, reads, and copy-on-write writes.

Formats only answer "where does block *b* live?"; this module handles parents, sector bitmaps,
zero blocks and allocation rules. A request is translated into a short list of runs with numpy over
the block maps, so Python work grows with the number of runs, not with the number of sectors.
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from .blockdev import ExtentKind
from vdisk.formats.base import ABSENT, SECTOR, ZERO, Layer
from vdisk.formats.registry import driver_for
from . import chainmap




DATA, ZEROK, UNALLOC = ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.UNALLOCATED
_ZEROS = memoryview(bytes(4 << 20))

# A run is (virtual offset, length, kind, layer index or -1, file offset or -1).


class Engine:
    """Reads and writes through a chain of layers (index 0 is the top, the one written to)."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.top = layers[0]
        self.size = self.top.size
        self.lock = threading.RLock()
        #: a partial write to a block the top lacks copies the whole block up first
        self._copy_up = driver_for(self.top).copies_whole_blocks_up(self.top)
        #: resolved runs per top block, so reads cost the same at any chain depth (chainmap.py)
        self.map: Optional[chainmap.ChainMap] = chainmap.ChainMap(self) if len(layers) > 1 else None

    # -- translation --------------------------------------------------------------------------
    def resolve(self, offset: int, length: int, level: int = 0) -> list[tuple]:
        out: list[tuple] = []
        if length > 0:
            self._resolve(level, offset, offset + length, out)
        return _merge(out)

    def _below(self, level: int, start: int, end: int, out: list) -> None:
        nxt = level + 1
        if nxt >= len(self.layers):
            out.append((start, end - start, UNALLOC, -1, -1))
            return
        psize = self.layers[nxt].size
        if start < psize:
            self._resolve(nxt, start, min(end, psize), out)
        if end > psize:
            s = max(start, psize)
            out.append((s, end - s, UNALLOC, -1, -1))

    def _resolve(self, level: int, start: int, end: int, out: list) -> None:
        layer = self.layers[level]
        bs = layer.block_size
        bmap = layer.block_map
        b0 = start // bs
        b1 = (end - 1) // bs + 1
        if b1 - b0 == 1:                                    # common case: one block, no numpy
            e = int(bmap[b0]) if b0 < len(bmap) else ABSENT
            self._emit(level, layer, b0, e, start, end, out)
            return
        e = bmap[b0:b1]
        if len(e) < b1 - b0:
            e = np.concatenate([e, np.full(b1 - b0 - len(e), ABSENT, np.int64)])
        kind = np.where(e >= 0, 0, e)
        brk = kind[1:] != kind[:-1]
        if layer.sector_granular:
            brk |= kind[1:] == 0
        else:
            brk |= (kind[1:] == 0) & (e[1:] != e[:-1] + bs)
        cuts = (np.flatnonzero(brk) + 1).tolist()
        for i, j in zip([0] + cuts, cuts + [len(e)]):
            rs = max(start, (b0 + i) * bs)
            re = min(end, (b0 + j) * bs)
            self._emit(level, layer, b0 + i, int(e[i]), rs, re, out)

    def _emit(self, level: int, layer: Layer, block: int, e: int, rs: int, re: int, out: list) -> None:
        if e >= 0:
            base = block * layer.block_size
            bitmap = layer.sector_bitmap(block) if layer.sector_granular else None
            if bitmap is None:
                out.append((rs, re - rs, DATA, level, e + rs - base))
                return
            s0 = (rs - base) // SECTOR
            s1 = -(-(re - base) // SECTOR)
            bits = np.unpackbits(bitmap)[s0:s1]
            if bits.all():
                out.append((rs, re - rs, DATA, level, e + rs - base))
                return
            if not bits.any():
                self._below(level, rs, re, out)
                return
            cuts = (np.flatnonzero(bits[1:] != bits[:-1]) + 1).tolist()
            for i, j in zip([0] + cuts, cuts + [len(bits)]):
                ps = max(rs, base + (s0 + i) * SECTOR)
                pe = min(re, base + (s0 + j) * SECTOR)
                if bits[i]:
                    out.append((ps, pe - ps, DATA, level, e + ps - base))
                else:
                    self._below(level, ps, pe, out)
        elif e == ZERO:
            out.append((rs, re - rs, ZEROK, level, -1))
        else:
            self._below(level, rs, re, out)

    # -- reading ------------------------------------------------------------------------------
    def readinto(self, buffer, offset: int, level: int = 0) -> None:
        view = memoryview(buffer).cast("B")
        n = len(view)
        if n == 0:
            return
        layer = self.layers[level]
        bs = layer.block_size
        b = offset // bs
        if level == 0 and (offset + n - 1) // bs == b and b < len(layer.block_map):
            e = int(layer.block_map[b])
            if e >= 0 and not layer.sector_granular:        # fast path: one stored piece
                layer.file.readinto_exact(view, e + offset - b * bs)
                return
            if e == ZERO or (e == ABSENT and len(self.layers) == 1):
                # a shared zero buffer: bytes(n) would fault in fresh pages on every read
                view[:] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
                return
            if self.map is not None:                        # the parents: resolved once per block
                self.map.read(view, offset, b, e)
                return
        if level == 0 and self.map is not None and (offset + n - 1) // bs != b:
            # Several top blocks: each piece takes the one-block path above.
            pos, end = offset, offset + n
            while pos < end:
                stop = min(end, (pos // bs + 1) * bs)
                self.readinto(view[pos - offset: stop - offset], pos)
                pos = stop
            return
        for voff, length, kind, lvl, foff in self.resolve(offset, n, level):
            piece = view[voff - offset: voff - offset + length]
            if kind == DATA:
                # Stored data the file must hold: an error or an early end of file is a ReadError.
                self.layers[lvl].file.readinto_exact(piece, foff)
            else:
                piece[:] = bytes(length)

    def read(self, offset: int, length: int, level: int = 0) -> bytearray:
        buf = bytearray(length)
        self.readinto(buf, offset, level)
        return buf

    def below_is_zero(self, offset: int, length: int) -> bool:
        """True when everything under the top layer reads as zeros without looking at data."""
        if len(self.layers) == 1:
            return True
        return all(kind != DATA for _, _, kind, _, _ in self.resolve(offset, length, 1))

    # -- writing ------------------------------------------------------------------------------
    # Every change, finished or not, tells the resolved maps over the top layer (chainmap.py).
    def write(self, data, offset: int) -> None:
        try:
            self._write(data, offset)
        finally:
            chainmap.changed(self.top, offset, memoryview(data).nbytes)

    def write_zeroes(self, offset: int, length: int, keep_allocated: bool = False) -> None:
        try:
            self._write_zeroes(offset, length, keep_allocated)
        finally:
            chainmap.changed(self.top, offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Release storage where the format can; everything in the range reads as zeros after."""
        try:
            self._discard(offset, length)
        finally:
            chainmap.changed(self.top, offset, length)

    def _write(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        top = self.top
        with self.lock:
            if top.flat:
                self._write_flat(view, offset)
                return
            for b, bstart, pos, stop in self._blocks(offset, len(view)):
                self._write_block(b, pos - bstart, view[pos - offset: stop - offset])

    def _blocks(self, offset: int, length: int):
        """(block, block start, piece start, piece end) for each top-layer block a range touches."""
        bs = self.top.block_size
        pos, end = offset, offset + length
        while pos < end:
            b = pos // bs
            bstart = b * bs
            stop = min(end, bstart + bs)
            yield b, bstart, pos, stop
            pos = stop

    def _write_flat(self, view: memoryview, offset: int) -> None:
        top = self.top
        bs = top.block_size
        b0, b1 = offset // bs, (offset + len(view) - 1) // bs
        if top.block_map[b0] >= 0 and (b0 == b1 or (top.block_map[b0:b1 + 1] >= 0).all()):
            top.file.pwrite(view, top.data_start + offset)
            return
        pos, end = offset, offset + len(view)
        while pos < end:
            b = pos // bs
            stop = min(end, (b + 1) * bs)
            piece = view[pos - offset: stop - offset]
            if top.block_map[b] >= 0:
                top.file.pwrite(piece, top.data_start + pos)
            elif _nonzero(piece):
                top.allocate(b, [(pos - b * bs, piece)])
            pos = stop

    def _write_block(self, b: int, in_off: int, piece: memoryview) -> None:
        top = self.top
        bs = top.block_size
        bstart = b * bs
        e = int(top.block_map[b])
        if e >= 0:
            if not top.sector_granular:
                top.file.pwrite(piece, e + in_off)
                return
            a0, a1, buf = self._sector_align(b, in_off, piece, e)
            top.file.pwrite(buf, e + a0)
            top.set_sectors_present(b, a0 // SECTOR, (a1 - a0) // SECTOR)
            return
        # The block has no storage in the top layer.
        if not _nonzero(piece):
            if e == ZERO or self.below_is_zero(bstart + in_off, len(piece)):
                return                                       # already reads as zeros
            if top.can_mark_zero() and len(piece) == min(bs, self.size - bstart):
                top.mark_zero(b)
                return
        if top.sector_granular:
            a0, a1, buf = self._sector_align(b, in_off, piece, None)
            top.allocate(b, [(a0, buf)], present=(a0 // SECTOR, (a1 - a0) // SECTOR))
        elif self._copy_up and e == ABSENT and len(self.layers) > 1 and \
                not self.below_is_zero(bstart, min(bs, self.size - bstart)):
            # No sector bitmap (VDI): copy the whole block up from the parent, then overlay.
            full = self.read(bstart, min(bs, self.size - bstart), 1)
            full[in_off:in_off + len(piece)] = piece
            top.allocate(b, [(0, full)])
        else:
            top.allocate(b, [(in_off, piece)])

    def _sector_align(self, b: int, in_off: int, piece: memoryview, e: Optional[int]):
        """Widen a write to whole sectors, filling partial edges from what they read as now.
        The sector is the image's logical one: a VHDX bitmap bit covers 4096 bytes when so made."""
        unit = max(SECTOR, self.top.logical_sector_size)
        a0 = in_off // unit * unit
        a1 = -(-(in_off + len(piece)) // unit) * unit
        if a0 == in_off and a1 == in_off + len(piece):
            return a0, a1, piece
        buf = bytearray(a1 - a0)
        bstart = b * self.top.block_size
        if a0 != in_off:
            buf[:unit] = self.read(bstart + a0, unit)
        if a1 != in_off + len(piece) and (a1 - a0 > unit or a0 == in_off):
            buf[-unit:] = self.read(bstart + a1 - unit, unit)
        buf[in_off - a0: in_off - a0 + len(piece)] = piece
        return a0, a1, buf

    def _write_zeroes(self, offset: int, length: int, keep_allocated: bool = False) -> None:
        top = self.top
        with self.lock:
            for b, bstart, pos, stop in self._blocks(offset, length):
                n = stop - pos
                e = int(top.block_map[b])
                if top.flat and e >= 0 and not keep_allocated and top.punch(e + pos - bstart, n):
                    pass
                elif e >= 0 or not top.sector_granular:
                    self._write_block(b, pos - bstart, memoryview(bytes(n)))
                else:
                    self._zero_unallocated_sectors(b, pos - bstart, n)

    def _zero_unallocated_sectors(self, b: int, in_off: int, n: int) -> None:
        """Differencing VHD block with no storage: allocate it sparse, marking the range present."""
        bstart = b * self.top.block_size
        if self.below_is_zero(bstart + in_off, n):
            return
        unit = max(SECTOR, self.top.logical_sector_size)
        a0 = -(-in_off // unit) * unit
        a1 = (in_off + n) // unit * unit
        if a1 <= a0:
            self._write_block(b, in_off, memoryview(bytes(n)))
            return
        self.top.allocate(b, [], present=(a0 // SECTOR, (a1 - a0) // SECTOR))
        if a0 > in_off:
            self._write_block(b, in_off, memoryview(bytes(a0 - in_off)))
        if in_off + n > a1:
            self._write_block(b, a1, memoryview(bytes(in_off + n - a1)))

    def _discard(self, offset: int, length: int) -> None:
        top = self.top
        bs = top.block_size
        with self.lock:
            for b, bstart, pos, stop in self._blocks(offset, length):
                whole = pos == bstart and stop == min(bstart + bs, self.size)
                e = int(top.block_map[b])
                if not (whole and e >= 0 and len(self.layers) == 1 and not top.preallocated and top.deallocate(b)):
                    self.write_zeroes(pos, stop - pos)

    def stored_pages(self, offset: int, length: int, page: int) -> list[tuple[int, int]]:
        """The (start, end) ranges of the top file, whole *page*-aligned pages, that hold the
        range's data and are stored (not holes): what :meth:`release` punches."""
        file = self.top.file
        out: list[tuple[int, int]] = []
        for _voff, n, kind, level, foff in self.resolve(offset, length):
            if kind == DATA and level == 0:
                lo, hi = -(-foff // page) * page, (foff + n) // page * page
                if hi > lo:
                    out += file.data_runs(lo, hi)
        return out

    def release(self, offset: int, length: int, page: int) -> int:
        """Punch :meth:`stored_pages` out of the top file, changing no table: those bytes read as
        zeros afterwards, everything else (a parent's data, partial pages, metadata) as before.
        Returns the bytes punched."""
        file = self.top.file
        released = 0
        with self.lock:
            for s, e in self.stored_pages(offset, length, page):
                if not file.punch_hole(s, e - s):
                    break                                  # this filesystem cannot punch holes
                released += e - s
        return released

    def flush(self) -> None:
        with self.lock:
            self.top.flush()


def _nonzero(view) -> bool:
    if len(view) == 0:
        return False
    return bool(np.frombuffer(view, dtype=np.uint8).any())


def _merge(runs: list) -> list:
    if len(runs) < 2:
        return runs
    out = [runs[0]]
    for r in runs[1:]:
        p = out[-1]
        if r[2] == p[2] and r[3] == p[3] and (r[2] != DATA or p[4] + p[1] == r[4]) and p[0] + p[1] == r[0]:
            out[-1] = (p[0], p[1] + r[1], p[2], p[3], p[4])
        else:
            out.append(r)
    return out
