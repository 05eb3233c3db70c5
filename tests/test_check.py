"""`vdisk check` finds each kind of planted corruption, repairs the fixable ones, and exits 0/1/2/3
(clean / could not run / corruption / only leaks) like qemu-img."""
from __future__ import annotations

import os
import struct

import vdisk
from vdisk import journal
from vdisk.ops.check import check
from vdisk.ops.compact import compact
from vdisk.formats.vhd.structs import FOOTER_CHECKSUM_OFFSET, with_checksum
from vdisk.ops.digest import path_digest

MiB = 1 << 20


def _vhd(tmp_path, name="a.vhd", blocks=(0, 1, 2, 3)):
    p = str(tmp_path / name)
    with vdisk.create(p, 16 * MiB, format="vhd", block_size=MiB) as d:
        for b in blocks:
            d.pwrite(bytes([b + 1]) * MiB, b * MiB)
    return p


def _vdi(tmp_path, name="a.vdi", blocks=(0, 1, 2, 3)):
    p = str(tmp_path / name)
    with vdisk.create(p, 16 * MiB, format="vdi") as d:
        for b in blocks:
            d.pwrite(bytes([b + 1]) * MiB, b * MiB)
    return p


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        f.write(data)


def _read(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        return f.read(n)


def _bat_offset(path):
    return struct.unpack(">Q", _read(path, 512 + 16, 8))[0]


def _kinds(report):
    return {f.kind for f in report.findings}


def _repaired(path, kind, leaves_leak=False):
    """Planted *kind* is found (exit 2), repaired, and the image then checks clean — or, when the
    repair unlinked a block in the middle of the file, only that leak remains (exit 3)."""
    r = check(path)
    assert kind in _kinds(r) and r.exit_code == 2, r.summary()
    fixed = check(path, repair=True)
    assert fixed.exit_code == (3 if leaves_leak else 0), fixed.summary()
    assert fixed.repairs
    if leaves_leak:
        compact(path)
    assert check(path).exit_code == 0
    return fixed


def test_clean_images_exit_0(tmp_path):
    for p in (_vhd(tmp_path), _vdi(tmp_path)):
        r = check(p)
        assert r.exit_code == 0 and r.clean and r.allocated_blocks == 4


def test_a_missing_file_or_a_damaged_vdi_header_means_the_check_could_not_run(tmp_path):
    assert check(str(tmp_path / "missing.vhd")).exit_code == 1
    p = _vdi(tmp_path)
    _patch(p, 0x48, struct.pack("<I", 0x10))          # header size below the minimum
    r = check(p)
    assert r.exit_code == 1 and r.error


# -- VHD ------------------------------------------------------------------------------------
def test_vhd_lost_footer_is_rewritten_from_the_copy(tmp_path):
    p = _vhd(tmp_path)
    before = path_digest(p)
    os.truncate(p, os.path.getsize(p) - 512)
    _repaired(p, "footer-missing")
    assert path_digest(p) == before


def test_vhd_footer_with_bad_checksum_is_replaced(tmp_path):
    p = _vhd(tmp_path)
    _patch(p, -512 + 100, b"\x01")
    _repaired(p, "footer-checksum")
    assert _read(p, -512, 512) == _read(p, 0, 512)


def test_vhd_footer_copy_with_bad_checksum_is_replaced(tmp_path):
    p = _vhd(tmp_path)
    _patch(p, 100, b"\x01")
    _repaired(p, "footer-copy-checksum")


def test_vhd_footer_copy_that_differs_from_the_footer_is_replaced(tmp_path):
    p = _vhd(tmp_path)
    copy = bytearray(_read(p, 0, 512))
    copy[24:28] = b"\x00\x00\x00\x01"                 # another timestamp, valid checksum
    _patch(p, 0, with_checksum(bytes(copy), FOOTER_CHECKSUM_OFFSET))
    _repaired(p, "footer-mismatch")


def test_vhd_header_checksum_is_recomputed_when_the_header_is_sane(tmp_path):
    p = _vhd(tmp_path)
    _patch(p, 512 + 36, b"\x00\x00\x00\x00")
    _repaired(p, "header-checksum")
    with vdisk.open(p, "r+") as d:                    # strict writable open accepts it again
        assert d.pread(1, 0) == b"\x01"


def test_vhd_bat_entry_pointing_past_the_end_is_dropped(tmp_path):
    p = _vhd(tmp_path)
    _patch(p, _bat_offset(p) + 4 * 2, struct.pack(">I", 0x00FFFFFF))
    _repaired(p, "bat-range", leaves_leak=True)
    with vdisk.open(p) as d:
        assert d.pread(1, 2 * MiB) == b"\0" and d.pread(1, 3 * MiB) == b"\x04"


def test_vhd_bat_entries_sharing_a_block_are_reduced_to_one(tmp_path):
    p = _vhd(tmp_path)
    bat = _bat_offset(p)
    _patch(p, bat + 4, _read(p, bat, 4))
    _repaired(p, "bat-overlap", leaves_leak=True)
    with vdisk.open(p) as d:
        assert d.pread(1, 0) == b"\x01" and d.pread(1, MiB) == b"\0"


def test_vhd_leaked_block_at_the_end_is_truncated(tmp_path):
    p = _vhd(tmp_path)
    footer = _read(p, -512, 512)
    size = os.path.getsize(p)
    _patch(p, size - 512, b"\x77" * (MiB + 512) + footer)    # an unreferenced block before the footer
    before = path_digest(p)
    r = check(p)
    assert r.exit_code == 3 and "leak-tail" in _kinds(r) and r.leaked_bytes >= MiB
    fixed = check(p, repair=True)
    assert fixed.exit_code == 0 and os.path.getsize(p) == size
    assert path_digest(p) == before


def test_vhd_leak_between_blocks_exits_3_and_compact_reclaims_it(tmp_path):
    p = _vhd(tmp_path)
    _patch(p, _bat_offset(p) + 4, b"\xff\xff\xff\xff")      # block 1 no longer referenced
    r = check(p, repair=True)
    assert r.exit_code == 3 and "leak" in _kinds(r)
    compact(p)
    assert check(p).exit_code == 0


def test_vhd_table_too_small_for_the_size_is_corruption(tmp_path):
    p = _vhd(tmp_path)
    for off in (0, os.path.getsize(p) - 512):
        f = bytearray(_read(p, off, 512))
        f[48:56] = struct.pack(">Q", 64 * MiB)
        _patch(p, off, with_checksum(bytes(f), FOOTER_CHECKSUM_OFFSET))
    r = check(p, repair=True)
    assert "size-mismatch" in _kinds(r) and r.exit_code == 2


def test_vhd_dynamic_bitmap_that_hides_data_is_corrected(tmp_path):
    p = _vhd(tmp_path)
    block0 = struct.unpack(">I", _read(p, _bat_offset(p), 4))[0] * 512
    _patch(p, block0, b"\x00" * 64)                   # first 512 sectors marked unwritten
    found = next(f for f in check(p).findings if f.kind == "bitmap-mismatch")
    assert "512 sectors in 1 blocks" in found.message
    _repaired(p, "bitmap-mismatch")
    assert _read(p, block0, 64) == b"\xff" * 64
    with vdisk.open(p) as d:
        assert d.pread(1, 0) == b"\x01"


def test_vhd_fixed_footer_checksum_is_repaired(tmp_path):
    p = str(tmp_path / "f.vhd")
    vdisk.create(p, 4 * MiB, format="vhd", subtype="fixed").close()
    _patch(p, -512 + 200, b"\x09")
    _repaired(p, "footer-checksum")


def test_differencing_vhd_with_a_foreign_parent_is_corruption(tmp_path):
    base = _vhd(tmp_path, "base.vhd")
    child = str(tmp_path / "child.vhd")
    vdisk.create(child, format="vhd", parent=base).close()
    assert check(child).exit_code == 0
    os.unlink(base)
    _vhd(tmp_path, "base.vhd")                        # same name, another identity
    r = check(child)
    assert "parent" in _kinds(r) and r.exit_code == 2


# -- VDI ------------------------------------------------------------------------------------
def _map_offset(path):
    return struct.unpack("<I", _read(path, 0x154, 4))[0]


def test_vdi_map_entry_beyond_the_image_is_dropped(tmp_path):
    p = _vdi(tmp_path)
    _patch(p, _map_offset(p) + 4 * 3, struct.pack("<I", 5000))
    _repaired(p, "map-range")


def test_vdi_map_entries_sharing_a_slot_are_reduced_to_one(tmp_path):
    p = _vdi(tmp_path)
    m = _map_offset(p)
    _patch(p, m + 4 * 5, _read(p, m, 4))
    _repaired(p, "map-overlap")


def test_vdi_allocated_counter_too_small_is_corrected(tmp_path):
    p = _vdi(tmp_path)
    _patch(p, 0x184, struct.pack("<I", 2))
    _repaired(p, "allocated-count")
    with vdisk.open(p, "r+") as d:
        d.pwrite(b"\x09" * 512, 10 * MiB)             # a new allocation must not hit used slots
        assert d.pread(1, 3 * MiB) == b"\x04"


def test_vdi_allocated_counter_too_large_is_corrected(tmp_path):
    p = _vdi(tmp_path)
    _patch(p, 0x184, struct.pack("<I", 9))
    fixed = _repaired(p, "allocated-count")
    assert fixed.allocated_blocks == 4


def test_vdi_unreferenced_slot_is_a_leak_that_compact_reclaims(tmp_path):
    p = _vdi(tmp_path)
    _patch(p, _map_offset(p) + 4, b"\xff\xff\xff\xff")
    r = check(p)
    assert r.exit_code == 3 and "leak" in _kinds(r)
    compact(p)
    assert check(p).exit_code == 0


def test_vdi_leftover_slot_after_the_last_one_is_truncated(tmp_path):
    p = _vdi(tmp_path)
    size = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(b"\x33" * MiB)
    r = check(p)
    assert r.exit_code == 3 and "leak-tail" in _kinds(r)
    assert check(p, repair=True).exit_code == 0
    assert os.path.getsize(p) == size


def test_differencing_vdi_whose_parent_is_gone_is_corruption(tmp_path):
    base = _vdi(tmp_path, "base.vdi")
    child = str(tmp_path / "child.vdi")
    vdisk.create(child, format="vdi", parent=base).close()
    assert check(child).exit_code == 0
    os.unlink(base)
    r = check(child)
    assert "parent" in _kinds(r) and r.exit_code == 2


# -- journal ----------------------------------------------------------------------------------
def test_a_pending_journal_is_reported_and_recovered_by_repair(tmp_path):
    p = _vdi(tmp_path)
    before = path_digest(p)
    from vdisk.io import ImageFile
    f = ImageFile(p, writable=True)
    tx = journal.Transaction(f, "compact")
    tx.begin()
    tx.write(0x100000, b"\x12" * 4096)                # map garbage, as if interrupted
    f.close()
    r = check(p)
    assert "journal-pending" in _kinds(r) and r.exit_code == 2
    fixed = check(p, repair=True)
    assert fixed.exit_code == 0 and any("rolled back" in x for x in fixed.repairs)
    assert path_digest(p) == before


def test_json_report_carries_the_exit_code(tmp_path):
    p = _vdi(tmp_path)
    d = check(p).to_dict()
    assert d["exit_code"] == 0 and d["clean"] and d["format"] == "vdi"


# -- real images ------------------------------------------------------------------------------
def test_every_fixture_checks_clean_except_the_one_whose_parent_is_missing():
    from conftest import fixture_image, manifest
    for name in manifest():
        if name.endswith(".tar.bz2"):
            continue                                   # the 8 GiB VirtualBox image: see test_compact (slow)
        r = check(str(fixture_image(name)))
        if name == "dfvfs_fat-differential.vhd":       # its parent is not shipped
            assert r.exit_code == 2 and _kinds(r) == {"parent"}, r.summary()
        else:
            assert r.exit_code == 0, f"{name}: {r.summary()}"
