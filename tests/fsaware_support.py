"""Real filesystems for the filesystem-aware compaction tests, made and judged by their own tools.

A disk is a raw file first filled with seeded random bytes (so free space holds stale, non-zero
data even where no file was ever deleted), partitioned with sfdisk (MBR or GPT), each partition
made by the real mkfs and populated by the filesystem's own tools (debugfs, mtools, ntfs-3g
through FUSE), with some files deleted again. Judging reads the image back with qemu-img and the
files with debugfs / mtools / ntfscat, and runs the filesystem's own fsck.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

MiB = 1 << 20
SECTOR = 512

MKFS = {
    # nodiscard: mke2fs would punch the whole file first, and free space is to hold stale data
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1"],
    "ext2": ["mkfs.ext2", "-q", "-F", "-E", "nodiscard"],
    "ext3": ["mkfs.ext3", "-q", "-F", "-E", "nodiscard"],
    "fat12": ["mkfs.vfat", "-F", "12"],
    "fat16": ["mkfs.vfat", "-F", "16"],
    "fat32": ["mkfs.vfat", "-F", "32", "-S", "512", "-s", "1"],
    "exfat": ["mkfs.exfat"],
    "ntfs": ["mkntfs", "-Q", "-F", "-q"],
    "swap": ["mkswap", "-q"],
}
FSCK = {
    "ext": ["e2fsck", "-fn"],
    "fat": ["fsck.fat", "-n"],
    "exfat": ["fsck.exfat", "-n"],
    "ntfs": ["ntfsfix", "--no-action"],
}
TOOLS = {
    "ext": ("mkfs.ext4", "debugfs", "e2fsck", "dumpe2fs"),
    "fat": ("mkfs.vfat", "mcopy", "mdel", "fsck.fat"),
    "exfat": ("mkfs.exfat", "fsck.exfat"),
    "ntfs": ("mkntfs", "ntfs-3g", "ntfscat", "ntfsfix", "fusermount3"),
    "swap": ("mkswap",),
}
COMMON_TOOLS = ("sfdisk", "sgdisk", "qemu-img")
MBR_TYPE = {"ext": "83", "fat": "0c", "exfat": "07", "ntfs": "07", "swap": "82"}
GPT_TYPE = {"ext": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "fat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            "exfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"}


def family(fs: str) -> str:
    return "ext" if fs.startswith("ext") else "fat" if fs.startswith("fat") else fs


def tools_for(*filesystems: str) -> tuple[str, ...]:
    out = list(COMMON_TOOLS)
    for fs in filesystems:
        out += TOOLS[family(fs)]
    return tuple(dict.fromkeys(out))


def run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exit {p.returncode}: {p.stdout}{p.stderr}")
    return p


@dataclass
class Part:
    fs: str
    size: int                      # bytes
    start: int = 0                 # filled in by make_disk
    files: dict = field(default_factory=dict)      # name -> sha256 of what must remain
    deleted: list = field(default_factory=list)
    mkfs: tuple = ()               # extra mkfs arguments (features, block size)


def noise(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def make_disk(path: str, parts: list[Part], *, table: str = "mbr", seed: int = 1, nfiles: int = 8,
              file_size: int = 3 * MiB) -> list[Part]:
    """A raw disk at *path* holding *parts*, populated; returns the parts with starts and files."""
    size = 2 * MiB + sum(p.size + MiB for p in parts) + 2 * MiB
    with open(path, "wb") as f:
        for off in range(0, size, 16 * MiB):
            f.write(noise(min(16 * MiB, size - off), seed + off))
    if table == "none":                    # a filesystem on the whole disk, no partition table
        assert len(parts) == 1
        parts[0].start, parts[0].size = 0, size
    else:
        _partition(path, parts, table)
    with tempfile.TemporaryDirectory(prefix="vdisk-fs-") as work:
        for i, p in enumerate(parts):
            img = os.path.join(work, f"p{i}.img")
            copy_range(path, img, p.start, p.size)
            run(MKFS[p.fs] + list(p.mkfs) + [img])
            populate(p, img, work, seed * 100 + i, nfiles, min(file_size, p.size // (2 * nfiles)))
            copy_back(img, path, p.start)
    return parts


def _partition(path: str, parts: list[Part], table: str) -> None:
    """sfdisk the disk: GPT, MBR primaries, or ("mbr-logical") all inside an extended partition."""
    lines = [f"label: {'gpt' if table == 'gpt' else 'dos'}"]
    pos = 2 * MiB
    logical = table == "mbr-logical"
    if logical:
        lines.append(f"start={MiB // SECTOR}, type=5")
    for p in parts:
        p.start = pos
        t = GPT_TYPE[family(p.fs)] if table == "gpt" else MBR_TYPE[family(p.fs)]
        lines.append(f"start={pos // SECTOR}, size={p.size // SECTOR}, type={t}")
        pos += p.size + (MiB if logical else 0)
    run(["sfdisk", "-q", path], input="\n".join(lines) + "\n")


def copy_range(src: str, dst: str, start: int, length: int) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        f.seek(start)
        left = length
        while left:
            b = f.read(min(left, 8 * MiB))
            g.write(b)
            left -= len(b)


def copy_back(src: str, dst: str, start: int) -> None:
    with open(src, "rb") as f, open(dst, "r+b") as g:
        g.seek(start)
        shutil.copyfileobj(f, g, 8 * MiB)


def populate(p: Part, img: str, work: str, seed: int, nfiles: int, file_size: int) -> None:
    """Write *nfiles* seeded files and delete every other one, with the filesystem's own tools."""
    fam = family(p.fs)
    if fam == "swap":
        return                      # swap holds no files
    if fam == "exfat":
        exfat_populate(p, img, seed, nfiles, file_size)
        run(FSCK["exfat"] + [img])           # the writer's output must be clean before anything relies on it
        assert exfat_read_files(img) == p.files
        return
    rng = np.random.default_rng(seed)
    names = [f"f{i:02d}.bin" for i in range(nfiles)]
    srcs = {}
    for i, name in enumerate(names):
        n = int(rng.integers(file_size // 4, file_size)) + (7 if i % 3 == 0 else 0)
        data = noise(n, seed * 1000 + i)
        src = os.path.join(work, name)
        with open(src, "wb") as f:
            f.write(data)
        srcs[name] = src
        p.files[name] = hashlib.sha256(data).hexdigest()
    doomed = names[::2]
    if fam == "ext":
        cmds = [f"write {srcs[n]} {n}" for n in names] + [f"rm {n}" for n in doomed]
        script = os.path.join(work, "cmds")
        with open(script, "w") as f:
            f.write("\n".join(cmds) + "\n")
        run(["debugfs", "-w", "-f", script, img])
    elif fam == "fat":
        for n in names:
            run(["mcopy", "-i", img, srcs[n], f"::{n}"])
        for n in doomed:
            run(["mdel", "-i", img, f"::{n}"])
    elif fam == "ntfs":
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt, exist_ok=True)
        run(["ntfs-3g", img, mnt])
        try:
            for n in names:
                shutil.copyfile(srcs[n], os.path.join(mnt, n))
            for n in doomed:
                os.unlink(os.path.join(mnt, n))
        finally:
            for _ in range(50):
                if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
    for n in doomed:
        del p.files[n]
        p.deleted.append(n)


def to_raw(image: str, dst: str) -> None:
    """The image's content as qemu-img reads it (VHD/VDI base images), or vdisk for chains."""
    fmt = {".vhd": "vpc", ".vdi": "vdi"}.get(os.path.splitext(image)[1], "raw")
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, dst])


def judge_partition(raw: str, p: Part, work: str) -> None:
    """fsck clean and every remaining file byte-identical, read by the filesystem's own tools."""
    fam = family(p.fs)
    img = os.path.join(work, f"judge-{p.start}.img")
    copy_range(raw, img, p.start, p.size)
    if fam in FSCK:
        r = subprocess.run(FSCK[fam] + [img], capture_output=True, text=True)
        assert r.returncode == 0, f"{FSCK[fam][0]} on {p.fs} at {p.start}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    if fam == "swap":
        head = open(img, "rb").read(4096)
        assert head[4086:4096] == b"SWAPSPACE2"
    for name, digest in p.files.items():
        out = os.path.join(work, "out.bin")
        if fam == "ext":
            run(["debugfs", "-R", f"dump {name} {out}", img])
        elif fam == "fat":
            run(["mcopy", "-n", "-i", img, f"::{name}", out])
        elif fam == "exfat":
            got = exfat_read_files(img)
            assert got.get(name) == digest, f"{name} on exFAT changed or missing"
            continue
        elif fam == "ntfs":
            with open(out, "wb") as f:
                r = subprocess.run(["ntfscat", img, name], stdout=f, stderr=subprocess.PIPE)
            assert r.returncode == 0, r.stderr
        with open(out, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{name} on {p.fs} changed"
        os.unlink(out)
    for name in p.deleted:
        if fam == "ext":
            r = subprocess.run(["debugfs", "-R", f"stat {name}", img], capture_output=True, text=True)
            assert "File not found" in r.stderr + r.stdout
    os.unlink(img)


def ext_free_blocks(img: str) -> tuple[int, list[tuple[int, int]]]:
    """(block size, [first, last] free block ranges) as dumpe2fs lists them."""
    out = run(["dumpe2fs", img]).stdout
    bs = int(next(line.split(":")[1] for line in out.splitlines() if line.startswith("Block size:")))
    ranges = []
    for line in out.splitlines():
        if not line.startswith("  Free blocks: "):      # per group (the header line is a count)
            continue
        for item in line[len("  Free blocks: "):].split(","):
            item = item.strip()
            if item:
                lo, _, hi = item.partition("-")
                ranges.append((int(lo), int(hi or lo)))
    return bs, ranges


def sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(8 * MiB), b""):
            h.update(b)
    return h.hexdigest()


def changed_blocks(a: str, b: str, bs: int) -> np.ndarray:
    """Indices of the *bs*-sized blocks in which two raw files differ."""
    out = []
    with open(a, "rb") as f, open(b, "rb") as g:
        i = 0
        while True:
            x, y = f.read(bs), g.read(bs)
            if not x and not y:
                break
            if x != y:
                out.append(i)
            i += 1
    return np.array(out, dtype=np.int64)


# -- exFAT files, written here ----------------------------------------------------------------
# No tool in reach writes files into exFAT without a kernel mount (exfat-fuse insists on a block
# device when run as root, and on allow_other otherwise). This small writer makes what the
# specification calls contiguous files (NoFatChain): an entry set in the root directory (file,
# stream extension, name entries, set checksum, name hash), the clusters marked in the
# allocation bitmap. fsck.exfat judges it first; dissect.fat's exFAT reader reads the files back.

def _exfat_geometry(img: bytes) -> dict:
    b = img[:512]
    bps = 1 << b[108]
    unit = bps << b[109]
    return dict(bps=bps, unit=unit, heap=int.from_bytes(b[88:92], "little") * bps,
                clusters=int.from_bytes(b[92:96], "little"), root=int.from_bytes(b[96:100], "little"))


def _exfat_sum16(data: bytes, skip=()) -> int:
    c = 0
    for i, x in enumerate(data):
        if i in skip:
            continue
        c = (((c & 1) << 15) | (c >> 1)) + x
        c &= 0xFFFF
    return c


def exfat_populate(p: Part, img: str, seed: int, nfiles: int, file_size: int) -> None:
    """Write *nfiles* seeded files into the exFAT volume *img*, then delete every other one
    (entries marked unused, clusters freed in the bitmap; the data stays as stale bytes)."""
    with open(img, "r+b") as f:
        vol = bytearray(f.read())
        g = _exfat_geometry(vol)
        unit, heap = g["unit"], g["heap"]
        root = heap + (g["root"] - 2) * unit
        bitmap_at = bitmap_len = None
        for i in range(0, unit, 32):
            if vol[root + i] == 0x81:
                first = int.from_bytes(vol[root + i + 20:root + i + 24], "little")
                bitmap_at = heap + (first - 2) * unit
                bitmap_len = int.from_bytes(vol[root + i + 24:root + i + 32], "little")
        assert bitmap_at is not None
        used = np.unpackbits(np.frombuffer(bytes(vol[bitmap_at:bitmap_at + bitmap_len]), dtype=np.uint8),
                             bitorder="little")[:g["clusters"]].astype(bool)
        slot = next(i for i in range(0, unit, 32) if vol[root + i] == 0)      # end of directory
        rng = np.random.default_rng(seed)
        sets = {}
        for k in range(nfiles):
            name = f"f{k:02d}.bin"
            n = int(rng.integers(file_size // 4, file_size)) + (7 if k % 3 == 0 else 0)
            data = noise(n, seed * 1000 + k)
            need = -(-n // unit)
            free_runs = np.flatnonzero(np.convolve(~used, np.ones(need, dtype=int), "valid") == need)
            c0 = int(free_runs[0])
            used[c0:c0 + need] = True
            at = heap + c0 * unit
            vol[at:at + n] = data
            first_cluster = c0 + 2
            uname = name.encode("utf-16-le")
            names = [uname[i:i + 30].ljust(30, b"\0") for i in range(0, len(uname), 30)]
            file_e = bytearray(32)
            file_e[0], file_e[1] = 0x85, 1 + len(names)
            file_e[4:6] = (0x20).to_bytes(2, "little")
            stream = bytearray(32)
            stream[0], stream[1], stream[3] = 0xC0, 0x03, len(name)       # AllocationPossible | NoFatChain
            stream[4:6] = _exfat_sum16(name.upper().encode("utf-16-le")).to_bytes(2, "little")
            stream[8:16] = n.to_bytes(8, "little")
            stream[20:24] = first_cluster.to_bytes(4, "little")
            stream[24:32] = n.to_bytes(8, "little")
            entries = file_e + stream + b"".join(bytes([0xC1, 0]) + part for part in names)
            entries[2:4] = _exfat_sum16(bytes(entries), skip=(2, 3)).to_bytes(2, "little")
            assert slot + len(entries) < unit
            vol[root + slot:root + slot + len(entries)] = entries
            sets[name] = (root + slot, len(entries), c0, need)
            slot += len(entries)
            p.files[name] = hashlib.sha256(data).hexdigest()
        for name in list(sets)[::2]:
            at, length, c0, need = sets[name]
            for e in range(at, at + length, 32):
                vol[e] &= 0x7F                                              # InUse cleared
            used[c0:c0 + need] = False
            del p.files[name]
            p.deleted.append(name)
        packed = np.packbits(used, bitorder="little").tobytes()
        vol[bitmap_at:bitmap_at + len(packed)] = packed
        f.seek(0)
        f.write(vol)


def exfat_read_files(img: str) -> dict[str, str]:
    """sha256 of every file in the exFAT root directory, as dissect.fat's exFAT reader reads it."""
    from dissect.fat import exfat
    out = {}
    with open(img, "rb") as f:
        fs = exfat.ExFAT(f)
        for name, (entry, children) in fs.files["/"][1].items():
            if children is not None:                 # a directory
                continue
            runs = fs.runlist(entry.stream.location, not_fragmented=entry.stream.flags.not_fragmented,
                              size=entry.stream.data_length)
            from dissect.util.stream import RunlistStream
            data = RunlistStream(f, runs, entry.stream.data_length, fs.sector_size).read()
            out[name] = hashlib.sha256(data).hexdigest()
    return out
