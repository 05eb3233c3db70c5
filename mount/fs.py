"""The FUSE filesystem of ``vdisk mount``: a virtual disk and its partitions as plain files.

Layout of the mount point (all names fixed for the life of the mount)::

    disk                 the whole virtual disk
    p1, p2, ... p5, ...  one file per partition (Linux numbering: p5+ are MBR logical partitions)
    by-name/<name>       symlinks to ../pN for GPT partitions that have a name
    <view>/disk, <view>/p1, <view>/by-name/...
                         extra read-only views given by the caller (e.g. ``shadows/3``)

Every file is served with FUSE ``direct_io``: reads and writes go straight to the Disk with the
size the caller asked for (up to :data:`MAX_READ` per request), so ``disk`` and the partition files
that alias its bytes never disagree through a stale page cache. Reads and writes land in the FUSE
request buffer without an extra copy (see :class:`FastFUSE`). Writes never reach past the end of a
partition: a write that starts at or after the end fails with ENOSPC (as on a block device), one that
straddles the end is cut short there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from vdisk.blockdev import ExtentKind
from vdisk.errors import RangeError, ReadOnlyError, VDiskError

from .partitions import Partition, read_partitions

log = logging.getLogger("vdisk.mount")


def _load_mfusepy():
    """Import mfusepy, preferring libfuse 3 (1 MiB requests) over libfuse 2 (128 KiB)."""
    set_name = False
    if not os.environ.get("FUSE_LIBRARY_PATH") and not os.environ.get("FUSE_LIBRARY_NAME"):
        if ctypes.util.find_library("fuse3"):
            os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
            set_name = True
    try:
        import mfusepy
    except ImportError:
        raise VDiskError("mounting needs the Python package mfusepy: pip install 'vdisk[mount]'") from None
    except (OSError, AttributeError) as exc:
        raise VDiskError(f"libfuse is missing or unusable ({exc}): install fuse3 (apt-get install fuse3)") from None
    finally:
        if set_name:
            del os.environ["FUSE_LIBRARY_NAME"]
    return mfusepy


mfusepy = _load_mfusepy()
FUSE_MAJOR = mfusepy.fuse_version_major
# The largest request libfuse will take: libfuse 3 sizes its buffers for FUSE_MAX_MAX_PAGES (256)
# pages, libfuse 2 for 32 pages.
MAX_READ = (256 if FUSE_MAJOR >= 3 else 32) * os.sysconf("SC_PAGE_SIZE")

WORKER_THREADS = 10          # libfuse 3's default max_threads; all kept for the session

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

XATTR_PREFIX = "user.vdisk."


@dataclass
class _Node:
    ino: int
    path: str
    kind: int                                     # stat.S_IFDIR / S_IFREG / S_IFLNK
    children: dict = field(default_factory=dict)  # directories: name -> _Node
    target: str = ""                              # symlinks
    state: object = None                          # files: the _DiskState and the byte range they show
    start: int = 0
    length: int = 0
    writable: bool = False
    xattrs: dict = field(default_factory=dict)
    blocks: Optional[int] = None                  # cached st_blocks (allocated 512-byte units)


class _DiskState:
    """Per-Disk bookkeeping: written since the last flush?"""

    __slots__ = ("disk", "dirty", "writable")

    def __init__(self, disk, writable: bool):
        self.disk = disk
        self.dirty = False
        self.writable = writable


def sanitize_name(name: str) -> str:
    """A GPT partition name made safe as one file name ("" if nothing usable is left)."""
    name = re.sub(r"[\x00-\x1f\x7f/\\]", "_", name).strip()
    if name in (".", ".."):
        return ""
    while len(name.encode("utf-8", "surrogateescape")) > 255:
        name = name[:-1]
    return name


class VDiskFS(mfusepy.Operations):
    """mfusepy Operations for one Disk (writable if asked) plus optional read-only extra views.

    *partitions*: the main disk's partitions (read from the disk when None). *extra_views*: a
    mapping of relative directory names (``"shadows/3"``) to read-only Disk objects, each shown as
    ``<name>/disk``, ``<name>/p1``... The filesystem owns every Disk it is given and closes them all
    in :meth:`destroy` (when the FUSE session ends: unmount, SIGTERM, SIGINT, SIGHUP).
    """

    use_ns = True
    # Read, write, flush, fsync and friends find their file by handle, so libfuse need not build
    # the path of every request.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, disk, *, writable: bool = False, partitions: Optional[list[Partition]] = None,
                 extra_views: Optional[Mapping[str, object]] = None, warn: Optional[Callable[[str], None]] = None,
                 uid: Optional[int] = None, gid: Optional[int] = None, root_xattrs: Optional[dict] = None,
                 on_ready: Optional[Callable[[], None]] = None):
        self.warn = warn or log.warning
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.on_ready = on_ready
        self._nodes: list[_Node] = []
        self._by_path: dict[str, _Node] = {}
        self._states: list[_DiskState] = []
        self._destroyed = False
        self.ready = False
        self._lock = threading.Lock()
        self.mtime = self._mtime_of(disk)
        root = self._add("/", stat.S_IFDIR)
        root.xattrs.update({k: str(v) for k, v in (root_xattrs or {}).items()})
        if partitions is None:
            partitions = read_partitions(disk, warn=self.warn)
        self.partitions = partitions
        self._add_view(root, disk, writable, partitions)
        for name, view in (extra_views or {}).items():
            parts = [p for p in str(name).split("/") if p]
            if not parts or any(p in (".", "..") for p in parts):
                raise VDiskError(f"invalid view name {name!r}")
            where = root
            for i, comp in enumerate(parts):
                child = where.children.get(comp)
                if child is None:
                    child = self._add(where.path.rstrip("/") + "/" + comp, stat.S_IFDIR)
                    where.children[comp] = child
                elif child.kind != stat.S_IFDIR or (i == len(parts) - 1 and child.children):
                    raise VDiskError(f"view name {name!r} collides with another entry of the mount")
                where = child
            self._add_view(where, view, False, read_partitions(view, warn=self.warn))

    # -- building the tree ---------------------------------------------------------------------
    @staticmethod
    def _mtime_of(disk) -> int:
        try:
            return os.stat(disk.path).st_mtime_ns
        except (AttributeError, OSError, TypeError):
            return time.time_ns()

    def _add(self, path: str, kind: int, **kw) -> _Node:
        node = _Node(len(self._nodes) + 1, path, kind, **kw)
        self._nodes.append(node)
        self._by_path[path] = node
        return node

    def _add_view(self, where: _Node, disk, writable: bool, partitions: list[Partition]) -> None:
        state = _DiskState(disk, writable)
        self._states.append(state)
        base = where.path.rstrip("/")
        image = str(getattr(disk, "path", "") or "")

        def add_file(name: str, start: int, length: int, xattrs: dict) -> None:
            node = self._add(f"{base}/{name}", stat.S_IFREG, state=state, start=start, length=length,
                             writable=writable)
            node.xattrs.update({"image": image, "offset": str(start), "size": str(length)})
            node.xattrs.update({k: str(v) for k, v in xattrs.items() if v != ""})
            where.children[name] = node

        add_file("disk", 0, int(disk.size), {})
        named = []
        for p in partitions:
            add_file(f"p{p.index}", p.start, p.length,
                     {"partition": p.index, "scheme": p.scheme, "type": p.type, "type_name": p.type_name,
                      "name": p.name, "uuid": p.uuid})
            if p.name and sanitize_name(p.name):
                named.append((sanitize_name(p.name), p.index))
        if named:
            folder = self._add(f"{base}/by-name", stat.S_IFDIR)
            where.children["by-name"] = folder
            for name, index in named:
                unique, n = name, 1
                while unique in folder.children:
                    n += 1
                    unique = f"{name}_{n}"
                link = self._add(f"{folder.path}/{unique}", stat.S_IFLNK, target=f"../p{index}")
                folder.children[unique] = link

    # -- lookups -------------------------------------------------------------------------------
    def _node(self, path: Optional[str], fh: Optional[int] = None) -> _Node:
        if fh:
            return self._nodes[fh - 1]
        node = self._by_path.get(path) if path is not None else None
        if node is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return node

    def _file(self, fh: int) -> _Node:
        node = self._nodes[fh - 1]
        if node.kind != stat.S_IFREG:
            raise mfusepy.FuseOSError(errno.EISDIR)
        return node

    # -- lifecycle -----------------------------------------------------------------------------
    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            if hasattr(conn, "max_read"):
                conn.max_read = MAX_READ
            conn.max_readahead = MAX_READ
        if config is not None:
            config.entry_timeout = 86400.0          # the tree never changes
            config.negative_timeout = 86400.0
            config.attr_timeout = 1.0 if any(s.writable for s in self._states) else 86400.0
            config.use_ino = 1
            config.direct_io = 1
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path) -> None:
        """The FUSE session is over (unmount, signal): make every image consistent and close it."""
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        for state in self._states:
            try:
                state.disk.close()          # flushes data, then metadata
            except Exception as exc:        # keep closing the others
                self.warn(f"closing {getattr(state.disk, 'path', 'disk')}: {exc}")

    # -- metadata ------------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        node = self._node(path, fh)
        attrs = {"st_ino": node.ino, "st_uid": self.uid, "st_gid": self.gid, "st_atime": self.mtime,
                 "st_mtime": self.mtime, "st_ctime": self.mtime}
        if node.kind == stat.S_IFDIR:
            subdirs = sum(1 for c in node.children.values() if c.kind == stat.S_IFDIR)
            attrs.update(st_mode=stat.S_IFDIR | 0o555, st_nlink=2 + subdirs, st_size=0)
        elif node.kind == stat.S_IFLNK:
            attrs.update(st_mode=stat.S_IFLNK | 0o777, st_nlink=1, st_size=len(node.target))
        else:
            attrs.update(st_mode=stat.S_IFREG | (0o644 if node.writable else 0o444), st_nlink=1,
                         st_size=node.length, st_blocks=self._blocks(node), st_blksize=MAX_READ)
        return attrs

    def _blocks(self, node: _Node) -> int:
        """Allocated 512-byte units, so that du and cp --sparse see how sparse the image is."""
        blocks = node.blocks
        if blocks is None:
            try:
                data = sum(e.length for e in node.state.disk.extents(node.start, node.length)
                           if e.kind == ExtentKind.DATA)
                blocks = -(-data // 512)
            except Exception:
                blocks = -(-node.length // 512)
            node.blocks = blocks
        return blocks

    def readdir(self, path, fh):
        node = self._node(path, fh)
        if node.kind != stat.S_IFDIR:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", ".."] + [(name, {"st_mode": c.kind, "st_ino": c.ino}, 0)
                              for name, c in node.children.items()]

    def opendir(self, path):
        node = self._node(path)
        if node.kind != stat.S_IFDIR:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return node.ino

    def readlink(self, path):
        node = self._node(path)
        if node.kind != stat.S_IFLNK:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return node.target

    def statfs(self, path):
        size = int(self._states[0].disk.size)
        return {"f_bsize": MAX_READ, "f_frsize": 512, "f_blocks": size // 512, "f_bfree": 0, "f_bavail": 0,
                "f_files": len(self._nodes), "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    def getxattr(self, path, name, position=0):
        node = self._node(path)
        if name.startswith(XATTR_PREFIX) and name[len(XATTR_PREFIX):] in node.xattrs:
            return node.xattrs[name[len(XATTR_PREFIX):]].encode("utf-8", "surrogateescape")
        raise mfusepy.FuseOSError(mfusepy.ENOATTR)

    def listxattr(self, path):
        return [XATTR_PREFIX + k for k in self._node(path).xattrs]

    # -- files ---------------------------------------------------------------------------------
    def open(self, path, flags):
        node = self._node(path)
        if node.kind == stat.S_IFDIR:
            raise mfusepy.FuseOSError(errno.EISDIR)
        if (flags & os.O_ACCMODE) != os.O_RDONLY and not node.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        return node.ino

    def readinto(self, fh: int, view: memoryview, offset: int) -> int:
        """Fill *view* from byte *offset* of file *fh*; short only at the end of the file."""
        node = self._file(fh)
        n = min(len(view), node.length - offset)
        if n <= 0:
            return 0
        try:
            node.state.disk.readinto(view[:n] if n < len(view) else view, node.start + offset)
        except VDiskError as exc:
            log.error("read of %s at %d+%d failed: %s", node.path, offset, n, exc)
            raise mfusepy.FuseOSError(errno.EIO) from None
        return n

    def read(self, path, size, offset, fh):
        buf = bytearray(max(0, min(size, self._file(fh).length - offset)))
        n = self.readinto(fh, memoryview(buf), offset)
        return bytes(buf[:n])

    def write_from(self, fh: int, view, offset: int) -> int:
        """Write *view* at *offset* of file *fh*, never past the file's end."""
        node = self._file(fh)
        if not node.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset < 0:
            raise mfusepy.FuseOSError(errno.EINVAL)
        if not len(view):
            return 0
        if offset >= node.length:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        n = min(len(view), node.length - offset)
        state = node.state
        try:
            state.disk.pwrite(view[:n] if n < len(view) else view, node.start + offset)
        except ReadOnlyError:
            raise mfusepy.FuseOSError(errno.EROFS) from None
        except RangeError:
            raise mfusepy.FuseOSError(errno.ENOSPC) from None
        except VDiskError as exc:
            log.error("write to %s at %d+%d failed: %s", node.path, offset, n, exc)
            raise mfusepy.FuseOSError(_errno_of(exc)) from None
        state.dirty = True
        node.blocks = None
        return n

    def write(self, path, data, offset, fh):
        return self.write_from(fh, memoryview(data), offset)

    def truncate(self, path, length, fh=None):
        """Partition files have a fixed size, like block devices: shrinking (O_TRUNC) changes nothing."""
        node = self._node(path, fh)
        if node.kind != stat.S_IFREG:
            raise mfusepy.FuseOSError(errno.EISDIR)
        if not node.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        if length > node.length:
            raise mfusepy.FuseOSError(errno.EFBIG)
        return 0

    def fallocate(self, path, mode, offset, size, fh):
        node = self._file(fh)
        if not node.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset < 0 or size <= 0:
            raise mfusepy.FuseOSError(errno.EINVAL)
        end = offset + size
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        if end > node.length and not mode & FALLOC_FL_KEEP_SIZE:
            raise mfusepy.FuseOSError(errno.EFBIG)
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            # Reserving space is not something a sparse image can promise; glibc's posix_fallocate
            # then falls back to writing, which does allocate.
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        end = min(end, node.length)
        if offset >= end:
            return 0
        state = node.state
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                state.disk.discard(node.start + offset, end - offset)
            else:
                state.disk.write_zeroes(node.start + offset, end - offset)
        except VDiskError as exc:
            log.error("fallocate(%#x) of %s at %d+%d failed: %s", mode, node.path, offset, end - offset, exc)
            raise mfusepy.FuseOSError(_errno_of(exc)) from None
        state.dirty = True
        node.blocks = None
        return 0

    def _flush(self, fh: int, always: bool) -> int:
        node = self._nodes[fh - 1] if fh else None
        if node is None or node.kind != stat.S_IFREG or not node.writable:
            return 0
        state = node.state
        if not (always or state.dirty):
            return 0
        state.dirty = False          # cleared before: a write finishing meanwhile marks it again
        try:
            state.disk.flush()
        except VDiskError as exc:
            state.dirty = True
            log.error("flush of %s failed: %s", node.path, exc)
            raise mfusepy.FuseOSError(_errno_of(exc)) from None
        return 0

    def flush(self, path, fh):
        """close(2) of a descriptor: make what was written through the mount durable."""
        return self._flush(fh, always=False)

    def fsync(self, path, datasync, fh):
        return self._flush(fh, always=True)

    def release(self, path, fh):
        return 0

    # Names can neither appear nor disappear.
    def _eperm(self, *args):
        raise mfusepy.FuseOSError(errno.EPERM)

    create = mkdir = mknod = unlink = rmdir = rename = symlink = link = chmod = chown = _eperm

    def utimens(self, path, times=None):
        return 0


def _errno_of(exc: Exception) -> int:
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    if "no space left" in str(exc):
        return errno.ENOSPC
    return errno.EIO


_tls = threading.local()
ctypes.pythonapi.PyGILState_Ensure.restype = ctypes.c_int


def _pin_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state alive between callbacks.

    A ctypes callback on a thread Python did not create makes a new thread state on entry and
    deletes it on exit, which costs more than the rest of a 4 KiB read. One extra, never released
    PyGILState_Ensure() keeps the state (the GIL is still released after each callback), which
    nearly triples small-request throughput. libfuse keeps its workers for the whole session
    (max_idle_threads = max_threads), so nothing piles up.
    """
    if not getattr(_tls, "pinned", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _tls.pinned = True


class FastFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with zero-copy reads and writes and cheap callbacks.

    mfusepy copies each read through a bytes object and each write into one; here the Disk reads
    straight into libfuse's request buffer and writes straight from it. Each worker thread keeps
    its Python thread state (:func:`_pin_thread_state`). Truncate is also given the file handle
    (mfusepy drops it for libfuse 3), since paths are not built (``nullpath_ok``).
    """

    def _wrapper(self, func, *args, **kwargs):
        _pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def read(self, path, buf, size, offset, fip):
        if size <= 0:
            return 0
        view = memoryview((ctypes.c_char * size).from_address(ctypes.cast(buf, ctypes.c_void_p).value)).cast("B")
        return self.operations.readinto(fip.contents.fh, view, offset)

    def write(self, path, buf, size, offset, fip):
        if size <= 0:
            return 0
        view = memoryview((ctypes.c_char * size).from_address(ctypes.cast(buf, ctypes.c_void_p).value)).cast("B")
        return self.operations.write_from(fip.contents.fh, view, offset)

    def truncate_fuse_3(self, path, length, fip):
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                        length, fh)


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def serve(ops: VDiskFS, mountpoint: str, *, writable: bool, allow_other: bool = False,
          fsname: str = "vdisk", debug: bool = False) -> None:
    """Mount *ops* on *mountpoint* and serve requests until the FUSE session ends.

    Runs in the calling thread (foreground); multi-threaded request handling. Returns after the
    file system was unmounted and :meth:`VDiskFS.destroy` closed the images. SIGTERM, SIGINT and
    (unless ignored) SIGHUP end the session cleanly (libfuse's handlers).
    """
    options = dict(foreground=True, debug=debug, ro=not writable, default_permissions=True,
                   fsname=_escape_option(fsname), subtype="vdisk", max_read=MAX_READ, direct_io=True)
    if allow_other:
        options["allow_other"] = True
    if FUSE_MAJOR == 2:
        options["big_writes"] = True
    else:
        options["max_idle_threads"] = WORKER_THREADS
    saved = {}
    if threading.current_thread() is threading.main_thread():
        # libfuse installs its clean-exit handlers (SIGTERM, SIGINT, SIGHUP) only over the default
        # disposition; an ignored SIGHUP (the daemon) stays ignored.
        saved[signal.SIGTERM] = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        FastFUSE(ops, mountpoint, raw_fi=False, **options)
    except RuntimeError as exc:
        # libfuse also reports a session ended by a signal as an error (8); only a failure before
        # the file system came up is one.
        if not ops.ready:
            raise VDiskError(f"{mountpoint}: FUSE mount failed (libfuse error {exc})") from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        ops.close()
