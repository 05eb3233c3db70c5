"""Real FUSE mounts: fixtures read byte-exact, partitions at the right places, ext4 inside a
partition file, read-write through the mount (also into differencing images), locks, errors,
unmount and SIGTERM leaving consistent images.

Judges: the MANIFEST raw hashes, qemu-img compare / check, e2fsck, debugfs, sfdisk, the Disk API.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

import vdisk
from vdisk.errors import LockError, ParentError, VDiskError

from conftest import CI_CANNOT, cannot_here, fixture_image, manifest, need

from vdisk.mount import mount_image, unmount

# No /dev/fuse, libfuse, mfusepy or fusermount3: every test here is skipped, or fails under
# VDISK_REQUIRE_JUDGES=1 (CI), checked before any fixture runs.
pytestmark = pytest.mark.needs_fuse

MiB = 1 << 20
SECTOR = 512


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path):
    """Whatever a test does (or fails to do), no mount below its tmp_path survives it."""
    yield
    with open("/proc/self/mounts") as f:
        leftovers = [line.split()[1] for line in f if line.split()[1].startswith(str(tmp_path))]
    for mp in leftovers:
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


@contextlib.contextmanager
def mounted(image, mountpoint, **kw):
    os.makedirs(mountpoint, exist_ok=True)
    pid = mount_image(image, mountpoint, **kw)
    try:
        yield pid
    finally:
        if os.path.ismount(mountpoint):
            try:
                unmount(mountpoint)
            except VDiskError:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
                raise


def sha256_file(path, chunk=MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                return h.hexdigest()
            h.update(data)


def read_at(path, offset, length) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_at(path, offset, data) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def dd_write(src, dst, *, bs, seek, count, conv="notrunc"):
    return subprocess.run(["dd", f"if={src}", f"of={dst}", f"bs={bs}", f"seek={seek}", f"count={count}",
                           f"conv={conv}", "status=none"], capture_output=True, text=True)


def mount_line(mountpoint) -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mountpoint):
                return line
    return ""


def wait_gone(pid, timeout=30.0):
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], timeout)[0], f"process {pid} still running"
    finally:
        os.close(fd)


def mbr(entries) -> bytes:
    """Sector 0 with primary partitions (type, first sector, sectors)."""
    sector = bytearray(SECTOR)
    for i, (ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, 0, b"\0\0\0", ptype, b"\0\0\0", lba, count)
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


# -- reading real images -----------------------------------------------------------------------
@pytest.mark.parametrize("name, files", [
    ("rdisk_vhd_dynamic_small_gpt.vhd.xz", {"p1": (128 * SECTOR, 2048 * SECTOR)}),
    ("rdisk_win7dyn.vhd.xz", {"p1": (34 * SECTOR, 65536 * SECTOR), "p2": (65664 * SECTOR, 339968 * SECTOR)}),
    ("rdisk_vhd_fixed_small.vhd", {"p1": (128 * SECTOR, 3968 * SECTOR)}),
])
def test_fixture_mount_reads_byte_exact(tmp_path, name, files):
    image = fixture_image(name)
    mp = tmp_path / "m"
    with vdisk.open(image) as d:
        size = d.size
        raw = d.pread(size, 0)
    with mounted(image, mp):
        names = sorted(os.listdir(mp))
        assert names == sorted(["disk", *files] + (["by-name"] if "gpt" in name or "win7" in name else []))
        assert os.path.getsize(mp / "disk") == size
        assert sha256_file(mp / "disk") == manifest()[name]["raw_sha256"]
        for fname, (start, length) in files.items():
            st = os.stat(mp / fname)
            assert st.st_size == length
            assert sha256_file(mp / fname) == hashlib.sha256(raw[start:start + length]).hexdigest()
            assert int(os.getxattr(mp / fname, "user.vdisk.offset")) == start
            assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
            assert stat.S_IMODE(st.st_mode) == 0o444
        if "by-name" in names:
            for link in os.listdir(mp / "by-name"):
                target = os.readlink(mp / "by-name" / link)
                assert target.startswith("../p") and target[3:] in files
            assert os.readlink(mp / "by-name" / "Basic data partition") == "../" + max(files)
        # unaligned reads, crossing the end
        assert read_at(mp / "disk", 1234567 % size, 9999) == raw[1234567 % size:1234567 % size + 9999]
        assert read_at(mp / "disk", size - 100, 4096) == raw[-100:]
        assert read_at(mp / "disk", size + 10, 4096) == b""
        line = mount_line(mp)
        assert " fuse.vdisk " in line and "ro," in line and "allow_other" not in line
        assert f"user_id={os.getuid()}" in line
        from vdisk.mount.fs import MAX_READ
        assert f"max_read={MAX_READ}" in line          # 1 MiB with libfuse 3


def test_sparse_allocation_shows_in_st_blocks_and_readonly_refuses_writes(tmp_path):
    image = fixture_image("rdisk_win7dyn.vhd.xz")
    mp = tmp_path / "m"
    with mounted(image, mp):
        st = os.stat(mp / "disk")
        assert 0 < st.st_blocks * 512 < st.st_size // 4      # 6 of 100 blocks allocated
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as exc:
                os.open(mp / "p1", flags)
            assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError):
            os.truncate(mp / "disk", 0)
        assert os.getxattr(mp, "user.vdisk.mode") == b"ro"


def test_parallel_readers(tmp_path):
    image = fixture_image("rdisk_win7dyn.vhd.xz")
    mp = tmp_path / "m"
    with vdisk.open(image) as d:
        raw = d.pread(d.size, 0)
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(200):
                off = rnd.randrange(len(raw) - 70000)
                n = rnd.choice([512, 4096, 65536, 70000])
                if read_at(mp / "disk", off, n) != raw[off:off + n]:
                    errors.append((off, n))
        except Exception as exc:     # pragma: no cover - reported below
            errors.append(exc)

    with mounted(image, mp):
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# -- ext4 inside a partition of a fresh image ----------------------------------------------------
@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory):
    """A fresh dynamic VHD, partitioned by sfdisk and given an ext4 by mkfs.ext4, all through the mount."""
    need("sfdisk", "mkfs.ext4", "e2fsck", "debugfs")
    tmp = tmp_path_factory.mktemp("ext4")
    image = tmp / "fresh.vhd"
    vdisk.create(image, 96 * MiB, format="vhd", subtype="dynamic").close()
    mp = tmp / "m"
    with mounted(image, mp, rw=True):
        subprocess.run(["sfdisk", "-q", str(mp / "disk")], check=True, capture_output=True, text=True,
                       input="label: gpt\nstart=2048, size=40960, type=linux, name=boot\n"
                             "start=43008, type=linux, name=data\n")
    payload = tmp / "payload.bin"
    payload.write_bytes(random.Random(5).randbytes(300_000) + b"end of file\n")
    with mounted(image, mp, rw=True):
        assert os.readlink(mp / "by-name" / "data") == "../p2"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "vdisk", str(mp / "p2")], check=True, capture_output=True)
        subprocess.run(["debugfs", "-w", "-R", f"write {payload} /file", str(mp / "p2")], check=True,
                       capture_output=True)
    return image, payload.read_bytes()


def test_ext4_in_a_partition_file(tmp_path, ext4_image):
    image, payload = ext4_image
    mp = tmp_path / "m"
    with mounted(image, mp):
        fsck = subprocess.run(["e2fsck", "-f", "-n", str(mp / "p2")], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        cat = subprocess.run(["debugfs", "-R", "cat /file", str(mp / "p2")], capture_output=True, check=True)
        assert cat.stdout == payload
        # the file system sits exactly at partition 2's offset on the disk
        assert read_at(mp / "disk", 43008 * SECTOR + 1024 + 0x38, 2) == b"\x53\xef"
        assert read_at(mp / "p1", 0, 4096) == bytes(4096)     # partition 1 untouched
    with vdisk.open(image) as d:
        allocated = sum(e.length for e in d.extents() if e.kind == 0)
    assert allocated < 40 * MiB                               # mkfs discards, nothing inflated


def _loop_mount(source, target, *options) -> None:
    res = subprocess.run(["mount", "-o", ",".join(("loop",) + options), str(source), str(target)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        text = res.stderr.lower()
        if any(w in text for w in ("permission denied", "not permitted", "only root", "no free loop",
                                   "failed to setup loop", "unknown filesystem type")):
            cannot_here("loop-mount", res.stderr.strip())
        raise AssertionError(res.stderr)


@pytest.mark.judges("mount", "umount")
@pytest.mark.skipif(os.geteuid() != 0, reason=f"loop-mount: not root ({CI_CANNOT['loop-mount']})")
def test_partition_file_loop_mounts_read_write(tmp_path, ext4_image):
    """The kernel's ext4 on a loop device over the partition file, writing through vdisk."""
    image = tmp_path / "copy.vhd"
    shutil.copy(ext4_image[0], image)
    mp, fsdir = tmp_path / "m", tmp_path / "fs"
    fsdir.mkdir()
    news = random.Random(8).randbytes(3 * MiB + 5)
    with mounted(image, mp, rw=True):
        _loop_mount(mp / "p2", fsdir)
        try:
            assert (fsdir / "file").read_bytes() == ext4_image[1]
            (fsdir / "dir").mkdir()
            (fsdir / "dir" / "new.bin").write_bytes(news)
        finally:
            subprocess.run(["umount", str(fsdir)], check=True)
    with mounted(image, mp):
        fsck = subprocess.run(["e2fsck", "-f", "-n", str(mp / "p2")], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        cat = subprocess.run(["debugfs", "-R", "cat /dir/new.bin", str(mp / "p2")], capture_output=True, check=True)
        assert cat.stdout == news


# -- writing -----------------------------------------------------------------------------------
WRITES = [(0, 1000), (12345, 77777), (2 * MiB - 300, 600), (5 * MiB + 1, 3 * MiB + 7), (17 * MiB - 1, 1)]


def apply_writes(path, model: bytearray, seed=1):
    rnd = random.Random(seed)
    for off, n in WRITES:
        data = rnd.randbytes(n)
        assert write_at(path, off, data) == n
        model[off:off + n] = data


@pytest.mark.parametrize("fmt", ["vpc", "vdi"])
def test_rw_unaligned_writes_match_qemu(tmp_path, fmt):
    need("qemu-img", "dd")
    image = tmp_path / f"img.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "48M"], check=True)
    with vdisk.open(image) as d:
        size = d.size
    model = bytearray(size)
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(9).randbytes(100_000))
    mp = tmp_path / "m"
    with mounted(image, mp, rw=True):
        assert os.getxattr(mp, "user.vdisk.mode") == b"rw"
        apply_writes(mp / "disk", model)
        res = dd_write(src, mp / "disk", bs=1000, seek=33333, count=100)    # dd at an unaligned offset
        assert res.returncode == 0, res.stderr
        model[33333000:33333000 + 100_000] = src.read_bytes()
        tail = random.Random(3).randbytes(700)                            # the very end of the disk
        assert write_at(mp / "disk", size - 700, tail) == 700
        model[size - 700:] = tail
        assert read_at(mp / "disk", 12000, 100_000) == bytes(model[12000:112000])
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(image), str(expected)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt == "vdi":
        chk = subprocess.run(["qemu-img", "check", "-q", "-f", "vdi", str(image)], capture_output=True, text=True)
        assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_rw_into_a_differencing_image(tmp_path, fmt):
    base = tmp_path / f"base.{fmt}"
    child = tmp_path / f"child.{fmt}"
    size = 24 * MiB
    with vdisk.create(base, size, format=fmt, subtype="dynamic") as d:
        size = d.size
        base_data = bytearray(random.Random(2).randbytes(size))
        d.pwrite(base_data, 0)
    base_hash = sha256_file(base)
    vdisk.create(child, format=fmt, parent=base).close()
    model = bytearray(base_data)
    mp = tmp_path / "m"
    with mounted(child, mp, rw=True):
        apply_writes(mp / "disk", model, seed=4)
        res = dd_write("/dev/zero", mp / "disk", bs=999, seek=3001, count=5)   # zeros must shadow the parent
        assert res.returncode == 0, res.stderr
        model[999 * 3001:999 * 3006] = bytes(999 * 5)
        assert read_at(mp / "disk", 0, 4 * MiB) == bytes(model[:4 * MiB])
    with vdisk.open(child) as d:
        assert len(d.chain) == 2
        assert d.pread(size, 0) == bytes(model)
    assert sha256_file(base) == base_hash


def test_writes_stop_at_the_partition_end(tmp_path):
    image = tmp_path / "two.vhd"
    with vdisk.create(image, 16 * MiB, format="vhd") as d:
        d.pwrite(mbr([(0x83, 2048, 8192), (0x83, 10240, 8192)]), 0)
        d.pwrite(b"\xaa" * (4 * MiB), 10240 * SECTOR)                     # partition 2 content
    p1_len = 8192 * SECTOR
    mp = tmp_path / "m"
    src = tmp_path / "ones.bin"
    src.write_bytes(b"\x11" * 16384)
    with mounted(image, mp, rw=True):
        assert os.path.getsize(mp / "p1") == p1_len
        res = dd_write(src, mp / "p1", bs=4096, seek=p1_len // 4096 - 2, count=4)
        assert res.returncode != 0 and "No space left on device" in res.stderr
        fd = os.open(mp / "p1", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"\x22" * 1000, p1_len - 300) == 300           # cut at the end
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"\x33", p1_len)
            assert exc.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.truncate(mp / "p1", 0)                                          # block-device-like: no-op
        assert os.path.getsize(mp / "p1") == p1_len
        with pytest.raises(OSError) as exc:
            os.truncate(mp / "p1", p1_len + 1)
        assert exc.value.errno == errno.EFBIG
        assert read_at(mp / "p2", 0, 4096) == b"\xaa" * 4096
    with vdisk.open(image) as d:
        end1 = (2048 + 8192) * SECTOR
        assert d.pread(8192 - 300, end1 - 8192) == b"\x11" * (8192 - 300)
        assert d.pread(300, end1 - 300) == b"\x22" * 300
        assert d.pread(4 * MiB, end1) == b"\xaa" * (4 * MiB)


def test_punch_hole_and_zero_range(tmp_path):
    need("fallocate")
    image = tmp_path / "img.vdi"
    with vdisk.create(image, 16 * MiB, format="vdi") as d:
        d.pwrite(b"\x5a" * (8 * MiB), 0)
    mp = tmp_path / "m"
    with mounted(image, mp, rw=True):
        subprocess.run(["fallocate", "-p", "-o", "4096", "-l", str(2 * MiB), str(mp / "disk")], check=True)
        subprocess.run(["fallocate", "-z", "-o", str(5 * MiB), "-l", "1000", str(mp / "disk")], check=True)
        assert read_at(mp / "disk", 0, 4096) == b"\x5a" * 4096
        assert read_at(mp / "disk", 4096, 2 * MiB) == bytes(2 * MiB)
        assert read_at(mp / "disk", 5 * MiB, 1000) == bytes(1000)
    with vdisk.open(image) as d:
        assert d.pread(2 * MiB, 4096) == bytes(2 * MiB)
        assert d.pread(100, 2 * MiB + 4096) == b"\x5a" * 100


# -- locks, errors, lifecycle -------------------------------------------------------------------
def test_rw_mount_locks_the_image(tmp_path):
    image = tmp_path / "img.vhd"
    vdisk.create(image, 8 * MiB).close()
    with mounted(image, tmp_path / "a", rw=True):
        os.makedirs(tmp_path / "b")
        with pytest.raises(LockError, match="mounted read-write elsewhere"):
            mount_image(image, tmp_path / "b")
        with pytest.raises(LockError, match="mounted or open elsewhere"):
            mount_image(image, tmp_path / "b", rw=True)
        with pytest.raises(LockError):
            vdisk.open(image, "r+")
    # two read-only mounts share the image; a writer is kept out
    with mounted(image, tmp_path / "a"), mounted(image, tmp_path / "b"):
        with pytest.raises(LockError):
            vdisk.open(image, "r+")
        os.makedirs(tmp_path / "c")
        with pytest.raises(LockError, match="mounted or open elsewhere"):
            mount_image(image, tmp_path / "c", rw=True)
    vdisk.open(image, "r+").close()


def test_mount_errors(tmp_path, monkeypatch):
    image = tmp_path / "img.vhd"
    vdisk.create(image, 8 * MiB).close()
    with pytest.raises(VDiskError, match="does not exist"):
        mount_image(image, tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VDiskError, match="not a directory"):
        mount_image(image, tmp_path / "file")
    mp = tmp_path / "m"
    with mounted(image, mp):
        with pytest.raises(VDiskError, match="busy"):
            mount_image(image, mp)
    os.makedirs(tmp_path / "m2")
    with pytest.raises(VDiskError, match="no such file"):
        mount_image(tmp_path / "missing.vhd", tmp_path / "m2")
    with pytest.raises(ParentError, match="fat-parent.vhd"):
        mount_image(fixture_image("dfvfs_fat-differential.vhd"), tmp_path / "m2")
    assert not os.path.ismount(tmp_path / "m2")
    with pytest.raises(VDiskError, match="not mounted"):
        unmount(tmp_path / "m2")
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p) == "/dev/fuse" else real_exists(p))
    with pytest.raises(VDiskError, match="/dev/fuse is missing"):
        mount_image(image, tmp_path / "m2")


def test_unmount_refuses_while_busy_and_waits_for_the_close(tmp_path):
    image = tmp_path / "img.vhd"
    vdisk.create(image, 8 * MiB).close()
    mp = tmp_path / "m"
    os.makedirs(mp)
    pid = mount_image(image, mp, rw=True)
    f = open(mp / "disk", "r+b")
    try:
        f.write(b"busy")
        with pytest.raises(VDiskError, match="busy"):
            unmount(mp)
    finally:
        f.close()
    unmount(mp)
    assert not os.path.ismount(mp)
    wait_gone(pid, timeout=0.5)                  # exited already (perhaps not yet reaped)
    with vdisk.open(image, "r+") as d:            # the lock is gone: unmount waited for the close
        assert d.pread(4, 0) == b"busy"


def test_daemon_ignores_hangups_and_leaves_the_callers_process_group(tmp_path):
    image = tmp_path / "img.vhd"
    vdisk.create(image, 8 * MiB).close()
    mp = tmp_path / "m"
    with mounted(image, mp) as pid:
        assert os.getpgid(pid) != os.getpgid(0)              # Ctrl-C on the caller's job misses it
        os.kill(pid, signal.SIGHUP)                          # a closing terminal
        time.sleep(0.2)
        assert os.path.getsize(mp / "disk") == 8 * MiB


@pytest.mark.judges("qemu-img")
def test_killed_daemon_keeps_fsynced_data_and_its_dead_mount_is_cleared(tmp_path):
    image = tmp_path / "img.vdi"
    vdisk.create(image, 8 * MiB, format="vdi").close()
    mp = tmp_path / "m"
    os.makedirs(mp)
    pid = mount_image(image, mp, rw=True)
    data = random.Random(6).randbytes(3 * MiB + 17)
    fd = os.open(mp / "disk", os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, 4097) == len(data)
        os.fsync(fd)                                   # durable from here on, whatever happens
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    with pytest.raises(OSError) as exc:
        os.listdir(mp)
    assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(VDiskError, match="dead FUSE mount"):
        mount_image(image, mp)
    unmount(mp)
    assert _stat_errno(mp) == 0 and not os.path.ismount(mp)
    _check_clean(image, "vdi")
    with vdisk.open(image) as d:
        assert d.pread(len(data), 4097) == data
    with mounted(image, mp):
        assert read_at(mp / "disk", 4097, len(data)) == data


def _stat_errno(path) -> int:
    try:
        os.stat(path)
        return 0
    except OSError as exc:
        return exc.errno


def _check_clean(image, fmt):
    from vdisk.ops.check import check
    report = check(str(image))
    assert report.clean, report.summary()
    if fmt == "vdi":
        chk = subprocess.run(["qemu-img", "check", "-q", "-f", "vdi", str(image)], capture_output=True, text=True)
        assert chk.returncode == 0, chk.stdout + chk.stderr
    else:
        info = subprocess.run(["vhdiinfo", str(image)], capture_output=True, text=True)
        assert info.returncode == 0, info.stdout + info.stderr


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
@pytest.mark.judges("qemu-img", "vhdiinfo")
def test_sigterm_while_writing_leaves_a_consistent_image(tmp_path, fmt):
    image = tmp_path / f"img.{fmt}"
    vdisk.create(image, 256 * MiB, format=fmt).close()
    first = random.Random(1).randbytes(8 * MiB)
    second = tmp_path / "second.bin"
    second.write_bytes(random.Random(2).randbytes(160 * MiB))
    mp = tmp_path / "m"
    os.makedirs(mp)
    pid = mount_image(image, mp, rw=True)
    try:
        (tmp_path / "first.bin").write_bytes(first)
        res = dd_write(tmp_path / "first.bin", mp / "disk", bs=MiB, seek=0, count=8, conv="notrunc,fsync")
        assert res.returncode == 0, res.stderr
        # O_DSYNC: every 1 MiB write is followed by an fsync through the mount, which keeps dd
        # busy for a while and has flushes in flight when the signal lands.
        writer = subprocess.Popen(["dd", f"if={second}", f"of={mp / 'disk'}", "bs=1M", "seek=64",
                                   "conv=notrunc", "oflag=dsync", "status=none"], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        head = read_at(second, 0, SECTOR)
        while read_at(mp / "disk", 64 * MiB, SECTOR) != head:
            assert time.monotonic() < deadline, "dd wrote nothing"
            time.sleep(0.01)
        time.sleep(0.05)
        assert writer.poll() is None, "dd finished before the signal"
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        writer.wait(timeout=30)
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    assert not os.path.ismount(mp)
    _check_clean(image, fmt)
    data = second.read_bytes()
    with vdisk.open(image) as d:
        assert d.pread(8 * MiB, 0) == first
        got = d.pread(160 * MiB, 64 * MiB)
    # every sector of the interrupted region is either the old (zero) or the new content
    zero = bytes(SECTOR)
    written = 0
    for off in range(0, len(got), SECTOR):
        sector = got[off:off + SECTOR]
        if sector == data[off:off + SECTOR]:
            written += 1
        else:
            assert sector == zero, f"sector at {64 * MiB + off} is neither old nor new"
    assert written > 0


def test_foreground_mount_ends_cleanly_on_sigterm(tmp_path):
    image = tmp_path / "img.vdi"
    vdisk.create(image, 8 * MiB, format="vdi").close()
    mp = tmp_path / "m"
    os.makedirs(mp)
    code = ("import sys; from vdisk.mount import mount_image; "
            "mount_image(sys.argv[1], sys.argv[2], rw=True, foreground=True, "
            "on_ready=lambda: print('ready', flush=True)); print('done', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(image), str(mp)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert int(os.getxattr(mp, "user.vdisk.pid")) == proc.pid
        assert write_at(mp / "disk", 1000, b"foreground") == 10
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    assert proc.returncode == 0, err
    assert out.strip() == "done"
    assert not os.path.ismount(mp)
    with vdisk.open(image, "r+") as d:
        assert d.pread(10, 1000) == b"foreground"


def test_extra_views_and_allow_other(tmp_path):
    image = tmp_path / "img.vhd"
    vdisk.create(image, 8 * MiB).close()
    gpt = fixture_image("rdisk_vhd_dynamic_small_gpt.vhd.xz")
    fixed = fixture_image("rdisk_vhd_fixed_small.vhd")
    mp = tmp_path / "m"
    views = {"shadows/1": vdisk.open(gpt), "shadows/2": vdisk.open(fixed)}
    with mounted(image, mp, rw=True, allow_other=True, extra_views=views):
        assert all(d.closed for d in views.values())       # the daemon has its own copies
        assert "allow_other" in mount_line(mp)
        assert sorted(os.listdir(mp)) == ["disk", "shadows"]
        assert sorted(os.listdir(mp / "shadows")) == ["1", "2"]
        assert sorted(os.listdir(mp / "shadows" / "1")) == ["by-name", "disk", "p1"]
        assert sha256_file(mp / "shadows" / "1" / "disk") == \
            manifest()["rdisk_vhd_dynamic_small_gpt.vhd.xz"]["raw_sha256"]
        assert os.path.getsize(mp / "shadows" / "2" / "p1") == 3968 * SECTOR
        with pytest.raises(OSError) as exc:
            os.open(mp / "shadows" / "1" / "p1", os.O_RDWR)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        assert write_at(mp / "disk", 0, b"main is writable") == 16

    def make_views(disk):
        assert disk.size == 8 * MiB
        return {"extra": vdisk.open(fixed)}
    with mounted(image, mp, extra_views=make_views):
        with vdisk.open(fixed) as d:
            assert read_at(mp / "extra" / "disk", 0, 65536) == d.pread(65536, 0)
            assert read_at(mp / "extra" / "p1", 0, 4096) == d.pread(4096, 128 * SECTOR)
        assert read_at(mp / "disk", 0, 16) == b"main is writable"


def test_daemon_errors_go_to_syslog(tmp_path):
    import logging
    import socket
    from vdisk.mount import api
    address = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    loggers = [logging.getLogger(n) for n in ("vdisk.mount", "fuse")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        api._log_to_syslog("/mnt/x", address=address)
        logging.getLogger("vdisk.mount").error("read of /p2 at 0+4096 failed: boom")
        sock.settimeout(5)
        line = sock.recv(4096).decode()
        assert f"vdisk-mount[{os.getpid()}]: /mnt/x: read of /p2 at 0+4096 failed: boom" in line
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            for h in lg.handlers[:]:
                if h not in handlers:
                    lg.removeHandler(h)
                    h.close()
            lg.setLevel(level)
            lg.propagate = propagate
        sock.close()

