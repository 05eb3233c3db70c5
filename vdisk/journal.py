"""Write-ahead journal for operations that move or free existing data inside an image file.

Every in-place maintenance operation (compact, commit, resize, relink, repair, shadow deletion)
runs as one :class:`Transaction` on one image file. The journal is a file beside the image,
``IMAGE.vdisk-journal``, with this life cycle::

    create journal (header: operation, original file size)   fsync journal + directory
    for each batch of image writes:
        append UNDO records (offset, old bytes; or "was zeros")  fsync journal
        write the image (no barrier needed yet)
    fsync image
    append COMMIT (final file size + REDO writes)              fsync journal   <- commit point
    apply the REDO writes, truncate to the final size          fsync image
    delete the journal                                         fsync directory

Recovery (:func:`recover`, also run by every writable open) reads the journal: with a valid
COMMIT record it re-applies the REDO writes and the truncation (idempotent) — the operation is
*completed*; without one it writes every UNDO record back, newest first, and truncates to the
original size — the operation is *rolled back*. Each record carries a CRC-32, so a record torn by
the crash is recognised and ignored (the image write it guarded never started, because the
journal is made durable before the image is touched). A read-only open refuses an image with a
pending journal (:class:`~vdisk.errors.JournalPendingError`) and points at ``vdisk recover``.

Undo data stays small: bytes past the original end of file need none (rollback truncates), a
range known to hold zeros is logged as a ZERO record without payload, and a range that nothing
referenced before the operation (a leak, a hole being filled) may be declared ``unreferenced``.
"""
from __future__ import annotations

import bisect
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from construct import Bytes, Int32ul, Int64ul, Struct

from .errors import JournalPendingError, VDiskError
from . import io as _io
from .sidecars import JOURNAL
from .io import ImageFile, start_writeback

SUFFIX = JOURNAL
MAGIC = b"VDJRNL01"
RECORD_MAGIC = 0x4452434A          # "JCRD"
REC_UNDO, REC_UNDO_ZERO, REC_COMMIT = 1, 2, 3

# Journal header (one per journal, at offset 0). crc covers every other byte of the header.
JournalHeader = Struct(
    "magic" / Bytes(8),
    "original_size" / Int64ul,
    "inode" / Int64ul,                 # the image file's inode and format identity (VHD footer id,
    "identity" / Bytes(16),            # VDI creation UUID): a journal never applies to another file
    "operation" / Bytes(32),
    "image_name" / Bytes(200),
    "crc" / Int32ul,
)
HEADER_SIZE = JournalHeader.sizeof()

# Record header; the payload follows. crc covers kind, offset, length and the payload.
RecordHeader = Struct(
    "magic" / Int32ul,
    "kind" / Int32ul,
    "offset" / Int64ul,
    "length" / Int64ul,
    "payload_length" / Int64ul,
    "crc" / Int32ul,
)
RECORD_SIZE = RecordHeader.sizeof()
_REDO_ITEM = struct.Struct("<QQ")   # (offset, length) before each REDO write inside COMMIT's payload


def journal_path(image_path: str) -> str:
    """Where the journal of *image_path* lives."""
    return os.fspath(image_path) + SUFFIX


def pending(image_path: str) -> bool:
    """True when *image_path* has an unfinished operation waiting for recovery."""
    return os.path.exists(journal_path(image_path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _record_crc(kind: int, offset: int, length: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<IQQ", kind, offset, length))) & 0xFFFFFFFF


def _record(kind: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    head = RecordHeader.build(dict(magic=RECORD_MAGIC, kind=kind, offset=offset, length=length,
                                   payload_length=len(payload), crc=_record_crc(kind, offset, length, payload)))
    return head + payload


def image_identity(file: ImageFile) -> bytes:
    """The 16 identity bytes its format's driver reads from the file's ends (a VHD footer's id,
    a VDI creation UUID), or zeros (raw, or not readable right now). No in-place operation
    changes them."""
    from vdisk.formats import registry
    size = file.size()
    head = file.pread(512, 0)
    tail = file.pread(512, max(0, size - 512))
    for driver in registry.drivers():
        identity = driver.identity_from(head, tail)
        if identity:
            return bytes(identity).ljust(16, b"\0")[:16]
    return bytes(16)


def _header(original_size: int, inode: int, identity: bytes, operation: str, image_name: str) -> bytes:
    fields = dict(magic=MAGIC, original_size=original_size, inode=inode, identity=identity,
                  operation=operation.encode()[:32].ljust(32, b"\0"),
                  image_name=os.path.basename(image_name).encode("utf-8", "replace")[:200].ljust(200, b"\0"), crc=0)
    raw = JournalHeader.build(fields)
    fields["crc"] = zlib.crc32(raw[:-4]) & 0xFFFFFFFF
    return JournalHeader.build(fields)


class _Ranges:
    """Byte ranges already covered by undo records (sorted, disjoint half-open intervals)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        i = bisect.bisect_right(self.ends, start)
        pos = start
        while pos < end and i < len(self.starts):
            if self.starts[i] >= end:
                break
            if self.starts[i] > pos:
                out.append((pos, self.starts[i]))
            pos = max(pos, self.ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)
        j = i
        while j < len(self.starts) and self.starts[j] <= end:
            start, end = min(start, self.starts[j]), max(end, self.ends[j])
            j += 1
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]


class Transaction:
    """One journaled in-place operation on one open, writable image file.

    Use as a context manager; call :meth:`commit` at the end. Leaving the block with an exception
    rolls back (and if even that fails — the process is dying, the disk is gone — the journal stays
    for :func:`recover`)::

        with Transaction(file, "compact") as tx:
            tx.write_many([(offset, data), ...], unreferenced=True)
            tx.commit(final_size=new_size, redo=[(footer_offset, footer)])
    """

    def __init__(self, file: ImageFile, operation: str):
        if not file.writable:
            raise VDiskError(f"{file.path}: internal error: journaled operation on a read-only file")
        self.file = file
        self.operation = operation
        self.path = journal_path(file.path)
        self.original_size = file.size()
        self._covered = _Ranges()
        self._journal: Optional[ImageFile] = None
        self._jpos = 0
        self._header_durable = False
        self.done = False

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Transaction":
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.done:
                self.rollback()
                raise VDiskError(f"{self.file.path}: internal error: {self.operation} ended without commit")
            return
        if not self.done:
            try:
                self.rollback()
            except BaseException:            # the journal stays; the next writable open recovers
                self._close_journal()

    def begin(self) -> None:
        if os.path.exists(self.path):
            raise JournalPendingError(f"{self.file.path}: an interrupted operation is pending; "
                                      f"run 'vdisk recover {self.file.path}' first")
        self._journal = ImageFile(self.path, create=True, lock=False)
        head = _header(self.original_size, os.fstat(self.file.fd).st_ino, image_identity(self.file),
                       self.operation, self.file.path)
        self._journal.pwrite(head, 0)
        self._jpos = len(head)
        # Made durable (with the directory entry) by the first _append, which every image write
        # waits for: one barrier instead of two.
        self._header_durable = False

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- journaled writes ---------------------------------------------------------------------
    def _undo_records(self, offset: int, length: int, old_zero: bool, unreferenced: bool,
                      old: Optional[bytes]) -> list[bytes]:
        end = min(offset + length, self.original_size)   # past the old end: rollback truncates
        recs = []
        for lo, hi in self._covered.gaps(offset, end) if offset < end else []:
            self._covered.add(lo, hi)
            if unreferenced:
                continue
            if old_zero:
                recs.append(_record(REC_UNDO_ZERO, lo, hi - lo))
            elif old is not None:
                recs.append(_record(REC_UNDO, lo, hi - lo, bytes(old[lo - offset:hi - offset])))
            else:
                data = self.file.pread(hi - lo, lo)
                data += bytes(hi - lo - len(data))
                recs.append(_record(REC_UNDO, lo, hi - lo, data))
        return recs

    def _append(self, records: Sequence[bytes]) -> None:
        if self._journal is None:
            raise VDiskError(f"{self.file.path}: internal error: transaction is not open")
        if records:
            blob = b"".join(records)
            self._journal.pwrite(blob, self._jpos)
            self._jpos += len(blob)
        if records or not self._header_durable:
            self._journal.sync()
        if not self._header_durable:
            _fsync_dir(self.path)
            self._header_durable = True

    def write_many(self, writes: Iterable[tuple], *, old_zero: bool = False,
                   unreferenced: bool = False) -> None:
        """Journal the old contents of every target range (one barrier), then write them all.

        *old_zero*: the caller knows the ranges hold zeros now (logged without payload).
        *unreferenced*: nothing in the image refers to the ranges now, so no undo data is kept.
        An item may be ``(offset, data, mode)`` with mode "read", "zero" or "unreferenced" to
        choose per write.
        """
        writes = list(writes)
        self._append(self._write_undo(writes, old_zero, unreferenced))
        for item in writes:
            self.file.write_through(item[1], item[0])

    def _write_undo(self, writes: Sequence[tuple], old_zero: bool = False,
                    unreferenced: bool = False) -> list[bytes]:
        recs: list[bytes] = []
        for item in writes:
            zero, unref = old_zero, unreferenced
            if len(item) > 2:                  # per-write mode: "read", "zero" or "unreferenced"
                zero, unref = item[2] == "zero", item[2] == "unreferenced"
            recs += self._undo_records(item[0], len(item[1]), zero, unref, None)
        return recs

    def copy_many(self, copies: Iterable[tuple[int, int, int, str]],
                  then_write: Sequence[tuple] = ()) -> None:
        """Journal the targets, then copy ranges inside the image: items (src, dst, length, mode),
        mode as in :meth:`write_many`. The kernel copies (copy_file_range) where it can.

        *then_write*: items as for :meth:`write_many`, written after the copies and journaled
        with them, behind the same single barrier.
        """
        copies = list(copies)
        recs: list[bytes] = []
        for src, dst, n, mode in copies:
            recs += self._undo_records(dst, n, mode == "zero", mode == "unreferenced", None)
        recs += self._write_undo(then_write)
        self._append(recs)
        for src, dst, n, mode in copies:
            _copy_range(self.file, src, dst, n)
        for item in then_write:
            self.file.write_through(item[1], item[0])

    def write(self, offset: int, data: bytes, *, old_zero: bool = False, unreferenced: bool = False) -> None:
        """Journal then write one range (see :meth:`write_many`)."""
        self.write_many([(offset, data)], old_zero=old_zero, unreferenced=unreferenced)

    def preserve(self, offset: int, length: int) -> None:
        """Journal the old bytes of a range about to change by other means than a write (a hole
        punched with fallocate)."""
        if length:
            self._append(self._undo_records(offset, length, False, False, None))

    def truncate(self, size: int) -> None:
        """Change the file size before the commit (what is cut off is journaled first)."""
        cur = self.file.size()
        if size < cur:
            self._append(self._undo_records(size, cur - size, False, False, None))
        self.file.truncate_through(size)

    # -- the end ------------------------------------------------------------------------------
    def commit(self, final_size: Optional[int] = None, redo: Sequence[tuple[int, bytes]] = ()) -> None:
        """Make the operation durable: image barrier, COMMIT record, REDO writes, truncation, cleanup."""
        size = self.file.size() if final_size is None else final_size
        # The cached pages of a tail about to be cut off are dropped while the barrier waits for
        # the device, instead of by the truncation afterwards (it changes no byte of the file).
        dropper = None
        if size < self.file.size() and hasattr(os, "posix_fadvise"):
            dropper = threading.Thread(target=_drop_cache, args=(self.file.fd, size), daemon=True)
            dropper.start()
        try:
            self.file.sync()
        finally:
            if dropper is not None:
                dropper.join()
        payload = b"".join(_REDO_ITEM.pack(off, len(data)) + bytes(data) for off, data in redo)
        self._append([_record(REC_COMMIT, size, len(redo), payload)])
        _finish(self.file, list(redo), size)
        self.done = True
        self._remove()

    def rollback(self) -> None:
        """Settle a failed operation in-process, as recovery would: undo everything written so
        far — or, once the COMMIT record is durable, complete it — and remove the journal."""
        if self._journal is None:
            return
        self._journal.sync()
        _settle(self.file, _read_records(self._journal), self.original_size)
        self.done = True
        self._remove()

    def _remove(self) -> None:
        self._close_journal()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        _fsync_dir(self.path)


def _copy_range(file: ImageFile, src: int, dst: int, n: int) -> None:
    """Copy [src, src+n) to dst within one image file, through the I/O seam's fault hook.

    The device starts writing the copy at once, so the barrier before COMMIT finds little left.
    """
    file._check("write", dst, n)
    _copy_bytes(file, src, dst, n)
    start_writeback(file.fd, dst, n)


def _drop_cache(fd: int, offset: int) -> None:
    try:
        os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _copy_bytes(file: ImageFile, src: int, dst: int, n: int) -> None:
    copy = getattr(os, "copy_file_range", None)
    if _io.read_fault_hook is not None:
        copy = None                              # injected read faults must see the source reads
    done = 0
    if copy is not None:
        try:
            while done < n:
                got = copy(file.fd, file.fd, n - done, src + done, dst + done)
                if got <= 0:
                    break
                done += got
        except OSError:
            pass                                 # e.g. unsupported by the filesystem: copy by hand
    while done < n:
        # Stored data being moved: a failed or short read is a ReadError (the journal rolls the
        # operation back), never zeros written in the data's place.
        chunk = bytearray(min(8 << 20, n - done))
        file.readinto_exact(memoryview(chunk), src + done)
        os.pwrite(file.fd, chunk, dst + done)
        done += len(chunk)


# ---------------------------------------------------------------------------------------------
# Reading a journal and recovering
# ---------------------------------------------------------------------------------------------
@dataclass
class _Rec:
    kind: int
    offset: int
    length: int
    payload: bytes


def _read_records(journal: ImageFile) -> list[_Rec]:
    """Every valid record in order; stops at the first torn or corrupt one."""
    out = []
    pos = HEADER_SIZE
    size = journal.size()
    while pos + RECORD_SIZE <= size:
        raw = journal.pread(RECORD_SIZE, pos)
        h = RecordHeader.parse(raw)
        if h.magic != RECORD_MAGIC or pos + RECORD_SIZE + h.payload_length > size:
            break
        payload = journal.pread(h.payload_length, pos + RECORD_SIZE)
        if _record_crc(h.kind, h.offset, h.length, payload) != h.crc:
            break
        out.append(_Rec(h.kind, h.offset, h.length, payload))
        pos += RECORD_SIZE + h.payload_length
    return out


def _parse_redo(rec: _Rec) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    for _ in range(rec.length):
        off, n = _REDO_ITEM.unpack_from(rec.payload, pos)
        pos += _REDO_ITEM.size
        out.append((off, rec.payload[pos:pos + n]))
        pos += n
    return out


def _finish(file: ImageFile, redo: list[tuple[int, bytes]], final_size: int) -> None:
    for off, data in redo:
        file.write_through(data, off)
    if file.size() != final_size:
        file.truncate_through(final_size)
    file.sync()


def _undo(file: ImageFile, records: list[_Rec], original_size: int) -> None:
    for rec in reversed(records):
        if rec.kind == REC_UNDO:
            file.write_through(rec.payload, rec.offset)
        elif rec.kind == REC_UNDO_ZERO:
            chunk = 8 << 20
            for pos in range(rec.offset, rec.offset + rec.length, chunk):
                file.write_through(bytes(min(chunk, rec.offset + rec.length - pos)), pos)
    if file.size() != original_size:
        file.truncate_through(original_size)
    file.sync()


def _settle(file: ImageFile, records: list[_Rec], original_size: int) -> tuple[str, str]:
    """Complete the operation if its COMMIT record is valid, else roll it back."""
    commit = next((r for r in records if r.kind == REC_COMMIT), None)
    if commit is not None:
        redo = _parse_redo(commit)
        _finish(file, redo, commit.offset)
        return "completed", f"{len(redo)} metadata writes re-applied"
    undo = [r for r in records if r.kind in (REC_UNDO, REC_UNDO_ZERO)]
    _undo(file, undo, original_size)
    return "rolled back", f"{len(undo)} ranges restored"


@dataclass
class Recovery:
    """What :func:`recover` did."""
    action: str          # "none", "rolled back", "completed", "discarded"
    operation: str = ""
    detail: str = ""

    def __str__(self) -> str:
        if self.action == "none":
            return "no interrupted operation"
        what = f"interrupted {self.operation}" if self.operation else "journal"
        return f"{what}: {self.action}" + (f" ({self.detail})" if self.detail else "")


def recover_file(file: ImageFile) -> Recovery:
    """Finish or roll back the pending operation of an open, writable, locked image file."""
    jpath = journal_path(file.path)
    if not os.path.exists(jpath):
        return Recovery("none")
    if not file.writable:
        raise JournalPendingError(f"{file.path}: an interrupted in-place operation left a journal "
                                  f"({os.path.basename(jpath)}); run 'vdisk recover {file.path}'")
    journal = ImageFile(jpath, lock=False)
    try:
        raw = journal.pread(HEADER_SIZE, 0)
        # Zeros where the magic belongs: the header never reached the disk (see below).
        if raw[:8] != MAGIC[:len(raw[:8])] and any(raw[:8]):
            raise VDiskError(f"{jpath}: not a vdisk journal; move it away to use the image")
        ok = len(raw) == HEADER_SIZE and zlib.crc32(raw[:-4]) & 0xFFFFFFFF == JournalHeader.parse(raw).crc
        if not ok:
            # The header is made durable before the image is touched, so a torn header means the
            # operation never wrote anything.
            result = Recovery("discarded", detail="journal header incomplete; image untouched")
        else:
            h = JournalHeader.parse(raw)
            op = h.operation.rstrip(b"\0").decode("utf-8", "replace")
            now = image_identity(file)
            if h.inode != os.fstat(file.fd).st_ino or (
                    now != bytes(16) and h.identity != bytes(16) and now != h.identity):
                raise JournalPendingError(
                    f"{file.path}: the journal {os.path.basename(jpath)} was written for another file "
                    f"(an interrupted {op} of an image that has since been replaced?); it was not applied. "
                    f"Remove it if this image is the one you want")
            action, detail = _settle(file, _read_records(journal), h.original_size)
            result = Recovery(action, op, detail)
    finally:
        journal.close()
    os.unlink(jpath)
    _fsync_dir(jpath)
    return result


def recover(path: str) -> Recovery:
    """Complete or roll back an interrupted operation on the image at *path* (``vdisk recover``)."""
    path = os.fspath(path)
    if not os.path.exists(journal_path(path)):
        return Recovery("none")
    file = ImageFile(path, writable=True)
    try:
        return recover_file(file)
    finally:
        file.close()


def check_on_open(file: ImageFile) -> Optional[Recovery]:
    """Hook for opening: recover when writable, refuse with JournalPendingError when read-only."""
    if not os.path.exists(journal_path(file.path)):
        return None
    return recover_file(file)
