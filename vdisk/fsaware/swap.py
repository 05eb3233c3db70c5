"""Linux swap (version 1): nothing in it outlives a boot, so every page after the header page is
free, except the pages listed as bad. A swap area holding a hibernation image (its signature
replaced by a suspend signature) is refused: that image is the state of a sleeping system.
"""
from __future__ import annotations

import numpy as np

from .base import FreeMap, Region, need, u32

PAGE_SIZES = (4096, 8192, 16384, 65536)
SWAP_MAGIC = b"SWAPSPACE2"
SUSPEND_MAGICS = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001")
MAX_BAD = 637            # what fits in a 4 KiB header page


def _page_size(region: Region) -> tuple[int, bytes]:
    for ps in PAGE_SIZES:
        if ps > region.length:
            break
        tail = region.read(ps - 10, 10, "swap signature")
        if tail == SWAP_MAGIC or any(tail.startswith(m) or tail.endswith(m) for m in SUSPEND_MAGICS):
            return ps, tail
    return 0, b""


def probe(region: Region) -> bool:
    return _page_size(region)[0] > 0


def read_free(region: Region, sink=None) -> FreeMap:
    """Every page of the swap area in *region* past its header, bad pages excepted."""
    ps, tail = _page_size(region)
    need(ps > 0, region, "no swap signature")
    if tail != SWAP_MAGIC:
        raise region.fail("swap area holds a hibernation image (resume from it, or run mkswap, first)")
    hdr = region.read(1024, 512, "swap header")
    version, last, nbad = u32(hdr, 0), u32(hdr, 4), u32(hdr, 8)
    need(version == 1, region, f"swap header version {version} is not 1 (or not little-endian)")
    pages = region.length // ps
    need(0 < last < pages, region, f"swap claims {last + 1} pages, more than the partition's {pages}")
    need(nbad <= MAX_BAD, region, f"swap claims {nbad} bad pages, more than its header can list")
    raw = region.read(1536, 4 * nbad, "swap bad-page list")
    bad = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    need(bool(((bad >= 1) & (bad <= last)).all()), region, "swap bad-page list names pages outside the area")
    free = np.ones(last + 1, dtype=bool)
    free[0] = False
    free[bad] = False
    fm = FreeMap("swap", ps, last + 1, sink=sink)
    fm.add(0, free)
    return fm
