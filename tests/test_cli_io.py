"""`vdisk mount/umount` and `vdisk serve iscsi` reach their libraries (the NBD one is in test_cli.py)."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

import vdisk
from conftest import need

MiB = 1 << 20


def _cli(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.vdi"
    with vdisk.create(path, 3 * MiB, format="vdi") as d:
        d.pwrite(random.Random(9).randbytes(8192), 4096)
    return path


def test_mount_then_umount_shows_the_disk_as_a_file(tmp_path, image):
    need("fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _cli("mount", image, mnt)
    assert r.returncode == 0, r.stderr
    try:
        names = os.listdir(mnt)
        assert "disk" in names, names
        with open(mnt / "disk", "rb") as f:
            f.seek(4096)
            with vdisk.open(image) as d:
                assert f.read(8192) == d.pread(8192, 4096)
        assert os.path.getsize(mnt / "disk") == 3 * MiB
    finally:
        u = _cli("umount", mnt)
    assert u.returncode == 0, u.stderr
    assert not os.path.ismount(mnt)


def test_serve_iscsi_answers_an_inquiry(image):
    need("iscsi-inq")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "serve", "iscsi", str(image), "--port", str(port),
                             "--iqn", "iqn.2026-01.org.vdisk:test"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"127.0.0.1:{port}" in line, line
        r = subprocess.run(["iscsi-inq", "-i", "iqn.2026-01.org.vdisk:client",
                            f"iscsi://127.0.0.1:{port}/iqn.2026-01.org.vdisk:test/0"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.send_signal(2)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
