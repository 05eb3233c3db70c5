"""The one exception hierarchy of vdisk.

Every error a user can provoke with bad input derives from :class:`VDiskError`, so the CLI (and any
embedding program) can turn it into a one-line message instead of a traceback.
"""
from __future__ import annotations


class VDiskError(Exception):
    """Base of every error vdisk raises on purpose."""


class FormatError(VDiskError):
    """An on-disk structure is invalid: names the file, the structure, the field and its offset."""

    def __init__(self, path: str, structure: str, field: str | None, offset: int | None, problem: str):
        self.path, self.structure, self.field, self.offset, self.problem = path, structure, field, offset, problem
        where = structure
        if field:
            where += f".{field}"
        if offset is not None:
            where += f" at offset {offset:#x}"
        super().__init__(f"{path}: {where}: {problem}")


class ChecksumError(FormatError):
    """A structure's checksum does not match its contents."""


class ParentError(VDiskError):
    """A differencing image's parent is missing, mismatched or forms a cycle."""


class ReadOnlyError(VDiskError):
    """A write was attempted on something opened (or only openable) read-only."""


class RangeError(VDiskError):
    """A request lies (partly) outside the virtual disk."""


class UnsupportedError(VDiskError):
    """A valid image uses a feature vdisk does not implement."""


class LockError(VDiskError):
    """The image is locked by another process (opened read-write elsewhere)."""


class JournalPendingError(VDiskError):
    """An interrupted in-place operation left a journal that must be recovered first."""


class ReadError(VDiskError):
    """Reading an image file failed: the device reported an error, or the file ended before the
    end of a region its metadata says it holds. Names the file, the offset and the length."""

    def __init__(self, path: str, offset: int, length: int, problem: str):
        self.path, self.offset, self.length, self.problem = path, offset, length, problem
        super().__init__(f"{path}: read error at offset {offset} ({length} bytes): {problem}")
