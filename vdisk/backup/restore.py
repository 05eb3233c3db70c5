"""Restoring a backup chain into a new image, and verifying backups without writing anything."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from vdisk.errors import VDiskError
from .chain import open_chain
from .container import KIND_DATA
from .reader import BackupFile
from .view import BackupDisk

Progress = Callable[[int, int], None]


def open_backup(paths, *, search: bool = True) -> BackupDisk:
    """Open a backup (a path) or a chain (a list of paths, any order) as a read-only Disk.

    Parents not given are looked for, by backup id, among the files in their child's folder.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = open_chain([os.fspath(p) for p in paths], search=search)
    try:
        return BackupDisk(files)
    except BaseException:
        for bf in files:
            bf.close()
        raise


@dataclass
class RestoreResult:
    """What ``vdisk restore`` wrote (its ``--json`` summary)."""
    path: str
    format: str
    subtype: str
    virtual_size: int
    backups: list                # backup ids applied, full first
    bytes_read: int              # bytes decompressed from the backups
    bytes_written: int           # non-zero bytes written to the image
    seconds: float


def restore(paths, dst, *, format: Optional[str] = None, subtype: Optional[str] = None, force: bool = False,
            progress: Optional[Progress] = None) -> RestoreResult:
    """Write the disk a backup chain holds into a new image *dst* (``vhd``/``vdi``/``raw``,
    default from its name). Every chunk that is read has its SHA-256 checked; zeros stay holes
    (or unallocated blocks); the image gets its name only once complete (see vdisk.ops.convert)."""
    from vdisk.ops.convert import convert
    t0 = time.perf_counter()
    with open_backup(paths) as disk:
        ids = [bf.header.backup_id for bf in disk.backups]
        r = convert(disk, dst, format=format, subtype=subtype, force=force, progress=progress)
    return RestoreResult(r.path, r.format, r.subtype, r.size, ids, r.bytes_read, r.bytes_written,
                         round(time.perf_counter() - t0, 3))


@dataclass
class FileReport:
    """The result of verifying one backup file."""
    path: str
    backup_id: Optional[str]
    kind: Optional[str]
    parent: Optional[str]
    entries: int = 0
    bytes_checked: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class VerifyReport:
    """Every file's result, and whether the files form a complete chain."""
    files: list = field(default_factory=list)
    chain: list = field(default_factory=list)      # paths, full first, when complete
    chain_error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.chain_error is None and all(f.ok for f in self.files)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "files": [dict(asdict(f), ok=f.ok) for f in self.files], "chain": self.chain,
                "chain_error": self.chain_error}


def verify_file(path, progress: Optional[Progress] = None) -> FileReport:
    """Check one backup file completely: structure, every data chunk's SHA-256, every zero frame."""
    path = os.fspath(path)
    try:
        bf = BackupFile(path)
    except (VDiskError, OSError) as exc:
        return FileReport(path, None, None, None, error=str(exc))
    with bf:
        h = bf.header
        report = FileReport(path, h.backup_id, h.kind, h.parent, entries=len(bf.entries))
        e = bf.entries
        total = int(e["length"].sum())
        zero_frames: set = set()
        try:
            for i in range(len(e)):
                length = int(e[i]["length"])
                if e[i]["kind"] == KIND_DATA:
                    bf.read_entry(i)
                elif int(e[i]["frame_length"]):
                    frame = bf.read_frame(i)
                    key = hashlib.sha256(frame).digest()
                    if key not in zero_frames:             # identical zero frames are checked once
                        data = bf.decompress(frame, length, int(e[i]["offset"]), int(e[i]["frame_offset"]))
                        if data.count(0) != length:
                            raise VDiskError(f"{path}: backup chunk at offset {int(e[i]['offset'])}: a zero "
                                             f"entry's frame holds non-zero data (the backup is damaged)")
                        zero_frames.add(key)
                report.bytes_checked += length
                if progress:
                    progress(report.bytes_checked, total)
        except (VDiskError, OSError) as exc:
            report.error = str(exc)
    return report


def verify(paths: Sequence, progress: Optional[Progress] = None) -> VerifyReport:
    """Verify the given backups and every ancestor they need (found as ``open_backup`` does)."""
    paths = [os.fspath(p) for p in paths]
    report = VerifyReport()
    chain_paths: list[str] = []
    try:
        files = open_chain(paths)
        chain_paths = [bf.path for bf in files]
        for bf in files:
            bf.close()
        report.chain = chain_paths
    except (VDiskError, OSError) as exc:
        report.chain_error = str(exc)
    seen: set = set()
    for p in [*paths, *chain_paths]:
        key = os.path.realpath(p)
        if key in seen:
            continue
        seen.add(key)
        report.files.append(verify_file(p, progress))
    return report
