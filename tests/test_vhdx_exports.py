"""A 4096-byte-sector VHDX through the exports: initiators see 4096-byte logical blocks (iSCSI,
judged by libiscsi's tools) and the same bytes (NBD, judged by nbdcopy)."""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

import vdisk
from vdisk.serve.iscsi import start_iscsi_server

MiB = 1 << 20


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed"
    return path


@pytest.fixture
def vhdx_4k(tmp_path):
    path = tmp_path / "4k.vhdx"
    with vdisk.create(path, 16 * MiB, format="vhdx", block_size=MiB, logical_sector_size=4096,
                      physical_sector_size=4096) as d:
        d.pwrite(b"\x5a" * 4096, 0)
        d.pwrite(bytes(range(256)) * 64, 9 * MiB)
        data = d.pread(d.size, 0)
    return path, data


@pytest.mark.judges("iscsi-readcapacity16", "qemu-img")
def test_iscsi_reports_4096_byte_logical_blocks_of_a_4k_vhdx(vhdx_4k, tmp_path):
    cap = _tool("iscsi-readcapacity16")
    qemu_formats = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    assert " iscsi" in qemu_formats, "qemu-img has no iscsi driver (qemu-block-extra)"
    path, data = vhdx_4k
    with start_iscsi_server(str(path), rw=False) as srv:
        out = subprocess.run([cap, srv.url], capture_output=True, text=True, timeout=60).stdout
        assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in out, out
        assert f"RETURNED LOGICAL BLOCK ADDRESS:{16 * MiB // 4096 - 1}" in out, out
        assert f"Total size:{16 * MiB}" in out, out
        # qemu's libiscsi driver reads in the target's 4096-byte blocks: the bytes must be the image's.
        dst = tmp_path / "copy.raw"
        res = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.url, str(dst)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.judges("nbdcopy", "nbdinfo")
def test_nbd_serves_a_4k_vhdx_byte_exact_with_a_4096_byte_preferred_block(vhdx_4k, tmp_path):
    from vdisk.serve.nbd import BackgroundNBDServer
    path, data = vhdx_4k
    dst = tmp_path / "copy.raw"
    with BackgroundNBDServer([str(path)], names=["x"]) as srv:
        info = subprocess.run([_tool("nbdinfo"), "--json", srv.uri("x")], capture_output=True, text=True,
                              timeout=60)
        assert info.returncode == 0, info.stderr
        assert '"block_size_preferred": 4096' in info.stdout, info.stdout
        res = subprocess.run([_tool("nbdcopy"), srv.uri("x"), str(dst)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
    assert dst.read_bytes() == data
