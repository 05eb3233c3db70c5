"""exFAT: free clusters from the allocation bitmap named in the root directory.

Files may be stored without FAT chains (NoFatChain), so only the bitmap tells what is used. The
root directory and the bitmap itself are followed through the FAT with a visited bound. Refuses
VolumeDirty / MediaFailure, a bitmap shorter than the cluster count, and geometry past the
partition end.
"""
from __future__ import annotations

from .base import FreeMap, Region, bits_free, need, u32, u64

ENTRY_BITMAP = 0x81
END_OF_CHAIN = 0xFFFFFFFF
PIECE = 1 << 20                 # bitmap bytes examined at a time (bounded memory)


def probe(boot: bytes) -> bool:
    return len(boot) >= 512 and boot[3:11] == b"EXFAT   "


def _chain(region: Region, fat: int, first: int, clusters: int, limit: int) -> list[int]:
    """Clusters of a FAT chain from *first*, at most *limit* long; a loop or a bad link refuses."""
    out: list[int] = []
    c = first
    while c != END_OF_CHAIN:
        need(2 <= c < clusters + 2, region, f"exFAT chain points at cluster {c:#x}, outside the heap")
        need(len(out) < limit, region, "exFAT cluster chain is longer than its object (a loop?)")
        out.append(c)
        c = u32(region.read(fat + c * 4, 4, "exFAT FAT entry"), 0)
    return out


def read_free(region: Region, sink=None) -> FreeMap:
    """The free clusters of the exFAT volume in *region*."""
    boot = region.read(0, 512, "exFAT boot sector")
    need(probe(boot), region, "no exFAT boot sector")
    bps_shift, spc_shift = boot[108], boot[109]
    need(9 <= bps_shift <= 12 and bps_shift + spc_shift <= 25, region, "exFAT sector/cluster size is out of range")
    bps = 1 << bps_shift
    unit = bps << spc_shift
    flags = int.from_bytes(boot[106:108], "little")
    if flags & 0x2:
        raise region.fail("exFAT volume is marked dirty (VolumeDirty): run fsck.exfat")
    if flags & 0x4:
        raise region.fail("exFAT volume reports a media failure: run fsck.exfat")
    vol_len = u64(boot, 72)
    fat_off, fat_len = u32(boot, 80), u32(boot, 84)
    heap, clusters, root = u32(boot, 88), u32(boot, 92), u32(boot, 96)
    nfats = boot[110]
    need(nfats in (1, 2), region, f"exFAT number of FATs {nfats} is invalid")
    need(vol_len * bps <= region.length, region,
         f"exFAT claims {vol_len} sectors, more than the partition's {region.length} bytes")
    need(fat_off > 0 and fat_len * bps >= (clusters + 2) * 4, region, "exFAT FAT is too small for its clusters")
    need(heap * bps + clusters * unit <= vol_len * bps, region, "exFAT cluster heap runs past the volume")
    active = 1 if (nfats == 2 and flags & 1) else 0
    fat = (fat_off + active * fat_len) * bps
    dir_clusters = _chain(region, fat, root, clusters, clusters)
    bitmap = None
    for c in dir_clusters:
        raw = region.read(heap * bps + (c - 2) * unit, unit, "exFAT root directory")
        for i in range(0, unit, 32):
            t = raw[i]
            if t == 0:
                break
            if t == ENTRY_BITMAP and (raw[i + 1] & 1) == active:
                bitmap = (u32(raw, i + 20), u64(raw, i + 24))
        else:
            continue
        break
    if bitmap is None:
        raise region.fail("exFAT root directory holds no allocation bitmap")
    first, length = bitmap
    need(length * 8 >= clusters, region, f"exFAT allocation bitmap of {length} bytes cannot cover {clusters} clusters")
    bm_clusters = _chain(region, fat, first, clusters, -(-length // unit))
    fm = FreeMap("exfat", unit, clusters, sink=sink)
    done = 0
    piece = min(unit, PIECE)
    for c in bm_clusters:
        for off in range(0, unit, piece):
            n = min(piece * 8, clusters - done)
            if n <= 0:
                break
            raw = region.read(heap * bps + (c - 2) * unit + off, -(-n // 8), "exFAT allocation bitmap")
            fm.add(heap * bps + done * unit, bits_free(raw, n))
            done += n
    need(done == clusters, region, "exFAT allocation bitmap chain ends before the last cluster")
    return fm
