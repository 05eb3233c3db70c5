"""The one test fake of a disk: :class:`FakeDisk`, an in-memory :class:`vdisk.blockdev.BlockDevice`.

It offers exactly the protocol for I/O (no ``pread``: what a device, server or mount may ask of a
disk is the protocol, and a fake with more would hide a caller that asks for more), plus what
tests need to set a disk up and look inside it:

- settable ``read_only``, ``block_size`` (the allocation unit extents are reported in),
  ``logical_sector_size``, ``uuid``, and the descriptive ``path``/``format``/``geometry``;
- sparse storage in ``block_size`` pieces (bytearrays), so a fake of a petabyte costs only what
  is written; never-written blocks read as zeros (UNALLOCATED) or, given ``background``, as
  that content (DATA);
- extents with :class:`ExtentKind` members: DATA (layer 0) where a block holds content, ZERO
  (layer 0) where ``write_zeroes`` marked a whole block, UNALLOCATED (layer None) elsewhere;
  neighbours of one kind merged;
- fault hooks: :meth:`fail` makes requests of some kind (a protocol method's name) touching a
  range raise, before anything changes; ``aligned=True`` refuses writes, zeroings and discards that are not whole logical
  sectors (a device must never send them);
- a record of what was asked: ``calls`` (every request, as (method, offset, length)), ``writes``,
  ``zeroes``, ``discards`` ((offset, length) of each that succeeded), ``flushes`` and ``reads``
  (counts).
"""
from __future__ import annotations

import errno
import threading
import uuid as uuidlib
from typing import Callable, Optional

from vdisk.blockdev import Extent, ExtentKind
from vdisk.errors import RangeError, ReadOnlyError, VDiskError

#: What :meth:`FakeDisk.fail` can make fail, and the names ``calls`` records: the protocol's methods.
OPS = ("readinto", "pwrite", "write_zeroes", "discard", "extents", "flush")


class FakeDisk:
    """A sparse in-memory disk of *size* bytes that speaks the BlockDevice protocol."""

    def __init__(self, size: int, *, data: Optional[bytes] = None, read_only: bool = False,
                 block_size: int = 64 << 10, logical_sector_size: int = 512,
                 uuid: Optional[uuidlib.UUID] = None, path: Optional[str] = "fake.img",
                 format: str = "fake", subtype: str = "test", geometry: Optional[tuple] = None,
                 background: Optional[Callable[[int, int], bytes]] = None, aligned: bool = False):
        if size < 0 or block_size <= 0:
            raise ValueError("a fake disk needs a size >= 0 and a positive block size")
        self.size = size
        self.read_only = read_only
        self.block_size = block_size
        self.logical_sector_size = logical_sector_size
        self.uuid = uuid
        if path is not None:               # a disk without a path is a case devices must handle
            self.path = path
        self.format, self.subtype, self.geometry = format, subtype, geometry
        self.background = background
        self.aligned = aligned
        self.closed = False
        self.lock = threading.Lock()
        self._blocks: dict[int, bytearray] = {}
        self._zero: set[int] = set()
        self._faults: list[tuple[frozenset, int, int, BaseException]] = []
        self.calls: list[tuple] = []
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.discards: list[tuple[int, int]] = []
        self.flushes = 0
        if data is not None:
            if len(data) > size:
                raise ValueError("data longer than the disk")
            self.fill(0, data)

    @classmethod
    def from_bytes(cls, data: bytes, **kw) -> "FakeDisk":
        """A disk of ``len(data)`` bytes holding *data*."""
        return cls(len(data), data=data, **kw)

    def __repr__(self) -> str:
        return f"<FakeDisk {self.size} bytes{' ro' if self.read_only else ''}>"

    # -- set-up and inspection (not part of the protocol) --------------------------------------
    def fill(self, offset: int, data) -> None:
        """Store *data* at *offset*, bypassing read_only, faults and the record."""
        data = bytes(data)
        self._range(offset, len(data))
        with self.lock:
            self._store(offset, data)

    def content(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        """What the disk holds at [offset, offset+length), bypassing faults and the record."""
        if length is None:
            length = self.size - offset
        self._range(offset, length)
        buf = bytearray(length)
        with self.lock:
            self._load(buf, offset)
        return bytes(buf)

    @property
    def reads(self) -> int:
        """How many reads were asked for."""
        return sum(1 for c in self.calls if c[0] == "readinto")

    @property
    def data(self) -> bytes:
        """The whole content (immutable: change it with fill or the protocol)."""
        return self.content()

    def fail(self, op, offset: int = 0, length: Optional[int] = None,
             error: Optional[BaseException] = None) -> None:
        """Make requests of *op* (one of OPS, or several) that touch [offset, offset+length) raise
        *error* (default ``OSError(EIO)``) before changing anything; length None: to the end."""
        ops = frozenset((op,) if isinstance(op, str) else op)
        if not ops <= set(OPS):
            raise ValueError(f"unknown operations {sorted(ops - set(OPS))}")
        end = self.size if length is None else offset + length
        if error is None:
            error = OSError(errno.EIO, f"injected {'/'.join(sorted(ops))} error")
        self._faults.append((ops, offset, end, error))

    def heal(self) -> None:
        """Remove every fault :meth:`fail` injected."""
        self._faults.clear()

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "FakeDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the BlockDevice protocol --------------------------------------------------------------
    def readinto(self, buffer, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        self._request("readinto", offset, n)
        with self.lock:
            self._load(view, offset)
        return n

    def pwrite(self, data, offset: int) -> int:
        data = bytes(data)
        n = len(data)
        self._request("pwrite", offset, n, changes=True)
        with self.lock:
            self._store(offset, data)
        self.writes.append((offset, n))
        return n

    def write_zeroes(self, offset: int, length: int, *, keep_allocated: bool = False) -> None:
        self._request("write_zeroes", offset, length, changes=True)
        with self.lock:
            self._clear(offset, length, ExtentKind.DATA if keep_allocated else ExtentKind.ZERO)
        self.zeroes.append((offset, length))

    def discard(self, offset: int, length: int) -> None:
        self._request("discard", offset, length, changes=True)
        with self.lock:
            # with a background, a block left alone would read as the background again
            self._clear(offset, length, ExtentKind.ZERO if self.background else ExtentKind.UNALLOCATED)
        self.discards.append((offset, length))

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        self._request("extents", offset, length)
        out: list[Extent] = []
        bs, end = self.block_size, offset + length
        with self.lock:
            touched = sorted(b for b in (*self._blocks, *self._zero) if b * bs < end and (b + 1) * bs > offset)
            pos = offset
            for b in touched:
                s = max(offset, b * bs)
                if s > pos:
                    self._append(out, pos, s - pos, self._untouched_kind())
                e = min(end, (b + 1) * bs)
                self._append(out, s, e - s, ExtentKind.ZERO if b in self._zero else ExtentKind.DATA)
                pos = e
            if pos < end:
                self._append(out, pos, end - pos, self._untouched_kind())
        return out

    def flush(self) -> None:
        self._request("flush", 0, 0)
        self.flushes += 1

    # -- inside --------------------------------------------------------------------------------
    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(f"{getattr(self, 'path', 'fake')}: request {offset}+{length} is outside "
                             f"the disk (size {self.size})")

    def _request(self, op: str, offset: int, length: int, changes: bool = False) -> None:
        if self.closed:
            raise VDiskError(f"{getattr(self, 'path', 'fake')}: disk is closed")
        self.calls.append((op, offset, length))
        if op != "flush":
            self._range(offset, length)
        if changes and self.read_only:
            raise ReadOnlyError(f"{getattr(self, 'path', 'fake')}: opened read-only")
        if changes and self.aligned and (offset | length) % self.logical_sector_size:
            raise RangeError(f"{op} {offset}+{length} is not whole {self.logical_sector_size}-byte sectors")
        for ops, start, end, error in self._faults:
            if op in ops and (op == "flush" or (offset < end and offset + max(length, 1) > start)):
                raise error

    def _untouched_kind(self) -> ExtentKind:
        return ExtentKind.DATA if self.background else ExtentKind.UNALLOCATED

    @staticmethod
    def _append(out: list[Extent], offset: int, length: int, kind: ExtentKind) -> None:
        layer = None if kind == ExtentKind.UNALLOCATED else 0
        if out and out[-1].kind == kind and out[-1].offset + out[-1].length == offset:
            prev = out.pop()
            out.append(Extent(prev.offset, prev.length + length, kind, layer))
        else:
            out.append(Extent(offset, length, kind, layer))

    def _block(self, b: int) -> bytearray:
        """Block *b*'s bytes, made DATA (materialised from what it reads as now)."""
        blk = self._blocks.get(b)
        if blk is None:
            n = min(self.block_size, self.size - b * self.block_size)
            if self.background is not None and b not in self._zero:
                blk = bytearray(self.background(b * self.block_size, n))
            else:
                blk = bytearray(n)
            self._blocks[b] = blk
            self._zero.discard(b)
        return blk

    def _pieces(self, offset: int, length: int):
        """(block, offset in block, offset in request, length) of each block a range touches."""
        bs, pos, end = self.block_size, offset, offset + length
        while pos < end:
            b = pos // bs
            n = min(end, (b + 1) * bs) - pos
            yield b, pos - b * bs, pos - offset, n
            pos += n

    def _load(self, view, offset: int) -> None:
        for b, inner, at, n in self._pieces(offset, len(view)):
            blk = self._blocks.get(b)
            if blk is not None:
                view[at:at + n] = blk[inner:inner + n]
            elif self.background is not None and b not in self._zero:
                base = b * self.block_size
                whole = self.background(base, min(self.block_size, self.size - base))
                view[at:at + n] = whole[inner:inner + n]
            else:
                view[at:at + n] = bytes(n)

    def _store(self, offset: int, data: bytes) -> None:
        for b, inner, at, n in self._pieces(offset, len(data)):
            self._block(b)[inner:inner + n] = data[at:at + n]

    def _clear(self, offset: int, length: int, whole_kind: ExtentKind) -> None:
        """Zeros over a range: whole blocks become *whole_kind*, partial ones get zero bytes."""
        for b, inner, _, n in self._pieces(offset, length):
            whole = inner == 0 and n == min(self.block_size, self.size - b * self.block_size)
            if not whole or whole_kind == ExtentKind.DATA:
                self._block(b)[inner:inner + n] = bytes(n)
                continue
            self._blocks.pop(b, None)
            if whole_kind == ExtentKind.ZERO:
                self._zero.add(b)
            else:
                self._zero.discard(b)
