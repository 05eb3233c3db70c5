"""Real-world quirks from the spec digests, each handled on purpose."""
from __future__ import annotations

import os
import subprocess

import pytest

import vdisk
from conftest import need

MiB = 1 << 20


def test_511_byte_footer_of_old_virtual_pc_images(tmp_path):
    path = tmp_path / "old.vhd"
    with vdisk.create(path, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\x42" * 4096, 0)
    os.truncate(path, os.path.getsize(path) - 1)          # the footer's last byte is reserved (zero)
    with vdisk.open(path) as d:
        assert d.pread(4096, 0) == b"\x42" * 4096
    with vdisk.open(path, "r+") as d:                      # appending a block keeps old data intact
        d.pwrite(b"\x43" * 512, 3 * MiB)
    with vdisk.open(path) as d:
        assert d.pread(4096, 0) == b"\x42" * 4096
        assert d.pread(512, 3 * MiB) == b"\x43" * 512


def test_lost_trailing_footer_is_read_from_the_copy_and_restored_by_a_read_write_open(tmp_path):
    """A crash can lose the footer at the end of a growing dynamic VHD (issue 12): reading uses the
    copy at offset 0; opening read-write writes the footer back, so the image is whole again."""
    path = tmp_path / "cut.vhd"
    with vdisk.create(path, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\x42" * 4096, 0)
    with open(path, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(bytes(512))
    with vdisk.open(path) as d:
        assert d.pread(4096, 0) == b"\x42" * 4096
        assert any("copy at offset 0" in w for w in d.warnings)
    with vdisk.open(path, "r+") as d:
        assert any("restored" in w for w in d.warnings)
        assert d.pread(4096, 0) == b"\x42" * 4096
    with vdisk.open(path) as d:
        assert d.warnings == [] and d.pread(4096, 0) == b"\x42" * 4096
    with open(path, "rb") as f:
        assert f.read(512) == (f.seek(-512, os.SEEK_END), f.read(512))[1]


def test_qemu_vdi_with_384_byte_header_stays_qemu_readable_after_writes(tmp_path):
    need("qemu-img")
    path = tmp_path / "q.vdi"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(path), "8M"], check=True)
    with vdisk.open(path, "r+") as d:
        assert d.layers[0].header_len == 0x180
        d.pwrite(b"\x99" * 5000, MiB - 100)
    subprocess.run(["qemu-img", "check", "-q", "-f", "vdi", str(path)], check=True)
    out = subprocess.run(["qemu-io", "-f", "vdi", "-c", f"read -P 0x99 {MiB - 100} 5000", str(path)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in out.stdout and out.returncode == 0


def test_vdi_uuids_use_the_windows_guid_layout(tmp_path):
    with vdisk.create(tmp_path / "u.vdi", MiB, format="vdi") as d:
        raw = open(tmp_path / "u.vdi", "rb").read(0x198)[0x188:0x198]
        assert d.uuid.bytes_le == raw
        assert d.uuid.version == 4


def test_windows_locators_with_data_space_in_bytes(tmp_path):
    """The Windows differencing fixture stores data space 65536 (bytes) and 4096: both read."""
    from conftest import FIXTURES
    import shutil
    shutil.copy(FIXTURES / "dfvfs_fat-differential.vhd", tmp_path)
    with pytest.raises(vdisk.ParentError) as err:
        vdisk.open(tmp_path / "dfvfs_fat-differential.vhd")
    assert "C:" not in str(err.value)                          # drive letters dropped
    assert "\\" not in str(err.value)                          # separators mapped


def test_damage_that_still_reads_is_reported_once_by_the_cli_and_never_printed_by_the_library(tmp_path):
    import sys
    path = tmp_path / "w.vhd"
    with vdisk.create(path, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\x42" * 512, 0)
    with open(path, "r+b") as f:                 # spoil the trailing footer; the copy at 0 is intact
        f.seek(-300, os.SEEK_END)
        f.write(b"\x11")
    lib = subprocess.run([sys.executable, "-c", f"import vdisk; vdisk.open({str(path)!r}).pread(512, 0)"],
                         capture_output=True, text=True)
    assert lib.returncode == 0 and lib.stderr == ""
    cli = subprocess.run([sys.executable, "-m", "vdisk.cli", "info", str(path)], capture_output=True, text=True)
    assert cli.returncode == 0
    lines = cli.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: warning: ") and "copy at offset 0" in lines[0]


# -- sector bitmaps of differencing VHDs: where libvhdi 20260901 reads wrong ---------------------
# Two patterns libvhdi (vhdiinfo, pyvhdi, vhdimount) misreads, found while checking our chains
# against it: (1) a run of present sectors that ends at bit 6 of a bitmap byte makes it return
# zeros for the byte's last two sectors instead of the parent's data; (2) with blocks other than
# 2 MiB, one read across two blocks can return the parent's data for the second block's present
# sectors. These tests pin what the specification says: the bits vdisk writes (MSB first, set
# only for written sectors) and what it reads back, judged by the parent's and child's own bytes.
def _bitmap(path, block: int) -> bytes:
    with vdisk.open(path) as d:
        layer = d.layers[0]
        data_at = int(layer.block_map[block])
        with open(path, "rb") as f:
            f.seek(data_at - layer.bitmap_bytes)
            return f.read(layer.block_size // 512 // 8)


def test_a_present_run_ending_inside_a_bitmap_byte_reads_the_rest_of_the_byte_from_the_parent(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    with vdisk.create(base, 4 << 20, format="vhd") as d:
        d.pwrite(b"\xbb" * 8192, 0)
    with vdisk.create(child, format="vhd", parent=base) as d:
        d.pwrite(b"\xcc" * (6 * 512), 0)                # sectors 0-5
    assert _bitmap(child, 0)[:2] == b"\xfc\x00"          # bits 0-5 set, MSB first
    with vdisk.open(child) as d:
        assert d.pread(8192, 0) == b"\xcc" * 3072 + b"\xbb" * 5120


def test_a_read_across_two_256k_blocks_keeps_each_blocks_own_sectors(tmp_path):
    bs = 256 << 10
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    with vdisk.create(base, 4 * bs, format="vhd", block_size=bs) as d:
        d.pwrite(b"\xbb" * (2 * bs), 0)
    with vdisk.create(child, format="vhd", parent=base, block_size=bs) as d:
        d.pwrite(b"\xcc" * 512, 0)                       # first sector of block 0
        d.pwrite(b"\xdd" * 512, 2 * bs - 512)            # last sector of block 1
    assert _bitmap(child, 0)[0] == 0x80 and not any(_bitmap(child, 0)[1:])
    assert _bitmap(child, 1)[-1] == 0x01 and not any(_bitmap(child, 1)[:-1])
    with vdisk.open(child) as d:
        both = d.pread(2 * bs, 0)
    assert both == b"\xcc" * 512 + b"\xbb" * (2 * bs - 1024) + b"\xdd" * 512
