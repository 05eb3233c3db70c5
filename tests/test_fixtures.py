"""Real images made by other tools read byte-exact against the MANIFEST's raw hashes."""
from __future__ import annotations

import shutil

import pytest

import vdisk
from conftest import FIXTURES, disk_sha256, fixture_image, manifest

ROWS = manifest()
SMALL = ["rdisk_vhd_fixed_small.vhd", "rdisk_vhd_dynamic_small_gpt.vhd.xz", "rdisk_win7dyn.vhd.xz",
         "dfvfs_ext2.vhd", "pyvbox_TestHD_4.0.8.vdi", "openslx_vdi_chain/image-default.vdi",
         "openslx_vdi_chain/image-default_snapshot.vdi"]
BIG = ["qemu_virtualpc-dynamic.vhd.bz2", "compactvd_3hfs.vdi.tar.bz2"]


def test_every_manifest_row_is_covered():
    assert set(ROWS) == set(SMALL) | set(BIG) | {"dfvfs_fat-differential.vhd"}


@pytest.mark.parametrize("name", SMALL)
def test_small_fixture_reads_byte_exact(name):
    row = ROWS[name]
    with vdisk.open(fixture_image(name)) as d:
        assert d.size == int(row["virtual_size"].split()[0])
        assert d.format == row["format"].lower()
        assert disk_sha256(d) == row["raw_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_fixture_reads_byte_exact(name):
    row = ROWS[name]
    with vdisk.open(fixture_image(name)) as d:
        assert d.size == int(row["virtual_size"].split()[0])
        assert disk_sha256(d) == row["raw_sha256"]


def test_virtual_pc_image_offers_the_chs_size_too():
    path = fixture_image("qemu_virtualpc-dynamic.vhd.bz2")
    with vdisk.open(path) as d:
        assert d.size == 136365211648                      # footer current_size (default)
    with vdisk.open(path, size_policy="chs") as d:
        assert d.size == 136363130880                      # what Virtual PC and qemu-img show


def test_differencing_vdi_finds_its_parent_by_uuid():
    with vdisk.open(fixture_image("openslx_vdi_chain/image-default_snapshot.vdi")) as d:
        assert d.subtype == "differencing"
        assert len(d.chain) == 2
        assert d.chain[1].path.endswith("image-default.vdi")
        assert "UUID" in d.chain[1].found_by
        assert str(d.chain[0].parent_uuid) == "45ec18d9-39c5-4079-8de1-e36437901627"


def test_differencing_vdi_without_its_parent_is_refused(tmp_path):
    shutil.copy(FIXTURES / "openslx_vdi_chain/image-default_snapshot.vdi", tmp_path)
    with pytest.raises(vdisk.ParentError, match="45ec18d9-39c5-4079-8de1-e36437901627"):
        vdisk.open(tmp_path / "image-default_snapshot.vdi")


def test_windows_differencing_vhd_with_missing_parent_names_every_place_tried(tmp_path):
    shutil.copy(FIXTURES / "dfvfs_fat-differential.vhd", tmp_path)
    with pytest.raises(vdisk.ParentError) as err:
        vdisk.open(tmp_path / "dfvfs_fat-differential.vhd", parent_search=[str(tmp_path / "elsewhere")])
    msg = str(err.value)
    assert "fat-parent.vhd" in msg
    assert "5fa21a55-f394-aa4d-9958-1951a67d5540" in msg
    assert "relative locator" in msg and "absolute locator" in msg
    assert str(tmp_path / "fat-parent.vhd") in msg
    assert "/Projects/dfvfs/test_data/fat-parent.vhd" in msg
    assert str(tmp_path / "elsewhere" / "fat-parent.vhd") in msg
