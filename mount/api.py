"""Library calls behind ``vdisk mount`` and ``vdisk umount``.

    from vdisk.mount import mount_image, unmount
    pid = mount_image("disk.vhd", "/mnt/disk")          # returns once /mnt/disk is usable
    ...
    unmount("/mnt/disk")                                 # returns once the image is closed

By default the mount runs in a daemon process (double fork, own process group, hang-ups ignored,
standard streams on /dev/null, working directory /) and
:func:`mount_image` returns its pid only after the kernel has the file system, or raises the
:class:`vdisk.VDiskError` that stopped it (missing image or parent, image locked read-write
elsewhere, busy mount point, no FUSE). ``foreground=True`` serves in the calling process instead
and returns when the file system is unmounted.
"""
from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Mapping, Optional, Sequence, Union

import vdisk
from vdisk import errors as _errors
from vdisk.errors import LockError, VDiskError

PID_XATTR = "user.vdisk.pid"
READY_TIMEOUT = 120.0

Views = Union[None, Mapping[str, object], Callable[[object], Mapping[str, object]]]


def _default_warn(message: str) -> None:
    print(f"vdisk: warning: {message}", file=sys.stderr)


def mount_image(image, mountpoint, *, rw: bool = False, foreground: bool = False, allow_other: bool = False,
                parent_search: Sequence = (), extra_views: Views = None,
                warn: Optional[Callable[[str], None]] = None, on_ready: Optional[Callable[[], None]] = None,
                debug: bool = False) -> Optional[int]:
    """Mount *image* (and its partitions) as files under *mountpoint*.

    *rw* opens the image read-write (exclusive lock) and lets writes through; otherwise the mount is
    read-only. *parent_search*: extra folders where differencing parents are looked for.
    *extra_views*: read-only Disk objects to show beside the image, as a mapping ``name -> Disk``
    (``"shadows/1"`` gives ``shadows/1/disk``, ``shadows/1/p1``...) or a callable that receives the
    opened image's Disk and returns such a mapping. The mount takes ownership of these Disks and
    closes them when it ends (in daemon mode the caller's copies are closed at once). *warn* receives warnings (default: printed on stderr); *on_ready* is
    called once the mount is usable (foreground mode).

    Returns the daemon's pid, or None in foreground mode (after the unmount).
    """
    warn = warn or _default_warn
    image = os.path.abspath(os.fspath(image))
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    parent_search = tuple(os.path.abspath(os.fspath(p)) for p in parent_search)
    check_mountpoint(mountpoint)
    check_fuse()
    args = dict(image=image, mountpoint=mountpoint, rw=rw, allow_other=allow_other,
                parent_search=parent_search, extra_views=extra_views, debug=debug)
    if foreground:
        _serve(warn=warn, on_ready=on_ready, **args)
        return None
    return _daemonize(warn, args)


def check_mountpoint(mountpoint: str) -> None:
    """Raise VDiskError unless *mountpoint* is an existing directory that nothing is mounted on."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise VDiskError(f"{mountpoint}: mount point does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise VDiskError(f"{mountpoint}: a dead FUSE mount is still attached there (its process ended); "
                             f"run 'vdisk umount {mountpoint}' first") from None
        raise VDiskError(f"{mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise VDiskError(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint):
        if _dead_fuse(mountpoint):
            raise VDiskError(f"{mountpoint}: a dead FUSE mount is still attached there (its process ended); "
                             f"run 'vdisk umount {mountpoint}' first")
        raise VDiskError(f"{mountpoint}: mount point is busy: something is already mounted there")


def _dead_fuse(mountpoint: str) -> bool:
    """True for a FUSE mount whose process is gone (statfs is never answered from a cache)."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_fuse() -> None:
    """Raise VDiskError when FUSE cannot work here (no /dev/fuse, no fusermount, no libfuse)."""
    if not os.path.exists("/dev/fuse"):
        raise VDiskError("/dev/fuse is missing: the FUSE kernel module is not loaded "
                         "(modprobe fuse), or a container was started without --device /dev/fuse")
    try:                                 # libfuse 3 opens it itself, root or not
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        raise VDiskError(f"/dev/fuse cannot be opened: {exc.strerror} (its mode is {mode:04o}; "
                         "FUSE needs it read-write for the mounting user, normally 0666)") from None
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        raise VDiskError("fusermount3 is missing: install fuse3 (apt-get install fuse3)")
    from . import fs   # noqa: F401  (raises VDiskError when mfusepy or libfuse is missing)


def _open_image(image: str, rw: bool, parent_search: tuple):
    try:
        return vdisk.open(image, "r+" if rw else "r", parent_search=parent_search)
    except LockError as exc:
        # A read-only open is kept out only by a writer; a read-write one by any other user.
        hint = "mounted or open elsewhere" if rw else "mounted read-write elsewhere"
        raise LockError(f"{exc} (is it {hint}? 'vdisk umount MOUNTPOINT' ends a mount)") from None


def _serve(*, image, mountpoint, rw, allow_other, parent_search, extra_views, debug, warn, on_ready) -> None:
    from . import fs
    disk = _open_image(image, rw, parent_search)
    views = {}
    try:
        for message in getattr(disk, "warnings", ()):
            warn(message)
        views = dict(extra_views(disk) if callable(extra_views) else (extra_views or {}))
        ops = fs.VDiskFS(disk, writable=rw, extra_views=views, warn=warn, on_ready=on_ready,
                         root_xattrs={"pid": os.getpid(), "image": image, "mode": "rw" if rw else "ro",
                                      "format": getattr(disk, "format", ""), "size": disk.size})
    except BaseException:
        for d in [disk, *views.values()]:
            try:
                d.close()
            except Exception:
                pass
        raise
    fs.serve(ops, mountpoint, writable=rw, allow_other=allow_other, fsname=image, debug=debug)


# -- daemon -------------------------------------------------------------------------------------
def _daemonize(warn, args: dict) -> int:
    status_r, status_w = os.pipe()
    errlog = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:                                   # intermediate child
        code = 1
        try:
            os.close(status_r)
            # A process group of its own (Ctrl-C in the terminal does not reach it) but not a new
            # session: with autogroup scheduling every session is its own CPU group, and a FUSE
            # daemon in another group than its readers waits for each wake-up (3x slower
            # sequential reads on a busy machine). Hang-ups are ignored instead.
            os.setpgid(0, 0)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            if os.fork() == 0:                       # the daemon: not our child, reaped by init
                code = _daemon_main(status_w, errlog, args)
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(status_w)
    # The daemon owns the extra views now; our copies would only hold their locks after it ends.
    if not callable(args["extra_views"]):
        for view in (args["extra_views"] or {}).values():
            if view.read_only:
                view.close()
    os.waitpid(child, 0)
    lines, ready_pid, error = _read_status(status_r, READY_TIMEOUT)
    os.close(status_r)
    for message in lines:
        warn(message)
    if ready_pid is not None:
        errlog.close()
        return ready_pid
    errlog.seek(0)
    details = errlog.read(65536).decode("utf-8", "replace").strip()
    errlog.close()
    if error is not None:
        cls = getattr(_errors, error.get("class", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, VDiskError)):
            cls = VDiskError
        message = error["error"]
        if cls is VDiskError and details:          # what libfuse / fusermount said
            message += ": " + " / ".join(details.splitlines()[-3:])
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        raise exc
    raise VDiskError(f"{args['mountpoint']}: mounting failed" + (f": {details}" if details else
                                                                 " (the mount process ended without a word)"))


def _read_status(fd: int, timeout: float):
    """Read the daemon's JSON lines until it closes the pipe: (warnings, ready pid, error dict)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise VDiskError(f"the mount did not become ready within {timeout:.0f} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    warnings, ready, error = [], None, None
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "warning" in msg:
            warnings.append(msg["warning"])
        elif "ready" in msg:
            ready = int(msg["ready"])
        elif "error" in msg:
            error = msg
    return warnings, ready, error


def _daemon_main(status_w: int, errlog, args: dict) -> int:
    state = {"ready": False}

    def send(obj) -> None:
        if not state["ready"]:
            os.write(status_w, (json.dumps(obj) + "\n").encode())

    def warn(message: str) -> None:
        if state["ready"]:
            logging.getLogger("vdisk.mount").warning(message)
        else:
            send({"warning": message})

    devnull = os.open(os.devnull, os.O_RDWR)

    def on_ready() -> None:
        send({"ready": os.getpid()})
        state["ready"] = True
        os.close(status_w)
        os.dup2(devnull, 2)      # nobody is listening any more: what goes wrong goes to syslog
        _log_to_syslog(args["mountpoint"])

    try:
        os.chdir("/")
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(errlog.fileno(), 2)
        _serve(warn=warn, on_ready=on_ready, **args)
        return 0
    except VDiskError as exc:
        send({"error": str(exc), "class": type(exc).__name__})
        return 1
    except BaseException as exc:
        traceback.print_exc()
        send({"error": f"{args['mountpoint']}: mount failed: {exc!r}", "class": "VDiskError"})
        return 1


def _log_to_syslog(mountpoint: str, address: str = "/dev/log") -> None:
    """Send the daemon's warnings and errors (failed reads, writes, flushes) to syslog / the journal."""
    if not os.path.exists(address):
        return
    try:
        handler = logging.handlers.SysLogHandler(address=address)
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"vdisk-mount[{os.getpid()}]: {mountpoint}: %(message)s"))
    for name in ("vdisk.mount", "fuse"):          # ours, and mfusepy's
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


# -- unmount ------------------------------------------------------------------------------------
def unmount(mountpoint, *, timeout: float = 600.0) -> None:
    """Unmount a vdisk mount and wait until its process has closed the image.

    Refuses (VDiskError) when the mount is busy; clears a dead mount whose process has gone.
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise VDiskError(f"{mountpoint}: no such directory") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise VDiskError(f"{mountpoint}: {exc.strerror}") from None
        _fusermount_u(mountpoint)                    # the daemon is gone: just detach the mount
        return
    if not os.path.ismount(mountpoint):
        raise VDiskError(f"{mountpoint}: not mounted")
    try:
        pid = int(os.getxattr(mountpoint, PID_XATTR))
    except (OSError, ValueError):
        pid = None                                   # not ours (or too old): unmount, nothing to wait for
    _fusermount_u(mountpoint)
    if pid is not None and pid != os.getpid():      # a foreground mount in this very process
        _wait_exit(pid, timeout, mountpoint)        # closes its images before serve() returns


def _fusermount_u(mountpoint: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise VDiskError(f"{mountpoint}: cannot run {cmd[0]}: {exc.strerror}") from None
    if res.returncode != 0:
        text = (res.stderr or res.stdout).strip()
        if "busy" in text.lower():
            raise VDiskError(f"{mountpoint}: mount point is busy (a file in it is open, or a process is "
                             "working in it); close those and retry")
        raise VDiskError(f"{mountpoint}: unmount failed: {text or cmd[0] + ' exited with ' + str(res.returncode)}")


def _wait_exit(pid: int, timeout: float, mountpoint: str) -> None:
    """Wait for the daemon to close its images and exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    deadline = time.monotonic() + timeout
    if fd is not None:
        try:
            if select.select([fd], [], [], timeout)[0]:
                return
        finally:
            os.close(fd)
    else:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return
            except (FileNotFoundError, IndexError):
                return
            time.sleep(0.05)
    raise VDiskError(f"{mountpoint}: unmounted, but the mount process {pid} is still closing the image "
                     f"after {timeout:.0f} s")
