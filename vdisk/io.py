"""Positional file I/O: the single seam between vdisk and the operating system.

All reads and writes of image files go through :class:`ImageFile`: positional and batched reads
and writes, hole punching, truncation and barriers. Two switches change how a file's mutations
go, both owned here rather than patched in from outside: :meth:`ImageFile.journaled` routes them
through a journal transaction first, and :attr:`ImageFile.durable` = False makes barriers free
(a temporary output nobody asked to make durable).

Fault injection: :func:`injected_faults` installs a hook called before every mutation, to cut
the I/O at a given write (crash simulation), make writes short, or raise EIO, which is how crash
safety is proven by fault injection rather than argument; :func:`injected_read_faults` installs
one that makes reads fail (EIO) or come back short, which is how every front end is shown to
report a read error instead of returning wrong data.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

from .errors import LockError, ReadError, VDiskError

# Called before every mutating operation as fault_hook(kind, file, offset, length) where kind is
# "write", "truncate" or "sync". It may raise (to simulate a crash or an I/O error).
fault_hook: Optional[Callable[[str, "ImageFile", int, int], None]] = None

# Called before every read of an image file as read_fault_hook("read", file, offset, length). It is
# separate from fault_hook so that crash simulators, which count mutations, never see reads. It
# may raise OSError (the device failed the read; it becomes a ReadError) or return a byte count
# below *length*: the read then delivers only that many bytes, as a file that ends early would.
read_fault_hook: Optional[Callable[[str, "ImageFile", int, int], Optional[int]]] = None

IOV_MAX = 1024

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


@contextmanager
def injected_faults(hook: Optional[Callable[[str, "ImageFile", int, int], None]]) -> Iterator[None]:
    """Call *hook* before every mutation of an image file while the block runs (see fault_hook)."""
    global fault_hook
    old, fault_hook = fault_hook, hook
    try:
        yield
    finally:
        fault_hook = old


@contextmanager
def injected_read_faults(hook: Optional[Callable[[str, "ImageFile", int, int], Optional[int]]]) -> Iterator[None]:
    """Call *hook* before every read of an image file while the block runs (see read_fault_hook)."""
    global read_fault_hook
    old, read_fault_hook = read_fault_hook, hook
    try:
        yield
    finally:
        read_fault_hook = old


def _refuse_special(path: str) -> None:
    """Only regular files and block devices are images: opening a FIFO would block forever,
    and a socket or character device is no disk. Checked before the open for I/O."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return                      # the open below reports a missing or unreadable path
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a character device" if stat.S_ISCHR(mode) else "not a regular file"
        raise VDiskError(f"{path}: is {kind}, not an image file or block device")


class ImageFile:
    """An open image file with positional, batched I/O and advisory locking."""

    def __init__(self, path: str, writable: bool = False, create: bool = False, lock: bool = True):
        self.path = os.fspath(path)
        self.writable = writable or create
        if not create:
            _refuse_special(self.path)
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            raise VDiskError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise VDiskError(f"{self.path}: is a directory") from None
        except FileExistsError:
            raise VDiskError(f"{self.path}: already exists") from None
        except PermissionError:
            raise VDiskError(f"{self.path}: permission denied") from None
        except OSError as exc:
            raise VDiskError(f"{self.path}: {exc.strerror}") from None
        self._closed = False
        #: False: barriers are skipped (a temporary output whose caller did not ask for them)
        self.durable = True
        self._route = None             # the journal Transaction mutations go through (journaled())
        self._size_lock = threading.Lock()
        # Set by every mutation, cleared by sync(): a barrier with nothing new to make durable
        # (a close after a journaled operation already synced) costs no device flush.
        self._unsynced = False
        if lock:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self._closed = True
                mode = "read-write" if self.writable else "read-only"
                raise LockError(f"{self.path}: image is in use by another process; cannot open {mode}") from None

    # -- reading -------------------------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def data_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ``(start, end)`` runs of [start, end) the file stores, holes left out (found with
        SEEK_DATA/SEEK_HOLE, nothing read); the whole range where the filesystem cannot tell."""
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            try:
                s = os.lseek(self.fd, pos, os.SEEK_DATA)
                if s >= end:
                    break
                e = min(os.lseek(self.fd, s, os.SEEK_HOLE), end)
            except OSError as exc:
                if exc.errno == errno.ENXIO:           # no data at or after pos
                    break
                runs.append((pos, end))                # no hole support: all of it is stored
                break
            runs.append((s, e))
            pos = e
        return runs

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly what exists; short only at end of file."""
        if read_fault_hook is not None:
            length = self._read_limit(offset, length)
        chunks, start, want = [], offset, length
        while length > 0:
            try:
                data = os.pread(self.fd, length, offset)
            except OSError as exc:
                raise ReadError(self.path, start, want, _strerror(exc)) from None
            if not data:
                break
            chunks.append(data)
            length -= len(data)
            offset += len(data)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def preadv(self, buffers: Sequence, offset: int) -> int:
        """Fill memoryviews in order from offset; bytes past EOF are left untouched."""
        bufs = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(b) for b in bufs)
        if read_fault_hook is not None:
            limit = self._read_limit(offset, total)
            if limit < total:
                bufs = _prefix(bufs, limit)
        return self._fill(bufs, offset, total)

    def readinto(self, buffer, offset: int) -> int:
        return self.preadv([buffer], offset)

    def readinto_exact(self, view: memoryview, offset: int) -> None:
        """Fill *view* (a byte memoryview) from a region the image's metadata says the file holds.

        A device error, or an end of file inside the region, raises ReadError: data that is not
        there must never read as zeros.
        """
        n = len(view)
        if read_fault_hook is None:
            try:
                got = os.preadv(self.fd, [view], offset)      # the hot path: one system call
            except OSError as exc:
                raise ReadError(self.path, offset, n, _strerror(exc)) from None
            if got == n:
                return
            got += self._fill([view[got:]], offset + got, n)
        else:
            limit = self._read_limit(offset, n)
            got = self._fill([view[:limit]], offset, n)
        if got < n:
            raise ReadError(self.path, offset, n, f"short read: the file gave {got} of the {n} bytes "
                                                  f"its metadata says it holds (file size {self.size()})")

    def _read_limit(self, offset: int, length: int) -> int:
        """How many of *length* bytes the read fault hook lets this read deliver."""
        try:
            limit = read_fault_hook("read", self, offset, length)
        except OSError as exc:
            raise ReadError(self.path, offset, length, _strerror(exc)) from None
        return length if limit is None else max(0, min(int(limit), length))

    def _fill(self, bufs: list, offset: int, length: int) -> int:
        """preadv until the buffers are full or end of file; an OSError becomes ReadError
        (*length* is the size of the whole request, for the message)."""
        start, total = offset, 0
        while bufs:
            try:
                n = os.preadv(self.fd, bufs[:IOV_MAX], offset)
            except OSError as exc:
                raise ReadError(self.path, start, length, _strerror(exc)) from None
            if n == 0:
                break
            total += n
            offset += n
            _consume(bufs, n)
        return total

    # -- writing -------------------------------------------------------------------------------
    def _check(self, kind: str, offset: int, length: int) -> None:
        if not self.writable:
            raise VDiskError(f"{self.path}: internal error: write to a read-only file")
        if fault_hook is not None:
            fault_hook(kind, self, offset, length)
        if kind != "sync":
            self._unsynced = True

    @contextmanager
    def journaled(self, tx) -> Iterator["ImageFile"]:
        """While the block runs, writes, truncations and punched holes of this file go through the
        journal transaction *tx* first (undo records before the bytes change). Lets unmodified
        format code (a layer's allocation and flush) run inside an in-place operation."""
        if self._route is not None:
            raise VDiskError(f"{self.path}: internal error: already journaled")
        self._route = tx
        try:
            yield self
        finally:
            self._route = None

    def pwrite(self, data, offset: int) -> None:
        if self._route is not None:
            self._route.write(offset, bytes(memoryview(data).cast("B")))
            return
        self.write_through(data, offset)

    def write_through(self, data, offset: int) -> None:
        """pwrite that bypasses a journal route (the journal's own application of writes)."""
        view = memoryview(data).cast("B")
        self._check("write", offset, len(view))
        while len(view):
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                raise _io_error(self.path, exc) from None
            view = view[n:]
            offset += n

    def pwritev(self, buffers: Sequence, offset: int) -> None:
        if self._route is not None:
            self._route.write(offset, b"".join(bytes(memoryview(b).cast("B")) for b in buffers))
            return
        bufs = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(b) for b in bufs)
        self._check("write", offset, total)
        while bufs:
            try:
                n = os.pwritev(self.fd, bufs[:IOV_MAX], offset)
            except OSError as exc:
                raise _io_error(self.path, exc) from None
            offset += n
            _consume(bufs, n)

    def truncate(self, size: int) -> None:
        if self._route is not None:
            self._route.truncate(size)
            return
        self.truncate_through(size)

    def truncate_through(self, size: int) -> None:
        """truncate that bypasses a journal route."""
        self._check("truncate", size, 0)
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _io_error(self.path, exc) from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a byte range (it reads back as zeros); False where the filesystem cannot."""
        global _libc
        if length <= 0:
            return True
        if _libc is None:
            import ctypes                                  # only images that punch holes pay for it
            _libc = ctypes.CDLL(None, use_errno=True)      # the C library this Python runs on
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if self._route is not None:
            self._route.preserve(offset, length)           # its old bytes into the journal first
        self._check("write", offset, length)
        return _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0

    def sync(self) -> None:
        """Barrier: everything written so far reaches stable storage before what follows."""
        if not self.writable or not self._unsynced or not self.durable:
            return
        self._check("sync", 0, 0)
        self._unsynced = False         # before the flush: a write racing with it sets it again
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._unsynced = True
            raise _io_error(self.path, exc) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    @property
    def closed(self) -> bool:
        return self._closed


def sync_dir(folder: str) -> None:
    """Barrier on a folder: a rename or a new name in it is durable once this returns."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Atomically make *data* the content of *path*: write a new file, sync it, rename it over
    *path*, sync the folder. A reader (or a crash) sees the old content or the new, never half."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    f = ImageFile(tmp, create=True, lock=False)
    try:
        f.pwrite(data, 0)
        f.sync()
    finally:
        f.close()
    os.rename(tmp, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))


_sync_file_range = None


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to start writing a file range's dirty pages to the device, without waiting
    (sync_file_range WRITE; length 0 means to the end of the file). A later fdatasync then has
    less left to wait for. Only a hint: a no-op where the call does not exist."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes
            call = ctypes.CDLL(None, use_errno=True).sync_file_range   # the libc already loaded
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = call
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)          # SYNC_FILE_RANGE_WRITE


def _consume(bufs: list, n: int) -> None:
    """Drop the first *n* bytes from a list of memoryviews (after a short vectored transfer)."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        else:
            bufs[0] = bufs[0][n:]
            n = 0


def _prefix(bufs: list, n: int) -> list:
    """The first *n* bytes of a list of memoryviews, as a list of memoryviews."""
    out = []
    for b in bufs:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(out[-1])
    return out


def _strerror(exc: OSError) -> str:
    return f"I/O error: {exc.strerror or exc}"


def _io_error(path: str, exc: OSError) -> VDiskError:
    if exc.errno == errno.ENOSPC:
        return VDiskError(f"{path}: no space left on device")
    return VDiskError(f"{path}: I/O error: {exc.strerror}")
