"""`vdisk mount/umount` and `vdisk serve iscsi` reach their libraries (the NBD one is in test_cli.py)."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

import vdisk
from conftest import interrupt

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


@pytest.mark.needs_fuse
def test_mount_then_umount_shows_the_disk_as_a_file(tmp_path, image):
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


@pytest.mark.judges("iscsi-inq")
def test_serve_iscsi_answers_an_inquiry(image):
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
        interrupt(proc)


@pytest.fixture
def shadowed(tmp_path):
    """An image whose shadow copy holds 'before' while the live image holds 'after'."""
    path = tmp_path / "s.vhd"
    with vdisk.create(path, 3 * MiB, format="vhd") as d:
        d.pwrite(b"before" * 1000, MiB)
    r = _cli("shadow", "create", path, "--description", "cli test")
    assert r.returncode == 0, r.stderr
    shadow_id = r.stdout.strip().splitlines()[-1]
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"after!" * 1000, MiB)
    return path, shadow_id


@pytest.mark.needs_fuse
def test_mount_shows_each_shadow_copy_read_only(tmp_path, shadowed):
    path, shadow_id = shadowed
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _cli("mount", path, mnt)
    assert r.returncode == 0, r.stderr
    try:
        with open(mnt / "disk", "rb") as f:
            f.seek(MiB)
            assert f.read(6000) == b"after!" * 1000
        with open(mnt / "shadows" / shadow_id / "disk", "rb") as f:
            f.seek(MiB)
            assert f.read(6000) == b"before" * 1000
        with pytest.raises(OSError):
            open(mnt / "shadows" / shadow_id / "disk", "r+b")
    finally:
        u = _cli("umount", mnt)
    assert u.returncode == 0, u.stderr


@pytest.mark.judges("qemu-img")
def test_serve_nbd_exports_a_shadow_copy_as_image_at_id(tmp_path, shadowed):
    path, shadow_id = shadowed
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "serve", "nbd", f"{path}@{shadow_id}", str(path),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"{port}" in line, line
        out = tmp_path / "out.raw"
        for name, want in ((f"s.vhd@{shadow_id}", b"before"), ("s.vhd", b"after!")):
            subprocess.run(["qemu-img", "convert", "-O", "raw", f"nbd://127.0.0.1:{port}/{name}", str(out)],
                           check=True, timeout=60)
            data = out.read_bytes()
            assert data[MiB:MiB + 6000] == want * 1000
            out.unlink()
    finally:
        interrupt(proc)


def test_serve_nbd_refuses_an_unknown_shadow(shadowed):
    path, _ = shadowed
    r = _cli("serve", "nbd", f"{path}@no-such-shadow", "--port", str(_free_port()))
    assert r.returncode != 0
    assert r.stderr.startswith("vdisk: error:") and "Traceback" not in r.stderr
