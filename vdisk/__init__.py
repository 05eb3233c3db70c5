"""vdisk: virtual disk images (Microsoft VHD, VirtualBox VDI, raw) as one block-device object.

    import vdisk
    with vdisk.open("disk.vhd") as d:
        head = d.pread(512, 0)
"""
import logging

from .errors import (ChecksumError, FormatError, JournalPendingError, LockError, ParentError,
                     RangeError, ReadOnlyError, UnsupportedError, VDiskError)
from .disk import Disk, Extent, ExtentKind, create, open

__all__ = [
    "open", "create", "Disk", "Extent", "ExtentKind",
    "VDiskError", "FormatError", "ChecksumError", "ParentError", "ReadOnlyError", "RangeError",
    "UnsupportedError", "LockError", "JournalPendingError",
]
__version__ = "0.1.0"

# A library reports, it does not print: warnings (checksum mismatches, repairable damage) go to the
# "vdisk" logger and to Disk.warnings; the CLI shows them as `vdisk: warning: ...`.
logging.getLogger("vdisk").addHandler(logging.NullHandler())
