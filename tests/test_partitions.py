"""Partition tables: MBR (primary, extended, logical) and GPT, judged by sfdisk/sgdisk and by hand.

Tables are built in the test, either byte by byte (so that hostile ones can be made) or with
sfdisk / sgdisk (independent writers whose own view, ``sfdisk -J``, is the expected answer).
"""
from __future__ import annotations

import json
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk.mount.partitions import (GPT_HEADER, MAX_LOGICAL, Partition, PartitionTableError,
                                    read_partitions)

from conftest import fixture_image, need
from fakes import FakeDisk

SECTOR = 512
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
BASIC = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"


def mem_disk(data, path="mem", **kw) -> FakeDisk:
    """A disk holding *data* (read_partitions uses size, logical_sector_size and readinto)."""
    return FakeDisk.from_bytes(bytes(data), path=path, **kw)


def file_disk(path) -> FakeDisk:
    """A disk holding what a partitioning tool wrote into a file."""
    return FakeDisk.from_bytes(Path(path).read_bytes(), path=str(path))


def parts(disk, **kw):
    warnings = []
    found = read_partitions(disk, warn=warnings.append, **kw)
    return found, warnings


# -- builders ----------------------------------------------------------------------------------
def mbr_entry(status=0, ptype=0x83, lba=0, count=0) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\0\0\0", ptype, b"\0\0\0", lba, count)


def put_table(img: bytearray, sector: int, entries, ss: int = SECTOR) -> None:
    base = sector * ss
    for i, e in enumerate(entries):
        img[base + 446 + 16 * i:base + 462 + 16 * i] = mbr_entry(*e)
    img[base + 510:base + 512] = b"\x55\xaa"


def gpt_image(total_sectors: int, entries, *, n_entries=128, entry_size=128, ss=SECTOR,
              protective=True) -> bytearray:
    """A disk with a valid primary and backup GPT; entries: (type, first, last, name[, attrs])."""
    img = bytearray(total_sectors * ss)
    if protective:
        put_table(img, 0, [(0, 0xEE, 1, min(total_sectors - 1, 0xFFFFFFFF))])
    array = bytearray(n_entries * entry_size)
    for slot, e in enumerate(entries):
        if e is None:
            continue
        ptype, first, last, name = e[:4]
        attrs = e[4] if len(e) > 4 else 0
        struct.pack_into("<16s16sQQQ72s", array, slot * entry_size, uuid.UUID(ptype).bytes_le,
                         uuid.uuid4().bytes_le, first, last, attrs, name.encode("utf-16-le")[:72])
    array_sectors = -(-len(array) // ss)
    first_usable = 2 + array_sectors
    last_usable = total_sectors - 2 - array_sectors
    disk_guid = uuid.uuid4().bytes_le
    for my, alt, entries_lba in ((1, total_sectors - 1, 2),
                                 (total_sectors - 1, 1, total_sectors - 1 - array_sectors)):
        header = bytearray(GPT_HEADER.pack(b"EFI PART", 0x10000, 92, 0, 0, my, alt, first_usable, last_usable,
                                           disk_guid, entries_lba, n_entries, entry_size, zlib.crc32(array)))
        struct.pack_into("<I", header, 16, zlib.crc32(header))
        img[my * ss:my * ss + 92] = header
        img[entries_lba * ss:entries_lba * ss + len(array)] = array
    return img


def run(*cmd, input=None):
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True).stdout


def sfdisk_view(path) -> list[dict]:
    """sfdisk's own reading of a table: number, start byte, length bytes (its -J output)."""
    table = json.loads(run("sfdisk", "-J", str(path)))["partitiontable"]
    out = []
    for p in table.get("partitions", []):
        number = int(p["node"][len(str(path)):])
        out.append({"index": number, "start": p["start"] * SECTOR, "length": p["size"] * SECTOR,
                    "type": p["type"], "name": p.get("name", "")})
    return out


# -- sfdisk / sgdisk as judges -----------------------------------------------------------------
def test_mbr_with_logical_partitions_matches_sfdisk(tmp_path):
    need("sfdisk")
    img = tmp_path / "mbr.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    script = """label: dos
start=2048, size=8192, type=83, bootable
start=10240, size=4096, type=7
start=16384, size=100000, type=f
start=18432, size=6000, type=83
start=26624, size=7000, type=82
start=36864, size=20000, type=8e
start=120000, size=10000, type=c
"""
    run("sfdisk", "-q", str(img), input=script)
    expected = [p for p in sfdisk_view(img) if p["type"] not in ("f", "5", "85")]
    found, warnings = parts(file_disk(img))
    assert warnings == []
    assert [(p.index, p.start, p.length) for p in found] == [(e["index"], e["start"], e["length"]) for e in expected]
    assert [p.type for p in found] == ["0x83", "0x07", "0x0c", "0x83", "0x82", "0x8e"]
    assert [p.index for p in found] == [1, 2, 4, 5, 6, 7]
    assert found[0].bootable and not found[1].bootable
    assert [p.logical for p in found] == [False, False, False, True, True, True]
    assert found[4].type_name == "Linux swap"


def test_gpt_with_names_matches_sgdisk(tmp_path):
    need("sgdisk", "sfdisk")
    img = tmp_path / "gpt.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run("sgdisk", "-n", "1:2048:+8M", "-t", "1:ef00", "-c", "1:EFI system partition",
        "-n", "3:0:+10M", "-t", "3:8300", "-c", "3:données/root ✓",
        "-n", "4:0:+1M", "-t", "4:0700", str(img))
    expected = sfdisk_view(img)
    found, warnings = parts(file_disk(img))
    assert warnings == []
    assert [(p.index, p.start, p.length, p.name) for p in found] == \
        [(e["index"], e["start"], e["length"], e["name"]) for e in expected]
    assert [p.index for p in found] == [1, 3, 4]
    assert found[0].type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" and found[0].type_name == "EFI System"
    assert found[1].name == "données/root ✓" and found[1].type == LINUX
    assert all(p.scheme == "gpt" and uuid.UUID(p.uuid) for p in found)


def test_gpt_with_damaged_primary_uses_backup(tmp_path):
    need("sgdisk")
    img = tmp_path / "gpt.raw"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    run("sgdisk", "-n", "1:2048:+4M", "-c", "1:data", str(img))
    with open(img, "r+b") as f:               # corrupt one byte of the primary header
        f.seek(SECTOR + 40)
        f.write(b"\xff")
    found, warnings = parts(file_disk(img))
    assert [(p.index, p.start, p.length, p.name) for p in found] == [(1, 2048 * SECTOR, 4 << 20, "data")]
    assert any("header CRC32" in w for w in warnings)
    assert any("using the backup GPT" in w for w in warnings)
    with pytest.raises(PartitionTableError, match="CRC32"):
        read_partitions(file_disk(img), strict=True)


# -- real images -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("rdisk_vhd_dynamic_small_gpt.vhd.xz",
     [(1, 128 * SECTOR, 2048 * SECTOR, "gpt", BASIC, "Basic data partition")]),
    ("rdisk_win7dyn.vhd.xz",
     [(1, 34 * SECTOR, 65536 * SECTOR, "gpt", "e3c9e316-0b5c-4db8-817d-f92df00215ae", "Microsoft reserved partition"),
      (2, 65664 * SECTOR, 339968 * SECTOR, "gpt", BASIC, "Basic data partition")]),
    ("rdisk_vhd_fixed_small.vhd", [(1, 128 * SECTOR, 3968 * SECTOR, "mbr", "0x0e", "")]),
    ("dfvfs_ext2.vhd", []),                 # a file system without a partition table
])
def test_fixture_tables(name, expected):
    with vdisk.open(fixture_image(name)) as d:
        found, warnings = parts(d)
    assert warnings == []
    assert [(p.index, p.start, p.length, p.scheme, p.type, p.name) for p in found] == expected


# -- hand-built tables, hostile ones included --------------------------------------------------
def test_empty_and_non_tables():
    assert parts(mem_disk(bytes(1 << 20))) == ([], [])
    # A FAT boot sector: 0x55AA but the "status bytes" are code, not 0x00/0x80.
    vbr = bytearray(1 << 20)
    vbr[0:3] = b"\xeb\x3c\x90"
    vbr[446:510] = bytes(range(1, 65))
    vbr[510:512] = b"\x55\xaa"
    assert parts(mem_disk(vbr)) == ([], [])
    assert parts(mem_disk(b"")) == ([], [])
    assert parts(mem_disk(bytes(100))) == ([], [])


def test_mbr_overlap_past_end_and_zero_start():
    img = bytearray(4 << 20)                      # 8192 sectors
    put_table(img, 0, [(0x80, 0x83, 2048, 2048), (0, 0x83, 3000, 1000), (0, 0x07, 6000, 4000), (0, 0x83, 0, 10)])
    found, warnings = parts(mem_disk(img))
    assert [(p.index, p.start, p.length) for p in found] == [(1, 2048 * SECTOR, 2048 * SECTOR),
                                                             (3, 6000 * SECTOR, (8192 - 6000) * SECTOR)]
    assert any("overlaps partition 1" in w for w in warnings)
    assert any("past the end of the disk" in w and "cut to" in w for w in warnings)
    assert any("sector 0" in w for w in warnings)
    with pytest.raises(PartitionTableError):
        read_partitions(mem_disk(img), strict=True)


def test_mbr_partition_starting_past_the_end_is_skipped():
    img = bytearray(1 << 20)
    put_table(img, 0, [(0, 0x83, 4096, 100), (0, 0x83, 100, 100)])
    found, warnings = parts(mem_disk(img))
    assert [p.index for p in found] == [2]
    assert any("starts at byte" in w and "skipped" in w for w in warnings)


def ebr_chain(n: int, loop_to: int | None = None) -> bytearray:
    """An extended partition at sector 2048 holding *n* logical partitions of 4 sectors each."""
    sectors = 2048 + 8 * (n + 1)
    img = bytearray(sectors * SECTOR)
    put_table(img, 0, [(0, 0x05, 2048, sectors - 2048)])
    for i in range(n):
        ebr = 2048 + 8 * i
        link = [(0, 0x05, 8 * (i + 1), 8)] if i + 1 < n else []
        if i + 1 == n and loop_to is not None:
            link = [(0, 0x05, 8 * loop_to, 8)]
        put_table(img, ebr, [(0, 0x83, 2, 4)] + link)
    return img


def test_logical_chain_is_followed():
    found, warnings = parts(mem_disk(ebr_chain(5)))
    assert warnings == []
    assert [(p.index, p.start // SECTOR, p.length // SECTOR) for p in found] == \
        [(5 + i, 2048 + 8 * i + 2, 4) for i in range(5)]


@pytest.mark.parametrize("loop_to", [0, 2, 4])
def test_ebr_loop_terminates_with_a_warning(loop_to):
    disk = mem_disk(ebr_chain(5, loop_to=loop_to))
    t = time.monotonic()
    found, warnings = parts(disk)
    assert time.monotonic() - t < 1
    assert [p.index for p in found] == [5, 6, 7, 8, 9]
    assert any("loops back" in w for w in warnings)
    assert disk.reads < 20
    with pytest.raises(PartitionTableError, match="loops back"):
        read_partitions(mem_disk(ebr_chain(5, loop_to=loop_to)), strict=True)


def test_ebr_chain_length_is_capped():
    disk = mem_disk(ebr_chain(MAX_LOGICAL + 50))
    found, warnings = parts(disk)
    assert len(found) == MAX_LOGICAL
    assert any(f"more than {MAX_LOGICAL}" in w for w in warnings)


def test_ebr_pointing_outside_its_extended_partition():
    img = ebr_chain(3)
    # second EBR's link jumps far past the extended partition
    struct.pack_into("<I", img, (2048 + 8) * SECTOR + 446 + 16 + 8, 10 ** 6)
    found, warnings = parts(mem_disk(img))
    assert [p.index for p in found] == [5, 6]
    assert any("outside extended partition" in w for w in warnings)


def test_logical_partition_running_past_its_extended_partition():
    img = ebr_chain(2)
    struct.pack_into("<I", img, (2048 + 8) * SECTOR + 446 + 12, 10 ** 5)    # size of the 2nd logical
    found, warnings = parts(mem_disk(img))
    assert [p.index for p in found] == [5]
    assert any("runs past its extended partition" in w for w in warnings)


def test_gpt_by_hand_unicode_names_and_gaps():
    img = gpt_image(4096, [(LINUX, 40, 1000, "root 🐧"), None, (BASIC, 1001, 2000, "x/y\x01z", 1 << 63)])
    found, warnings = parts(mem_disk(img))
    assert warnings == []
    assert [(p.index, p.start, p.length, p.name) for p in found] == [
        (1, 40 * SECTOR, 961 * SECTOR, "root 🐧"), (3, 1001 * SECTOR, 1000 * SECTOR, "x/y\x01z")]
    assert found[1].attributes == 1 << 63


def test_gpt_4k_sectors():
    img = gpt_image(2048, [(LINUX, 10, 100, "big sectors")], ss=4096)
    found, warnings = parts(mem_disk(img))
    assert warnings == []
    assert [(p.start, p.length, p.name) for p in found] == [(10 * 4096, 91 * 4096, "big sectors")]


def test_mbr_addresses_count_the_disks_logical_sectors():
    img = bytearray(4096 * 4096)
    put_table(img, 0, [(0x80, 0x83, 256, 1000), (0, 0x05, 2048, 64)], ss=4096)
    put_table(img, 2048, [(0, 0x07, 8, 16)], ss=4096)                   # one logical partition
    found, warnings = parts(mem_disk(img, logical_sector_size=4096))
    assert warnings == []
    assert [(p.index, p.start, p.length, p.bootable) for p in found] == \
        [(1, 256 * 4096, 1000 * 4096, True), (5, 2056 * 4096, 16 * 4096, False)]
    found, _ = parts(mem_disk(img))                                      # read as 512-byte sectors
    assert [(p.index, p.start) for p in found] == [(1, 256 * 512)]      # (no EBR at byte 2048 * 512)


def test_gpt_is_looked_for_at_the_disks_own_sector_size_first():
    img = gpt_image(2048, [(LINUX, 10, 100, "big sectors")], ss=4096, n_entries=4)
    small = gpt_image(4096, [(BASIC, 40, 99, "small sectors")], n_entries=4)
    img[512:1536] = small[512:1536]               # a 512-byte-sector GPT too: header and its array
    found, _ = parts(mem_disk(img, logical_sector_size=4096))
    assert [(p.start, p.name) for p in found] == [(10 * 4096, "big sectors")]
    found, _ = parts(mem_disk(img))
    assert [(p.start, p.name) for p in found] == [(40 * 512, "small sectors")]


def test_gpt_hostile_entries():
    img = gpt_image(4096, [(LINUX, 100, 50, "backwards"), (LINUX, 40, 1000, "a"), (LINUX, 900, 1100, "overlap"),
                           (LINUX, 1200, 10 ** 6, "too long"), (LINUX, 1, 30, "over the header"),
                           (LINUX, 10 ** 7, 10 ** 7 + 5, "far away")])
    found, warnings = parts(mem_disk(img))
    assert [(p.index, p.name) for p in found] == [(2, "a"), (4, "too long")]
    assert found[1].end == 4096 * SECTOR
    text = "\n".join(warnings)
    for needle in ("before it starts", "overlaps partition 2", "past the end", "GPT header or its entry array",
                   "starts at byte"):
        assert needle in text


def test_gpt_huge_entry_count_is_refused_quickly():
    img = gpt_image(4096, [(LINUX, 40, 1000, "a")])
    for lba in (1, 4095):                    # damage both headers the same way, with valid CRCs
        header = bytearray(img[lba * SECTOR:lba * SECTOR + 92])
        struct.pack_into("<II", header, 80, 0xFFFFFFFF, 0xFFFFFFF8)
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(header))
        img[lba * SECTOR:lba * SECTOR + 92] = header
    disk = mem_disk(img)
    found, warnings = parts(disk)
    assert found == []
    assert any("num_entries" in w for w in warnings)
    assert any("protective MBR" in w for w in warnings)


def test_gpt_bad_entry_crc_both_copies():
    img = gpt_image(4096, [(LINUX, 40, 1000, "a")])
    img[2 * SECTOR + 100] ^= 1                    # primary array
    img[(4096 - 33) * SECTOR + 100] ^= 1          # backup array
    found, warnings = parts(mem_disk(img))
    assert found == []
    assert any("entry array CRC32" in w for w in warnings)


def test_gpt_only_backup_left():
    img = gpt_image(4096, [(LINUX, 40, 1000, "survivor")])
    img[SECTOR:2 * SECTOR] = bytes(SECTOR)        # primary header wiped
    found, warnings = parts(mem_disk(img))
    assert [p.name for p in found] == ["survivor"]
    assert any("backup GPT" in w for w in warnings)


def test_hybrid_mbr_falls_back_when_gpt_is_broken():
    img = gpt_image(4096, [(LINUX, 40, 1000, "a")])
    put_table(img, 0, [(0, 0xEE, 1, 39), (0, 0x0C, 2000, 1000)])
    img[SECTOR:2 * SECTOR] = bytes(SECTOR)
    img[4095 * SECTOR:] = bytes(SECTOR)
    found, warnings = parts(mem_disk(img))
    assert [(p.index, p.scheme, p.type) for p in found] == [(2, "mbr", "0x0c")]
    assert any("no valid GPT" in w for w in warnings)


def test_warnings_name_the_disk_and_offset():
    img = bytearray(1 << 20)
    put_table(img, 0, [(0, 0x83, 100, 100), (0, 0x83, 150, 100)])
    _, warnings = parts(mem_disk(img, path="/images/x.vhd"))
    assert warnings and warnings[0].startswith("/images/x.vhd: MBR at offset 0x1ce:")
    assert isinstance(Partition(1, 0, 1, "0x83").type_name, str)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_tables_never_hang_or_crash(data):
    """Random bytes over valid tables: the parser ends quickly, within the disk, without exceptions."""
    kind = data.draw(st.sampled_from(["mbr", "gpt", "ebr"]))
    if kind == "gpt":
        img = gpt_image(512, [(LINUX, 40, 100, "a"), (BASIC, 101, 200, "b")], n_entries=16)
    elif kind == "ebr":
        img = ebr_chain(4)
    else:
        img = bytearray(64 * SECTOR)
        put_table(img, 0, [(0, 0x83, 2, 10), (0, 0x05, 20, 40)])
        put_table(img, 20, [(0, 0x83, 2, 4), (0, 0x05, 10, 8)])
    for _ in range(data.draw(st.integers(1, 12))):
        pos = data.draw(st.integers(0, min(len(img), 40 * SECTOR) - 1))
        img[pos] = data.draw(st.integers(0, 255))
    disk = mem_disk(img)
    found = read_partitions(disk, warn=lambda m: None)
    assert disk.reads < 2 * MAX_LOGICAL + 16
    spans = sorted((p.start, p.end) for p in found)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1
    for p in found:
        assert 0 < p.start and p.end <= disk.size and p.length > 0
    try:
        read_partitions(mem_disk(img), strict=True)
    except PartitionTableError:
        pass
