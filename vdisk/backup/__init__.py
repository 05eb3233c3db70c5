"""Backups of shadow copies: full and incremental, in zstd frames any zstd tool can read.

    from vdisk import backup
    r = backup.backup("disk.vhd", "mon.vbk")                      # new shadow, full backup
    r = backup.backup("disk.vhd", "tue.vbk", since="mon.vbk")     # new shadow, changes only
    backup.restore(["mon.vbk", "tue.vbk"], "disk-tue.vdi")        # any order; verified
    with backup.open_backup("tue.vbk") as d:                      # a read-only vdisk.Disk
        d.pread(512, 0)                                           # (mon.vbk found by its id)
    backup.verify(["tue.vbk"]).ok

``vdisk.open("tue.vbk")`` returns the same read-only Disk, so a backup mounts, serves over NBD
and converts like any image. ``zstd -d -c mon.vbk > disk.raw`` gives a full backup's raw disk.
The layout is documented in docs/backup.md.
"""
from __future__ import annotations

from .container import DEFAULT_CHUNK, Header
from .reader import BackupFile, is_backup
from .restore import FileReport, RestoreResult, VerifyReport, open_backup, restore, verify, verify_file
from .take import BackupResult, backup
from .view import BackupDisk

__all__ = ["backup", "restore", "verify", "verify_file", "open_backup", "is_backup", "BackupDisk", "BackupFile",
           "BackupResult", "RestoreResult", "VerifyReport", "FileReport", "Header", "DEFAULT_CHUNK"]
