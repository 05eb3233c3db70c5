"""The one public block-device object: :class:`Disk`, with :func:`open` and :func:`create`."""
from __future__ import annotations

import io
import os
import threading
from typing import Optional, Sequence
import uuid as uuidlib

from .chain import LayerInfo, layer_info, open_chain
from .blockdev import Extent, ExtentKind
from .engine import Engine
from .errors import RangeError, ReadOnlyError, UnsupportedError, VDiskError
from . import io as _vio
from .io import ImageFile
from .probe import open_layer, probe
from vdisk.formats import registry

#: what `create` makes when neither a format nor a parent says otherwise
DEFAULT_FORMAT = "vhd"


class Disk:
    """A virtual disk: an image file and its parents, read and written as one block device.

    Thread-safe: readers run concurrently; writers and allocations are serialised.
    """

    def __init__(self, layers, infos: list[LayerInfo], read_only: bool):
        self._layers = layers
        self._engine = Engine(layers)
        self.chain: list[LayerInfo] = infos
        self.read_only = read_only
        self._closed = False
        self._close_lock = threading.Lock()

    # -- identity -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._engine.size

    @property
    def format(self) -> str:
        return self._layers[0].format

    @property
    def subtype(self) -> str:
        return self._layers[0].subtype

    @property
    def block_size(self) -> int:
        return self._layers[0].block_size

    @property
    def logical_sector_size(self) -> int:
        """The sector a device presents to a guest: 512, or 4096 for an image made so."""
        return self._layers[0].logical_sector_size

    @property
    def uuid(self) -> Optional[uuidlib.UUID]:
        return self._layers[0].uuid

    @property
    def path(self) -> str:
        return self._layers[0].path

    @property
    def geometry(self) -> Optional[tuple]:
        return self._layers[0].geometry

    @property
    def layers(self):
        """The format Layers of the chain, top first (for maintenance operations)."""
        return self._layers

    @property
    def warnings(self) -> list[str]:
        return [w for layer in self._layers for w in layer.warnings]

    def __repr__(self) -> str:
        return f"<vdisk.Disk {self.path!r} {self.format}/{self.subtype} {self.size} bytes{' ro' if self.read_only else ''}>"

    # -- I/O ----------------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise VDiskError(f"{self.path}: disk is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(f"{self.path}: request {offset}+{length} is outside the disk (size {self.size})")

    def _check_write(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only")

    def pread(self, length: int, offset: int) -> bytes:
        """Read *length* bytes at *offset*."""
        self._check_range(offset, length)
        buf = bytearray(length)
        self._engine.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buffer, offset: int) -> int:
        """Fill *buffer* from *offset*; returns the number of bytes read (its length)."""
        n = memoryview(buffer).nbytes
        self._check_range(offset, n)
        self._engine.readinto(buffer, offset)
        return n

    def pwrite(self, data, offset: int) -> int:
        """Write *data* at *offset* (copy-on-write in differencing images); returns its length."""
        n = memoryview(data).nbytes
        self._check_write(offset, n)
        if n:
            self._engine.write(data, offset)
        return n

    def write_zeroes(self, offset: int, length: int, *, keep_allocated: bool = False) -> None:
        """Make a range read as zeros (allocating nothing where it already does)."""
        self._check_write(offset, length)
        self._engine.write_zeroes(offset, length, keep_allocated)

    def discard(self, offset: int, length: int) -> None:
        """Release storage where possible; the range reads as zeros afterwards."""
        self._check_write(offset, length)
        self._engine.discard(offset, length)

    def release(self, offset: int, length: int, page: int = 4096) -> int:
        """The guest no longer needs the range's bytes: give the host back the storage the top
        image file holds for them, in whole aligned *page*-sized pieces, without changing any of
        the image's tables. Afterwards each byte of the range reads as before or as zeros (like a
        TRIM); the image file keeps its length. Returns the bytes of storage given back."""
        self._check_write(offset, length)
        return self._engine.release(offset, length, page)

    def releasable(self, offset: int, length: int, page: int = 4096) -> int:
        """The bytes of storage :meth:`release` would give back for the range (nothing changes)."""
        self._check_range(offset, length)
        return sum(e - s for s, e in self._engine.stored_pages(offset, length, page))

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        """Runs of DATA / ZERO / UNALLOCATED, with the chain layer that holds each."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        out: list[Extent] = []
        for voff, n, kind, level, _ in self._engine.resolve(offset, length):
            layer = None if level < 0 else level
            if out and out[-1].kind == kind and out[-1].layer == layer:
                prev = out.pop()
                out.append(Extent(prev.offset, prev.length + n, kind, layer))
            else:
                out.append(Extent(voff, n, ExtentKind(kind), layer))
        return out

    def map_runs(self, offset: int, length: int):
        """Low-level translation: (offset, length, kind, layer, file offset) tuples."""
        self._check_range(offset, length)
        return self._engine.resolve(offset, length)

    def file_runs(self, offset: int, length: int) -> Optional[list[tuple]]:
        """Where a read of the range would come from, for callers that read the image files
        themselves (the NBD server's page-cache path): ``(kind, fd, file offset, length)``
        pieces in order, ``fd == -1`` where the piece reads as zeros (kind ZERO or
        UNALLOCATED). None when the files must not be read directly (read fault injection is
        on): then use :meth:`readinto`. The file may be shorter than its map says (a damaged
        or truncated image): a caller that reads fewer bytes than a piece asks for must fall
        back to :meth:`readinto`, which reports it. Valid until the next write to the range;
        the descriptors belong to the disk (do not close them)."""
        self._check_range(offset, length)
        if _vio.read_fault_hook is not None:
            return None
        layers = self._layers
        return [(kind, layers[level].file.fd if kind == ExtentKind.DATA else -1, foff, n)
                for _voff, n, kind, level, foff in self._engine.resolve(offset, length)]

    def flush(self) -> None:
        """Make every completed write durable (data first, then the metadata pointing at it)."""
        if not self.read_only and not self._closed:
            self._engine.flush()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                # Every file is closed (and its lock dropped) even when one layer's close fails.
                failed: Optional[BaseException] = None
                for layer in self._layers:
                    try:
                        layer.close()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest
                        failed = failed or exc
                if failed is not None:
                    raise failed

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Disk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def as_file(self) -> "DiskFile":
        """A seekable io.RawIOBase view of the disk (shares this Disk; closing it does not close the Disk)."""
        return DiskFile(self)


class DiskFile(io.RawIOBase):
    def __init__(self, disk: Disk):
        self._disk = disk
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._disk.read_only

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._disk.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(memoryview(buffer).nbytes, max(0, self._disk.size - self._pos))
        if n <= 0:
            return 0
        self._disk.readinto(memoryview(buffer).cast("B")[:n], self._pos)
        self._pos += n
        return n

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._disk.pwrite(data, self._pos)
        self._pos += n
        return n

    def flush(self) -> None:
        if not self.closed:
            self._disk.flush()

    def truncate(self, size=None):
        raise io.UnsupportedOperation("a virtual disk has a fixed size")


def check_open_args(mode: str, size_policy: str) -> bool:
    """Refuse a bad *mode* or *size_policy* (ValueError); returns whether the mode writes."""
    if mode not in ("r", "r+", "rw", "w"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    if size_policy not in ("current", "chs"):
        raise ValueError(f"size_policy must be 'current' or 'chs', not {size_policy!r}")
    return mode != "r"


def open(path, mode: str = "r", *, parent_search: Sequence[str] = (), vbox_registry=None,
         size_policy: str = "current", format: Optional[str] = None, parent: Optional[str] = None,
         allow_parent_modified: bool = False) -> Disk:
    """Open an image file and its parents as a :class:`Disk` (the core of :func:`vdisk.open`).

    mode "r" (shared lock) or "r+" (exclusive lock, top image writable). *format* forces the
    format instead of probing; *parent* names the top image's parent explicitly. Backups,
    snapshot trees and shadow copies are the open pipeline's business (vdisk/openers.py).
    """
    writable = check_open_args(mode, size_policy)
    path = os.fspath(path)
    layers, infos = open_chain(path, writable=writable, fmt=format, parent_search=tuple(parent_search),
                               vbox_registry=vbox_registry, size_policy=size_policy,
                               allow_parent_modified=allow_parent_modified, explicit_parent=parent)
    return Disk(layers, infos, read_only=not writable)


def create(path, size: Optional[int] = None, *, format: Optional[str] = None, subtype: str = "dynamic",
           parent=None, block_size: Optional[int] = None, size_policy: str = "exact", **options) -> Disk:
    """Create a new image and return it opened read-write.

    ``parent=`` makes a differencing image (its size and, by default, its format are the
    parent's). *format* defaults to "vhd" for a base image. The file must not exist.
    *options* are those only one format takes (its driver's ``create_options``).
    """
    path = os.fspath(path)
    if format is None:
        format = DEFAULT_FORMAT if parent is None else probe(os.fspath(parent))
    if format not in registry.NAMES:
        raise ValueError(f"format must be one of {', '.join(map(repr, registry.NAMES))}, not {format!r}")
    driver = registry.driver(format)
    unknown = sorted(set(options) - set(driver.create_options))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of {format} images")
    parent_layer = None
    if parent is not None:
        parent = os.fspath(parent)
        parent_layer = open_layer(parent)
        if not registry.driver_for(parent_layer).has_parents:
            parent_layer.close()
            raise UnsupportedError(f"{parent}: a {parent_layer.format} file cannot be the parent of a differencing image")
        if parent_layer.format != format:
            parent_layer.close()
            raise UnsupportedError(f"{path}: a {format} differencing image needs a {format} parent, "
                                   f"{parent} is {parent_layer.format}")
        if size is not None and size != parent_layer.size:
            parent_layer.close()
            raise ValueError(f"a differencing image has its parent's size ({parent_layer.size}), not {size}")
    else:
        if size is None:
            raise ValueError("size is required for a new base image")
        if subtype not in driver.subtypes:
            raise ValueError(f"subtype must be one of {driver.subtypes}, not {subtype!r}")
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
    file = ImageFile(path, create=True)
    try:
        layer = driver.create(file, size, subtype, block_size=block_size, size_policy=size_policy,
                              parent=parent_layer, parent_path=parent, **options)
    except BaseException:
        file.close()
        if parent_layer is not None:
            parent_layer.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    layers = [layer]
    infos = [layer_info(layer, "created")]
    if parent_layer is not None:
        parent_layer.close()
        try:
            rest, rest_infos = open_chain(parent, writable=False, size_policy="current")
        except BaseException:
            layer.close()
            raise
        rest_infos[0].found_by = "given explicitly"
        layers += rest
        infos += rest_infos
    return Disk(layers, infos, read_only=False)
