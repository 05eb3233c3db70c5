"""What the SCSI disk tells a guest about its medium and its limits, and the disks too small to
be one (issue 13, items 2 and 7).

Linux reads VPD page B1 for rotation (rotational=1 unless MEDIUM ROTATION RATE is 1) and sizes
its requests by the OPTIMAL TRANSFER LENGTH of page B0 (io_opt), so both are pinned here.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

import vdisk
from vdisk.devices.scsi import MAX_TRANSFER_BLOCKS, ScsiDisk
from vdisk.devices.scsi_sense import CHECK_CONDITION, GOOD, decode_sense

from fakes import FakeDisk

MiB = 1 << 20


def inquiry_vpd(page: int) -> bytes:
    return struct.pack(">BBBHB", 0x12, 0x01, page, 255, 0)


def read_capacity10() -> bytes:
    return struct.pack(">BxIxxBB", 0x25, 0, 0, 0)


def read_capacity16() -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)


def good(res) -> bytes:
    assert res.status == GOOD, decode_sense(res.sense)
    return res.data_in


@pytest.fixture(params=[("vhd", 2 * MiB), ("vdi", MiB), ("raw", None)], ids=["vhd", "vdi", "raw"])
def image(request, tmp_path):
    fmt, block = request.param
    path = str(tmp_path / f"disk.{fmt}")
    vdisk.create(path, 64 * MiB, format=fmt).close()
    with vdisk.open(path) as d:
        yield d, block


def test_block_device_characteristics_say_non_rotating(image):
    disk, _ = image
    page = good(ScsiDisk(disk).execute(inquiry_vpd(0xB1)))
    assert page[1] == 0xB1 and struct.unpack(">H", page[2:4])[0] == 0x3C
    assert struct.unpack(">H", page[4:6])[0] == 0x0001           # MEDIUM ROTATION RATE: non-rotating


def test_optimal_transfer_is_the_image_block_at_least_1mib_at_most_one_command(image):
    disk, block = image
    for physical in (512, 4096):
        limits = good(ScsiDisk(disk, physical_block_size=physical).execute(inquiry_vpd(0xB0)))
        granularity = struct.unpack(">H", limits[6:8])[0]
        maximum, optimal = struct.unpack(">II", limits[8:16])
        assert maximum == MAX_TRANSFER_BLOCKS
        assert optimal * 512 >= max(block or 0, MiB)             # not 128 KiB any more
        assert optimal <= maximum and optimal % granularity == 0   # what Linux validates
        if block:
            assert optimal * 512 == block


def test_optimal_transfer_never_exceeds_the_maximum_transfer():
    big = FakeDisk(1 << 30, block_size=256 * MiB, read_only=True, path="big")   # 256 MiB blocks
    limits = good(ScsiDisk(big).execute(inquiry_vpd(0xB0)))
    assert struct.unpack(">I", limits[12:16])[0] == MAX_TRANSFER_BLOCKS


def test_an_image_smaller_than_one_block_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "tiny.raw"
    path.write_bytes(b"x" * 300)
    with vdisk.open(str(path)) as d:
        with pytest.raises(vdisk.VDiskError, match=r"tiny\.raw: 300 bytes is less than one 512-byte"):
            ScsiDisk(d)


def test_serve_iscsi_of_a_tiny_image_is_one_error_line(tmp_path):
    path = tmp_path / "tiny.raw"
    path.write_bytes(b"x" * 300)
    proc = subprocess.run([sys.executable, "-m", "vdisk.cli", "serve", "iscsi", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"vdisk: error: {path}: 300 bytes is less than one 512-byte logical block; "
        "a SCSI disk needs at least one"]


def test_a_disk_shrunk_to_nothing_reports_no_medium_not_a_block():
    disk = FakeDisk(MiB, read_only=True, path="shrinks")
    lu = ScsiDisk(disk)
    disk.size = 0                                             # the image went away under the LU
    lu.capacity_changed()
    lu.execute(bytes(6))                                      # consume CAPACITY DATA HAS CHANGED
    for cdb in (read_capacity10(), read_capacity16()):
        res = lu.execute(cdb)
        assert res.status == CHECK_CONDITION
        assert decode_sense(res.sense) == (0x2, 0x3A, 0x00)   # NOT READY, MEDIUM NOT PRESENT
