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

import importlib

#: public name -> the module that defines it. They load on first use, so that a peek at a file's
#: header (reader.is_backup, which every vdisk.open makes) does not load the whole package.
_EXPORTS = {"DEFAULT_CHUNK": "container", "Header": "container", "BackupFile": "reader", "is_backup": "reader",
            "FileReport": "restore", "RestoreResult": "restore", "VerifyReport": "restore",
            "open_backup": "restore", "restore": "restore", "verify": "restore", "verify_file": "restore",
            "BackupResult": "take", "backup": "take", "BackupDisk": "view"}

__all__ = ["backup", "restore", "verify", "verify_file", "open_backup", "is_backup", "BackupDisk", "BackupFile",
           "BackupResult", "RestoreResult", "VerifyReport", "FileReport", "Header", "DEFAULT_CHUNK"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
