"""The one place where sizes a header claims meet the format's limits and the file's real size.

A header field is a promise made by whoever wrote the file. Before vdisk allocates anything for
a table or a virtual size a header names, the claim is checked here against (1) what the format
allows, (2) what vdisk is willing to hold in memory, and (3) what the file can really hold: a
table that would lie past the end of the file is refused before a byte of it is read. Both
drivers (``formats/vhd.py``, ``formats/vdi.py``), ``vdisk create`` and ``vdisk check`` call
these functions, so memory and time grow with what a file holds, not with what it claims.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from .errors import FormatError, UnsupportedError

#: Block-table entries vdisk holds in memory for one image (8 bytes each: at most 512 MiB).
#: With the default blocks that is 128 PiB of VHD or 64 TiB of VDI; larger disks need larger blocks.
MAX_TABLE_ENTRIES = 1 << 26
#: Entries of the allocation map of a flat image (raw, fixed VHD); the granularity grows beyond it.
FLAT_MAP_ENTRIES = 1 << 21
#: Entries read and validated at a time, so a bad table fails after one chunk.
TABLE_CHUNK = 1 << 20


def check_table(path: str, structure: str, field: str, field_offset: Optional[int], *, entries: int,
                entry_bytes: int, table_offset: int, file_size: int, format_max: int) -> int:
    """Refuse a table of *entries* claimed by a header unless the format, vdisk's memory budget
    and the file all allow it. Returns the table's length in bytes."""
    def bad(problem: str) -> FormatError:
        return FormatError(path, structure, field, field_offset, problem)

    if entries > format_max:
        raise bad(f"{entries} table entries exceed the format's limit of {format_max}")
    if entries > MAX_TABLE_ENTRIES:
        raise bad(f"{entries} table entries exceed vdisk's limit of {MAX_TABLE_ENTRIES} "
                  f"({MAX_TABLE_ENTRIES * 8 >> 20} MiB of memory)")
    length = entries * entry_bytes
    if table_offset < 0 or table_offset + length > file_size:
        raise bad(f"a table of {entries} entries at {table_offset:#x} needs {table_offset + length} bytes, "
                  f"the file has {file_size}")
    return length


def check_virtual_size(path: str, structure: str, field: str, field_offset: Optional[int], size: int,
                       limit: int) -> None:
    """Refuse a virtual size beyond the format's limit."""
    if size > limit:
        raise FormatError(path, structure, field, field_offset,
                          f"virtual size {size} exceeds the format's limit of {limit} bytes")


def new_table_entries(where: str, size: int, block_size: int, *, format_max: int, format_name: str,
                      size_limit: Optional[int] = None, max_block_size: Optional[int] = None) -> int:
    """Entries of the block table of a new image; refused, before anything is allocated, when the
    size is beyond the format or vdisk's table budget (with the block size that would fit)."""
    if size_limit is not None and size > size_limit:
        raise UnsupportedError(f"{where}: {size} bytes exceed the {format_name} limit of {size_limit} bytes")
    n = -(-size // block_size)
    if n > format_max:
        raise UnsupportedError(f"{where}: {size} bytes need {n} blocks of {block_size}, more than a "
                               f"{format_name} can address ({format_max})")
    if n > MAX_TABLE_ENTRIES:
        need = block_size
        while -(-size // need) > MAX_TABLE_ENTRIES:
            need *= 2
        hint = (f"use a block size of at least {need}" if max_block_size is None or need <= max_block_size
                else f"even {max_block_size}-byte blocks are not enough")
        raise UnsupportedError(f"{where}: {size} bytes in blocks of {block_size} need a table of {n} entries, "
                               f"more than vdisk's limit of {MAX_TABLE_ENTRIES}; {hint}")
    return n


def write_new_table(pwrite: Callable[[bytes, int], None], offset: int, entries: int, *,
                    fill: Optional[int] = None, pad_to: int = 1) -> None:
    """Write the u32 table of a new image in chunks: every entry *fill* (0xFFFFFFFF, "unused" in
    both formats, reads the same in either byte order) or, with ``fill=None``, the little-endian
    identity map 0, 1, 2, ... of a fixed VDI. Padded with 0xFF bytes (zeros for the identity map)
    to a multiple of *pad_to*. Memory stays at one chunk whatever the table's size."""
    length = -(-entries * 4 // pad_to) * pad_to
    pad = b"\xff" if fill is not None else b"\0"
    for first in range(0, entries, TABLE_CHUNK):
        count = min(TABLE_CHUNK, entries - first)
        if fill is not None:
            chunk = fill.to_bytes(4, "little") * count
        else:
            chunk = np.arange(first, first + count, dtype="<u4").tobytes()
        if first + count == entries:
            chunk += pad * (length - 4 * entries)
        pwrite(chunk, offset + 4 * first)
    if entries == 0 and length:
        pwrite(pad * length, offset)


def flat_block_size(size: int, base: int) -> int:
    """Granularity of a flat image's allocation map: *base*, doubled until the map stays small."""
    bs = base
    while -(-size // bs) > FLAT_MAP_ENTRIES:
        bs *= 2
    return bs


def read_table(read: Callable[[int, int], bytes], offset: int, entries: int, dtype: str,
               check: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """A u32 table as int64, read and validated in chunks (*check(first_index, chunk)* raises on a
    bad entry), so a damaged table is refused after its first bad chunk. Call only after
    :func:`check_table` has bounded *entries* by the file."""
    out = np.empty(entries, dtype=np.int64)
    for first, chunk in iter_table(read, offset, entries, dtype):
        if check is not None:
            check(first, chunk)
        out[first:first + len(chunk)] = chunk
    return out


def iter_table(read: Callable[[int, int], bytes], offset: int, entries: int,
               dtype: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, int64 chunk) of a u32 table, TABLE_CHUNK entries at a time."""
    for first in range(0, entries, TABLE_CHUNK):
        count = min(TABLE_CHUNK, entries - first)
        raw = read(4 * count, offset + 4 * first)
        if len(raw) < 4 * count:
            raw = raw + b"\xff" * (4 * count - len(raw))      # short only if the file shrank under us
        yield first, np.frombuffer(raw, dtype=dtype).astype(np.int64)
