"""CHS geometry as the VHD specification computes it (spec digest A2)."""
from __future__ import annotations

MAX_CHS_SECTORS = 65535 * 16 * 255
#: Geometry meaning "use current_size, not C*H*S" (QEMU force_size, Hyper-V, disk2vhd).
MAX_GEOMETRY = (65535, 16, 255)


def chs_for_sectors(total_sectors: int) -> tuple[int, int, int]:
    """The spec's CHS for *total_sectors*; C*H*S rounds down and never exceeds the ATA limit."""
    t = min(total_sectors, MAX_CHS_SECTORS)
    if t >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = t // spt
    else:
        spt = 17
        cth = t // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = t // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = t // spt
    return cth // heads, heads, spt


def chs_bytes(geometry: tuple[int, int, int]) -> int:
    c, h, s = geometry
    return c * h * s * 512


def chs_round_up(size: int) -> tuple[int, tuple[int, int, int]]:
    """QEMU's rule: the smallest CHS-exact size >= size (or size itself past the CHS limit)."""
    sectors = -(-size // 512)
    if sectors >= MAX_CHS_SECTORS:
        return size, MAX_GEOMETRY
    t = sectors
    while True:
        geo = chs_for_sectors(t)
        if geo[0] * geo[1] * geo[2] >= sectors:
            return chs_bytes(geo), geo
        t += 1
