"""Corrupt, truncated and hostile images: a specific VDiskError, quickly, and the file untouched."""
from __future__ import annotations

import hashlib
import os
import shutil
import tracemalloc

import numpy as np
import pytest

import vdisk
from vdisk.formats.vdi import structs as VS
from vdisk.formats.vhd import structs as HS

MiB = 1 << 20


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_vhd(tmp_path, name="d.vhd", size=6 * MiB, blocks=(0, 2)):
    path = tmp_path / name
    with vdisk.create(path, size, format="vhd") as d:
        for b in blocks:
            d.pwrite(b"\x5a" * 4096, b * (2 * MiB))
    return path


def make_vdi(tmp_path, name="d.vdi", size=6 * MiB, blocks=(0, 3)):
    path = tmp_path / name
    with vdisk.create(path, size, format="vdi") as d:
        for b in blocks:
            d.pwrite(b"\x5a" * 4096, b * MiB)
    return path


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def vhd_header(path) -> tuple[int, bytes]:
    raw = open(path, "rb").read(512 + 1024)
    return 512, raw[512:]


def rewrite_vhd_header(path, **fields) -> None:
    off, raw = vhd_header(path)
    h = HS.DynamicHeader.parse(raw)
    for k, v in fields.items():
        h[k] = v
    patch(path, off, HS.with_checksum(HS.DynamicHeader.build(h), HS.HEADER_CHECKSUM_OFFSET))


def expect_refusal(path, error=vdisk.VDiskError, match=None, modes=("r", "r+")):
    """Opening fails with *error* in every mode, within bounded memory, leaving the file as it was."""
    before = sha(path)
    for mode in modes:
        tracemalloc.start()
        try:
            with pytest.raises(error, match=match) as info:
                vdisk.open(path, mode).close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < max(16 * MiB, 2 * os.path.getsize(path)), f"{mode}: used {peak} bytes"
        assert str(path) in str(info.value)
    assert sha(path) == before
    return info.value


# -- VHD -------------------------------------------------------------------------------------
def test_truncated_dynamic_vhd_is_refused(tmp_path):
    path = make_vhd(tmp_path)
    os.truncate(path, os.path.getsize(path) - 3 * MiB)
    expect_refusal(path, vdisk.FormatError, "past the end|truncated")


def test_vhd_cut_inside_its_block_table_is_refused(tmp_path):
    path = make_vhd(tmp_path, size=400 * MiB)
    os.truncate(path, 512 + 1024 + 100)
    expect_refusal(path, vdisk.FormatError)


def test_wrong_dynamic_header_cookie(tmp_path):
    path = make_vhd(tmp_path)
    patch(path, 512, b"notparse")
    err = expect_refusal(path, vdisk.FormatError, "cxsparse")
    assert err.structure == "dynamic header" and err.field == "cookie" and err.offset == 512


def test_bad_footer_checksum_reads_with_a_warning_but_refuses_writing(tmp_path):
    path = tmp_path / "f.vhd"
    with vdisk.create(path, 4 * MiB, format="vhd", subtype="fixed") as d:
        d.pwrite(b"x" * 512, 0)
    size = os.path.getsize(path)
    patch(path, size - 512 + 40, b"\x00\x00\x00\x09")          # original_size changed, checksum stale
    before = sha(path)
    with vdisk.open(path) as d:
        assert d.pread(1, 0) == b"x"
        assert any("checksum" in w for w in d.warnings)
    with pytest.raises(vdisk.ChecksumError, match="repair"):
        vdisk.open(path, "r+")
    assert sha(path) == before


def test_vhd_block_entry_past_end_of_file(tmp_path):
    path = make_vhd(tmp_path)
    patch(path, 1536 + 4, (10**7).to_bytes(4, "big"))
    err = expect_refusal(path, vdisk.FormatError, "past the end")
    assert err.structure == "BAT" and err.field == "entry[1]" and err.offset == 1536 + 4


def test_vhd_block_overlapping_metadata(tmp_path):
    path = make_vhd(tmp_path)
    patch(path, 1536, (3).to_bytes(4, "big"))                  # sector 3 = inside the header
    expect_refusal(path, vdisk.FormatError, "overlaps metadata")


def test_vhd_blocks_overlapping_each_other(tmp_path):
    path = make_vhd(tmp_path)
    bat = np.frombuffer(open(path, "rb").read()[1536:1536 + 12], dtype=">u4")
    patch(path, 1536 + 4, int(bat[0] + 1).to_bytes(4, "big"))
    expect_refusal(path, vdisk.FormatError, "overlaps block")


def test_absurd_vhd_table_size(tmp_path):
    path = make_vhd(tmp_path)
    rewrite_vhd_header(path, max_table_entries=0xFFFFFFF0)
    expect_refusal(path, vdisk.FormatError, "absurd|outside")


@pytest.mark.parametrize("bs", [0, 1000, 1 << 31])
def test_absurd_vhd_block_size(tmp_path, bs):
    path = make_vhd(tmp_path)
    rewrite_vhd_header(path, block_size=bs)
    err = expect_refusal(path, vdisk.FormatError, "block size")
    assert err.field == "block_size"


def test_tiny_file_with_a_footer_cookie_only(tmp_path):
    path = tmp_path / "t.vhd"
    path.write_bytes(b"conectix" + bytes(504))
    expect_refusal(path, vdisk.FormatError)


# -- VDI -------------------------------------------------------------------------------------
def test_truncated_vdi_is_refused(tmp_path):
    path = make_vdi(tmp_path)
    os.truncate(path, os.path.getsize(path) - MiB // 2)
    expect_refusal(path, vdisk.FormatError, "past the end")


def test_vdi_map_entry_past_end_of_file(tmp_path):
    path = make_vdi(tmp_path)
    patch(path, MiB + 4, (5).to_bytes(4, "little"))
    err = expect_refusal(path, vdisk.FormatError)
    assert err.structure in ("block map", "header")


def test_vdi_entries_sharing_a_slot(tmp_path):
    path = make_vdi(tmp_path)
    patch(path, MiB + 4 * 3, (0).to_bytes(4, "little"))
    expect_refusal(path, vdisk.FormatError, "shares slot 0")


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 3000, "block size"), ("block_size", 1 << 30, "block size"),
    ("blocks_in_image", 0xFFFFFFF0, "absurd|past the end"), ("blocks_in_image", 1, "cannot hold"),
    ("offset_blocks", 16, "overlaps the header"), ("offset_data", 100, "overlaps the block map"),
    ("header_size", 12, "smaller"), ("image_type", 9, "image type"),
    ("disk_size", 0, "size is 0"),
])
def test_vdi_header_fields_out_of_range(tmp_path, field, value, match):
    path = make_vdi(tmp_path)
    patch(path, VS.V1_FIELD_OFFSETS[field], value.to_bytes(8 if field == "disk_size" else 4, "little"))
    err = expect_refusal(path, vdisk.FormatError, match)
    assert err.field == field


def test_wrong_vdi_signature_is_refused_not_read_as_raw(tmp_path):
    path = make_vdi(tmp_path)
    patch(path, 0x40, b"\0\0\0\0")
    err = expect_refusal(path, vdisk.FormatError, "signature 0x00000000 is not 0xbeda107f")
    assert err.field == "signature" and "-f raw" in str(err)
    with vdisk.open(path, format="raw") as d:  # on purpose: the container's bytes as a disk
        assert d.format == "raw"


# -- parents ---------------------------------------------------------------------------------
def test_parent_cycle_is_refused(tmp_path):
    base = make_vhd(tmp_path, "x.vhd")
    vdisk.create(tmp_path / "a.vhd", format="vhd", parent=base).close()
    vdisk.create(tmp_path / "b.vhd", format="vhd", parent=tmp_path / "a.vhd").close()
    b_id = open(tmp_path / "b.vhd", "rb").read(512)[68:84]
    _, raw = vhd_header(tmp_path / "a.vhd")
    h = HS.DynamicHeader.parse(raw)
    for loc in h.parent_locators:
        loc.platform_code = 0
    rewrite_vhd_header(tmp_path / "a.vhd", parent_unique_id=b_id,
                       parent_unicode_name="b.vhd".encode("utf-16-be").ljust(512, b"\0"),
                       parent_locators=h.parent_locators)
    expect_refusal(tmp_path / "b.vhd", vdisk.ParentError, "cycle")


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_parent_with_the_wrong_identity_is_refused(tmp_path, fmt):
    base = (make_vhd if fmt == "vhd" else make_vdi)(tmp_path, f"base.{fmt}")
    vdisk.create(tmp_path / f"child.{fmt}", format=fmt, parent=base).close()
    os.unlink(base)
    vdisk.create(base, 6 * MiB, format=fmt).close()            # same name, other identity
    err = expect_refusal(tmp_path / f"child.{fmt}", vdisk.ParentError, "not found")
    assert "does not match" in str(err)


def test_raw_parent_is_refused_for_a_differencing_image(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(vdisk.UnsupportedError):
        vdisk.create(tmp_path / "c.vhd", format="vhd", parent=raw)
    assert not (tmp_path / "c.vhd").exists()


# -- API misuse ------------------------------------------------------------------------------
def test_reads_and_writes_outside_the_disk_raise_range_error(tmp_path):
    with vdisk.create(tmp_path / "r.vdi", 2 * MiB, format="vdi") as d:
        with pytest.raises(vdisk.RangeError):
            d.pread(2, 2 * MiB - 1)
        with pytest.raises(vdisk.RangeError):
            d.pwrite(b"x", -1)
        with pytest.raises(vdisk.RangeError):
            d.extents(0, 3 * MiB)


def test_writes_to_a_read_only_disk_raise(tmp_path):
    path = make_vdi(tmp_path)
    with vdisk.open(path) as d:
        with pytest.raises(vdisk.ReadOnlyError):
            d.pwrite(b"x", 0)
        with pytest.raises(vdisk.ReadOnlyError):
            d.discard(0, 512)


def test_a_writable_open_excludes_every_other_open(tmp_path):
    path = make_vdi(tmp_path)
    with vdisk.open(path, "r+"):
        with pytest.raises(vdisk.LockError, match="in use"):
            vdisk.open(path)
    with vdisk.open(path), vdisk.open(path):          # readers share
        with pytest.raises(vdisk.LockError):
            vdisk.open(path, "r+")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(vdisk.VDiskError, match="no such file"):
        vdisk.open(tmp_path / "nope.vhd")
    with pytest.raises(vdisk.VDiskError, match="directory"):
        vdisk.open(tmp_path)


def test_create_refuses_to_overwrite(tmp_path):
    path = make_vdi(tmp_path)
    before = sha(path)
    with pytest.raises(vdisk.VDiskError, match="exists"):
        vdisk.create(path, MiB, format="vhd")
    assert sha(path) == before
