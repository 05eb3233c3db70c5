"""ext2/3/4: free blocks from the block-group bitmaps.

Handles 32- and 64-bit group descriptors, flex_bg (bitmaps and inode tables of many groups packed
into one), BLOCK_UNINIT groups (no bitmap on disk: everything is free except the group's own
superblock/descriptor backups and any group's bitmaps or inode table placed inside it), meta_bg
descriptor placement and bigalloc clusters. Refuses a journal that needs recovery, pending
orphans, an unclean or erroneous state, feature flags not listed here, a bitmap whose checksum
fails (metadata_csum), and any group whose bitmap claims more free blocks than its descriptor
(or a total above the superblock's count).
"""
from __future__ import annotations

import numpy as np

from .base import FreeMap, Region, bits_free, crc32c_update, need, u16, u32

MAGIC = 0xEF53
SB_OFFSET = 1024

COMPAT_KNOWN = {0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
                0x10: "resize_inode", 0x20: "dir_index", 0x200: "sparse_super2", 0x400: "fast_commit",
                0x800: "stable_inodes", 0x1000: "orphan_file"}
INCOMPAT_KNOWN = {0x2: "filetype", 0x10: "meta_bg", 0x40: "extents", 0x80: "64bit", 0x100: "mmp",
                  0x200: "flex_bg", 0x400: "ea_inode", 0x2000: "csum_seed", 0x4000: "largedir",
                  0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold"}
RO_COMPAT_KNOWN = {0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file",
                   0x10: "gdt_csum", 0x20: "dir_nlink", 0x40: "extra_isize", 0x100: "quota",
                   0x200: "bigalloc", 0x400: "metadata_csum", 0x1000: "readonly", 0x2000: "project",
                   0x4000: "shared_blocks", 0x8000: "verity"}
INCOMPAT_RECOVER = 0x4
RO_ORPHAN_PRESENT = 0x10000
BG_BLOCK_UNINIT = 0x2
MMP_CLEAN = 0xFF4D4D50
MMP_MAGIC = 0x004D4D50


def probe(sb_area: bytes) -> bool:
    """True when the 2 KiB at the partition start carry an ext superblock."""
    return len(sb_area) >= SB_OFFSET + 60 and u16(sb_area, SB_OFFSET + 56) == MAGIC


def _unknown(value: int, known: dict) -> list[str]:
    return [hex(1 << i) for i in range(32) if value >> i & 1 and (1 << i) not in known]


def read_free(region: Region, sink=None) -> FreeMap:
    """The free blocks (clusters, under bigalloc) of the ext filesystem in *region*."""
    sb = region.read(SB_OFFSET, 1024, "superblock")
    need(u16(sb, 56) == MAGIC, region, "no ext superblock")
    compat, incompat, ro = u32(sb, 92), u32(sb, 96), u32(sb, 100)
    if incompat & INCOMPAT_RECOVER:
        raise region.fail("ext journal needs recovery (needs_recovery set): run e2fsck or mount it once")
    if ro & RO_ORPHAN_PRESENT or u32(sb, 232):
        raise region.fail("ext filesystem has orphan inodes pending: run e2fsck")
    state = u16(sb, 58)
    if not state & 1:
        raise region.fail("ext filesystem was not cleanly unmounted (state not clean): run e2fsck")
    if state & 2:
        raise region.fail("ext filesystem has errors recorded: run e2fsck")
    for kind, value, known in (("compat", compat, COMPAT_KNOWN), ("incompat", incompat & ~INCOMPAT_RECOVER, INCOMPAT_KNOWN),
                               ("ro_compat", ro, RO_COMPAT_KNOWN)):
        bad = _unknown(value, known)
        if bad:
            raise region.fail(f"ext feature flags not understood ({kind} {', '.join(bad)}); left untouched")
    log_block = u32(sb, 24)
    need(log_block <= 6, region, f"ext block size 2^(10+{log_block}) is not 1..64 KiB")
    bsize = 1024 << log_block
    bigalloc = bool(ro & 0x200)
    log_cluster = u32(sb, 28) if bigalloc else log_block
    need(log_block <= log_cluster <= log_block + 16, region, "ext cluster size is out of range")
    unit = 1024 << log_cluster
    is64 = bool(incompat & 0x80)
    blocks = u32(sb, 4) | ((u32(sb, 336) << 32) if is64 else 0)
    free_sb = u32(sb, 12) | ((u32(sb, 344) << 32) if is64 else 0)
    first_data = u32(sb, 20)
    bpg = u32(sb, 32)
    cpg = u32(sb, 36) if bigalloc else bpg
    ratio = unit // bsize
    need(blocks > first_data, region, f"ext block count {blocks} is not above the first data block")
    need(blocks * bsize <= region.length, region,
         f"ext claims {blocks} blocks of {bsize} bytes, more than the partition's {region.length} bytes")
    need(0 < cpg <= bsize * 8 and bpg == cpg * ratio, region,
         f"ext blocks per group {bpg} does not fit one bitmap block")
    need(first_data == (1 if bsize == 1024 and not bigalloc else 0), region, f"ext first data block {first_data} is impossible")
    groups = -(-(blocks - first_data) // bpg)
    desc_size = u16(sb, 254) if is64 else 32
    need(desc_size >= 32 and (not is64 or (desc_size >= 64 and desc_size & (desc_size - 1) == 0 and desc_size <= 1024)),
         region, f"ext group descriptor size {desc_size} is invalid")
    csum = bool(ro & (0x10 | 0x400))
    if incompat & 0x100:
        _check_mmp(region, sb, bsize, blocks)

    descs = _descriptors(region, sb, bsize, groups, desc_size, first_data, bpg, incompat, ro)
    fm = FreeMap("ext4" if incompat & 0x40 or is64 or incompat & 0x200 else ("ext3" if compat & 0x4 else "ext2"),
                 unit, (blocks - first_data) // ratio, sink=sink)
    ipg, isize = u32(sb, 40), (u16(sb, 88) if u32(sb, 76) >= 1 else 128)
    itb = -(-(ipg * isize) // bsize)
    ms, me = _metadata_intervals(descs, itb)
    total_free = 0
    seed = None
    if ro & 0x400:                                   # metadata_csum: bitmaps carry CRC-32C
        seed = u32(sb, 0x270) if incompat & 0x2000 else crc32c_update(0xFFFFFFFF, sb[104:120])
    for g in range(groups):
        bb, ib, it, gfree, flags, bcsum = descs[g]
        g_first = first_data + g * bpg
        g_blocks = min(bpg, blocks - g_first)
        n = -(-g_blocks // ratio)
        if csum and flags & BG_BLOCK_UNINIT:
            if bigalloc:
                continue                              # exact layout not derived for clusters: all used
            free = np.ones(n, dtype=bool)
            free[: _super_blocks(sb, g, bsize, groups, desc_size, incompat, ro)] = False
            lo, hi = g_first, g_first + g_blocks
            # intervals are at most itb long: only those starting in [lo - itb, hi) can overlap
            j, k = int(np.searchsorted(ms, lo - itb)), int(np.searchsorted(ms, hi))
            sel = me[j:k] > lo
            for a, b in zip(ms[j:k][sel].tolist(), me[j:k][sel].tolist()):
                free[max(a, lo) - lo:min(b, hi) - lo] = False
        else:
            need(first_data <= bb < blocks, region, f"ext group {g} block bitmap at block {bb} is outside the filesystem")
            raw = region.read(bb * bsize, bsize, f"ext group {g} block bitmap")
            if seed is not None:
                mask = 0xFFFFFFFF if desc_size >= 0x3A else 0xFFFF
                if crc32c_update(seed, raw[: cpg // 8]) & mask != bcsum:
                    raise region.fail(f"ext group {g} block bitmap checksum does not match: run e2fsck")
            free = bits_free(raw, n)
        count = int(np.count_nonzero(free))
        if count > gfree:
            raise region.fail(f"ext group {g} bitmap shows {count} free blocks but its descriptor counts {gfree}: "
                              "run e2fsck")
        total_free += count
        fm.add(g_first * bsize, free)
    if total_free > free_sb:
        raise region.fail(f"ext bitmaps show {total_free} free blocks, more than the superblock's {free_sb}: run e2fsck")
    return fm


def _check_mmp(region: Region, sb: bytes, bsize: int, blocks: int) -> None:
    mmp = int.from_bytes(sb[360:368], "little")
    need(0 < mmp < blocks, region, "ext MMP block is outside the filesystem")
    raw = region.read(mmp * bsize, 8, "ext MMP block")
    if u32(raw, 0) != MMP_MAGIC or u32(raw, 4) != MMP_CLEAN:
        raise region.fail("ext multi-mount protection says the filesystem is in use (or was not cleanly released)")


def _has_super(g: int, sb: bytes, ro: int, compat: int) -> bool:
    if g == 0:
        return True
    if compat & 0x200:                               # sparse_super2: two listed backups only
        return g in (u32(sb, 0x24C), u32(sb, 0x250))
    if not ro & 0x1:
        return True
    if g == 1:
        return True
    for p in (3, 5, 7):
        x = p
        while x < g:
            x *= p
        if x == g:
            return True
    return False


def _descriptors(region: Region, sb: bytes, bsize: int, groups: int, desc_size: int, first_data: int,
                 bpg: int, incompat: int, ro: int) -> list[tuple[int, int, int, int, int, int]]:
    """(block bitmap, inode bitmap, inode table, free blocks, flags, bitmap checksum) per group."""
    per_block = bsize // desc_size
    nblocks = -(-groups // per_block)
    need(nblocks * bsize <= region.length, region, f"ext claims {groups} groups, more descriptors than fit the partition")
    meta_bg = bool(incompat & 0x10)
    first_meta = u32(sb, 260) if meta_bg else nblocks
    compat = u32(sb, 92)
    out = []
    sb_block = 1 if bsize == 1024 else 0          # the block holding the primary superblock
    for i in range(nblocks):
        if i < first_meta:
            loc = sb_block + 1 + i
        else:
            g = i * per_block
            start = sb_block if g == 0 else first_data + g * bpg
            loc = start + (1 if _has_super(g, sb, ro, compat) else 0)
        raw = region.read(loc * bsize, bsize, f"ext group descriptor block {i}")
        for j in range(min(per_block, groups - i * per_block)):
            d = raw[j * desc_size:(j + 1) * desc_size]
            hi = desc_size >= 64
            bb = u32(d, 0) | ((u32(d, 32) << 32) if hi else 0)
            ib = u32(d, 4) | ((u32(d, 36) << 32) if hi else 0)
            it = u32(d, 8) | ((u32(d, 40) << 32) if hi else 0)
            free = u16(d, 12) | ((u16(d, 44) << 16) if hi else 0)
            bcsum = u16(d, 24) | ((u16(d, 56) << 16) if desc_size >= 0x3A else 0)
            out.append((bb, ib, it, free, u16(d, 18), bcsum))
    return out


def _metadata_intervals(descs, itb: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted [start, end) block intervals of every group's bitmaps and inode table."""
    lo: list[int] = []
    hi: list[int] = []
    for bb, ib, it, *_ in descs:
        lo += [bb, ib, it]
        hi += [bb + 1, ib + 1, it + itb]
    s, e = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
    order = np.argsort(s, kind="stable")
    return s[order], e[order]


def _super_blocks(sb: bytes, g: int, bsize: int, groups: int, desc_size: int, incompat: int, ro: int) -> int:
    """How many blocks at the start of group *g* its superblock backup and descriptor blocks
    (old-style plus reserved, or its meta_bg descriptor block) take."""
    compat = u32(sb, 92)
    per_block = bsize // desc_size
    nblocks = -(-groups // per_block)
    meta_bg = bool(incompat & 0x10)
    first_meta = u32(sb, 260) if meta_bg else 0
    old = first_meta if meta_bg else nblocks + u16(sb, 206)
    has = 1 if _has_super(g, sb, ro, compat) else 0
    n = has
    if not meta_bg or g // per_block < first_meta:
        n += old if has else 0
    elif g % per_block in (0, 1, per_block - 1):
        n += 1
    return n
