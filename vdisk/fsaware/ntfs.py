"""NTFS: free clusters from $Bitmap (MFT record 6), found through $MFT's own data runs.

Refuses, unless forced, a volume whose $Volume flags say dirty or one holding an active
hibernation image or fast startup state (hiberfil.sys beginning "hibr"/"wake"). Always refuses
a $Bitmap shorter than the cluster count, compressed or encrypted $Bitmap data, data found only
through an attribute list, and geometry past the partition end.
"""
from __future__ import annotations

from typing import Optional

from .base import FreeMap, Region, bits_free, need, u16, u32, u64

MFT_BITMAP, MFT_VOLUME, MFT_ROOT = 6, 3, 5
ATTR_LIST, ATTR_FILE_NAME, ATTR_VOLUME_INFO, ATTR_DATA = 0x20, 0x30, 0x70, 0x80
ATTR_INDEX_ROOT, ATTR_INDEX_ALLOC = 0x90, 0xA0
VOLUME_DIRTY = 0x0001
BITMAP_CHUNK = 1 << 20
MAX_RUNS = 1 << 20


def probe(boot: bytes) -> bool:
    return len(boot) >= 512 and boot[3:11] == b"NTFS    "


class _Volume:
    def __init__(self, region: Region):
        self.region = region
        boot = region.read(0, 512, "NTFS boot sector")
        need(probe(boot), region, "no NTFS boot sector")
        self.bps = u16(boot, 11)
        spc = boot[13]
        need(self.bps in (512, 1024, 2048, 4096), region, f"NTFS bytes per sector {self.bps} is invalid")
        spc = 1 << (256 - spc) if spc > 0x80 else spc
        need(spc > 0 and spc & (spc - 1) == 0 and spc * self.bps <= 2 << 20, region, "NTFS cluster size is invalid")
        self.cluster = spc * self.bps
        total = u64(boot, 40)
        need(total * self.bps <= region.length, region,
             f"NTFS claims {total} sectors, more than the partition's {region.length} bytes")
        self.clusters = total // spc
        rec = int.from_bytes(boot[64:65], "little", signed=True)
        self.record = 1 << -rec if rec < 0 else rec * self.cluster
        need(512 <= self.record <= 65536, region, f"NTFS MFT record size {self.record} is invalid")
        idx = int.from_bytes(boot[68:69], "little", signed=True)
        self.index_block = 1 << -idx if idx < 0 else idx * self.cluster
        mft = u64(boot, 48)
        need(mft < self.clusters, region, "NTFS $MFT starts outside the volume")
        self.mft_runs = [(0, mft, max(1, -(-16 * self.record // self.cluster)))]
        attrs = self.attributes(self.record_bytes(0), "$MFT")
        data = self.nonresident(attrs, ATTR_DATA, "$MFT")
        self.mft_runs = data[0]

    # -- records ---------------------------------------------------------------------------
    def read_runs(self, runs, offset: int, n: int, what: str) -> bytes:
        """*n* bytes at byte *offset* of the data described by *runs* [(vcn, lcn, count)]."""
        out = bytearray()
        pos, end = offset, offset + n
        for vcn, lcn, count in runs:
            lo, hi = vcn * self.cluster, (vcn + count) * self.cluster
            if hi <= pos or lo >= end:
                continue
            a, b = max(lo, pos), min(hi, end)
            if a > pos:
                raise self.region.fail(f"NTFS {what} has a gap in its runs")
            out += bytes(b - a) if lcn is None else self.region.read(lcn * self.cluster + a - lo, b - a, what)
            pos = b
            if pos >= end:
                break
        need(pos >= end, self.region, f"NTFS {what} ends before byte {end}")
        return bytes(out)

    def record_bytes(self, number: int) -> bytes:
        raw = bytearray(self.read_runs(self.mft_runs, number * self.record, self.record, f"MFT record {number}"))
        need(raw[:4] == b"FILE", self.region, f"NTFS MFT record {number} has no FILE signature")
        usa, count = u16(raw, 4), u16(raw, 6)
        need(count == self.record // 512 + 1 and usa + 2 * count <= self.record, self.region,
             f"NTFS MFT record {number} update sequence is invalid")
        self._fixup(raw, usa, count, f"MFT record {number}")
        return bytes(raw)

    def _fixup(self, raw: bytearray, usa: int, count: int, what: str) -> None:
        usn = raw[usa:usa + 2]
        for i in range(1, count):
            at = i * 512 - 2
            need(raw[at:at + 2] == usn, self.region, f"NTFS {what} is torn (update sequence mismatch)")
            raw[at:at + 2] = raw[usa + 2 * i:usa + 2 * i + 2]

    def attributes(self, raw: bytes, what: str) -> list[tuple[int, bytes, bool, str]]:
        """(type, attribute bytes, non-resident, name) of every attribute in a record."""
        out = []
        pos = u16(raw, 20)
        while pos + 8 <= len(raw):
            t, n = u32(raw, pos), u32(raw, pos + 4)
            if t == 0xFFFFFFFF:
                break
            need(16 <= n <= len(raw) - pos and n % 8 == 0, self.region, f"NTFS {what} attribute length {n} is invalid")
            a = raw[pos:pos + n]
            name = a[u16(a, 10):u16(a, 10) + 2 * a[9]].decode("utf-16-le", "replace")
            out.append((t, a, bool(a[8]), name))
            pos += n
        return out

    def resident_value(self, attrs, t: int, what: str) -> Optional[bytes]:
        for typ, a, nonres, name in attrs:
            if typ == t and not nonres and not name:
                off, n = u16(a, 20), u32(a, 16)
                need(off + n <= len(a), self.region, f"NTFS {what} resident value runs past its attribute")
                return a[off:off + n]
        return None

    def nonresident(self, attrs, t: int, what: str, name: str = "") -> tuple[list, int]:
        """(runs, data size) of the non-resident attribute *t* named *name*, from the base record
        (its first extent; a read past what those runs cover refuses in :meth:`read_runs`)."""
        for typ, a, nonres, nm in attrs:
            if typ == t and nm == name:
                need(nonres, self.region, f"NTFS {what} data is resident, not the expected runs")
                if u16(a, 12) & 0x4001:
                    raise self.region.fail(f"NTFS {what} is compressed or encrypted; left untouched")
                need(u64(a, 16) == 0, self.region, f"NTFS {what} data starts at a later VCN (extension record)")
                return self.decode_runs(a[u16(a, 32):], what), u64(a, 48)
        if any(typ == ATTR_LIST for typ, *_ in attrs):
            raise self.region.fail(f"NTFS {what} is split over an attribute list; left untouched")
        raise self.region.fail(f"NTFS {what} has no data attribute")

    def decode_runs(self, raw: bytes, what: str) -> list[tuple[int, Optional[int], int]]:
        runs: list[tuple[int, Optional[int], int]] = []
        vcn, lcn, pos = 0, 0, 0
        while pos < len(raw) and raw[pos]:
            h = raw[pos]
            ln, lo = h & 0x0F, h >> 4
            need(0 < ln <= 8 and lo <= 8 and pos + 1 + ln + lo <= len(raw), self.region, f"NTFS {what} run list is malformed")
            count = int.from_bytes(raw[pos + 1:pos + 1 + ln], "little")
            need(count > 0, self.region, f"NTFS {what} run of length 0")
            if lo:
                lcn += int.from_bytes(raw[pos + 1 + ln:pos + 1 + ln + lo], "little", signed=True)
                need(0 <= lcn and lcn + count <= self.clusters, self.region,
                     f"NTFS {what} run at cluster {lcn} (+{count}) lies outside the volume")
                runs.append((vcn, lcn, count))
            else:
                runs.append((vcn, None, count))
            vcn += count
            pos += 1 + ln + lo
            need(len(runs) <= MAX_RUNS, self.region, f"NTFS {what} has too many runs")
        return runs


def _check_clean(vol: _Volume) -> None:
    attrs = vol.attributes(vol.record_bytes(MFT_VOLUME), "$Volume")
    info = vol.resident_value(attrs, ATTR_VOLUME_INFO, "$Volume")
    if info is None or len(info) < 12:
        raise vol.region.fail("NTFS $Volume has no volume information")
    if u16(info, 10) & VOLUME_DIRTY:
        raise vol.region.fail("NTFS volume is marked dirty: run chkdsk (or ntfsfix) first, or --force to trust its bitmap")
    hib = _root_file(vol, "hiberfil.sys")
    if hib is not None:
        attrs = vol.attributes(vol.record_bytes(hib), "hiberfil.sys")
        head = vol.resident_value(attrs, ATTR_DATA, "hiberfil.sys")
        if head is None and any(t == ATTR_DATA and nr for t, _, nr, nm in attrs if not nm):
            runs, size = vol.nonresident(attrs, ATTR_DATA, "hiberfil.sys")
            head = vol.read_runs(runs, 0, min(4, size), "hiberfil.sys") if size else b""
        if head and head[:4].lower() in (b"hibr", b"wake"):
            raise vol.region.fail("NTFS volume holds a hibernated Windows (hiberfil.sys is active); "
                                  "boot it and shut down fully first, or --force to trust its bitmap")


def _root_file(vol: _Volume, wanted: str) -> Optional[int]:
    """MFT record number of *wanted* in the root directory, scanning every index node."""
    attrs = vol.attributes(vol.record_bytes(MFT_ROOT), "root directory")
    nodes = []
    for t, a, nonres, name in attrs:
        if t == ATTR_INDEX_ROOT and name == "$I30" and not nonres:
            v = a[u16(a, 20):u16(a, 20) + u32(a, 16)]
            nodes.append(v[16:])                          # index header follows the 16-byte root header
    for t, a, nonres, name in attrs:
        if t == ATTR_INDEX_ALLOC and name == "$I30" and nonres:
            runs, size = vol.nonresident(attrs, ATTR_INDEX_ALLOC, "root directory index", "$I30")
            need(size <= 64 << 20, vol.region, "NTFS root directory index is implausibly large")
            for off in range(0, size - size % vol.index_block, vol.index_block):
                raw = bytearray(vol.read_runs(runs, off, vol.index_block, "root directory index"))
                if raw[:4] != b"INDX":
                    continue
                usa, count = u16(raw, 4), u16(raw, 6)
                need(count == vol.index_block // 512 + 1, vol.region, "NTFS index block update sequence is invalid")
                vol._fixup(raw, usa, count, "root directory index")
                nodes.append(bytes(raw[24:]))
    for node in nodes:
        pos, end = u32(node, 0), min(u32(node, 4), len(node))
        while pos + 16 <= end:
            ref, n, keylen, flags = u64(node, pos), u16(node, pos + 8), u16(node, pos + 10), u16(node, pos + 12)
            if flags & 2 or n < 16:
                break
            key = node[pos + 16:pos + 16 + keylen]
            if len(key) >= 66:
                name = key[66:66 + 2 * key[64]].decode("utf-16-le", "replace")
                if name.lower() == wanted:
                    return ref & 0xFFFFFFFFFFFF
            pos += n
    return None


def read_free(region: Region, sink=None, force: bool = False) -> FreeMap:
    """The free clusters of the NTFS volume in *region*. *force*: trust the bitmap of a volume
    marked dirty or holding a hibernated system (the bitmap is then all that is trusted)."""
    vol = _Volume(region)
    if not force:
        _check_clean(vol)
    attrs = vol.attributes(vol.record_bytes(MFT_BITMAP), "$Bitmap")
    runs, size = vol.nonresident(attrs, ATTR_DATA, "$Bitmap")
    need(size * 8 >= vol.clusters, region, f"NTFS $Bitmap of {size} bytes cannot cover {vol.clusters} clusters")
    fm = FreeMap("ntfs", vol.cluster, vol.clusters, sink=sink)
    done = 0
    while done < vol.clusters:
        n = min(BITMAP_CHUNK * 8, vol.clusters - done)
        raw = vol.read_runs(runs, done // 8, -(-n // 8), "$Bitmap")
        fm.add(done * vol.cluster, bits_free(raw, n))
        done += n
    return fm
