"""FAT12/16/32: free clusters are the FAT entries that read 0.

The type follows from the cluster count (as the FAT specification defines it, not from the label).
Refuses a volume marked dirty (the clean-shutdown bit of FAT entry 1, or the boot sector's
"needs check" flag), FAT copies that disagree (while mirroring is on) and geometry that does not
fit the partition. The FAT is read in bounded chunks, all copies side by side.
"""
from __future__ import annotations

import numpy as np

from .base import FreeMap, Region, need, power_of_two, u16, u32

CHUNK_ENTRIES = 1 << 20


def probe(boot: bytes) -> bool:
    """True when the boot sector looks like a FAT BPB (and not exFAT/NTFS)."""
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa" or boot[3:11] in (b"EXFAT   ", b"NTFS    "):
        return False
    bps, spc = u16(boot, 11), boot[13]
    return (bps in (512, 1024, 2048, 4096) and power_of_two(spc) and u16(boot, 14) > 0 and 1 <= boot[16] <= 4
            and (boot[54:59] == b"FAT12" or boot[54:59] == b"FAT16" or boot[82:87] == b"FAT32" or boot[54:57] == b"FAT"))


def geometry(region: Region, boot: bytes) -> dict:
    bps, spc, reserved, nfats = u16(boot, 11), boot[13], u16(boot, 14), boot[16]
    need(bps in (512, 1024, 2048, 4096) and power_of_two(spc) and reserved > 0 and 1 <= nfats <= 4,
         region, "FAT boot sector geometry is invalid")
    root_entries = u16(boot, 17)
    total = u16(boot, 19) or u32(boot, 32)
    fatsz = u16(boot, 22) or u32(boot, 36)
    need(total > 0 and fatsz > 0, region, "FAT boot sector has no sector count or FAT size")
    need(total * bps <= region.length, region,
         f"FAT claims {total} sectors of {bps} bytes, more than the partition's {region.length} bytes")
    root_secs = -(-(root_entries * 32) // bps)
    data_start = reserved + nfats * fatsz + root_secs
    need(data_start < total, region, "FAT metadata is larger than the volume")
    clusters = (total - data_start) // spc
    kind = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    need(fatsz * bps * 8 >= (clusters + 2) * kind, region,
         f"FAT of {fatsz} sectors cannot describe {clusters} clusters")
    if kind == 32:
        need(root_entries == 0, region, "FAT32 boot sector claims a fixed root directory")
    return dict(bps=bps, spc=spc, reserved=reserved, nfats=nfats, fatsz=fatsz, data_start=data_start,
                clusters=clusters, kind=kind, ext_flags=u16(boot, 40) if kind == 32 else 0)


def _entries(raw: bytes, kind: int, n: int) -> np.ndarray:
    """*n* entries from the FAT bytes *raw* (FAT12: *raw* starts at an even entry, so entries
    pair up in 3-byte groups)."""
    if kind == 32:
        return np.frombuffer(raw, dtype="<u4")[:n] & 0x0FFFFFFF
    if kind == 16:
        return np.frombuffer(raw, dtype="<u2")[:n].astype(np.uint32)
    b = np.frombuffer(raw + bytes(-len(raw) % 3), dtype=np.uint8)
    trip = b[: len(b) // 3 * 3].reshape(-1, 3).astype(np.uint32)
    even = trip[:, 0] | ((trip[:, 1] & 0x0F) << 8)
    odd = (trip[:, 1] >> 4) | (trip[:, 2] << 4)
    return np.stack([even, odd], axis=1).reshape(-1)[:n]


def read_free(region: Region, sink=None) -> FreeMap:
    """The free clusters of the FAT volume in *region*."""
    boot = region.read(0, 512, "FAT boot sector")
    g = geometry(region, boot)
    bps, kind, nfats = g["bps"], g["kind"], g["nfats"]
    flag_at = 0x41 if kind == 32 else 0x25
    if kind != 12 and boot[flag_at] & 1:
        raise region.fail(f"FAT{kind} volume is marked dirty (boot sector flag): run fsck.fat")
    fat0 = g["reserved"] * bps
    head = region.read(fat0, 8, "FAT")
    if kind == 16 and not u16(head, 2) & 0x8000:
        raise region.fail("FAT16 volume is marked dirty (not cleanly unmounted): run fsck.fat")
    if kind == 32 and not u32(head, 4) & 0x08000000:
        raise region.fail("FAT32 volume is marked dirty (not cleanly unmounted): run fsck.fat")
    mirrored = not (kind == 32 and g["ext_flags"] & 0x80)
    active = 0 if mirrored else g["ext_flags"] & 0x0F
    need(active < nfats, region, f"FAT32 active FAT {active} does not exist")
    fat_bytes = g["fatsz"] * bps
    entry_bits = kind
    clusters = g["clusters"]
    unit = g["spc"] * bps
    fm = FreeMap(f"fat{kind}", unit, clusters, sink=sink)
    data = g["data_start"] * bps
    total = clusters + 2
    pos = 0                                       # entry index
    while pos < total:
        n = min(CHUNK_ENTRIES, total - pos)       # CHUNK_ENTRIES is even: FAT12 pairs stay whole
        lo = pos * entry_bits // 8
        hi = -(-(pos + n) * entry_bits // 8)
        need(hi <= fat_bytes, region, "FAT ends before its last cluster")
        copies = [region.read(fat0 + k * fat_bytes + lo, hi - lo, f"FAT copy {k + 1}") for k in range(nfats)]
        if mirrored and any(c != copies[0] for c in copies[1:]):
            raise region.fail(f"FAT{kind} copies disagree (entries from {pos}): run fsck.fat")
        ent = _entries(copies[active], kind, n)
        need(len(ent) == n, region, "FAT ends before its last cluster")
        free = ent == 0
        if pos == 0:
            free = free[2:]                       # entries 0 and 1 are not clusters
            fm.add(data, free)
        else:
            fm.add(data + (pos - 2) * unit, free)
        pos += n
    return fm
