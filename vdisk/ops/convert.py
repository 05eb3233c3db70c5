"""Convert any image (or differencing chain) into a new image of any format and subtype.

    with vdisk.open("chain-top.vhd") as src:
        convert(src, "flat.vdi", format="vdi", subtype="dynamic")

Only the source's DATA runs are read (holes, zero blocks and unallocated ranges cost nothing).
They are read in big chunks, zero blocks are found with numpy over a whole chunk at the
destination's allocation granularity, and only non-zero blocks are written, so the output is
sparse. The output is built in a temporary file beside the destination and renamed into place
only once it is complete and flushed: an interrupted convert never leaves a partial image under
the destination's name.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from vdisk import disk as _disk
from vdisk.disk import Disk
from vdisk.engine import ExtentKind
from vdisk.formats import registry
from vdisk.errors import VDiskError
from vdisk.io import start_writeback
from vdisk.units import MiB, SECTOR

#: Bytes read per request; big enough to amortise syscalls, small enough for bounded memory.
CHUNK = 4 << 20
#: Zero-detection granularity for raw and fixed outputs (a filesystem block: holes are that fine).
FLAT_GRANULE = 4096
#: Chunks in flight at once (each has its own CHUNK buffer): several requests keep the device
#: queue full, as qemu-img's coroutines do.
WORKERS = 4
#: Start writing dirty pages back after this many bytes, so the final flush has little left to do.
WRITEBACK_EVERY = 64 << 20

FORMATS = registry.NAMES
SUBTYPES = ("fixed", "dynamic")
TARGETS = registry.TARGETS

Progress = Callable[[int, int], None]


@dataclass
class ConvertResult:
    """What a conversion produced."""
    path: str
    format: str
    subtype: str
    size: int
    bytes_read: int           # source bytes read (DATA runs only)
    bytes_written: int        # non-zero bytes written to the destination


def format_from_name(path: str) -> str:
    """Output format implied by a file name (its driver's extension: .vhd -> vhd), else raw."""
    return registry.format_from_name(path)


def plan_output(src_size: int, format: Optional[str], subtype: Optional[str], target: Optional[str],
                dst_path: str) -> tuple[str, str, int]:
    """(format, subtype, virtual size) of the output; raises ValueError on contradictions."""
    if target is not None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
        tfmt, tsub = TARGETS[target]
        if format not in (None, tfmt) or subtype not in (None, tsub):
            raise ValueError(f"--target {target} means a {tsub} {tfmt} image; it conflicts with "
                             f"{format or tfmt}/{subtype or tsub}")
        format, subtype = tfmt, tsub
    format = format or format_from_name(dst_path)
    if format not in FORMATS:
        raise ValueError(f"unknown output format {format!r} (choose from {', '.join(FORMATS)})")
    if format == "raw":
        if subtype not in (None, "fixed", "dynamic", "raw"):
            raise ValueError(f"unknown subtype {subtype!r}")
        return "raw", "raw", src_size
    subtype = subtype or "dynamic"
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be 'fixed' or 'dynamic', not {subtype!r}")
    if src_size == 0:
        raise ValueError(f"the source is empty (0 bytes), and a {format.upper()} image cannot be empty")
    size = -(-src_size // SECTOR) * SECTOR        # VHD and VDI sizes are whole sectors
    if target == "azure":
        size = -(-size // MiB) * MiB
    return format, subtype, size


def _temp_path(dst: str) -> str:
    folder, name = os.path.split(os.path.abspath(dst))
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}.vdisk-tmp")


def work_ranges(src: Disk, granule: int, runs: Optional[list] = None) -> list[tuple[int, int]]:
    """Merged [start, end) ranges that hold source DATA, widened to whole granules.

    Only these are read; everything else reads as zeros in the source and stays a hole (or an
    unallocated block) in the output. *runs*: ``src.map_runs(0, src.size)`` if already known.
    """
    size = src.size
    if runs is None:
        runs = src.map_runs(0, size) if size else []
    out: list[list[int]] = []
    for voff, length, kind, _level, _foff in runs:
        if kind != ExtentKind.DATA:
            continue
        s = voff // granule * granule
        e = min(size, -(-(voff + length) // granule) * granule)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def nonzero_runs(buf, n: int, granule: int) -> list[tuple[int, int]]:
    """[start, end) byte runs of the first *n* bytes of *buf* made of granules that are not all zero.

    *buf* must hold a whole number of granules past *n* (the caller pads it with zeros).
    """
    if n <= 0:
        return []
    g = -(-n // granule)
    words = np.frombuffer(buf, dtype=np.uint64, count=g * granule // 8).reshape(g, granule // 8)
    # Random data almost always has a non-zero first word: only the rest needs a full scan.
    nz = words[:, 0] != 0
    cand = np.flatnonzero(~nz)
    if len(cand) * 4 > g:                 # mostly zero candidates: one pass over everything
        nz = words.max(axis=1) != 0
    elif len(cand):
        nz[cand] = words[cand].max(axis=1) != 0
    if nz.all():
        return [(0, n)]
    if not nz.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    return [(int(a) * granule, min(n, int(b) * granule)) for a, b in zip(edges[0::2], edges[1::2])]


class _Sink:
    """Where converted data goes.

    A helper thread asks the kernel to start writing dirty pages back every WRITEBACK_EVERY bytes,
    so the device works while we copy and the final flush has little left to wait for. It runs
    beside the copy workers so none of them ever waits on the device queue.
    """

    fd = -1

    def __init__(self):
        self._unsynced = 0
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._done = False
        self._thread: Optional[threading.Thread] = None

    def start_writeback(self) -> None:
        self._thread = threading.Thread(target=self._writeback, name="vdisk-writeback", daemon=True)
        self._thread.start()

    def _writeback(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._done:
                return
            fd = self.fd
            if fd >= 0:
                start_writeback(fd)

    def stop_writeback(self) -> None:
        self._done = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def written(self, n: int) -> None:
        with self._lock:
            self._unsynced += n
            if self._unsynced < WRITEBACK_EVERY:
                return
            self._unsynced = 0
        self._kick.set()


class _RawSink(_Sink):
    """A raw output written with os.pwrite; its untouched ranges stay holes."""

    def __init__(self, path: str, size: int, name: str):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.name = name                  # the destination name, for error messages
        # One writer at a time: concurrent buffered writes to one file contend for its inode
        # lock in the kernel, where the waiters spin and burn the CPU the copy needs.
        self._write_lock = threading.Lock()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.close()
            raise VDiskError(f"{name}: cannot size the output: {exc.strerror}") from None

    def pwrite(self, view, offset: int) -> None:
        view = memoryview(view)
        try:
            with self._write_lock:
                while len(view):
                    n = os.pwrite(self.fd, view, offset)
                    view, offset = view[n:], offset + n
        except OSError as exc:
            raise VDiskError(f"{self.name}: write failed: {exc.strerror}") from None

    def finish(self, durable: bool = True) -> None:
        if not durable:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise VDiskError(f"{self.name}: flush failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    abort = close


class _DiskSink(_Sink):
    """An image output (any format but raw): a new image with no parent, allocating only what is written.

    Whole blocks of a dynamic output go straight to the format Layer (``allocate``), and a
    flat (fixed) image's data straight to its data area: the copy already knows these blocks are
    new and not all zeros, so the checks Disk.pwrite makes for arbitrary writes (zero test,
    parent lookup, copy-up) would only cost time. Anything else goes through Disk.pwrite.
    """

    def __init__(self, disk: Disk):
        super().__init__()
        self.disk = disk
        self.top = disk.layers[0]
        self.fd = self.top.file.fd
        self.size = disk.size
        self.block = self.top.block_size
        alone = len(disk.layers) == 1
        self._by_block = alone and self.top.subtype == "dynamic"
        self._flat = alone and self.top.flat
        # Writes are serialised (as Disk.pwrite does); the lock also covers store_zero_blocks'
        # look-then-allocate, so a block shared by two chunks is never allocated twice.
        self._write_lock = threading.Lock()

    def pwrite(self, view, offset: int) -> None:
        n = len(view)
        bs = self.block
        with self._write_lock:
            if self._by_block and offset % bs == 0 and (n % bs == 0 or offset + n == self.size):
                top = self.top
                for i in range(0, n, bs):
                    b = (offset + i) // bs
                    piece = view[i:i + bs]
                    at = int(top.block_map[b])
                    if at >= 0:
                        top.file.pwrite(piece, at)
                    else:
                        top.allocate(b, [(0, piece)])
            elif self._flat:
                self.top.file.pwrite(view, self.top.data_start + offset)
            else:
                self.disk.pwrite(view, offset)

    def store_zero_blocks(self, offset: int, length: int) -> None:
        """Allocate the still unallocated blocks of a range (written as zeros, so they are stored).

        Disk.pwrite drops zeros aimed at unallocated blocks; --no-zero-detect asks for them to be
        stored. Only blocks nobody wrote yet are touched, so their content is all zeros.
        """
        top = self.disk.layers[0]
        if top.subtype == "fixed":
            return
        bs = top.block_size
        size = self.disk.size
        with self._write_lock:
            for b in range(offset // bs, -(-(offset + length) // bs)):
                if top.block_map[b] < 0:
                    top.allocate(b, [(0, bytes(min(bs, size - b * bs)))])

    def finish(self, durable: bool = True) -> None:
        if not durable:
            # The core's flush always ends with a barrier (fdatasync); on our private temporary
            # image, not yet visible under any name, metadata can be written without it.
            for layer in self.disk.layers:
                layer.file.durable = False
        self.disk.flush()

    def close(self) -> None:
        self.fd = -1
        self.disk.close()

    def abort(self) -> None:
        """Close a temporary output that is about to be deleted, without syncing it first."""
        for layer in self.disk.layers:
            layer.file.durable = False
        self.close()


def _granule(fmt: str, subtype: str, disk: Optional[Disk]) -> int:
    if fmt == "raw" or subtype == "fixed" or disk is None:
        return FLAT_GRANULE
    return min(disk.block_size, CHUNK)


def _probe_creatable(tmp: str, dst: str) -> None:
    """Fail early, naming the destination (not the temporary file), when it cannot be created."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VDiskError(f"{dst}: cannot create: {exc.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def _publish(tmp: str, dst: str, force: bool, durable: bool = True) -> None:
    """Move the finished temporary file to *dst* (never replacing an existing one unless *force*)."""
    if force:
        os.replace(tmp, dst)
    else:
        try:
            os.link(tmp, dst)            # atomic "create if absent"
        except FileExistsError:
            raise VDiskError(f"{dst}: already exists (use --force to overwrite)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(dst):
                raise VDiskError(f"{dst}: already exists (use --force to overwrite)") from None
            os.rename(tmp, dst)
            return
        os.unlink(tmp)
    if not durable:
        return
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)                    # make the new name durable too
    except OSError:
        pass
    finally:
        os.close(dfd)


def convert(src: Disk, dst_path, format: Optional[str] = None, subtype: Optional[str] = None, *,
            block_size: Optional[int] = None, target: Optional[str] = None, zero_detect: bool = True,
            progress: Optional[Progress] = None, force: bool = False, durable: bool = True,
            skip: Optional[Callable] = None) -> ConvertResult:
    """Write the whole content of *src* (its chain flattened) into a new image at *dst_path*.

    *format* ``vhd``/``vdi``/``raw`` (default from the file name), *subtype* ``fixed``/``dynamic``
    (default dynamic), *target* ``azure``/``hyper-v``/``virtualbox`` picks both. *block_size* sets
    the output's allocation unit (dynamic VHD/VDI). With *zero_detect*, allocated source blocks
    that hold only zeros are not allocated in the output. *progress(done, total)* is called with
    source bytes processed. Refuses an existing *dst_path* unless *force*.

    With *durable* (default) the output is fsynced before it gets its name, so even a power cut
    never leaves a partial image under *dst_path*; ``durable=False`` skips the syncs (qemu-img's
    default behaviour): a killed process still leaves nothing, a power cut soon after might.

    *skip(src, granule, ranges)*, when given, returns the ranges still to copy (``--sparsify``:
    :func:`vdisk.fsaware.sparsify` drops the granules the guest's filesystems do not use).
    """
    dst = os.fspath(dst_path)
    fmt, sub, size = plan_output(src.size, format, subtype, target, dst)
    if os.path.isdir(dst):
        raise VDiskError(f"{dst}: is a directory")
    if os.path.lexists(dst) and not force:
        raise VDiskError(f"{dst}: already exists (use --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise VDiskError(f"{folder}: no such directory")
    if block_size is not None and (fmt == "raw" or sub == "fixed"):
        raise ValueError("--block-size applies to dynamic VHD and VDI outputs only")
    tmp = _temp_path(dst)
    sink = None
    try:
        _probe_creatable(tmp, dst)
        if fmt == "raw":
            sink = _RawSink(tmp, size, dst)
            granule = FLAT_GRANULE
        else:
            out = _disk.create(tmp, size, format=fmt, subtype=sub, block_size=block_size,
                               size_policy="exact")
            sink = _DiskSink(out)
            granule = _granule(fmt, sub, out)
        if durable:
            sink.start_writeback()
        try:
            read, written = _copy(src, sink, granule, zero_detect, progress, skip)
        finally:
            sink.stop_writeback()
        sink.finish(durable)
        sink.close()
        _publish(tmp, dst, force, durable)
    except BaseException as exc:
        if sink is not None:
            try:
                sink.abort()
            except BaseException:
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, VDiskError) and tmp in str(exc):
            # Name the destination the user gave, not our temporary file.
            raise VDiskError(str(exc).replace(tmp, dst)) from None
        raise
    return ConvertResult(dst, fmt, sub, size, read, written)


def _chunks(ranges: list[tuple[int, int]], chunk: int):
    for start, end in ranges:
        for pos in range(start, end, chunk):
            yield pos, min(chunk, end - pos)


def _copy(src: Disk, sink, granule: int, zero_detect: bool, progress: Optional[Progress],
          skip: Optional[Callable] = None) -> tuple[int, int]:
    """Copy the DATA ranges of *src* into *sink*, several chunks in flight at once.

    Reads, zero scans (numpy) and writes all release the GIL, so a few threads keep the disk
    busy while the previous chunk is being scanned or written, the way qemu-img keeps several
    requests in flight. Memory is bounded by WORKERS buffers of CHUNK bytes.
    """
    runs = src.map_runs(0, src.size) if src.size else []
    ranges = work_ranges(src, granule, runs)
    if skip is not None:
        ranges = skip(src, granule, ranges)
    total = sum(e - s for s, e in ranges)
    prefetch = _Prefetcher(src, runs)
    chunk = max(CHUNK // granule, 1) * granule
    local = threading.local()
    stop = threading.Event()
    tally = [0, 0]                   # bytes done, bytes written
    if progress:
        progress(0, total)

    def work(pos: int, n: int) -> int:
        if stop.is_set():
            return 0
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk)
        view = memoryview(buf)
        src.readinto(view[:n], pos)
        if zero_detect:
            # Zeros are skipped at the fine granule even inside an output block: a block gets
            # storage at its first non-zero byte, and the parts of a new block never written
            # read as zeros (Layer.allocate), so writing them would only cost time and space.
            pad = -n % FLAT_GRANULE
            if pad:
                view[n:n + pad] = bytes(pad)
            runs = nonzero_runs(buf, n, FLAT_GRANULE)
        else:
            runs = [(0, n)]
        wrote = 0
        for a, b in runs:
            sink.pwrite(view[a:b], pos + a)
            wrote += b - a
        if not zero_detect and hasattr(sink, "store_zero_blocks"):
            sink.store_zero_blocks(pos, n)
        sink.written(wrote)
        return wrote

    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="vdisk-convert") as pool:
        try:
            for pos, n in _chunks(ranges, chunk):
                while len(pending) >= WORKERS * 2:
                    _reap(pending.popleft(), tally, progress, total)
                prefetch.advance(pos + n)
                pending.append((pool.submit(work, pos, n), n))
            while pending:
                _reap(pending.popleft(), tally, progress, total)
        except BaseException:
            stop.set()
            for fut, _ in pending:
                fut.cancel()
            raise
        finally:
            prefetch.close()
    return tally[0], tally[1]


class _Prefetcher:
    """Asks the kernel to read ahead (posix_fadvise WILLNEED) the source's stored runs that the
    copy will need next, so reads of an uncached source overlap with the copying instead of
    waiting for the device one chunk at a time. Works from a thread of its own; never reads."""

    AHEAD = 64 << 20          # virtual bytes ahead of the chunk last handed to a worker
    PIECE = 8 << 20

    def __init__(self, src: Disk, runs: list):
        self.items = [(int(v), src.layers[lvl].file.fd, int(f), int(n))
                      for v, n, kind, lvl, f in runs if kind == ExtentKind.DATA]
        self.target = 0
        self.closed = False
        self.cond = threading.Condition()
        self.thread = None
        if self.items and hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, name="vdisk-prefetch", daemon=True)
            self.thread.start()

    def advance(self, vpos: int) -> None:
        if self.thread is None:
            return
        with self.cond:
            self.target = vpos + self.AHEAD
            self.cond.notify()

    def close(self) -> None:
        if self.thread is None:
            return
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        self.thread = None

    def _run(self) -> None:
        i, done = 0, 0                   # current item, bytes of it already advised
        while i < len(self.items):
            with self.cond:
                while not self.closed and self.items[i][0] + done >= self.target:
                    self.cond.wait()
                if self.closed:
                    return
                limit = self.target
            while i < len(self.items) and self.items[i][0] + done < limit:
                voff, fd, foff, n = self.items[i]
                step = min(self.PIECE, n - done)
                try:
                    os.posix_fadvise(fd, foff + done, step, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return
                done += step
                if done >= n:
                    i, done = i + 1, 0


def _reap(item, tally: list, progress: Optional[Progress], total: int) -> None:
    fut, n = item
    tally[1] += fut.result()
    tally[0] += n
    if progress:
        progress(tally[0], total)
