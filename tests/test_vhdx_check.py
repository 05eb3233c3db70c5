"""`vdisk check [--repair]` on VHDX: exit codes as for the other formats (0 clean, 2 corruption,
3 leaks only); --repair replays a pending log, rewrites a damaged header slot and a damaged first
region table (qemu-img check judges the result)."""
from __future__ import annotations

import subprocess

import pytest

import vdisk
from vdisk.ops.check import check
from vhdx_support import copy_fixture

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "c.vhdx"
    with vdisk.create(path, 8 * MiB, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"\x42" * 5000, MiB)
    return path


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_clean(path) -> bool:
    res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    return res.returncode == 0 and "No errors" in res.stdout


def test_a_new_image_is_clean(image):
    r = check(image)
    assert r.exit_code == 0 and r.format == "vhdx" and r.allocated_blocks == 1, r.summary()


def test_damaged_structure_is_a_corruption(image):
    patch(image, 0x200000, b"METADATA")
    r = check(image)
    assert r.exit_code == 2 and [f.kind for f in r.findings] == ["structure"]


@pytest.mark.judges("qemu-img")
def test_a_damaged_header_slot_is_rewritten_by_repair(image):
    patch(image, 0x20000 + 200, b"\xff\xff")
    r = check(image)
    assert r.exit_code == 3 and [f.kind for f in r.findings] == ["header-copy"]
    r = check(image, repair=True)
    assert r.exit_code == 0 and r.repairs == ["rewrote the damaged header from the current one"], r.summary()
    assert qemu_clean(image)


@pytest.mark.judges("qemu-img")
def test_a_damaged_first_region_table_is_rewritten_from_the_copy(image):
    patch(image, 0x30000 + 40, b"\x01")
    r = check(image)
    assert r.exit_code == 2 and [f.kind for f in r.findings] == ["region-table-copy"]
    r = check(image, repair=True)
    assert r.exit_code == 0, r.summary()
    with open(image, "rb") as f:
        f.seek(0x30000)
        first = f.read(64 * 1024)
        f.seek(0x40000)
        assert f.read(64 * 1024) == first
    with vdisk.open(image) as d:
        assert d.pread(5000, MiB) == b"\x42" * 5000


@pytest.mark.slow
@pytest.mark.judges("qemu-img")
def test_a_pending_log_is_reported_and_replayed_by_repair(tmp_path):
    path = copy_fixture("qemu_iotest-dirtylog-10G-4M.vhdx.bz2", tmp_path)
    r = check(path)
    assert "log-pending" in [f.kind for f in r.findings] and r.exit_code == 3
    r = check(path, repair=True)
    assert "log-pending" not in [f.kind for f in r.findings]
    assert r.repairs == ["replayed the log into the file and cleared it"]
    assert qemu_clean(path)
