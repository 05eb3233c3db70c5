"""A Disk is a file for the rest of Python: the io stack (BufferedReader/BufferedRandom,
shutil.copyfileobj) and filesystem readers that take a file object (dissect.extfs, dissect.fat)
work on ``Disk.as_file()``. The filesystems are judged by their own tools (debugfs, mtools)."""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

import vdisk

from conftest import FIXTURES, need

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def image(tmp_path):
    """A dynamic VHD of an odd size with data scattered over a few blocks."""
    path = tmp_path / "disk.vhd"
    rng = random.Random(5)
    with vdisk.create(path, 5 * MiB + 1536, format="vhd", block_size=512 * KiB) as d:
        for off in (0, 700 * KiB, 3 * MiB - 100, 5 * MiB):
            d.pwrite(rng.randbytes(40 * KiB if off < 5 * MiB else 1536), off)
    return path


def test_buffered_reader_reads_the_whole_disk(image):
    with vdisk.open(image) as d:
        want = d.pread(d.size, 0)
        reader = io.BufferedReader(d.as_file(), buffer_size=64 * KiB)
        assert reader.read() == want
        reader.seek(700 * KiB - 3)
        assert reader.read(10) == want[700 * KiB - 3:700 * KiB + 7]
        assert reader.tell() == 700 * KiB + 7
        reader.seek(-5, io.SEEK_END)
        assert reader.read() == want[-5:] and reader.read() == b""
        lines = io.BufferedReader(d.as_file()).readlines()          # iteration works too
        assert b"".join(lines) == want


@pytest.mark.judges("qemu-img")
def test_copyfileobj_gives_what_qemu_img_converts(tmp_path, image):
    judge = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(judge)], check=True)
    out = tmp_path / "copy.raw"
    with vdisk.open(image) as d, open(out, "wb") as f:
        shutil.copyfileobj(d.as_file(), f, 100 * KiB)              # an odd buffer size on purpose
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(judge.read_bytes()).digest()


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["seek", "read", "write"]), st.integers(0, 2 * MiB),
                              st.integers(0, 70 * KiB)), min_size=1, max_size=12),
       seed=st.integers(0, 99))
def test_buffered_random_matches_a_bytearray(tmp_path_factory, ops, seed):
    """Reads, writes and seeks through io.BufferedRandom, byte for byte against a model."""
    path = tmp_path_factory.mktemp("rw") / "rw.vdi"
    size = 2 * MiB
    model = bytearray(size)
    rng = random.Random(seed)
    with vdisk.create(path, size, format="vdi", block_size=64 * KiB) as d:
        f = io.BufferedRandom(d.as_file(), buffer_size=16 * KiB)
        pos = 0
        for op, where, n in ops:
            if op == "seek":
                pos = f.seek(where)
            elif op == "read":
                got = f.read(n)
                assert got == bytes(model[pos:pos + n])
                pos += len(got)
            else:
                n = min(n, size - pos)                          # a disk does not grow
                data = rng.randbytes(n)
                assert f.write(data) == n
                model[pos:pos + n] = data
                pos += n
        f.flush()
    with vdisk.open(path) as d:
        assert d.pread(size, 0) == bytes(model)


# -- filesystem readers -------------------------------------------------------------------------
def debugfs(raw, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True).stdout


def test_dissect_extfs_reads_the_bundled_ext2_fixture(tmp_path):
    need("debugfs", "qemu-img")
    from dissect.extfs import ExtFS
    raw = tmp_path / "ext2.raw"                  # the judge reads qemu-img's view of the image
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(FIXTURES / "dfvfs_ext2.vhd"), str(raw)],
                   check=True)
    with vdisk.open(FIXTURES / "dfvfs_ext2.vhd") as d:
        fs = ExtFS(io.BufferedReader(d.as_file()))
        for folder in ("/", "/a_directory"):
            # debugfs -p: /inode/mode/uid/gid/name/size/
            want = {f.split("/")[5]: int(f.split("/")[1]) for f in debugfs(raw, f"ls -p {folder}").split()}
            got = {name: inode.inum for name, inode in fs.get(folder).listdir().items()}
            assert got == want
        for name in ("/passwords.txt", "/a_directory/a_file", "/a_directory/another_file"):
            assert fs.get(name).open().read().decode() == debugfs(raw, f"cat {name}")
        assert fs.get("/a_link").link == debugfs(raw, "stat /a_link").split('Fast link dest: "')[1].split('"')[0]


def test_dissect_extfs_reads_a_filesystem_mke2fs_made(tmp_path):
    """A new ext2 from a folder (mke2fs -d), converted to a VDI by qemu-img, read back file by file."""
    need("mke2fs", "qemu-img")
    from dissect.extfs import ExtFS
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    rng = random.Random(9)
    files = {"a.bin": rng.randbytes(300 * KiB), "sub/b.txt": b"hello\n" * 999, "sub/deeper/c": rng.randbytes(5),
             "empty": b""}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    raw = tmp_path / "fs.raw"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-b", "1024", "-d", str(tree), str(raw), "4M"], check=True)
    vdi = tmp_path / "fs.vdi"
    subprocess.run(["qemu-img", "convert", "-O", "vdi", str(raw), str(vdi)], check=True)
    with vdisk.open(vdi) as d:
        fs = ExtFS(d.as_file())
        for name, data in files.items():
            assert fs.get("/" + name).open().read() == data, name
        assert sorted(fs.get("/sub").listdir()) == [".", "..", "b.txt", "deeper"]


def mtools(*argv: str) -> str:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, env=env).stdout


def test_dissect_fat_reads_the_bundled_fat_fixture(tmp_path):
    """The fixed VHD's FAT16 partition (at 64 KiB), through a byte range of the Disk's file."""
    need("mdir", "qemu-img")
    from dissect.fat import FATFS
    from dissect.util.stream import RangeStream
    from vdisk.mount.partitions import read_partitions
    raw = tmp_path / "fat.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(FIXTURES / "rdisk_vhd_fixed_small.vhd"),
                    str(raw)], check=True)
    listing = mtools("mdir", "-a", "-i", f"{raw}@@65536", "::")
    serial = listing.split("Volume Serial Number is ")[1].split()[0]
    with vdisk.open(FIXTURES / "rdisk_vhd_fixed_small.vhd") as d:
        (part,) = read_partitions(d)
        assert part.start == 65536
        fs = FATFS(RangeStream(d.as_file(), part.start, part.length))
        assert f"{fs.volume_id[:4]}-{fs.volume_id[4:]}".upper() == serial
        entries = list(fs.get("/").iterdir())
    # mdir: "Volume in drive : is FAT", "No files": the root holds only the volume label.
    label = listing.split("Volume in drive : is ")[1].split("\n")[0].strip()
    assert [(e.name, e.is_volume_id()) for e in entries] == [(label, True)]
    assert "No files" in listing


def test_dissect_fat_reads_files_mtools_wrote(tmp_path):
    """A FAT image made and filled by mtools, converted to a dynamic VHD by vdisk, read by dissect.fat."""
    need("mformat", "mcopy")
    from dissect.fat import FATFS
    raw = tmp_path / "fat.img"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    mtools("mformat", "-i", str(raw), "-v", "VDISKTEST", "::")
    rng = random.Random(4)
    files = {"ONE.BIN": rng.randbytes(123_457), "TWO.TXT": b"two\r\n" * 300}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        mtools("mcopy", "-i", str(raw), str(tmp_path / name), f"::/{name}")
    mtools("mmd", "-i", str(raw), "::/DIR")
    mtools("mcopy", "-i", str(raw), str(tmp_path / "TWO.TXT"), "::/DIR/THREE.TXT")
    vhd = tmp_path / "fat.vhd"
    with vdisk.open(raw, format="raw") as src:
        from vdisk.ops.convert import convert
        convert(src, vhd, "vhd", "dynamic", durable=False)
    with vdisk.open(vhd) as d:
        fs = FATFS(io.BufferedReader(d.as_file()))
        assert fs.volume_label.strip() == "VDISKTEST"
        for name, data in files.items():
            assert fs.get(name).open().read() == data, name
        assert fs.get("DIR/THREE.TXT").open().read() == files["TWO.TXT"]
