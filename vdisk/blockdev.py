"""The block-device protocol: what devices, servers, the mount and backups may ask of a disk.

:class:`vdisk.Disk`, a shadow copy's view, a backup's read-only view and the test suite's one
fake all implement it; nothing outside the core asks a disk anything else. Read-only-ness has one
spelling (``read_only``); extent kinds are :class:`ExtentKind` members, never strings.

``block_size`` is the *allocation* unit of the image format (a VHD/VDI/VHDX block), kept under
that name because it is public API of :class:`vdisk.Disk`; the unit a device presents to a guest
is ``logical_sector_size`` (512, or 4096 for a VHDX made so).
"""
from __future__ import annotations

import enum
import uuid as uuidlib
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable


class ExtentKind(enum.IntEnum):
    """Where a run of the virtual disk comes from."""
    DATA = 0          # stored in a layer's file
    ZERO = 1          # reads as zeros by an explicit marker (VDI/VHDX zero block)
    UNALLOCATED = 2   # stored nowhere in the chain: reads as zeros


@dataclass(frozen=True)
class Extent:
    """A run of the virtual disk: where it comes from (kind) and which chain layer holds it."""
    offset: int
    length: int
    kind: ExtentKind
    layer: Optional[int]


@runtime_checkable
class BlockDevice(Protocol):
    """A byte-addressed disk of fixed size. Offsets and lengths are bytes; requests must lie inside
    ``[0, size)``. Implementations are thread-safe for concurrent readers."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int: ...

    @property
    def logical_sector_size(self) -> int: ...

    @property
    def uuid(self) -> Optional[uuidlib.UUID]: ...

    def readinto(self, buffer, offset: int) -> int:
        """Fill *buffer* from *offset*; returns len(buffer)."""
        ...

    def pwrite(self, data, offset: int) -> int:
        """Write *data* at *offset*; returns len(data)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, keep_allocated: bool = False) -> None:
        """Make a range read as zeros, allocating nothing where it already does."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Release storage where possible; the range reads as zeros afterwards."""
        ...

    def extents(self, offset: int = 0, length: Optional[int] = None) -> list[Extent]:
        """Runs of DATA / ZERO / UNALLOCATED covering the range, in order."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...
