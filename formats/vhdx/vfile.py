"""The file a VHDX layer hands to the engine: its ImageFile, plus two duties of the format.

* A read-only open of an image whose log was not replayed in place reads through an
  :class:`~formats.vhdx.log.Overlay` (only when the replayed sectors touch payload or bitmaps).
* The first mutation of a session first runs the layer's header update (new FileWriteGuid and
  DataWriteGuid, VHDX.md A5.1-2), whichever code path writes: the engine writes data into
  present blocks straight through this object.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from vdisk.io import ImageFile
from .log import Overlay


class VhdxFile:
    def __init__(self, raw: ImageFile, overlay: Optional[Overlay] = None):
        self.raw = raw
        self.overlay = overlay
        self.before_first_write: Optional[Callable[[], None]] = None

    def __getattr__(self, name):            # fd, path, writable, closed, sync, close, ...
        return getattr(self.raw, name)

    # -- reads ----------------------------------------------------------------------------------
    def size(self) -> int:
        if self.overlay is not None:
            return max(self.raw.size(), self.overlay.size)
        return self.raw.size()

    def pread(self, length: int, offset: int) -> bytes:
        if self.overlay is None:
            return self.raw.pread(length, offset)
        buf = bytearray(self.raw.pread(length, offset))
        want = min(length, max(0, self.size() - offset))
        buf.extend(bytes(want - len(buf)))
        self.overlay.apply(buf, offset)
        return bytes(buf)

    def readinto_exact(self, view: memoryview, offset: int) -> None:
        if self.overlay is None:
            self.raw.readinto_exact(view, offset)
            return
        got = self.raw.preadv([view], offset)
        if got < len(view):
            if offset + len(view) > self.size():
                self.raw.readinto_exact(view, offset)     # raises the ReadError
            view[got:] = bytes(len(view) - got)
        self.overlay.apply(view, offset)

    def preadv(self, buffers: Sequence, offset: int) -> int:
        n = self.raw.preadv(buffers, offset)
        if self.overlay is not None:
            pos = offset
            for b in buffers:
                m = memoryview(b).cast("B")
                self.overlay.apply(m, pos)
                pos += len(m)
        return n

    def readinto(self, buffer, offset: int) -> int:
        return self.preadv([buffer], offset)

    # -- writes ---------------------------------------------------------------------------------
    def _first(self) -> None:
        hook, self.before_first_write = self.before_first_write, None
        if hook is not None:
            try:
                hook()
            except BaseException:
                self.before_first_write = hook     # not done: the next write tries again
                raise

    def pwrite(self, data, offset: int) -> None:
        if self.before_first_write is not None:
            self._first()
        self.raw.pwrite(data, offset)

    def pwritev(self, buffers: Sequence, offset: int) -> None:
        if self.before_first_write is not None:
            self._first()
        self.raw.pwritev(buffers, offset)

    def truncate(self, size: int) -> None:
        if self.before_first_write is not None:
            self._first()
        self.raw.truncate(size)
