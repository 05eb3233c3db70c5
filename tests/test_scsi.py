"""ScsiDisk: every command and error path, in-process (no transport).

Expected codes come from spec/BLOCK-BACKENDS.md §1 (SPC-4 / SBC-3). Images are real ones made by
vdisk.create, so the device is tested against the same engine the iSCSI target serves.
"""
from __future__ import annotations

import struct

import pytest

import vdisk
from vdisk.devices.scsi import MAX_TRANSFER_BLOCKS, ScsiDisk
from vdisk.devices.scsi_sense import (CHECK_CONDITION, GOOD, decode_sense, descriptor_sense,
                                      fixed_sense)

from fakes import FakeDisk

SIZE = 4 << 20                 # 8192 blocks of 512 bytes
BLOCKS = SIZE // 512


# -- CDB builders ---------------------------------------------------------------------------------
def rw6(op, lba, n):
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0))


def rw10(op, lba, n, flags=0):
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw12(op, lba, n, flags=0):
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def rw16(op, lba, n, flags=0):
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def read16(lba, n, flags=0):
    return rw16(0x88, lba, n, flags)


def write16(lba, n, flags=0):
    return rw16(0x8A, lba, n, flags)


def inquiry(evpd=0, page=0, alloc=255):
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def mode_sense6(page=0x3F, pc=0, dbd=0, alloc=255, subpage=0):
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0))


def mode_sense10(page=0x3F, pc=0, dbd=0, llbaa=0, alloc=1024):
    return struct.pack(">BBBBxxxHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0),
                       (pc << 6) | page, 0, alloc, 0)


def mode_select6(plen, pf=1, sp=0):
    return bytes((0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, plen, 0))


def mode_select10(plen, pf=1):
    return struct.pack(">BBxxxxxHB", 0x55, 0x10 if pf else 0, plen, 0)


def rc16(alloc=32):
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba, alloc=1024):
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def ws16(lba, n, flags=0):
    return rw16(0x93, lba, n, flags)


def ws10(lba, n, flags=0):
    return rw10(0x41, lba, n, flags)


def unmap_cdb(plen, anchor=0):
    return struct.pack(">BBxxxxxHB", 0x42, anchor, plen, 0)


def unmap_list(*ranges):
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(desc) + 6, len(desc)) + desc


def report_luns(alloc=16):
    return struct.pack(">BxBxxxIxB", 0xA0, 0, alloc, 0)


def caw(lba, n, flags=0):
    return struct.pack(">BBQxxxBBB", 0x89, flags, lba, n, 0, 0)


def rsoc(options=0, op=0, sa=0, rctd=0, alloc=4096):
    return struct.pack(">BBBBHIxB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, op, sa, alloc, 0)


def pattern(n, seed=1):
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n * 512))


# -- fixtures -------------------------------------------------------------------------------------
FORMATS = ["raw", "vhd", "vdi"]


@pytest.fixture(params=FORMATS)
def image(request, tmp_path):
    """A fresh image in each format: for the tests whose outcome touches the engine."""
    path = str(tmp_path / f"disk.{request.param}")
    vdisk.create(path, SIZE, format=request.param).close()
    return path


@pytest.fixture
def vhd_lu(tmp_path):
    """One dynamic VHD: for the protocol-level tables, which do not depend on the format."""
    path = str(tmp_path / "disk.vhd")
    vdisk.create(path, SIZE, format="vhd").close()
    with vdisk.open(path, "r+") as d:
        yield ScsiDisk(d)


@pytest.fixture
def disk(image):
    with vdisk.open(image, "r+") as d:
        yield d


@pytest.fixture
def lu(disk):
    return ScsiDisk(disk)


@pytest.fixture
def ro_lu(image):
    with vdisk.open(image, "r") as d:
        yield ScsiDisk(d)


def sense_of(res):
    assert res.status == CHECK_CONDITION, res
    return decode_sense(res.sense)


def good(res):
    assert res.status == GOOD, decode_sense(res.sense)
    return res.data_in


# -- error paths: one row per condition -----------------------------------------------------------
ERRORS = [
    # name, cdb, data_out, (key, asc, ascq)
    ("unsupported opcode (PR IN)", bytes((0x5E, 0, 0, 0, 0, 0, 0, 0, 0, 0)), None, (5, 0x20, 0)),
    ("vendor opcode", bytes((0xC0,)) + bytes(15), None, (5, 0x20, 0)),
    ("short CDB", bytes((0x28, 0, 0)), None, (5, 0x24, 0)),
    ("READ(10) RDPROTECT", rw10(0x28, 0, 1, 0x20), None, (5, 0x24, 0)),
    ("READ(10) past end", rw10(0x28, BLOCKS, 1), None, (5, 0x21, 0)),
    ("READ(10) straddles end", rw10(0x28, BLOCKS - 1, 2), None, (5, 0x21, 0)),
    ("READ(10) 0 blocks past end", rw10(0x28, BLOCKS + 1, 0), None, (5, 0x21, 0)),
    ("READ(10) LBA 2^31", rw10(0x28, 0x80000000, 1), None, (5, 0x21, 0)),
    ("READ(10) LBA -1", rw10(0x28, 0xFFFFFFFF, 1), None, (5, 0x21, 0)),
    ("READ(16) LBA 2^64-1, no overflow", read16(2 ** 64 - 1, 1), None, (5, 0x21, 0)),
    ("READ(16) length 2^32-1", read16(0, 0xFFFFFFFF), None, (5, 0x21, 0)),
    ("READ(12) past end", rw12(0xA8, BLOCKS - 1, 2), None, (5, 0x21, 0)),
    ("READ(6) past end", rw6(0x08, BLOCKS - 1, 2), None, (5, 0x21, 0)),
    ("WRITE(16) WRPROTECT", write16(0, 1, 0x20), bytes(512), (5, 0x24, 0)),
    ("WRITE(16) past end", write16(BLOCKS, 1), bytes(512), (5, 0x21, 0)),
    ("WRITE(10) short data-out", rw10(0x2A, 0, 2), bytes(512), (5, 0x24, 0)),
    ("INQUIRY EVPD=0 with a page", inquiry(0, 0x80), None, (5, 0x24, 0)),
    ("INQUIRY unknown VPD page", inquiry(1, 0x42), None, (5, 0x24, 0)),
    ("INQUIRY CMDDT", inquiry(2, 0), None, (5, 0x24, 0)),
    ("REPORT LUNS alloc < 16", report_luns(15), None, (5, 0x24, 0)),
    ("REPORT LUNS bad select report", struct.pack(">BxBxxxIxB", 0xA0, 0x7, 16, 0), None, (5, 0x24, 0)),
    ("READ CAPACITY(10) LBA without PMI", struct.pack(">BxIxxBB", 0x25, 5, 0, 0), None, (5, 0x24, 0)),
    ("SERVICE ACTION IN(16) unknown action", struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0), None, (5, 0x24, 0)),
    ("GET LBA STATUS past end", get_lba_status(BLOCKS), None, (5, 0x21, 0)),
    ("MODE SENSE saved values", mode_sense6(pc=3), None, (5, 0x39, 0)),
    ("MODE SENSE unknown page", mode_sense6(page=0x2B), None, (5, 0x24, 0)),
    ("MODE SENSE unknown subpage", mode_sense6(page=0x08, subpage=1), None, (5, 0x24, 0)),
    ("MODE SELECT without PF", mode_select6(0, pf=0), None, (5, 0x24, 0)),
    ("MODE SELECT save pages", mode_select6(0, sp=1), None, (5, 0x24, 0)),
    ("MODE SELECT list shorter than header", mode_select6(3), bytes(3), (5, 0x1A, 0)),
    ("MODE SELECT bad descriptor length", mode_select6(8), bytes((0, 0, 0, 4, 0, 0, 0, 0)), (5, 0x26, 0)),
    ("MODE SELECT changes control page", mode_select6(16),
     bytes((0, 0, 0, 0)) + bytes((0x0A, 0x0A, 0x04)) + bytes(9), (5, 0x26, 0)),
    ("MODE SELECT unknown page", mode_select6(8), bytes((0, 0, 0, 0, 0x2B, 2, 0, 0)), (5, 0x26, 0)),
    ("MODE SELECT page length wrong", mode_select6(8), bytes((0, 0, 0, 0, 0x08, 2, 0, 0)), (5, 0x26, 0)),
    ("VERIFY BYTCHK=2", rw10(0x2F, 0, 1, 0x04), None, (5, 0x24, 0)),
    ("VERIFY VRPROTECT", rw16(0x8F, 0, 1, 0x20), None, (5, 0x24, 0)),
    ("VERIFY past end", rw16(0x8F, BLOCKS, 1), None, (5, 0x21, 0)),
    ("VERIFY miscompare", rw10(0x2F, 0, 1, 0x02), b"\x01" * 512, (0xE, 0x1D, 0)),
    ("WRITE SAME ANCHOR", ws16(0, 1, 0x10), bytes(512), (5, 0x24, 0)),
    ("WRITE SAME PBDATA", ws16(0, 1, 0x04), bytes(512), (5, 0x24, 0)),
    ("WRITE SAME LBDATA", ws10(0, 1, 0x02), bytes(512), (5, 0x24, 0)),
    ("WRITE SAME 0 blocks (WSNZ)", ws16(0, 0), bytes(512), (5, 0x24, 0)),
    ("WRITE SAME 0 blocks past end", ws16(BLOCKS + 1, 0), bytes(512), (5, 0x21, 0)),
    ("WRITE SAME past end", ws10(BLOCKS - 1, 2), bytes(512), (5, 0x21, 0)),
    ("WRITE SAME two blocks of data", ws10(0, 4), bytes(1024), (5, 0x1A, 0)),
    ("WRITE SAME NDOB with data", ws16(0, 4, 0x01), bytes(512), (5, 0x24, 0)),
    ("UNMAP ANCHOR", unmap_cdb(24, anchor=1), unmap_list((0, 1)), (5, 0x24, 0)),
    ("UNMAP parameter list < 8", unmap_cdb(6), bytes(6), (5, 0x1A, 0)),
    ("UNMAP descriptor length not /16", unmap_cdb(16), struct.pack(">HH4x", 14, 8) + bytes(8), (5, 0x1A, 0)),
    ("UNMAP past end", unmap_cdb(24), unmap_list((BLOCKS - 1, 2)), (5, 0x21, 0)),
    ("UNMAP too many descriptors", unmap_cdb(8 + 16 * 256), unmap_list(*[(0, 1)] * 256), (5, 0x26, 0)),
    ("SYNCHRONIZE CACHE(10) past end", rw10(0x35, BLOCKS, 1), None, (5, 0x21, 0)),
    ("SYNCHRONIZE CACHE(16) LBA past end", rw16(0x91, BLOCKS + 1, 0), None, (5, 0x21, 0)),
    ("PRE-FETCH(10) past end", rw10(0x34, BLOCKS, 1), None, (5, 0x21, 0)),
    ("COMPARE AND WRITE 0 blocks", caw(0, 0), None, (5, 0x24, 0)),
    ("COMPARE AND WRITE past end", caw(BLOCKS, 1), bytes(1024), (5, 0x21, 0)),
    ("COMPARE AND WRITE miscompare", caw(0, 1), b"\x01" * 512 + bytes(512), (0xE, 0x1D, 0)),
    ("START STOP UNIT eject fixed disk", bytes((0x1B, 0, 0, 0, 0x02, 0)), None, (5, 0x24, 0)),
    ("START STOP UNIT bad power condition", bytes((0x1B, 0, 0, 0, 0x40, 0)), None, (5, 0x24, 0)),
    ("REQUEST SENSE reserved bits", bytes((0x03, 0x02, 0, 0, 18, 0)), None, (5, 0x24, 0)),
    ("REPORT SUPPORTED OPCODES bad options", rsoc(options=5), None, (5, 0x24, 0)),
    ("REPORT SUPPORTED OPCODES one command with SA", rsoc(options=1, op=0x9E), None, (5, 0x24, 0)),
    ("MAINTENANCE IN other action", struct.pack(">BBxxxxIxB", 0xA3, 0x0A, 256, 0), None, (5, 0x24, 0)),
]


@pytest.mark.parametrize("name,cdb,data_out,expected", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_paths(vhd_lu, name, cdb, data_out, expected):
    res = vhd_lu.execute(cdb, data_out)
    assert sense_of(res) == expected
    assert res.data_in == b""


RO_ERRORS = [
    ("WRITE(10)", rw10(0x2A, 0, 1), bytes(512), (7, 0x27, 0)),
    ("WRITE(6)", rw6(0x0A, 0, 1), bytes(512), (7, 0x27, 0)),
    ("WRITE(16) past end: protect checked before range", write16(BLOCKS, 1), bytes(512), (7, 0x27, 0)),
    ("WRITE(16) WRPROTECT: CDB checked before protect", write16(0, 1, 0x20), bytes(512), (5, 0x24, 0)),
    ("WRITE AND VERIFY(16)", rw16(0x8E, 0, 1), bytes(512), (7, 0x27, 0)),
    ("WRITE SAME(16)", ws16(0, 1), bytes(512), (7, 0x27, 0)),
    ("UNMAP", unmap_cdb(24), unmap_list((0, 1)), (7, 0x27, 0)),
    ("COMPARE AND WRITE", caw(0, 1), bytes(1024), (7, 0x27, 0)),
]


@pytest.mark.parametrize("name,cdb,data_out,expected", RO_ERRORS, ids=[e[0] for e in RO_ERRORS])
def test_read_only_image_is_write_protected(ro_lu, name, cdb, data_out, expected):
    assert sense_of(ro_lu.execute(cdb, data_out)) == expected


def test_read_only_flag_overrides_a_writable_disk(disk):
    lu = ScsiDisk(disk, read_only=True)
    assert sense_of(lu.execute(write16(0, 1), bytes(512))) == (7, 0x27, 0)
    assert good(lu.execute(mode_sense6()))[2] & 0x80          # WP in the mode header


def test_fixed_sense_layout_points_at_the_bad_field(lu):
    res = lu.execute(rw10(0x28, 0, 1, 0x20))                 # RDPROTECT in byte 1 bit 7
    s = res.sense
    assert len(s) == 18 and s[0] == 0x70 and s[2] == 5 and s[7] == 10
    assert s[15] & 0x80 and s[15] & 0x40                      # SKSV, C/D = CDB
    assert s[15] & 0x08 and s[15] & 0x07 == 7                 # BPV, bit 7
    assert struct.unpack(">H", s[16:18])[0] == 1
    res = lu.execute(rw10(0x28, BLOCKS + 5, 1))
    assert res.sense[0] == 0xF0 and struct.unpack(">I", res.sense[3:7])[0] == BLOCKS + 5


# -- data path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["6", "10", "12", "16"])
def test_write_then_read_each_cdb_size(lu, disk, size):
    build = {"6": lambda op, l, n: rw6(op & 0x1F if op < 0x20 else op, l, n), "10": rw10,
             "12": rw12, "16": rw16}[size]
    rd, wr = {"6": (0x08, 0x0A), "10": (0x28, 0x2A), "12": (0xA8, 0xAA), "16": (0x88, 0x8A)}[size]
    data = pattern(9, seed=int(size))
    assert good(lu.execute(build(wr, 100, 9), data)) == b""
    assert good(lu.execute(build(rd, 100, 9))) == data
    assert disk.pread(9 * 512, 100 * 512) == data


def test_read6_length_zero_means_256_blocks(lu, disk):
    disk.pwrite(pattern(256), 512)
    assert good(lu.execute(rw6(0x08, 1, 0))) == pattern(256)


def test_zero_length_transfers_move_nothing(lu):
    for cdb in (rw10(0x28, 0, 0), rw10(0x28, BLOCKS, 0), rw12(0xA8, BLOCKS, 0), read16(BLOCKS, 0),
                rw10(0x2A, BLOCKS, 0), write16(0, 0), rw16(0x8F, BLOCKS, 0)):
        assert good(lu.execute(cdb)) == b""


def test_last_block_is_addressable(lu):
    assert good(lu.execute(write16(BLOCKS - 1, 1), b"\xee" * 512)) == b""
    assert good(lu.execute(read16(BLOCKS - 1, 1))) == b"\xee" * 512


def test_transfer_longer_than_the_maximum_is_refused(tmp_path):
    path = str(tmp_path / "big.raw")
    vdisk.create(path, (MAX_TRANSFER_BLOCKS + 8) * 512, format="raw").close()
    with vdisk.open(path) as d:
        assert sense_of(ScsiDisk(d).execute(read16(0, MAX_TRANSFER_BLOCKS + 1))) == (5, 0x24, 0)


def test_fua_flushes_before_good():
    counting = FakeDisk(SIZE)                                # FUA and write-through must reach flush
    lu = ScsiDisk(counting)
    good(lu.execute(write16(0, 1), bytes(512)))
    assert counting.flushes == 0
    good(lu.execute(write16(0, 1, 0x08), bytes(512)))       # FUA
    assert counting.flushes == 1
    good(lu.execute(rw10(0x35, 0, 0)))                       # SYNCHRONIZE CACHE(10), whole disk
    good(lu.execute(rw16(0x91, 10, 10)))
    assert counting.flushes == 3


def test_write_cache_off_makes_every_write_durable():
    counting = FakeDisk(SIZE)
    lu = ScsiDisk(counting)
    caching = good(lu.execute(mode_sense6(page=0x08, dbd=1)))[4:]
    assert caching[0] == 0x08 and caching[2] & 0x04          # WCE on by default
    page = bytearray(caching)
    page[2] &= ~0x04
    good(lu.execute(mode_select6(4 + len(page)), bytes(4) + bytes(page)))
    assert not good(lu.execute(mode_sense6(page=0x08, dbd=1)))[6] & 0x04
    before = counting.flushes
    good(lu.execute(write16(0, 1), bytes(512)))
    assert counting.flushes == before + 1


def test_dpofua_is_advertised(lu):
    assert good(lu.execute(mode_sense6()))[2] == 0x10
    assert good(lu.execute(mode_sense10()))[3] == 0x10


def test_medium_error_reports_the_first_failing_lba():
    failing = FakeDisk(SIZE)                # blocks 37-39 unreadable and unwritable, like bad sectors
    failing.fail(("readinto", "pwrite"), 37 * 512, 3 * 512, vdisk.VDiskError("simulated I/O error"))
    lu = ScsiDisk(failing)
    res = lu.execute(read16(30, 16))
    assert sense_of(res) == (3, 0x11, 0)
    assert res.sense[0] & 0x80 and struct.unpack(">I", res.sense[3:7])[0] == 37
    assert good(lu.execute(read16(0, 37)))                    # the rest stays readable
    res = lu.execute(rw16(0x8F, 0, 64))                       # VERIFY finds it too
    assert sense_of(res) == (3, 0x11, 0)
    res = lu.execute(write16(38, 1), bytes(512))
    assert sense_of(res) == (3, 0x0C, 0)


# -- VERIFY / WRITE AND VERIFY / COMPARE AND WRITE -------------------------------------------------
def test_verify_byte_check_modes(lu, disk):
    data = pattern(4, seed=3)
    disk.pwrite(data, 8 * 512)
    good(lu.execute(rw10(0x2F, 8, 4)))                             # BYTCHK 0: medium check
    good(lu.execute(rw10(0x2F, 8, 4, 0x02), data))                  # BYTCHK 1: compare
    bad = bytearray(data)
    bad[1000] ^= 1
    res = lu.execute(rw12(0xAF, 8, 4, 0x02), bytes(bad))
    assert sense_of(res) == (0xE, 0x1D, 0)
    assert struct.unpack(">I", res.sense[3:7])[0] == 1000         # offset of the miscompare
    disk.pwrite(b"\x5a" * 2048, 20 * 512)
    good(lu.execute(rw16(0x8F, 20, 4, 0x06), b"\x5a" * 512))        # BYTCHK 3: one block vs each
    assert sense_of(lu.execute(rw16(0x8F, 20, 5, 0x06), b"\x5a" * 512)) == (0xE, 0x1D, 0)


def test_write_and_verify_writes(lu, disk):
    data = pattern(3, seed=5)
    good(lu.execute(rw10(0x2E, 40, 3, 0x02), data))
    assert disk.pread(len(data), 40 * 512) == data


def test_compare_and_write(lu, disk):
    old, new = b"A" * 1024, b"B" * 1024
    disk.pwrite(old, 5 * 512)
    good(lu.execute(caw(5, 2), old + new))
    assert disk.pread(1024, 5 * 512) == new
    res = lu.execute(caw(5, 2), old + b"C" * 1024)                  # no longer matches
    assert sense_of(res) == (0xE, 0x1D, 0)
    assert disk.pread(1024, 5 * 512) == new


# -- thin provisioning ---------------------------------------------------------------------------
def test_write_same_repeats_one_block(lu, disk):
    block = pattern(1, seed=9)
    good(lu.execute(ws10(50, 3000), block))
    assert disk.pread(3000 * 512, 50 * 512) == block * 3000
    good(lu.execute(ws16(50, 10), bytes(512)))                      # zeros without UNMAP
    assert disk.pread(10 * 512, 50 * 512) == bytes(5120)


def test_write_same_unmap_and_ndob_read_back_zeros(lu, disk):
    disk.pwrite(b"\xff" * SIZE, 0)
    good(lu.execute(ws16(0, BLOCKS // 2, 0x08), bytes(512)))         # UNMAP bit, zero block
    good(lu.execute(ws16(BLOCKS // 2, 100, 0x01)))                   # NDOB: no data-out
    assert disk.pread(SIZE // 2 + 51200, 0) == bytes(SIZE // 2 + 51200)
    assert disk.pread(512, SIZE // 2 + 51200) == b"\xff" * 512


def test_unmap_deallocates_and_reads_zeros(lu, disk):
    disk.pwrite(b"\x11" * SIZE, 0)
    good(lu.execute(unmap_cdb(40), unmap_list((0, 4096), (6000, 7))))
    assert disk.pread(4096 * 512, 0) == bytes(4096 * 512)
    assert disk.pread(7 * 512, 6000 * 512) == bytes(7 * 512)
    assert disk.pread(512, 4096 * 512) == b"\x11" * 512
    good(lu.execute(unmap_cdb(0)))                                   # empty list: GOOD
    good(lu.execute(unmap_cdb(24), unmap_list((BLOCKS - 1, 0))))      # zero blocks: GOOD


def test_unmap_validates_every_descriptor_before_changing_anything(lu, disk):
    disk.pwrite(b"\x22" * 1024, 0)
    res = lu.execute(unmap_cdb(40), unmap_list((0, 2), (BLOCKS, 1)))
    assert sense_of(res) == (5, 0x21, 0)
    assert disk.pread(1024, 0) == b"\x22" * 1024


def lba_status(lu, lba):
    data = good(lu.execute(get_lba_status(lba)))
    length = struct.unpack(">I", data[:4])[0]
    descs = [struct.unpack(">QIB3x", data[8 + 16 * i:24 + 16 * i]) for i in range((length - 4) // 16)]
    return [(l, n, st & 0x0F) for l, n, st in descs]


def test_get_lba_status_follows_the_image_allocation(tmp_path):
    path = str(tmp_path / "thin.vhd")
    vdisk.create(path, SIZE, format="vhd", block_size=1 << 20).close()   # 2048-block granules
    with vdisk.open(path, "r+") as d:
        lu = ScsiDisk(d)
        assert lba_status(lu, 0) == [(0, BLOCKS, 1)]                      # all deallocated
        good(lu.execute(write16(2048 + 5, 1), b"x" * 512))
        runs = lba_status(lu, 0)
        assert runs == [(0, 2048, 1), (2048, 2048, 0), (4096, BLOCKS - 4096, 1)]
        assert lba_status(lu, 3000)[0] == (3000, 1096, 0)                 # starts where asked
        good(lu.execute(unmap_cdb(24), unmap_list((2048, 2048))))
        assert lba_status(lu, 0) == [(0, BLOCKS, 1)]
        tiny = good(lu.execute(get_lba_status(0, alloc=24)))
        assert len(tiny) == 24
        cap = good(lu.execute(rc16()))
        assert cap[14] & 0xC0 == 0xC0                                      # LBPME, LBPRZ


# -- information commands -------------------------------------------------------------------------
def test_standard_inquiry(lu):
    data = good(lu.execute(inquiry()))
    assert len(data) == 96
    assert data[0] == 0 and data[1] == 0 and data[2] == 6 and data[3] == 0x12 and data[4] == 91
    assert data[7] & 0x02
    assert data[8:16] == b"VDISK   "
    assert struct.unpack(">HH", data[58:62]) == (0x0460, 0x04C0)
    assert good(lu.execute(inquiry(alloc=36))) == data[:36]
    assert good(lu.execute(inquiry(alloc=0))) == b""


def test_inquiry_identity_comes_from_the_image(tmp_path):
    path = str(tmp_path / "id.vhd")
    vdisk.create(path, SIZE, format="vhd").close()
    with vdisk.open(path) as d:
        lu = ScsiDisk(d, vendor="ACME", product="Virtual", serial="S123")
        std = good(lu.execute(inquiry()))
        assert std[8:16] == b"ACME    " and std[16:32] == b"Virtual".ljust(16)
        assert good(lu.execute(inquiry(1, 0x80)))[4:] == b"S123"
        dev_id = good(lu.execute(inquiry(1, 0x83)))
        assert d.uuid.hex.encode() in dev_id
        again = good(ScsiDisk(d, vendor="ACME").execute(inquiry(1, 0x83)))
        assert again == dev_id                                         # stable per image


def test_device_identification_designators(lu):
    page = good(lu.execute(inquiry(1, 0x83)))
    assert page[1] == 0x83 and struct.unpack(">H", page[2:4])[0] == len(page) - 4
    pos, kinds = 4, {}
    while pos < len(page):
        code_set, ptype, length = page[pos] & 0x0F, page[pos + 1] & 0x0F, page[pos + 3]
        kinds[ptype] = (code_set, page[pos + 4:pos + 4 + length])
        pos += 4 + length
    assert kinds[1][0] == 2 and kinds[1][1].startswith(b"VDISK   ")   # T10 vendor ID, ASCII
    assert kinds[3][0] == 1 and len(kinds[3][1]) == 8 and kinds[3][1][0] >> 4 == 5   # NAA 5


def test_raw_images_get_an_identifier_from_their_path(tmp_path):
    ids = []
    for name in ("a.raw", "b.raw"):
        path = str(tmp_path / name)
        vdisk.create(path, SIZE, format="raw").close()
        with vdisk.open(path) as d:
            ids.append(good(ScsiDisk(d).execute(inquiry(1, 0x83))))
    assert ids[0] != ids[1]


def test_vpd_pages(lu):
    assert good(lu.execute(inquiry(1, 0x00)))[4:] == bytes((0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2))
    serial = good(lu.execute(inquiry(1, 0x80)))
    assert serial[1] == 0x80 and serial[4:].strip() and serial[4:].isascii()
    limits = good(lu.execute(inquiry(1, 0xB0)))
    assert struct.unpack(">H", limits[2:4])[0] == 0x3C
    assert limits[4] & 0x01                                            # WSNZ
    assert struct.unpack(">I", limits[8:12])[0] == MAX_TRANSFER_BLOCKS
    assert struct.unpack(">I", limits[24:28])[0] == 255               # max unmap descriptors
    assert struct.unpack(">Q", limits[36:44])[0] > 0                   # max write same
    chars = good(lu.execute(inquiry(1, 0xB1)))
    assert struct.unpack(">H", chars[2:4])[0] == 0x3C
    prov = good(lu.execute(inquiry(1, 0xB2)))
    assert struct.unpack(">H", prov[2:4])[0] == 4
    assert prov[5] & 0xE4 == 0xE4 and prov[6] & 0x07 == 2              # LBPU/WS/WS10/LBPRZ, thin


def test_read_capacity(lu):
    assert good(lu.execute(struct.pack(">BxIxxBB", 0x25, 0, 0, 0))) == struct.pack(">II", BLOCKS - 1, 512)
    data = good(lu.execute(rc16()))
    assert len(data) == 32 and struct.unpack(">QI", data[:12]) == (BLOCKS - 1, 512)
    assert good(lu.execute(rc16(alloc=8))) == data[:8]


def test_read_capacity10_saturates_beyond_2tib(tmp_path):
    path = str(tmp_path / "huge.vdi")
    vdisk.create(path, 3 << 40, format="vdi").close()
    with vdisk.open(path) as d:
        lu = ScsiDisk(d)
        assert good(lu.execute(struct.pack(">BxIxxBB", 0x25, 0, 0, 0)))[:4] == b"\xff" * 4
        assert struct.unpack(">Q", good(lu.execute(rc16()))[:8])[0] == (3 << 40) // 512 - 1
        desc = good(lu.execute(mode_sense6(page=0x08)))[4:12]
        assert desc[:4] == b"\xff" * 4


def test_report_luns(lu):
    assert good(lu.execute(report_luns(16))) == struct.pack(">I4x", 8) + bytes(8)
    assert good(lu.execute(report_luns(1024))) == struct.pack(">I4x", 8) + bytes(8)


def test_other_luns_are_absent(lu):
    assert good(lu.execute_lun(3, inquiry()))[0] == 0x7F
    assert good(lu.execute_lun(3, report_luns(16)))[:4] == struct.pack(">I", 8)
    assert sense_of(lu.execute_lun(3, bytes(6))) == (5, 0x25, 0)


def test_test_unit_ready_and_start_stop(lu):
    assert good(lu.execute(bytes(6))) == b""
    good(lu.execute(bytes((0x1B, 0, 0, 0, 0x01, 0))))                # start
    good(lu.execute(bytes((0x1B, 1, 0, 0, 0x00, 0))))                # stop (immediate)
    good(lu.execute(bytes((0x1B, 0, 0, 0, 0x30, 0))))                # power condition: standby


def test_request_sense_without_pending_condition(lu):
    data = good(lu.execute(bytes((0x03, 0, 0, 0, 252, 0))))
    assert data == fixed_sense(0, 0, 0)
    assert good(lu.execute(bytes((0x03, 1, 0, 0, 252, 0)))) == descriptor_sense(0, 0, 0)


def test_unit_attention_is_reported_once_per_initiator(lu):
    for nexus in ("a", "b"):
        good(lu.execute(bytes(6), nexus=nexus))
    lu.reset()
    assert good(lu.execute(inquiry(), nexus="a"))                     # INQUIRY never sees it
    assert sense_of(lu.execute(bytes(6), nexus="a")) == (6, 0x29, 0)
    assert good(lu.execute(bytes(6), nexus="a")) == b""                # reported once
    sense = good(lu.execute(bytes((0x03, 0, 0, 0, 18, 0)), nexus="b"))  # REQUEST SENSE takes it
    assert decode_sense(sense) == (6, 0x29, 0)
    assert good(lu.execute(bytes(6), nexus="b")) == b""


def test_capacity_change_is_announced(disk):
    lu = ScsiDisk(disk)
    good(lu.execute(bytes(6)))
    lu.capacity_changed()
    assert sense_of(lu.execute(rc16())) == (6, 0x2A, 0x09)
    assert struct.unpack(">Q", good(lu.execute(rc16()))[:8])[0] == BLOCKS - 1


# -- mode pages -----------------------------------------------------------------------------------
def parse_pages(body):
    pages, pos = {}, 0
    while pos < len(body):
        pages[body[pos] & 0x3F] = body[pos:pos + 2 + body[pos + 1]]
        pos += 2 + body[pos + 1]
    return pages


def test_mode_sense6_all_pages(lu):
    data = good(lu.execute(mode_sense6()))
    assert data[0] == len(data) - 1 and data[3] == 8
    assert struct.unpack(">II", data[4:12]) == (BLOCKS, 512)
    pages = parse_pages(data[12:])
    assert list(pages) == sorted(pages) and {0x08, 0x0A} <= set(pages)
    assert len(pages[0x08]) == 0x14 and len(pages[0x0A]) == 0x0C
    assert good(lu.execute(mode_sense6(alloc=4))) == data[:4]


def test_mode_sense10_and_long_lba_descriptor(lu):
    data = good(lu.execute(mode_sense10(page=0x0A)))
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert struct.unpack(">H", data[6:8])[0] == 8
    data = good(lu.execute(mode_sense10(page=0x0A, llbaa=1)))
    assert data[4] & 0x01 and struct.unpack(">H", data[6:8])[0] == 16
    assert struct.unpack(">Q", data[8:16])[0] == BLOCKS
    data = good(lu.execute(mode_sense10(page=0x08, dbd=1)))
    assert struct.unpack(">H", data[6:8])[0] == 0 and data[8] == 0x08


def test_mode_sense_changeable_values(lu):
    mask = parse_pages(good(lu.execute(mode_sense6(pc=1, dbd=1)))[4:])
    assert mask[0x08][2] == 0x04                                       # only WCE changes
    assert not any(mask[0x0A][2:])
    default = parse_pages(good(lu.execute(mode_sense6(pc=2, dbd=1)))[4:])
    assert default[0x08][2] & 0x04


def test_mode_select10_round_trip(lu):
    current = good(lu.execute(mode_sense10(page=0x08)))
    param = bytearray(current)
    param[0:2] = b"\x00\x00"                                            # mode data length: reserved
    param[3] = 0
    param[16 + 2] &= ~0x04                                              # WCE off (after 8 + 8)
    good(lu.execute(mode_select10(len(param)), bytes(param)))
    assert not good(lu.execute(mode_sense10(page=0x08, dbd=1)))[8 + 2] & 0x04
    lu.reset()
    assert lu.write_cache


# -- REPORT SUPPORTED OPERATION CODES ----------------------------------------------------------------
def test_report_supported_opcodes(lu):
    data = good(lu.execute(rsoc()))
    n = struct.unpack(">I", data[:4])[0] // 8
    ops = {(data[4 + 8 * i], struct.unpack(">H", data[6 + 8 * i:8 + 8 * i])[0]) for i in range(n)}
    assert {(0x88, 0), (0x8A, 0), (0x42, 0), (0x9E, 0x10), (0x9E, 0x12), (0x12, 0)} <= ops
    for op, sa in ops:                                                  # every one executes
        if op not in (0x9E, 0xA3):
            assert decode_sense(lu.execute(bytes((op,)) + bytes(15)).sense)[1] != 0x20
    one = good(lu.execute(rsoc(options=1, op=0x28)))
    assert one[1] & 0x07 == 3 and struct.unpack(">H", one[2:4])[0] == 10 and one[4] == 0x28
    sa = good(lu.execute(rsoc(options=2, op=0x9E, sa=0x12, rctd=1)))
    assert sa[1] & 0x80 and sa[4:6] == b"\x9e\x12" and len(sa) == 4 + 16 + 12
    assert good(lu.execute(rsoc(options=1, op=0x5E)))[1] & 0x07 == 1  # not supported


def test_an_internal_failure_is_a_check_condition_not_an_exception():
    broken = FakeDisk(SIZE)                 # reads fail with something that is no VDiskError (a bug)
    broken.fail("readinto", error=ZeroDivisionError("bug"))
    lu = ScsiDisk(broken)
    assert sense_of(lu.execute(read16(0, 1))) == (4, 0x44, 0)
    assert good(lu.execute(bytes(6))) == b""


def test_clip_transfer_shortens_writes_only():
    clip = ScsiDisk(FakeDisk(SIZE)).clip_transfer
    assert clip(rw10(0x2A, 7, 4), 1024) == rw10(0x2A, 7, 2)
    assert clip(rw12(0xAE, 7, 4), 600) == rw12(0xAE, 7, 1)
    assert clip(write16(7, 4), 0) == write16(7, 0)
    assert clip(rw6(0x0A, 7, 4), 512) == rw6(0x0A, 7, 1)
    assert clip(rw6(0x0A, 7, 4), 100) is None        # 0 would mean 256
    assert clip(ws16(0, 4), 100) is None


def test_physical_block_size_is_reported(disk):
    lu = ScsiDisk(disk, physical_block_size=4096)
    assert good(lu.execute(rc16()))[13] & 0x0F == 3                   # 8 logical per physical
    assert struct.unpack(">H", good(lu.execute(inquiry(1, 0xB0)))[6:8])[0] == 8
    assert good(ScsiDisk(disk).execute(rc16()))[13] & 0x0F == 0
    for bad in (256, 1000, 65536):
        with pytest.raises(ValueError):
            ScsiDisk(disk, physical_block_size=bad)


def test_write_same_and_compare_and_write_need_exact_data_out(vhd_lu):
    assert sense_of(vhd_lu.execute(ws10(0, 1), bytes(256)))[0] == 5
    assert sense_of(vhd_lu.execute(caw(0, 1), bytes(2048)))[0] == 5
    assert sense_of(vhd_lu.execute(caw(0, 3), bytes(2048)))[0] == 5
