"""A shadow served over NBD (the integration point for `vdisk serve nbd IMAGE@ID`): a read-only
export whose bytes are the shadow's, judged by qemu-img."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

import vdisk
from vdisk.serve.nbd import BackgroundNBDServer
from vdisk.shadow import open_shadow_view, open_shadowed


MiB = 1 << 20


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="vdisk-shnbd-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.judges("qemu-img", "qemu-io")
def test_a_served_shadow_reads_its_creation_bytes_and_refuses_writes(folder):
    image = os.path.join(folder, "disk.vdi")
    with vdisk.create(image, 4 * MiB, format="vdi") as d:
        d.pwrite(b"\x31" * MiB, 0)
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow().id
        d.pwrite(b"\x32" * (2 * MiB), 0)
    with open_shadow_view(image, sid) as view, BackgroundNBDServer([view], names=["shadow"]) as srv:
        out = os.path.join(folder, "out.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", srv.uri("shadow"), out], check=True, capture_output=True)
        with open(out, "rb") as f:
            assert f.read() == b"\x31" * MiB + bytes(3 * MiB)
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4096", srv.uri("shadow")],
                           capture_output=True, text=True)
        assert w.returncode != 0 or "failed" in (w.stdout + w.stderr).lower()
    with vdisk.open(image) as d:
        assert d.pread(2 * MiB, 0) == b"\x32" * (2 * MiB)
