"""The NBD backend: executing one :class:`~vdisk.serve.nbd_conn.Request` against a disk.

The disk is anything implementing :class:`vdisk.blockdev.BlockDevice` (a :class:`vdisk.Disk`, a
shadow view, a test fake); nothing else is asked of it. :func:`handle_request` returns the
complete reply as a list of buffers. It blocks on disk I/O, so the shell in
:mod:`vdisk.serve.nbd` runs it off the event loop.
"""
from __future__ import annotations

import errno as _errno
import os
import struct
from typing import List, Optional, Tuple

from ..blockdev import ExtentKind
from .nbd_conn import Request
from .nbd_wire import (CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO,
                       CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH,
                       CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, ENOMEM,
                       ENOSPC, ENOTSUP, EPERM, HDR_CHUNK, HDR_SIMPLE, HOLE_MIN, MAX_EXTENTS,
                       REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, SIMPLE_REPLY_MAGIC,
                       STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC, encode_block_status,
                       encode_hole_chunk, encode_none_chunk, encode_simple_reply,
                       error_reply)

def extent_runs(disk, offset: int, length: int) -> List[Tuple[int, int, ExtentKind]]:
    """``disk.extents(offset, length)`` as contiguous (offset, length, kind) runs exactly
    covering the range (clipped, gaps filled with DATA = "unknown, read it"), merged."""
    runs: List[Tuple[int, int, ExtentKind]] = []
    end = offset + length
    pos = offset
    for ext in disk.extents(offset, length):
        a, b = max(ext.offset, pos), min(ext.offset + ext.length, end)
        if b <= a:
            continue
        if not isinstance(ext.kind, ExtentKind):
            raise TypeError(f"extent kind {ext.kind!r} is not an ExtentKind (BlockDevice protocol)")
        if a > pos:
            _append_run(runs, pos, a - pos, ExtentKind.DATA)
        _append_run(runs, a, b - a, ext.kind)
        pos = b
        if pos >= end:
            break
    if pos < end:
        _append_run(runs, pos, end - pos, ExtentKind.DATA)
    return runs


def _append_run(runs, off, length, kind):
    if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == off:
        runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
    else:
        runs.append((off, length, kind))


def allocation_flags(kind: ExtentKind) -> int:
    """base:allocation flags for an extent kind. DATA is allocated (0). UNALLOCATED (no layer of
    the chain has it) and ZERO (a VDI zero block, or a block known to be zero without storage)
    both read as zeros and occupy no space in the image: HOLE|ZERO."""
    if kind is ExtentKind.DATA:
        return 0
    return STATE_HOLE | STATE_ZERO


STATUS_WINDOW = 64 * 1024 * 1024     # first look-up window of a block-status request


def block_status_descriptors(disk, offset: int, length: int, req_one: bool,
                             limit: int = MAX_EXTENTS) -> List[Tuple[int, int]]:
    """(length, flags) descriptors covering [offset, offset+length) from its start, merged by
    flags, each length < 2**32 (requests are u32 anyway), at most ``limit`` of them (one with
    ``req_one``).

    The disk is asked about a window that grows 4x at a time until the answer is complete or
    long enough, so the work follows the size of the answer, not of the request: repeated
    REQ_ONE queries over a huge fragmented disk (``qemu-img map``) stay linear overall.
    """
    want = 1 if req_one else limit
    window = min(length, STATUS_WINDOW)
    while True:
        out: List[Tuple[int, int]] = []
        for _off, ln, kind in extent_runs(disk, offset, window):
            flags = allocation_flags(kind)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + ln, flags)
            else:
                out.append((ln, flags))
        if window >= length or len(out) > want:
            return out[:want]
        # the window ended inside the answer's last extent (or too few extents): look further
        window = min(length, window * 4)


def _read_plan(disk, offset: int, length: int) -> List[Tuple[int, int, bool]]:
    """(offset, length, is_hole) pieces for a structured read: holes shorter than HOLE_MIN are
    folded into the data around them so a fragmented region costs one read, not many."""
    return _plan_from_kinds(offset, [(kind, n) for _o, n, kind in extent_runs(disk, offset, length)])


def _plan_from_kinds(offset: int, kinds: List[Tuple[ExtentKind, int]]) -> List[Tuple[int, int, bool]]:
    """The read plan from (kind, length) runs covering the range from *offset* in order."""
    merged: List[Tuple[int, int, bool]] = []
    pos = offset
    for kind, n in kinds:                       # runs of one kind first (as extent_runs gives)
        if merged and merged[-1][2] == kind:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, kind)
        else:
            merged.append((pos, n, kind))
        pos += n
    runs = [(o, n, kind is not ExtentKind.DATA) for o, n, kind in merged]
    plan: List[Tuple[int, int, bool]] = []
    for o, n, hole in runs:
        if hole and n < HOLE_MIN:
            hole = False
        if plan and plan[-1][2] == hole:
            plan[-1] = (plan[-1][0], plan[-1][1] + n, hole)
        else:
            plan.append((o, n, hole))
    return plan


def errno_for(exc: BaseException, command: int) -> Tuple[int, str]:
    """Map an exception from the disk to an NBD error number and a message."""
    from .. import errors  # local import: keep the protocol module importable on its own
    msg = str(exc) or exc.__class__.__name__
    if isinstance(exc, errors.ReadOnlyError):
        return EPERM, msg
    if isinstance(exc, errors.RangeError):
        return (ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL), msg
    if isinstance(exc, errors.UnsupportedError):
        return ENOTSUP, msg
    if isinstance(exc, MemoryError):
        return ENOMEM, "out of memory"
    if isinstance(exc, OSError):
        if exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            return ENOSPC, msg
        return EIO, msg
    if isinstance(exc, errors.VDiskError) and "no space left" in msg:
        return ENOSPC, msg
    return EIO, msg


def handle_request(req: Request, disk) -> List[bytes]:
    """Execute ``req`` on ``disk``; return the complete reply as buffers to send in order.

    Blocks on disk I/O. Never raises for a disk error: that becomes the reply's error number.
    """
    try:
        handler = _HANDLERS[req.command]
        return handler(req, disk)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a protocol error reply
        err, msg = errno_for(exc, req.command)
        return [error_reply(req.cookie, req.structured, err, f"NBD_CMD_{req.name}: {msg}")]


def _ok(req: Request) -> List[bytes]:
    # A simple reply is allowed for every command but READ even with structured replies on.
    return [encode_simple_reply(req.cookie)]


def _flush_if_fua(req: Request, disk) -> None:
    if req.flags & CMD_FLAG_FUA:
        disk.flush()


def _do_read(req: Request, disk) -> List[bytes]:
    off, n, cookie = req.offset, req.length, req.cookie
    if not req.structured:
        buf = bytearray(HDR_SIMPLE.size + n)
        if n:
            _readinto_exact(disk, memoryview(buf)[HDR_SIMPLE.size:], off)
        HDR_SIMPLE.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, cookie)
        return [buf]
    if n == 0:
        return [encode_none_chunk(cookie)]
    if req.flags & CMD_FLAG_DF:
        plan = [(off, n, False)]
    else:
        plan = _read_plan(disk, off, n)
    # Read everything first, so an error can still be reported as a clean single ERROR chunk.
    pieces: List[bytes] = []
    hdr = HDR_CHUNK.size + 8
    for i, (o, ln, hole) in enumerate(plan):
        done = i == len(plan) - 1
        flags = REPLY_FLAG_DONE if done else 0
        if hole:
            pieces.append(encode_hole_chunk(cookie, o, ln, done))
            continue
        buf = bytearray(hdr + ln)
        _readinto_exact(disk, memoryview(buf)[hdr:], o)
        HDR_CHUNK.pack_into(buf, 0, STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie,
                            8 + ln)
        struct.pack_into(">Q", buf, HDR_CHUNK.size, o)
        pieces.append(buf)
    return pieces


class _WouldBlock(Exception):
    """A cached read found a byte that is not in the page cache."""


def _fill_cached(view: memoryview, runs: list, i: int, skip: int) -> Tuple[int, int]:
    """Fill *view* from ``runs[i]`` on (the first *skip* bytes of it already used) with
    ``preadv(RWF_NOWAIT)``; zero runs stay as they are (the buffer is fresh). Returns where the
    next piece starts (run index, bytes of it used)."""
    pos, want = 0, len(view)
    while pos < want:
        _kind, fd, foff, n = runs[i]
        take = min(n - skip, want - pos)
        if fd >= 0:
            try:
                got = os.preadv(fd, [view[pos:pos + take]], foff + skip, _NOWAIT)
            except OSError:             # EAGAIN (not cached), or no RWF_NOWAIT here
                raise _WouldBlock() from None
            if got != take:             # not all cached, or the file ends early
                raise _WouldBlock()
        pos += take
        skip += take
        if skip == n:
            i, skip = i + 1, 0
    return i, skip


_Disk = None                    # vdisk.Disk, imported on first use (the core imports no server)
_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def read_cached(req: Request, disk) -> Optional[List[bytes]]:
    """The reply to a READ whose bytes are all in the page cache (``preadv(RWF_NOWAIT)``), so
    it costs no disk wait and may run on the event loop instead of a worker thread. Exactly the
    reply :func:`handle_request` gives, from one look-up of the map. None when anything would
    wait for the disk, the disk is not a plain :class:`vdisk.Disk` reading its own files, or
    the system has no RWF_NOWAIT: then the caller runs :func:`handle_request`."""
    global _Disk
    if _Disk is None:
        from ..disk import Disk
        _Disk = Disk
    if _NOWAIT is None or req.command != CMD_READ or type(disk).readinto is not _Disk.readinto:
        return None
    off, n, cookie = req.offset, req.length, req.cookie
    try:
        runs = disk.file_runs(off, n) if n else []
        if runs is None:
            return None
        structured = req.structured
        if structured and n and (len(runs) == 1 and (runs[0][1] >= 0 or n < HOLE_MIN)
                                 or req.flags & CMD_FLAG_DF):
            # one data chunk (a short hole is folded into data): the common case, kept short
            buf = bytearray(HDR_CHUNK.size + 8 + n)
            _fill_cached(memoryview(buf)[HDR_CHUNK.size + 8:], runs, 0, 0)
            _HDR_DATA.pack_into(buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_DATA, cookie, 8 + n, off)
            return [buf]
        if not structured:
            buf = bytearray(HDR_SIMPLE.size + n)
            if n:
                _fill_cached(memoryview(buf)[HDR_SIMPLE.size:], runs, 0, 0)
            HDR_SIMPLE.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, cookie)
            return [buf]
        if n == 0:
            return [encode_none_chunk(cookie)]
        plan = _plan_from_kinds(off, [(r[0], r[3]) for r in runs])
        pieces: List[bytes] = []
        hdr = HDR_CHUNK.size + 8
        i = skip = 0
        for k, (o, ln, hole) in enumerate(plan):
            done = k == len(plan) - 1
            if hole:
                pieces.append(encode_hole_chunk(cookie, o, ln, done))
                i, skip = _advance(runs, i, skip, ln)
                continue
            buf = bytearray(hdr + ln)
            i, skip = _fill_cached(memoryview(buf)[hdr:], runs, i, skip)
            _HDR_DATA.pack_into(buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                REPLY_TYPE_OFFSET_DATA, cookie, 8 + ln, o)
            pieces.append(buf)
        return pieces
    except _WouldBlock:
        return None
    except Exception:  # noqa: BLE001 - the worker path reports errors properly
        return None


_HDR_DATA = struct.Struct(HDR_CHUNK.format + "Q")     # chunk header + OFFSET_DATA's offset


def _advance(runs: list, i: int, skip: int, length: int) -> Tuple[int, int]:
    while length:
        take = min(runs[i][3] - skip, length)
        length -= take
        skip += take
        if skip == runs[i][3]:
            i, skip = i + 1, 0
    return i, skip


def _readinto_exact(disk, view: memoryview, offset: int) -> None:
    got = disk.readinto(view, offset)
    if got is not None and got != len(view):
        raise OSError(_errno.EIO, f"short read: {got} of {len(view)} bytes at offset {offset}")


def _do_write(req: Request, disk) -> List[bytes]:
    disk.pwrite(req.data, req.offset)
    _flush_if_fua(req, disk)
    return _ok(req)


def _reads_as_zero(disk, offset: int, length: int) -> bool:
    return all(kind is not ExtentKind.DATA for _o, _n, kind in extent_runs(disk, offset, length))


def _do_write_zeroes(req: Request, disk) -> List[bytes]:
    off, n = req.offset, req.length
    if req.flags & CMD_FLAG_FAST_ZERO:
        # Fast only when nothing has to be written: the range already reads as zeros and the
        # client allows holes. Anything else would cost real I/O, which FAST_ZERO forbids.
        if (req.flags & CMD_FLAG_NO_HOLE) or not _reads_as_zero(disk, off, n):
            return [error_reply(req.cookie, req.structured, ENOTSUP,
                                "NBD_CMD_WRITE_ZEROES: fast zeroing is not possible here")]
        _flush_if_fua(req, disk)
        return _ok(req)
    if n:
        if req.flags & CMD_FLAG_NO_HOLE:
            # NO_HOLE: the server must not create a hole. Storage that is allocated stays
            # allocated (zeros are written into it); where nothing is allocated, nothing is.
            disk.write_zeroes(off, n, keep_allocated=True)
        else:
            disk.write_zeroes(off, n)
    _flush_if_fua(req, disk)
    return _ok(req)


def _do_trim(req: Request, disk) -> List[bytes]:
    from .. import errors
    if req.length:
        try:
            disk.discard(req.offset, req.length)
        except errors.UnsupportedError:
            pass                                   # TRIM is advisory
    _flush_if_fua(req, disk)
    return _ok(req)


def _do_flush(req: Request, disk) -> List[bytes]:
    disk.flush()
    return _ok(req)


def _do_cache(req: Request, disk) -> List[bytes]:
    return _ok(req)                                # a hint: the page cache does the rest


def _do_block_status(req: Request, disk) -> List[bytes]:
    assert req.meta_context_id is not None
    desc = block_status_descriptors(disk, req.offset, req.length,
                                    bool(req.flags & CMD_FLAG_REQ_ONE))
    return [encode_block_status(req.cookie, req.meta_context_id, desc, done=True)]


_HANDLERS = {
    CMD_READ: _do_read,
    CMD_WRITE: _do_write,
    CMD_FLUSH: _do_flush,
    CMD_TRIM: _do_trim,
    CMD_CACHE: _do_cache,
    CMD_WRITE_ZEROES: _do_write_zeroes,
    CMD_BLOCK_STATUS: _do_block_status,
}


