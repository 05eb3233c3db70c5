"""A SCSI disk over an image with 4096-byte logical sectors (VHDX can be made so): the LU's
logical block is the disk's ``logical_sector_size``, in what it reports and how it addresses.

The disk is the shared fake with ``aligned=True``: a write, zeroing or discard that is not whole
4096-byte sectors raises, so the device is seen never to send one.
"""
from __future__ import annotations

import struct

import pytest

import vdisk
from vdisk.devices.scsi import MAX_TRANSFER_BLOCKS, ScsiDisk

from fakes import FakeDisk
from test_scsi import (get_lba_status, good, mode_select6, mode_sense6, mode_sense10, rc16, read16, rw10,
                       sense_of, unmap_cdb, unmap_list, write16, ws16)

SECTOR = 4096
SIZE = 4 << 20
BLOCKS = SIZE // SECTOR                 # 1024


def data(n_blocks: int, seed: int = 1) -> bytes:
    return bytes((seed * 31 + i * 7 + (i >> 12)) & 0xFF for i in range(n_blocks * SECTOR))


@pytest.fixture
def disk():
    return FakeDisk(SIZE, logical_sector_size=SECTOR, block_size=SECTOR, aligned=True)


@pytest.fixture
def lu(disk):
    return ScsiDisk(disk)


def test_read_capacity_10_and_16_report_4096_byte_blocks(lu):
    last, length = struct.unpack(">II", good(lu.execute(rw10(0x25, 0, 0))))
    assert (last, length) == (BLOCKS - 1, SECTOR)
    rc = good(lu.execute(rc16()))
    last, length = struct.unpack(">QI", rc[:12])
    assert (last, length) == (BLOCKS - 1, SECTOR)
    assert rc[13] & 0x0F == 0                          # physical = logical unless told otherwise


def test_physical_block_size_counts_4096_byte_logical_blocks(disk):
    assert good(ScsiDisk(disk, physical_block_size=16384).execute(rc16()))[13] & 0x0F == 2
    for bad in (512, 2048, 6144, 65536):
        with pytest.raises(ValueError, match="4096"):
            ScsiDisk(disk, physical_block_size=bad)


def test_reads_and_writes_address_4096_byte_blocks(lu, disk):
    payload = data(2)
    good(lu.execute(write16(3, 2), payload))
    assert disk.writes == [(3 * SECTOR, 2 * SECTOR)]
    assert disk.content(3 * SECTOR, 2 * SECTOR) == payload
    assert good(lu.execute(read16(3, 2))) == payload
    assert good(lu.execute(rw10(0x28, 4, 1))) == payload[SECTOR:]            # READ(10)
    good(lu.execute(rw10(0x2A, BLOCKS - 1, 1), data(1, 5)))                    # WRITE(10), last block
    assert disk.content(SIZE - SECTOR) == data(1, 5)


def test_transfers_are_whole_4096_byte_blocks(lu, disk):
    assert sense_of(lu.execute(write16(0, 2), bytes(2 * 512))) == (5, 0x24, 0)   # 1 KiB is no 2 blocks
    assert sense_of(lu.execute(read16(BLOCKS - 1, 2))) == (5, 0x21, 0)           # past the last block
    assert lu.data_out_length(rw10(0x2A, 0, 3)) == 3 * SECTOR
    assert lu.clip_transfer(rw10(0x2A, 7, 4), 2 * SECTOR + 100) == rw10(0x2A, 7, 2)
    assert disk.writes == []


def test_bounds_keep_their_bytes_so_a_4k_lu_moves_an_eighth_of_the_blocks():
    lu = ScsiDisk(FakeDisk(64 << 20, logical_sector_size=SECTOR, aligned=True))
    limits = good(lu.execute(struct.pack(">BBBHB", 0x12, 0x01, 0xB0, 255, 0)))
    maximum, optimal = struct.unpack(">II", limits[8:16])
    assert maximum * SECTOR == MAX_TRANSFER_BLOCKS * 512                   # 32 MiB either way
    assert optimal * SECTOR == 1 << 20 and optimal <= maximum
    assert sense_of(lu.execute(read16(0, maximum + 1))) == (5, 0x24, 0)


def test_write_same_unmap_and_lba_status_count_4096_byte_blocks(lu, disk):
    good(lu.execute(write16(0, 8), data(8)))
    good(lu.execute(ws16(2, 3), data(1, 9)))                                 # one block of pattern
    assert disk.content(2 * SECTOR, 3 * SECTOR) == data(1, 9) * 3
    assert sense_of(lu.execute(ws16(2, 3), bytes(512)))[0] == 5              # the data is one block
    good(lu.execute(unmap_cdb(24), unmap_list((5, 2))))
    assert disk.discards == [(5 * SECTOR, 2 * SECTOR)]
    assert disk.content(5 * SECTOR, 2 * SECTOR) == bytes(2 * SECTOR)
    status = good(lu.execute(get_lba_status(0)))
    runs = [struct.unpack_from(">QIB", status, 8 + 16 * i) for i in range((len(status) - 8) // 16)]
    assert runs[:3] == [(0, 5, 0), (5, 2, 1), (7, 1, 0)]                  # mapped, deallocated, mapped


def test_mode_pages_describe_4096_byte_blocks(lu):
    desc = good(lu.execute(mode_sense6()))[4:12]
    assert struct.unpack(">I", desc[4:8])[0] & 0xFFFFFF == SECTOR
    long = good(lu.execute(mode_sense10(llbaa=1)))[8:24]
    assert struct.unpack(">Q4xI", long) == (BLOCKS, SECTOR)
    header = bytes((0, 0, 0, 8))
    assert sense_of(lu.execute(mode_select6(12), header + struct.pack(">II", 0, 512)))[0] == 5
    good(lu.execute(mode_select6(12), header + struct.pack(">II", 0, SECTOR)))


def test_a_sector_size_no_scsi_disk_has_is_refused():
    with pytest.raises(vdisk.VDiskError, match="1000 bytes"):
        ScsiDisk(FakeDisk(SIZE, logical_sector_size=1000, path="odd.img"))


def test_an_image_smaller_than_one_4096_byte_block_is_refused():
    with pytest.raises(vdisk.VDiskError, match="less than one 4096-byte logical block"):
        ScsiDisk(FakeDisk(3000, logical_sector_size=SECTOR))
