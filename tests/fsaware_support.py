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
    if fam in ("swap", "exfat"):
        return                      # swap holds no files; exFAT: no tool writes files without a mount
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
