"""A shadow mounted read-only holds a clean ext4 while the live image is overwritten by another process."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import vdisk
from vdisk.shadow import open_shadowed, shadow_views

from vdisk.mount import mount_image, unmount

pytestmark = pytest.mark.needs_fuse        # skipped without FUSE; a failure under VDISK_REQUIRE_JUDGES=1

MiB = 1 << 20
WRITER = """
import os, random, sys
path, rounds = sys.argv[1], int(sys.argv[2])
rnd = random.Random(3)
fd = os.open(path, os.O_WRONLY)
size = os.lseek(fd, 0, os.SEEK_END)
for _ in range(rounds):
    os.pwrite(fd, rnd.randbytes(65536), rnd.randrange(0, size - 65536) // 512 * 512)
os.fsync(fd)
os.close(fd)
"""


@pytest.fixture
def folder():
    path = Path(tempfile.mkdtemp(prefix="vdisk-shmount-"))
    yield path
    with open("/proc/self/mounts") as f:
        for mp in [line.split()[1] for line in f if line.split()[1].startswith(str(path))]:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def mounted(image, mountpoint, **kw):
    os.makedirs(mountpoint, exist_ok=True)
    mount_image(image, mountpoint, **kw)
    try:
        yield Path(mountpoint)
    finally:
        if os.path.ismount(mountpoint):
            unmount(mountpoint)


def e2fsck(path) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-f", "-n", str(path)], capture_output=True, text=True)


@pytest.mark.judges("sfdisk", "mkfs.ext4", "e2fsck", "debugfs")
def test_e2fsck_of_a_mounted_shadow_is_clean_while_the_live_image_is_overwritten(folder):
    image = folder / "disk.vhd"
    vdisk.create(image, 64 * MiB, format="vhd").close()
    payload = folder / "payload.bin"
    payload.write_bytes(random.Random(9).randbytes(200_000))
    with mounted(image, folder / "m", rw=True) as mp:
        subprocess.run(["sfdisk", "-q", str(mp / "disk")], check=True, capture_output=True, text=True,
                       input="label: gpt\nstart=2048, type=linux, name=data\n")
    with mounted(image, folder / "m", rw=True) as mp:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(mp / "p1")], check=True, capture_output=True)
        subprocess.run(["debugfs", "-w", "-R", f"write {payload} /file", str(mp / "p1")], check=True,
                       capture_output=True)
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow("clean fs").id

    with mounted(image, folder / "m", rw=True, extra_views=shadow_views) as mp:
        shadow = mp / "shadows" / sid
        assert {"disk", "p1"} <= set(os.listdir(shadow))
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mp / "p1"), "400"])
        try:
            fsck = e2fsck(shadow / "p1")                        # while the writer runs
        finally:
            assert writer.wait(timeout=120) == 0
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        fsck = e2fsck(shadow / "p1")                            # and after all its writes
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        cat = subprocess.run(["debugfs", "-R", "cat /file", str(shadow / "p1")], capture_output=True, check=True)
        assert cat.stdout == payload.read_bytes()
        assert e2fsck(mp / "p1").returncode != 0                # the live file system is wrecked
        with pytest.raises(OSError):
            with open(shadow / "p1", "r+b") as f:                  # a shadow is read-only
                f.write(b"x")
    with open_shadowed(image, "r") as d:
        assert d.shadows[0].valid and d.shadows[0].blocks > 0
