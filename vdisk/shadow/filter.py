"""The copy-on-write filter around a Disk (:class:`ShadowedDisk`) and read-only shadow views.

Like an nbdkit filter, :class:`ShadowedDisk` is a small piece stacked on a :class:`vdisk.Disk`: a
wrapper whose writes, zeroings and discards first preserve the blocks they change into the newest
shadow's store, then pass through unchanged. Neither the Disk nor its engine knows about shadows;
:mod:`vdisk.openers` installs the wrapper when a writable image has a diff area.
"""
from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from typing import Optional

import numpy as np

from vdisk.blockdev import Extent, ExtentKind
from vdisk.disk import Disk, DiskFile
from vdisk.errors import RangeError, ReadOnlyError, VDiskError
from .catalog import fingerprint
from .shadowset import ShadowInfo, ShadowSet
from .store import ShadowStore
from vdisk.units import SECTOR

log = logging.getLogger("vdisk")

PRESERVE_BATCH = 256          # blocks preserved per durable append (bounds memory for huge writes)


class ShadowedDisk:
    """A :class:`vdisk.Disk` with shadow copies: every change is preceded by copy-on-write.

    A wrapper (a :class:`vdisk.blockdev.BlockDevice`) around the Disk it is given, which it owns:
    reads and identity pass through, writes, zeroings and discards first preserve the blocks they
    change, then go to the wrapped disk. Every public method of :class:`vdisk.Disk` is offered.
    Live writes never fail because of shadows: when the diff-area maximum would be exceeded the
    oldest shadows are deleted first.
    """

    def __init__(self, disk: Disk):
        self._disk = disk
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            self.shadow_set = ShadowSet(disk.path, not disk.read_only, lambda: fingerprint(self))
        except BaseException:
            disk.close()
            raise
        for note in self.shadow_set.notes:
            log.warning("%s: %s", self.path, note)

    def __repr__(self) -> str:
        return f"<vdisk.shadow.ShadowedDisk {self.path!r} {len(self.shadow_set.catalog.shadows)} shadows>"

    # -- the wrapped disk: identity and reads pass through ------------------------------------
    @property
    def disk(self) -> Disk:
        """The wrapped Disk (writing to it directly would bypass the copy-on-write)."""
        return self._disk

    size = property(lambda self: self._disk.size)
    read_only = property(lambda self: self._disk.read_only)
    format = property(lambda self: self._disk.format)
    subtype = property(lambda self: self._disk.subtype)
    block_size = property(lambda self: self._disk.block_size)
    logical_sector_size = property(lambda self: self._disk.logical_sector_size)
    uuid = property(lambda self: self._disk.uuid)
    path = property(lambda self: self._disk.path)
    geometry = property(lambda self: self._disk.geometry)
    layers = property(lambda self: self._disk.layers)
    chain = property(lambda self: self._disk.chain)
    warnings = property(lambda self: self._disk.warnings)

    @property
    def closed(self) -> bool:
        return self._closed or self._disk.closed

    def pread(self, length: int, offset: int) -> bytes:
        return self._disk.pread(length, offset)

    def readinto(self, buffer, offset: int) -> int:
        return self._disk.readinto(buffer, offset)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        return self._disk.extents(offset, length)

    def map_runs(self, offset: int, length: int):
        return self._disk.map_runs(offset, length)

    def releasable(self, offset: int, length: int, page: int = 4096) -> int:
        return self._disk.releasable(offset, length, page)

    def flush(self) -> None:
        self._disk.flush()

    def as_file(self) -> DiskFile:
        """A seekable io.RawIOBase view whose writes go through the copy-on-write."""
        return DiskFile(self)  # type: ignore[arg-type]   # DiskFile needs only the Disk's methods

    def __enter__(self) -> "ShadowedDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shadows -------------------------------------------------------------------------------
    @property
    def shadows(self) -> list[ShadowInfo]:
        """Every shadow of the image, oldest first (invalid ones included, flagged)."""
        with self.shadow_set.lock:
            return self.shadow_set.infos()

    @property
    def shadow_notes(self) -> list[str]:
        """Warnings found while opening (invalidated shadows, an unclean previous session)."""
        return list(self.shadow_set.notes)

    def create_shadow(self, description: str = "") -> ShadowInfo:
        """Freeze the current content as a new shadow (flushes the live image first)."""
        self._alive()
        with self.shadow_set.lock:
            self.flush()
            return self.shadow_set.create(description, fingerprint(self))

    def delete_shadow(self, shadow_id: str) -> None:
        """Delete one shadow (id or unique prefix); the others keep their views."""
        self._alive()
        with self.shadow_set.lock:
            self.shadow_set.delete(self.shadow_set.resolve_id(shadow_id).id)

    def delete_oldest_shadow(self) -> Optional[str]:
        """Delete the oldest shadow; returns its id (None when there is none)."""
        self._alive()
        with self.shadow_set.lock:
            recs = self.shadow_set.catalog.shadows
            if not recs:
                return None
            sid = recs[0].id
            self.shadow_set.delete(sid)
            return sid

    def delete_all_shadows(self) -> int:
        """Delete every shadow, newest first (no blocks need moving); returns how many."""
        self._alive()
        with self.shadow_set.lock:
            recs = self.shadow_set.catalog.shadows
            n = len(recs)
            while recs:
                self.shadow_set.delete(recs[-1].id)
            return n

    def set_shadow_limits(self, *, max_shadows: Optional[int] = None, max_diff_bytes: Optional[int] = -1) -> None:
        """Set the shadow count limit and/or the diff-area maximum (None = unbounded)."""
        self._alive()
        self.shadow_set.set_limits(max_shadows, max_diff_bytes)

    def shadow_view(self, shadow_id: str) -> "ShadowView":
        """A read-only Disk-like view of one shadow, sharing this disk."""
        return ShadowView(self, shadow_id)

    def diff(self, shadow_a: str, shadow_b: Optional[str] = None) -> list[tuple[int, int]]:
        """Byte ranges (offset, length), ascending, whose content differs between two points in time.

        *shadow_b* None or "live" compares with the live image. Candidates are the blocks preserved
        since the older shadow was made; blocks written back to their old content are dropped.
        """
        self._alive()
        ss = self.shadow_set
        with ss.lock:
            ra = ss.resolve_id(shadow_a)
            rb = None if shadow_b in (None, "live") else ss.resolve_id(shadow_b)
            ids = [r.id for r in ss.catalog.shadows]
            if rb is not None and ids.index(rb.id) < ids.index(ra.id):
                ra, rb = rb, ra
            if rb is not None and rb.id == ra.id:
                return []
            ss.chain_from(ra.id)                               # validity of both ends
            stop = len(ids) if rb is None else ids.index(rb.id)
            if rb is not None:
                ss.chain_from(rb.id)
            candidates: set[int] = set()
            for sid in ids[ids.index(ra.id):stop]:
                candidates.update(ss.stores[sid].blocks())
            old = ShadowView(self, ra.id)
            new = self if rb is None else ShadowView(self, rb.id)
            bs = ss.block_size
            out: list[tuple[int, int]] = []
            # Consecutive candidate blocks are compared a run at a time: one read per side per
            # run (at most DIFF_RUN bytes), not one per block.
            for first, count in _runs(sorted(candidates), max(1, DIFF_RUN // bs)):
                start = first * bs
                n = min(count * bs, self.size - start)
                if n <= 0:
                    continue
                a = np.frombuffer(old.pread(n, start), np.uint8)
                c = np.frombuffer(new.pread(n, start), np.uint8)
                _append_differences(out, a, c, start)
            return out

    # -- the copy-on-write filter --------------------------------------------------------------
    def _alive(self) -> None:
        if self.closed:
            raise VDiskError(f"{self.path}: disk is closed")

    def _guard(self, offset: int, length: int) -> None:
        self._alive()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(f"{self.path}: request {offset}+{length} is outside the disk (size {self.size})")
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only")

    def pwrite(self, data, offset: int) -> int:
        n = len(data) if type(data) in (bytes, bytearray) else memoryview(data).nbytes
        ss = self.shadow_set
        with ss.lock:
            # Fast path, a re-write: the block is already in the newest store and the session is
            # marked, so nothing needs preserving: straight to the Disk.
            fast = ss.fast
            if fast is not None and n:
                entries, bs = fast
                b = offset // bs
                if b in entries and (offset + n - 1) // bs == b:
                    return self._disk.pwrite(data, offset)     # the Disk checks range and mode
            self._guard(offset, n)
            if n:
                self._preserve(offset, n, zeroing=False)
            return self._disk.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int, *, keep_allocated: bool = False) -> None:
        self._guard(offset, length)
        with self.shadow_set.lock:
            if length:
                self._preserve(offset, length, zeroing=True)
            self._disk.write_zeroes(offset, length, keep_allocated=keep_allocated)

    def discard(self, offset: int, length: int) -> None:
        self._guard(offset, length)
        with self.shadow_set.lock:
            if length:
                self._preserve(offset, length, zeroing=True)
            self._disk.discard(offset, length)

    def release(self, offset: int, length: int, page: int = 4096) -> int:
        """:meth:`vdisk.Disk.release`, after the blocks it may zero are preserved for the shadows
        (free space of the live filesystem may be a file in an older point in time)."""
        self._guard(offset, length)
        with self.shadow_set.lock:
            if length:
                self._preserve(offset, length, zeroing=True)
            return self._disk.release(offset, length, page)

    def _preserve(self, offset: int, length: int, zeroing: bool) -> None:
        """Copy every block of [offset, offset+length) the newest shadow lacks into its store."""
        ss = self.shadow_set
        store = ss.newest_store()
        if store is None:
            return
        ss.begin_session()
        bs = ss.block_size
        b0, b1 = offset // bs, (offset + length - 1) // bs + 1
        if b1 - b0 == 1 and b0 in store.entries:            # a re-write: nothing to preserve
            return
        span0, span1 = b0 * bs, min(b1 * bs, self.size)
        has_data: set[int] = set()
        for ext in self.extents(span0, span1 - span0):
            if ext.kind == ExtentKind.DATA:
                has_data.update(range(ext.offset // bs, (ext.offset + ext.length - 1) // bs + 1))
        # A zeroing leaves a block that already reads as zeros unchanged: nothing to keep.
        todo = sorted(has_data) if zeroing else range(b0, b1)
        todo = [b for b in todo if b not in store.entries]
        for k in range(0, len(todo), PRESERVE_BATCH):
            items: list[tuple[int, int, Optional[bytes]]] = []
            for b in todo[k:k + PRESERVE_BATCH]:
                n = min(bs, self.size - b * bs)
                data = self.pread(n, b * bs) if b in has_data else None
                if data is not None and not np.frombuffer(data, np.uint8).any():
                    data = None
                items.append((b, n, data))
            ss.make_room(sum(ShadowStore.record_size(d) for _, _, d in items))
            if ss.newest_store() is not store:                # the limit evicted every shadow
                return
            store.append(items)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._disk.close()
        except BaseException:
            self.shadow_set.close()
            raise
        try:
            if not self.read_only:
                self.shadow_set.end_session(fingerprint(self, reopen=True))
        finally:
            self.shadow_set.close()


class ShadowView:
    """A read-only, Disk-like view of one shadow: its own store, newer stores, then the live image."""

    def __init__(self, disk: ShadowedDisk, shadow_id: str, *, owns_disk: bool = False):
        ss = disk.shadow_set
        rec = ss.resolve_id(shadow_id)
        ss.chain_from(rec.id)
        self._disk = disk
        self._owns = owns_disk
        self._closed = False
        self.id: str = rec.id
        self.created: str = rec.created
        self.description: str = rec.description
        self.read_only = True

    # -- identity (that of the live image, except uuid and path) -------------------------------
    size = property(lambda self: self._disk.size)
    format = property(lambda self: self._disk.format)
    subtype = property(lambda self: self._disk.subtype)
    block_size = property(lambda self: self._disk.shadow_set.block_size)
    logical_sector_size = property(lambda self: self._disk.logical_sector_size)
    geometry = property(lambda self: self._disk.geometry)
    chain = property(lambda self: self._disk.chain)

    @property
    def uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(self.id)

    @property
    def path(self) -> str:
        return f"{self._disk.path}@{self.id}"

    @property
    def closed(self) -> bool:
        return self._closed or self._disk.closed

    def __repr__(self) -> str:
        return f"<vdisk.shadow.ShadowView {self.path!r} created {self.created}>"

    # -- reading -------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise VDiskError(f"{self.path}: shadow view is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(f"{self.path}: request {offset}+{length} is outside the disk (size {self.size})")

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buffer, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        self._check(offset, n)
        ss = self._disk.shadow_set
        bs = ss.block_size
        # Under the shadow lock no copy-on-write runs halfway: stores and live data agree.
        with ss.lock:
            stores = ss.chain_from(self.id)
            pos, end = offset, offset + n
            live_start = None
            while pos < end:
                b = pos // bs
                stop = min(end, (b + 1) * bs)
                src = next((s for s in stores if b in s.entries), None)
                if src is None:
                    if live_start is None:
                        live_start = pos
                else:
                    if live_start is not None:
                        self._disk.readinto(view[live_start - offset:pos - offset], live_start)
                        live_start = None
                    src.read_into(b, view[pos - offset:stop - offset], pos - b * bs)
                pos = stop
            if live_start is not None:
                self._disk.readinto(view[live_start - offset:end - offset], live_start)
        return n

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        """DATA/ZERO runs preserved in stores (layer None), the live image's extents elsewhere."""
        if length is None:
            length = self.size - offset
        self._check(offset, length)
        ss = self._disk.shadow_set
        bs = ss.block_size
        out: list[Extent] = []
        with ss.lock:
            kinds: dict[int, ExtentKind] = {}
            for s in ss.chain_from(self.id):
                for b, e in s.entries.items():
                    kinds.setdefault(b, ExtentKind.DATA if e.kind == 1 else ExtentKind.ZERO)
            end = offset + length
            pos = offset
            for b in sorted(k for k in kinds if k * bs < end and (k + 1) * bs > offset):
                s, e = max(offset, b * bs), min(end, (b + 1) * bs)
                if s > pos:
                    out.extend(self._disk.extents(pos, s - pos))
                out.append(Extent(s, e - s, kinds[b], None))
                pos = e
            if pos < end:
                out.extend(self._disk.extents(pos, end - pos))
        merged: list[Extent] = []
        for x in out:
            if merged and merged[-1].kind == x.kind and merged[-1].layer == x.layer \
                    and merged[-1].offset + merged[-1].length == x.offset:
                p = merged.pop()
                x = Extent(p.offset, p.length + x.length, x.kind, x.layer)
            merged.append(x)
        return merged

    # -- refusing writes -----------------------------------------------------------------------
    def _refuse(self, *_args, **_kw):
        raise ReadOnlyError(f"{self.path}: a shadow copy is read-only")

    pwrite = write_zeroes = discard = _refuse

    def flush(self) -> None:
        """Nothing to write back: a view is read-only."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owns:
                self._disk.close()

    def __enter__(self) -> "ShadowView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def as_file(self) -> DiskFile:
        """A seekable read-only io.RawIOBase view."""
        return DiskFile(self)


#: Bytes of consecutive preserved blocks that diff() compares with one read per side.
DIFF_RUN = 4 << 20


def _runs(blocks: list[int], longest: int) -> list[tuple[int, int]]:
    """(first block, count) of the runs of consecutive numbers in sorted *blocks*, each at most
    *longest* long."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _append_differences(out: list, a: np.ndarray, b: np.ndarray, start: int) -> None:
    """Append the differing sector runs of two equal-length buffers (merged with the last run)."""
    n = len(a)
    pad = -n % SECTOR
    if pad:
        a = np.concatenate([a, np.zeros(pad, np.uint8)])
        b = np.concatenate([b, np.zeros(pad, np.uint8)])
    diff = (a.reshape(-1, SECTOR) != b.reshape(-1, SECTOR)).any(axis=1)
    if not diff.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], diff.astype(np.int8), [0]])))
    for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):
        off, end = start + s * SECTOR, min(start + e * SECTOR, start + n)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, end - off))
