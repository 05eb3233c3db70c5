"""Damaged and hostile VHDX structures: one clear error naming the file and the structure (one
line through the CLI, no traceback), bounded work, and not one changed byte in the file; a damaged
second copy (header, region table) is survived with a warning, as the format intends."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid

import pytest

import vdisk
from vdisk.formats.vhdx.crc32c import with_crc
from vdisk.formats.vhdx.log import build_entry
from vdisk.formats.vhdx.structs import Header, MetadataEntry

MiB = 1 << 20
H1, H2, R1, R2 = 0x10000, 0x20000, 0x30000, 0x40000
META, BAT, LOG = 2 * MiB, 3 * MiB, 1 * MiB
FILE = 6 * MiB                       # the fixture's file size: data from 4 MiB, two blocks


@pytest.fixture
def image(tmp_path):
    """A dynamic 8 MiB VHDX with 1 MiB blocks, blocks 0 and 3 written (data from 4 MiB on)."""
    path = tmp_path / "d.vhdx"
    with vdisk.create(path, 8 * MiB, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"\x11" * MiB, 0)
        d.pwrite(b"\x33" * MiB, 3 * MiB)
    return path


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def set_header(path, **fields) -> None:
    """Change fields of BOTH headers and fix their checksums (so only the field is wrong)."""
    for at in (H1, H2):
        h = dict(Header.parse(read(path, at, 4096)))
        h.update(fields)
        h["checksum"] = 0
        patch(path, at, with_crc(Header.build({k: v for k, v in h.items() if not k.startswith("_")})))


def fix_region_crcs(path) -> None:
    for at in (R1, R2):
        patch(path, at, with_crc(read(path, at, 64 * 1024)))


def refused(path, match: str, cls=vdisk.VDiskError) -> None:
    """Library: the error; CLI: one 'vdisk: error:' line naming the file; the file unchanged."""
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with pytest.raises(cls, match=match):
        vdisk.open(path)
    with pytest.raises(cls, match=match):
        vdisk.open(path, "r+")
    res = subprocess.run([sys.executable, "-m", "vdisk", "info", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error:") and str(path) in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


# -- file type identifier and headers ----------------------------------------------------------
def test_file_shorter_than_the_header_section(image):
    with open(image, "r+b") as f:
        f.truncate(300 * 1024)
    refused(image, "too small for a VHDX")


def test_vhdx_name_without_signature_is_a_damaged_vhdx_not_raw(image):
    patch(image, 0, b"VHDXFILE")
    refused(image, "damaged VHDX")


def test_one_damaged_header_is_survived_with_a_warning(image):
    patch(image, H2 + 100, b"\xff")
    with vdisk.open(image) as d:
        assert d.pread(4, 0) == b"\x11" * 4
        assert any("header 2 is damaged" in w for w in d.warnings)


def test_both_headers_damaged(image):
    patch(image, H1 + 100, b"\xff")
    patch(image, H2, b"HEAD")
    refused(image, r"neither header is valid \(1: checksum mismatch, 2: bad signature\)")


def test_unknown_header_version(image):
    set_header(image, version=2)
    refused(image, "version 2 is not 1")


def test_log_past_the_end_of_the_file(image):
    set_header(image, log_offset=1 << 40)
    refused(image, r"header \d.log_offset .*past the end")


def test_log_length_not_a_multiple_of_1_mib(image):
    set_header(image, log_length=4096)
    refused(image, "log length 0x1000 is not a multiple of 1 MiB")


def test_an_image_without_a_log_opens_read_only_only(image):
    set_header(image, log_length=0, log_offset=0)
    with vdisk.open(image) as d:
        assert d.pread(4, 0) == b"\x11" * 4
    with pytest.raises(vdisk.UnsupportedError, match="has no log"):
        vdisk.open(image, "r+")


def test_equal_sequence_numbers_with_different_headers(image):
    set_header(image, sequence_number=9)
    h2 = dict(Header.parse(read(image, H2, 4096)))
    h2["file_write_guid"] = uuid.uuid4().bytes_le
    h2["checksum"] = 0
    patch(image, H2, with_crc(Header.build({k: v for k, v in h2.items() if not k.startswith("_")})))
    refused(image, "both headers carry sequence number 9 but differ")


# -- region table ------------------------------------------------------------------------------
def test_damaged_first_region_table_falls_back_to_the_copy(image):
    patch(image, R1 + 20, b"\xee")
    with vdisk.open(image) as d:
        assert d.pread(4, 3 * MiB) == b"\x33" * 4
        assert any("region table copy 1 is damaged" in w for w in d.warnings)


def test_both_region_tables_damaged(image):
    patch(image, R1 + 20, b"\xee")
    patch(image, R2, b"xxxx")
    refused(image, r"region table at offset 0x30000: no valid copy")


def test_region_past_the_end_of_the_file(image):
    for at in (R1, R2):
        patch(image, at + 16 + 16, (1 << 40).to_bytes(8, "little"))      # BAT entry's file offset
    fix_region_crcs(image)
    refused(image, r"region table.entry\[0\].file_offset .*past the end")


def test_regions_that_overlap(image):
    for at in (R1, R2):
        patch(image, at + 48 + 16, BAT.to_bytes(8, "little"))            # metadata onto the BAT
    fix_region_crcs(image)
    refused(image, "overlaps")


def test_unknown_required_region(image):
    for at in (R1, R2):
        patch(image, at + 8, (3).to_bytes(4, "little"))
        patch(image, at + 80, uuid.uuid4().bytes_le + (5 * MiB).to_bytes(8, "little") + MiB.to_bytes(4, "little")
              + (1).to_bytes(4, "little"))
    fix_region_crcs(image)
    refused(image, "required region .* is unknown", vdisk.UnsupportedError)


def test_absurd_region_entry_count(image):
    for at in (R1, R2):
        patch(image, at + 8, (100000).to_bytes(4, "little"))
    fix_region_crcs(image)
    refused(image, "100000 entries exceed the limit of 2047")


# -- metadata ----------------------------------------------------------------------------------
def meta_entry(path, i: int) -> dict:
    return dict(MetadataEntry.parse(read(path, META + 32 + 32 * i, 32)))


def test_metadata_without_signature(image):
    patch(image, META, b"METADATA")
    refused(image, "metadata table.signature")


def test_metadata_item_outside_the_region(image):
    patch(image, META + 32 + 16, (2 * MiB).to_bytes(4, "little"))
    refused(image, r"metadata table.entry\[0\].offset .*outside the metadata region")


def test_metadata_item_larger_than_the_format_allows(image):
    patch(image, META + 32 + 20, (64 * MiB).to_bytes(4, "little"))
    refused(image, "exceeds the limit")


def test_unknown_required_metadata_item(image):
    patch(image, META + 32, uuid.uuid4().bytes_le)         # file parameters' id replaced, still required
    refused(image, "is required but unknown", vdisk.UnsupportedError)


@pytest.mark.parametrize("item,value,match", [
    (0, (3 * MiB).to_bytes(4, "little"), "block size 3145728 is not a power of two"),
    (0, (512 * MiB).to_bytes(4, "little"), "between 1 MiB and 256 MiB"),
    (1, (0).to_bytes(8, "little"), "virtual size 0 is not a positive multiple"),
    (1, (1000).to_bytes(8, "little"), "virtual size 1000 is not a positive multiple"),
    (1, (1 << 60).to_bytes(8, "little"), "exceeds the format's limit"),
    (2, (1024).to_bytes(4, "little"), "logical sector size 1024"),
    (3, (2048).to_bytes(4, "little"), "physical sector size 2048"),
])
def test_metadata_item_values_out_of_range(image, item, value, match):
    e = meta_entry(image, item)
    patch(image, META + e["offset"], value)
    refused(image, match)


def test_missing_required_metadata_item(image):
    patch(image, META + 10, (4).to_bytes(2, "little"))     # drop the last item (virtual disk id)
    refused(image, "virtual_disk_id.*required item is missing")


# -- BAT ---------------------------------------------------------------------------------------
def bat_entry(path, i: int) -> int:
    return int.from_bytes(read(path, BAT + 8 * i, 8), "little")


def test_block_past_the_end_of_the_file(image):
    patch(image, BAT + 8 * 3, ((1 << 30) | 6).to_bytes(8, "little"))
    refused(image, "past the end of the .*file")


def test_reserved_block_state(image):
    patch(image, BAT + 8, (4).to_bytes(8, "little"))
    refused(image, r"BAT.entry\[1\] .*reserved payload block state 4")


def test_partially_present_block_without_a_parent(image):
    patch(image, BAT, (bat_entry(image, 0) | 7).to_bytes(8, "little"))
    refused(image, "PARTIALLY_PRESENT block in an image without a parent")


def test_two_blocks_sharing_storage(image):
    patch(image, BAT + 8 * 3, bat_entry(image, 0).to_bytes(8, "little"))
    refused(image, "overlap")


def test_block_inside_the_header_section_or_a_region(image):
    patch(image, BAT + 8 * 3, (0 | 6).to_bytes(8, "little"))
    refused(image, "inside the header section")
    patch(image, BAT + 8 * 3, (META | 6).to_bytes(8, "little"))
    refused(image, "overlaps the structure at 0x200000")


def test_bat_region_too_short_for_the_disk(image):
    e = meta_entry(image, 1)
    patch(image, META + e["offset"], (200 * 1024 * MiB).to_bytes(8, "little"))   # 200 GiB, 1 MiB blocks
    refused(image, r"BAT at offset 0x300000: .* entries, 204849 are needed for 204800 blocks")


# -- log ---------------------------------------------------------------------------------------
LOG_GUID = uuid.UUID("c82755bc-427f-1245-b72c-da70aaabe031").bytes_le


def bat_sector(path, new_entry_3: int) -> bytes:
    s = bytearray(read(path, BAT, 4096))
    s[24:32] = new_entry_3.to_bytes(8, "little")
    return bytes(s)


def dirty(path, entries: list[tuple[int, bytes]]) -> None:
    """Put raw log entries at their log offsets and name LOG_GUID in the headers."""
    for at, raw in entries:
        patch(path, LOG + at, raw)
    set_header(path, log_guid=LOG_GUID)


def test_log_entry_is_replayed_read_only_without_touching_the_file(image):
    """An entry that unmaps block 3 (ZERO): the replayed view reads zeros there."""
    dirty(image, [(0, build_entry(LOG_GUID, 5, 0, [(BAT, bat_sector(image, 2))], FILE, FILE))])
    before = open(image, "rb").read()
    with vdisk.open(image) as d:
        assert d.pread(4, 3 * MiB) == bytes(4)
        assert d.layers[0].info()["log"]["where"] == "memory (file unchanged)"
    assert open(image, "rb").read() == before
    with vdisk.open(image, "r+") as d:
        assert d.pread(4, 3 * MiB) == bytes(4)
    assert bat_entry(image, 3) == 2


def test_a_log_named_by_the_header_but_without_entries(image):
    set_header(image, log_guid=LOG_GUID)
    refused(image, r"log at offset 0x100000: the header names log c82755bc.* no complete sequence")


def test_log_entries_with_a_bad_checksum_or_another_guid_are_ignored(image):
    good = build_entry(LOG_GUID, 5, 0, [(BAT, bat_sector(image, 2))], FILE, FILE)
    stale = build_entry(uuid.uuid4().bytes_le, 6, 8192, [(BAT, bat_sector(image, 0))], FILE, FILE)
    torn = bytearray(build_entry(LOG_GUID, 6, 16384, [(BAT, bat_sector(image, 0))], FILE, FILE))
    torn[5000] ^= 1
    dirty(image, [(0, good), (8192, stale), (16384, bytes(torn))])
    with vdisk.open(image) as d:
        assert d.pread(4, 3 * MiB) == bytes(4)                 # seq 5 is the active sequence
        assert d.layers[0].info()["log"]["sequence"] == [5, 5]


def test_only_the_part_of_a_run_from_the_head_tail_is_replayed(image):
    first = build_entry(LOG_GUID, 5, 0, [(BAT, bat_sector(image, 2))], FILE, FILE)
    second = build_entry(LOG_GUID, 6, 8192, [(BAT + 4096, bytes(4096))], FILE, FILE)
    dirty(image, [(0, first), (8192, second)])
    with vdisk.open(image) as d:
        assert d.pread(4, 3 * MiB) == b"\x33" * 4              # seq 5 precedes the tail: not replayed
        assert d.layers[0].info()["log"]["sequence"] == [6, 6]


def test_stale_sequence_numbers_are_no_run(image):
    """Entries that follow each other in the ring but not in sequence: the newest complete wins."""
    a = build_entry(LOG_GUID, 9, 0, [(BAT, bat_sector(image, 2))], FILE, FILE)
    b = build_entry(LOG_GUID, 3, 8192, [(BAT, bat_sector(image, 0))], FILE, FILE)
    dirty(image, [(0, a), (8192, b)])
    with vdisk.open(image) as d:
        assert d.layers[0].info()["log"]["sequence"] == [9, 9]


def test_a_tail_that_points_into_a_cycle_of_entries_is_refused_without_hanging(image):
    """Two entries whose tails name each other and whose numbers do not run on: no complete run."""
    a = build_entry(LOG_GUID, 5, 8192, [(BAT, bat_sector(image, 2))], FILE, FILE)
    b = build_entry(LOG_GUID, 7, 0, [(BAT, bat_sector(image, 0))], FILE, FILE)
    dirty(image, [(0, a), (8192, b)])
    refused(image, "no complete sequence")


def test_replay_that_would_write_past_the_end_of_the_file(image):
    dirty(image, [(0, build_entry(LOG_GUID, 5, 0, [(1 << 40, bytes(4096))], FILE, FILE))])
    refused(image, r"replay would write 4096 bytes at 0x10000000000, past the end of the file")


def test_log_claiming_a_far_larger_file(image):
    dirty(image, [(0, build_entry(LOG_GUID, 5, 0, [(BAT, bat_sector(image, 2))], FILE, 1 << 50))])
    refused(image, "the log claims a file of")


def test_log_saying_more_was_stable_than_the_file_holds(image):
    dirty(image, [(0, build_entry(LOG_GUID, 5, 0, [(BAT, bat_sector(image, 2))], 64 * MiB, 64 * MiB))])
    refused(image, "truncated")


def test_image_fixture_is_as_described(image):
    assert image.stat().st_size == FILE


def test_entries_claiming_overlapping_space_are_bounded(image):
    """Every 4 KiB of the log starts an entry header claiming the whole log: checking them all
    would cost the log's length squared; vdisk gives up with an error after a bounded amount."""
    head = bytearray(build_entry(LOG_GUID, 5, 0, [], FILE, FILE)[:4096])
    head[8:12] = MiB.to_bytes(4, "little")                 # entry length: the whole log
    head[4:8] = bytes(4)
    ring = bytes(head) * 256
    dirty(image, [(0, ring)])
    refused(image, "overlapping space")
