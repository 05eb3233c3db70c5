"""vdisk: virtual disk images (Microsoft VHD, VirtualBox VDI, raw) as one block-device object.

    import vdisk
    with vdisk.open("disk.vhd") as d:
        head = d.pread(512, 0)
"""
import importlib
import logging
from typing import TYPE_CHECKING

from .errors import (ChecksumError, FormatError, JournalPendingError, LockError, ParentError,
                     RangeError, ReadError, ReadOnlyError, UnsupportedError, VDiskError)

__all__ = [
    "open", "create", "Disk", "Extent", "ExtentKind",
    "VDiskError", "FormatError", "ChecksumError", "ParentError", "ReadOnlyError", "RangeError",
    "UnsupportedError", "LockError", "JournalPendingError", "ReadError",
]
__version__ = "0.1.0"

# The block-device API lives in vdisk.disk, which pulls in numpy and every format. It is loaded on
# first use, so that commands which never open an image (--help, --version, argument errors)
# start at once, and the CLI can configure numpy before it is imported. ``open`` is the open
# pipeline (vdisk/openers.py: backups, snapshot trees, shadows around the core's chain open).
_FROM_DISK = ("create", "Disk", "Extent", "ExtentKind")
_FROM_OPENERS = ("open",)
if TYPE_CHECKING:          # what the lazy names are, for type checkers (the package ships py.typed)
    from .disk import Disk, Extent, ExtentKind, create
    from .openers import open


def __getattr__(name: str):
    if name in _FROM_DISK or name in _FROM_OPENERS:
        disk = importlib.import_module(".disk", __name__)
        openers = importlib.import_module(".openers", __name__)
        for attr in _FROM_DISK:
            globals()[attr] = getattr(disk, attr)
        for attr in _FROM_OPENERS:
            globals()[attr] = getattr(openers, attr)
        return globals()[name]
    try:
        return importlib.import_module(f".{name}", __name__)     # vdisk.<submodule>
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


# Modules moved by the reorganisation into core / ops / cli keep their old names for one release.
from . import _moved
_moved.install()

# A library reports, it does not print: warnings (checksum mismatches, repairable damage) go to the
# "vdisk" logger and to Disk.warnings; the CLI shows them as `vdisk: warning: ...`.
logging.getLogger("vdisk").addHandler(logging.NullHandler())
