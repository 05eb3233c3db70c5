"""Safety before space: a filesystem that is dirty, needs recovery, hibernates, uses features not
understood, or whose metadata lies is refused with one line naming the image, the partition and
the reason — and the image keeps every byte. So is an image locked by another process."""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import tracemalloc

import pytest

import vdisk
from vdisk.fsaware import Refusal, analyse

from fsaware_support import MiB, Part, make_disk, run, sha_file, tools_for


def _vdisk(*args):
    exe = os.path.join(os.path.dirname(os.sys.executable), "vdisk")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def _image(tmp_path, fs, size, poke=None, fmt="vhd", table="mbr"):
    raw = str(tmp_path / "disk.raw")
    parts = make_disk(raw, [Part(fs, size)], table=table, nfiles=4)
    if poke is not None:
        with open(raw, "r+b") as f:
            poke(f, parts[0].start)
    img = str(tmp_path / f"disk.{fmt}")
    run([os.path.join(os.path.dirname(os.sys.executable), "vdisk"), "convert", raw, img])
    return img


def assert_refused(img, *words, dry_run=False):
    before = sha_file(img)
    p = _vdisk("compact", img, "--filesystem-aware", *(["--dry-run"] if dry_run else []))
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: ") and img in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert sha_file(img) == before
    return lines[0]


def _poke(offset, data):
    def poke(f, start):
        f.seek(start + offset)
        f.write(data)
    return poke


def _or32(offset, bits):
    def poke(f, start):
        f.seek(start + offset)
        v = struct.unpack("<I", f.read(4))[0]
        f.seek(start + offset)
        f.write(struct.pack("<I", v | bits))
    return poke


# -- ext --------------------------------------------------------------------------------------
EXT = pytest.mark.judges(*tools_for("ext4"))


@EXT
@pytest.mark.parametrize("poke,words", [
    (_or32(1024 + 96, 0x4), ("partition 1", "needs recovery")),
    (_poke(1024 + 232, struct.pack("<I", 12)), ("partition 1", "orphan")),
    (_poke(1024 + 58, struct.pack("<H", 0)), ("partition 1", "not cleanly unmounted")),
    (_poke(1024 + 58, struct.pack("<H", 3)), ("partition 1", "errors")),
    (_or32(1024 + 96, 0x40000000), ("partition 1", "feature flags not understood", "incompat")),
    (_or32(1024 + 100, 0x80000000), ("partition 1", "feature flags not understood", "ro_compat")),
    (_or32(1024 + 92, 0x40000000), ("partition 1", "feature flags not understood", "compat")),
], ids=["needs_recovery", "orphan", "unclean", "errors", "incompat", "ro_compat", "compat"])
def test_ext_states_and_features_that_forbid_touching_it(tmp_path, poke, words):
    assert_refused(_image(tmp_path, "ext4", 24 * MiB, poke), *words)


@EXT
@pytest.mark.parametrize("poke,words", [
    (_poke(1024 + 4, struct.pack("<I", 0x7FFFFFFF)), ("more than the partition",)),          # blocks_count
    (_poke(1024 + 12, struct.pack("<I", 0)), ("more than the superblock",)),                # free count
    (_poke(1024 + 32, struct.pack("<I", 1 << 20)), ("blocks per group",)),
    (_poke(1024 + 24, struct.pack("<I", 30)), ("block size",)),
], ids=["huge-block-count", "lying-free-count", "huge-groups", "block-size"])
def test_ext_hostile_superblocks(tmp_path, poke, words):
    assert_refused(_image(tmp_path, "ext4", 24 * MiB, poke), "partition 1", *words)


@EXT
def test_ext_group_whose_bitmap_claims_more_than_its_descriptor(tmp_path):
    def poke(f, start):
        # 1 KiB blocks (a 24 MiB mke2fs): descriptors at block 2; group 0's free count to 1
        f.seek(start + 2048 + 12)
        f.write(struct.pack("<H", 1))
    assert_refused(_image(tmp_path, "ext4", 24 * MiB, poke), "partition 1", "group 0", "descriptor")


@EXT
def test_ext_bitmap_whose_checksum_fails_although_the_counts_agree(tmp_path):
    def poke(f, start):
        # 1 KiB blocks: group 0's descriptor at block 2; swap a used and a free bit of its bitmap
        f.seek(start + 2048)
        bb = struct.unpack("<I", f.read(4))[0]
        f.seek(start + bb * 1024)
        bits = bytearray(f.read(1024))
        used = next(i for i in range(8192) if bits[i // 8] >> (i % 8) & 1)
        free = next(i for i in range(8191, 0, -1) if not bits[i // 8] >> (i % 8) & 1)
        bits[used // 8] &= ~(1 << (used % 8)) & 0xFF
        bits[free // 8] |= 1 << (free % 8)
        f.seek(start + bb * 1024)
        f.write(bits)
    assert_refused(_image(tmp_path, "ext4", 24 * MiB, poke), "partition 1", "group 0", "checksum")


@EXT
def test_ext_bitmap_past_the_partition_end(tmp_path):
    def poke(f, start):
        f.seek(start + 2048)
        f.write(struct.pack("<I", 0x00FFFFFF))
    assert_refused(_image(tmp_path, "ext4", 24 * MiB, poke), "partition 1", "outside the filesystem")


# -- FAT / exFAT ------------------------------------------------------------------------------
@pytest.mark.judges(*tools_for("fat32"))
def test_fat32_dirty_bit(tmp_path):
    assert_refused(_image(tmp_path, "fat32", 40 * MiB, _or32(0x40, 0x100)), "partition 1", "dirty")


@pytest.mark.judges(*tools_for("fat16"))
def test_fat16_not_cleanly_unmounted(tmp_path):
    def poke(f, start):
        f.seek(start + 14)
        reserved = struct.unpack("<H", f.read(2))[0]
        f.seek(start + reserved * 512 + 2)
        f.write(struct.pack("<H", 0x7FFF))
    assert_refused(_image(tmp_path, "fat16", 24 * MiB, poke), "partition 1", "dirty")


@pytest.mark.judges(*tools_for("fat16"))
def test_fat_copies_that_disagree(tmp_path):
    def poke(f, start):
        f.seek(start + 14)
        reserved = struct.unpack("<H", f.read(2))[0]
        f.seek(start + 22)
        fatsz = struct.unpack("<H", f.read(2))[0]
        f.seek(start + (reserved + fatsz) * 512 + 100)          # second FAT, some entry
        f.write(b"\x37\x13")
    assert_refused(_image(tmp_path, "fat16", 24 * MiB, poke), "partition 1", "copies disagree")


@pytest.mark.judges(*tools_for("fat16"))
def test_fat_claiming_more_sectors_than_the_partition(tmp_path):
    assert_refused(_image(tmp_path, "fat16", 24 * MiB, _fat_total(0x7FFFFFF0)), "partition 1", "more than the partition")


def _fat_total(n):
    def poke(f, start):
        f.seek(start + 19)
        f.write(b"\0\0")
        f.seek(start + 32)
        f.write(struct.pack("<I", n))
    return poke


@pytest.mark.judges(*tools_for("exfat"), modules=("dissect.fat",))
@pytest.mark.parametrize("poke,words", [
    (_poke(106, struct.pack("<H", 2)), ("dirty",)),
    (_poke(92, struct.pack("<I", 0xFFFFFFF0)), ("FAT is too small",)),
    (_poke(72, struct.pack("<Q", 1 << 40)), ("more than the partition",)),
], ids=["VolumeDirty", "huge-cluster-count", "huge-volume"])
def test_exfat_refusals(tmp_path, poke, words):
    assert_refused(_image(tmp_path, "exfat", 24 * MiB, poke, table="gpt"), "partition 1", *words)


# -- NTFS -------------------------------------------------------------------------------------
def _ntfs_volume_flags_offset(img_raw_path, start):
    """Byte offsets of $Volume's flags in $MFT and $MFTMirr (found through the boot sector)."""
    from vdisk.fsaware import ntfs
    from vdisk.fsaware.base import Region
    with vdisk.open(img_raw_path) as d:
        vol = ntfs._Volume(Region(d, start, d.size - start, "t"))
        rec = vol.record_bytes(3)
        for t, a, nonres, name in vol.attributes(rec, "$Volume"):
            if t == 0x70:
                in_rec = rec.index(a) + a[20] + (a[21] << 8) + 10
                mft = vol.mft_runs[0][1]
                mirror = struct.unpack("<Q", d.pread(8, start + 56))[0]          # $MFTMirr too
                return [start + lcn * vol.cluster + 3 * vol.record + in_rec for lcn in (mft, mirror)]
    raise AssertionError("no $VOLUME_INFORMATION")


@pytest.mark.judges(*tools_for("ntfs"))
@pytest.mark.needs_fuse
def test_ntfs_marked_dirty(tmp_path):
    raw = str(tmp_path / "disk.raw")
    parts = make_disk(raw, [Part("ntfs", 32 * MiB)], nfiles=2)
    with open(raw, "r+b") as f:
        for at in _ntfs_volume_flags_offset(raw, parts[0].start):
            f.seek(at)
            f.write(struct.pack("<H", 1))
    img = str(tmp_path / "disk.vdi")
    run([os.path.join(os.path.dirname(os.sys.executable), "vdisk"), "convert", raw, img])
    assert "--force" in assert_refused(img, "partition 1", "dirty")
    size = os.path.getsize(img)
    p = _vdisk("compact", img, "--filesystem-aware", "--force")         # then only the bitmap is trusted
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(img) < size
    out = str(tmp_path / "out.raw")
    run(["qemu-img", "convert", "-f", "vdi", "-O", "raw", img, out])
    from fsaware_support import copy_range
    import hashlib
    pimg = str(tmp_path / "p.img")
    copy_range(out, pimg, parts[0].start, parts[0].size)
    for name, digest in parts[0].files.items():
        r = subprocess.run(["ntfscat", "-f", pimg, name], capture_output=True)
        assert r.returncode == 0, r.stderr
        data = r.stdout
        assert hashlib.sha256(data).hexdigest() == digest


@pytest.mark.judges(*tools_for("ntfs"))
@pytest.mark.needs_fuse
def test_ntfs_holding_a_hibernated_windows(tmp_path):
    import tempfile
    raw = str(tmp_path / "disk.raw")
    parts = make_disk(raw, [Part("ntfs", 32 * MiB)], nfiles=2)
    with tempfile.TemporaryDirectory() as work:
        img, mnt = os.path.join(work, "p.img"), os.path.join(work, "m")
        from fsaware_support import copy_back, copy_range
        copy_range(raw, img, parts[0].start, parts[0].size)
        os.mkdir(mnt)
        run(["ntfs-3g", img, mnt])
        try:
            with open(os.path.join(mnt, "hiberfil.sys"), "wb") as f:
                f.write(b"hibr" + bytes(8188))
        finally:
            run(["fusermount3", "-u", mnt])
        copy_back(img, raw, parts[0].start)
    image = str(tmp_path / "disk.vhd")
    run([os.path.join(os.path.dirname(os.sys.executable), "vdisk"), "convert", raw, image])
    assert_refused(image, "partition 1", "hibernated")


# -- swap -------------------------------------------------------------------------------------
@pytest.mark.judges(*tools_for("swap"))
def test_swap_holding_a_hibernation_image(tmp_path):
    assert_refused(_image(tmp_path, "swap", 16 * MiB, _poke(4086, b"S1SUSPEND\0")), "partition 1", "hibernation")


@pytest.mark.judges(*tools_for("swap"))
def test_swap_claiming_more_pages_than_the_partition(tmp_path):
    assert_refused(_image(tmp_path, "swap", 16 * MiB, _poke(1024 + 4, struct.pack("<I", 1 << 30))),
                   "partition 1", "more than the partition")


# -- the image itself --------------------------------------------------------------------------
@EXT
def test_an_image_locked_by_another_process_is_refused(tmp_path):
    img = _image(tmp_path, "ext4", 24 * MiB)
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        line = assert_refused(img)
        assert "lock" in line.lower() or "in use" in line.lower()
    finally:
        os.close(fd)


@EXT
def test_a_read_only_image_file_is_refused(tmp_path):
    img = _image(tmp_path, "ext4", 24 * MiB)
    os.chmod(img, 0o444)
    assert_refused(img, "read-only")


@EXT
def test_a_damaged_partition_table_is_refused(tmp_path):
    img = _image(tmp_path, "ext4", 24 * MiB, None)
    raw = str(tmp_path / "bad.raw")
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", img, raw])
    with open(raw, "r+b") as f:                       # partition 2 overlapping partition 1
        f.seek(446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 4096, 8192))
    bad = str(tmp_path / "bad.vhd")
    run([os.path.join(os.path.dirname(os.sys.executable), "vdisk"), "convert", raw, bad])
    assert_refused(bad, "partition")


# -- bounded memory ----------------------------------------------------------------------------
@pytest.mark.judges(*tools_for("exfat", "ext4"), modules=("dissect.fat",))
@pytest.mark.parametrize("fs,poke", [
    ("ext4", _poke(1024 + 4, struct.pack("<I", 0xFFFFFFFF))),
    ("exfat", _poke(92, struct.pack("<I", 0xFFFFFFFF))),
])
def test_huge_claimed_counts_cost_no_memory(tmp_path, fs, poke):
    img = _image(tmp_path, fs, 24 * MiB, poke)
    with vdisk.open(img) as d:
        tracemalloc.start()
        try:
            with pytest.raises(Refusal):
                analyse(d, img)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 * MiB


@pytest.mark.judges(*tools_for("ntfs"))
@pytest.mark.needs_fuse
def test_ntfs_claiming_more_sectors_than_the_partition(tmp_path):
    assert_refused(_image(tmp_path, "ntfs", 24 * MiB, _poke(40, struct.pack("<Q", 1 << 40))),
                   "partition 1", "more than the partition")


@EXT
@pytest.mark.parametrize("extra", [["--to", "x.vhd"], ["--verify"]])
def test_filesystem_aware_compaction_is_in_place_and_says_so(tmp_path, extra):
    img = _image(tmp_path, "ext4", 24 * MiB)
    before = sha_file(img)
    p = _vdisk("compact", img, "--filesystem-aware", *extra)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "in place" in p.stderr
    assert sha_file(img) == before
