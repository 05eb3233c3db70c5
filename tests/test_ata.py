"""The ATA disk model, command by command and error path by error path.

Part 1 is one table run through ``AtaDisk.execute`` (task-file level); part 2 drives the register
interface directly (task file, HOB, Device Control, DRQ blocks, interrupts, DMA); part 3 puts the
device on real vdisk images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

import vdisk
from vdisk.devices.ata import (ABRT, BSY, CTL_HOB, CTL_NIEN, CTL_SRST, DMA_IN, DMA_OUT, DRQ, IDNF,
                               REG_COMMAND, REG_COUNT, REG_DEVICE, REG_ERROR, REG_FEATURES, REG_LBA_HIGH,
                               REG_LBA_LOW, REG_LBA_MID, REG_STATUS, SUPPORTED_COMMANDS, UNC, AtaDisk,
                               AtaResult, DmaRequest, chs_address)
from vdisk.devices.ata_identify import checksum_ok, words

from fakes import FakeDisk
from test_ata_helpers import SECTOR, ata_disk, bad_sectors, dsm_ranges, pattern, sectors

N = 1 << 29                     # sectors: past the LBA28 limit, sparse in memory
L28 = 0x0FFFFFFF                # LBA28 capacity (sectors)
OK, FAIL = 0x50, 0x51


def make(sectors: int = N, **disk_kw):
    ata_kw = {k: disk_kw.pop(k) for k in list(disk_kw) if k in ("trim", "max_multiple", "write_cache")}
    disk = ata_disk(sectors, **disk_kw)
    return AtaDisk(disk, serial="TESTSERIAL", model="TEST MODEL", **ata_kw), disk


# ------------------------------------------------------------------------------------------------
# Part 1: the table

@dataclass
class Case:
    name: str
    command: int
    kw: dict = field(default_factory=dict)
    status: int = OK
    error: int = 0
    data: Optional[bytes] = None          # expected data_in (None: expect empty)
    lba: Optional[int] = None             # expected output LBA registers
    count: Optional[int] = None           # expected output Count register
    setup: Optional[Callable] = None      # setup(ata, disk) before the command
    check: Optional[Callable] = None      # check(ata, disk, result) after it
    disk: dict = field(default_factory=dict)


def wdata(n: int, seed: int = 0x5A) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n * SECTOR))


def written(lba: int, n: int, seed: int = 0x5A):
    def check(ata, disk, r):
        assert sectors(disk, lba, n) == wdata(n, seed)
    return check


def untouched(ata, disk, r):
    assert disk.writes == [] and disk.discards == []


def flushed(times: int):
    def check(ata, disk, r):
        assert disk.flushes == times
    return check


def both(*checks):
    def check(ata, disk, r):
        for c in checks:
            c(ata, disk, r)
    return check


def cmd(op, **kw):
    """setup step: run a command first and insist it succeeds."""
    def setup(ata, disk):
        r = ata.execute(op, **kw)
        assert r.status == OK, (hex(op), r)
    return setup


def bad_read(*lbas):
    def setup(ata, disk):
        bad_sectors(disk, "readinto", *lbas)
    return setup


def bad_write(*lbas):
    def setup(ata, disk):
        bad_sectors(disk, "pwrite", *lbas)
    return setup


def chain(*setups):
    def setup(ata, disk):
        for s in setups:
            s(ata, disk)
    return setup


READS = [
    Case("READ SECTORS one", 0x20, dict(count=1, lba=0), data=pattern(0), lba=1, count=0),
    Case("READ SECTORS LBA28 top nibble", 0x20, dict(count=3, lba=0x0ABCDEF), data=pattern(0xABCDEF, 3),
         lba=0xABCDF2),
    Case("READ SECTORS no-retry opcode", 0x21, dict(count=2, lba=77), data=pattern(77, 2), lba=79),
    Case("READ SECTORS count 0 = 256", 0x20, dict(count=0, lba=10), data=pattern(10, 256), lba=266, count=0),
    Case("READ SECTORS last LBA28 sector", 0x20, dict(count=1, lba=L28 - 1), data=pattern(L28 - 1), lba=L28),
    Case("READ SECTORS past LBA28 limit", 0x20, dict(count=2, lba=L28 - 1), status=FAIL, error=IDNF, lba=L28),
    Case("READ SECTORS EXT above 2^28", 0x24, dict(count=2, lba=(1 << 28) + 5), data=pattern((1 << 28) + 5, 2),
         lba=(1 << 28) + 7),
    Case("READ SECTORS EXT last sector", 0x24, dict(count=1, lba=N - 1), data=pattern(N - 1), lba=N),
    Case("READ SECTORS EXT at capacity", 0x24, dict(count=1, lba=N), status=FAIL, error=IDNF, lba=N),
    Case("READ SECTORS EXT huge LBA", 0x24, dict(count=1, lba=(1 << 48) - 1), status=FAIL, error=IDNF,
         lba=(1 << 48) - 1),
    Case("READ SECTORS EXT count 0 = 65536", 0x24, dict(count=0, lba=N - 65535), status=FAIL, error=IDNF, lba=N),
    Case("READ SECTORS EXT 16-bit count", 0x24, dict(count=0x0102, lba=1000), data=pattern(1000, 0x102),
         lba=1000 + 0x102, count=0),
    Case("READ MULTIPLE", 0xC4, dict(count=20, lba=3), data=pattern(3, 20), lba=23),
    Case("READ MULTIPLE EXT", 0x29, dict(count=40, lba=(1 << 28) + 1), data=pattern((1 << 28) + 1, 40),
         lba=(1 << 28) + 41),
    Case("READ MULTIPLE mode 4", 0xC4, dict(count=9, lba=0), data=pattern(0, 9), setup=cmd(0xC6, count=4)),
    Case("READ MULTIPLE mode off", 0xC4, dict(count=1), status=FAIL, error=ABRT, setup=cmd(0xC6, count=0)),
    Case("READ MULTIPLE EXT mode off", 0x29, dict(count=1), status=FAIL, error=ABRT, setup=cmd(0xC6, count=0)),
    Case("READ DMA", 0xC8, dict(count=5, lba=0x0FFFF00), data=pattern(0x0FFFF00, 5), lba=0x0FFFF05),
    Case("READ DMA no-retry opcode", 0xC9, dict(count=1, lba=9), data=pattern(9), lba=10),
    Case("READ DMA EXT", 0x25, dict(count=300, lba=(1 << 29) - 300), data=pattern((1 << 29) - 300, 300), lba=N),
    Case("READ DMA past end", 0xC8, dict(count=1, lba=L28), status=FAIL, error=IDNF, lba=L28),
    Case("READ DMA EXT past end", 0x25, dict(count=2, lba=N - 1), status=FAIL, error=IDNF, lba=N),
    Case("READ VERIFY", 0x40, dict(count=8, lba=100), setup=bad_read(108)),
    Case("READ VERIFY no-retry opcode", 0x41, dict(count=0, lba=0)),
    Case("READ VERIFY EXT", 0x42, dict(count=1000, lba=(1 << 28))),
    Case("READ VERIFY past end", 0x40, dict(count=1, lba=L28), status=FAIL, error=IDNF, lba=L28),
    Case("READ VERIFY EXT past end", 0x42, dict(count=2, lba=N - 1), status=FAIL, error=IDNF, lba=N),
]

UNC_CASES = [
    Case("UNC READ SECTORS: sectors before the bad one arrive", 0x20, dict(count=10, lba=0), status=FAIL,
         error=UNC, data=pattern(0, 5), lba=5, setup=bad_read(5)),
    Case("UNC READ SECTORS EXT", 0x24, dict(count=4, lba=(1 << 40)), status=FAIL, error=UNC, lba=(1 << 40) + 2,
         data=pattern(1 << 40, 2), disk=dict(sectors=1 << 41), setup=bad_read((1 << 40) + 2)),
    Case("UNC READ MULTIPLE: failing block not sent", 0xC4, dict(count=40, lba=0), status=FAIL, error=UNC,
         data=pattern(0, 16), lba=20, setup=bad_read(20)),
    Case("UNC READ DMA", 0xC8, dict(count=10, lba=0), status=FAIL, error=UNC, data=pattern(0, 7), lba=7,
         setup=bad_read(7)),
    Case("UNC READ DMA EXT first sector", 0x25, dict(count=3, lba=(1 << 33)), status=FAIL, error=UNC,
         lba=(1 << 33), disk=dict(sectors=1 << 34), setup=bad_read(1 << 33)),
    Case("UNC READ VERIFY", 0x40, dict(count=10, lba=20), status=FAIL, error=UNC, lba=26, setup=bad_read(26)),
    Case("UNC READ VERIFY EXT", 0x42, dict(count=600, lba=(1 << 28)), status=FAIL, error=UNC,
         lba=(1 << 28) + 513, setup=bad_read((1 << 28) + 513)),
    Case("UNC WRITE SECTORS", 0x30, dict(count=10, lba=0, data_out=wdata(10)), status=FAIL, error=UNC, lba=7,
         setup=bad_write(7), check=lambda a, d, r: sectors(d, 0, 7) == wdata(7)),
    Case("UNC WRITE DMA: exact failing sector", 0xCA, dict(count=10, lba=100, data_out=wdata(10)), status=FAIL,
         error=UNC, lba=104, setup=bad_write(104)),
    Case("UNC WRITE DMA EXT", 0x35, dict(count=3, lba=(1 << 35), data_out=wdata(3)), status=FAIL, error=UNC,
         lba=(1 << 35) + 1, disk=dict(sectors=1 << 36), setup=bad_write((1 << 35) + 1)),
    Case("UNC FLUSH CACHE: lowest unflushed LBA", 0xE7, status=FAIL, error=UNC, lba=30,
         setup=chain(cmd(0x30, count=1, lba=50, data_out=wdata(1)), cmd(0x30, count=1, lba=30, data_out=wdata(1)),
                     lambda a, d: d.fail("flush"))),
    Case("UNC FLUSH CACHE EXT", 0xEA, status=FAIL, error=UNC, lba=0,
         setup=lambda a, d: d.fail("flush")),
]

WRITES = [
    Case("WRITE SECTORS", 0x30, dict(count=3, lba=1000, data_out=wdata(3)), lba=1003, check=written(1000, 3)),
    Case("WRITE SECTORS no-retry opcode", 0x31, dict(count=1, lba=7, data_out=wdata(1, 3)), lba=8,
         check=written(7, 1, 3)),
    Case("WRITE SECTORS count 0 = 256", 0x30, dict(count=0, lba=0, data_out=wdata(256)), lba=256,
         check=written(0, 256)),
    Case("WRITE SECTORS EXT", 0x34, dict(count=2, lba=(1 << 28) + 3, data_out=wdata(2)), lba=(1 << 28) + 5,
         check=written((1 << 28) + 3, 2)),
    Case("WRITE MULTIPLE", 0xC5, dict(count=37, lba=64, data_out=wdata(37)), lba=101, check=written(64, 37)),
    Case("WRITE MULTIPLE EXT", 0x39, dict(count=17, lba=(1 << 29) - 17, data_out=wdata(17)), lba=N,
         check=written((1 << 29) - 17, 17)),
    Case("WRITE MULTIPLE FUA EXT flushes", 0xCE, dict(count=2, lba=5, data_out=wdata(2)),
         check=both(written(5, 2), flushed(1))),
    Case("WRITE DMA", 0xCA, dict(count=8, lba=0x0FFFFF0, data_out=wdata(8)), check=written(0x0FFFFF0, 8)),
    Case("WRITE DMA no-retry opcode", 0xCB, dict(count=1, lba=1, data_out=wdata(1)), check=written(1, 1)),
    Case("WRITE DMA EXT", 0x35, dict(count=260, lba=(1 << 28), data_out=wdata(260)),
         check=both(written(1 << 28, 260), flushed(0))),
    Case("WRITE DMA FUA EXT flushes", 0x3D, dict(count=1, lba=3, data_out=wdata(1)),
         check=both(written(3, 1), flushed(1))),
    Case("WRITE with write cache off flushes", 0xCA, dict(count=1, lba=3, data_out=wdata(1)),
         setup=cmd(0xEF, features=0x82), check=both(written(3, 1), flushed(2))),
    Case("WRITE SECTORS past end", 0x30, dict(count=2, lba=L28 - 1, data_out=wdata(2)), status=FAIL, error=IDNF,
         lba=L28, check=untouched),
    Case("WRITE DMA EXT past end", 0x35, dict(count=1, lba=N, data_out=wdata(1)), status=FAIL, error=IDNF,
         lba=N, check=untouched),
    Case("WRITE MULTIPLE mode off", 0xC5, dict(count=1, data_out=wdata(1)), status=FAIL, error=ABRT,
         setup=cmd(0xC6, count=0), check=untouched),
    Case("WRITE MULTIPLE FUA EXT mode off", 0xCE, dict(count=1, data_out=wdata(1)), status=FAIL, error=ABRT,
         setup=cmd(0xC6, count=0), check=untouched),
]

READ_ONLY = [
    Case(f"read-only {name}", op, dict(count=1, lba=0, data_out=wdata(1)), status=FAIL, error=ABRT,
         disk=dict(read_only=True), check=untouched)
    for op, name in [(0x30, "WRITE SECTORS"), (0x31, "WRITE SECTORS (nr)"), (0x34, "WRITE SECTORS EXT"),
                     (0xC5, "WRITE MULTIPLE"), (0x39, "WRITE MULTIPLE EXT"), (0xCE, "WRITE MULTIPLE FUA EXT"),
                     (0xCA, "WRITE DMA"), (0xCB, "WRITE DMA (nr)"), (0x35, "WRITE DMA EXT"),
                     (0x3D, "WRITE DMA FUA EXT")]
] + [
    Case("read-only checked before range", 0x30, dict(count=1, lba=L28, data_out=wdata(1)), status=FAIL,
         error=ABRT, disk=dict(read_only=True)),
    Case("read-only DSM TRIM", 0x06, dict(features=1, count=1, data_out=dsm_ranges((0, 1))), status=FAIL,
         error=ABRT, disk=dict(read_only=True), check=untouched),
    Case("read-only reads work", 0x20, dict(count=1, lba=4), data=pattern(4), disk=dict(read_only=True)),
    Case("read-only flush is fine", 0xE7, disk=dict(read_only=True)),
]


def trimmed(*ranges):
    def check(ata, disk, r):
        assert disk.discards == [(lba * SECTOR, n * SECTOR) for lba, n in ranges]
        for lba, n in ranges:
            assert sectors(disk, lba, n) == bytes(n * SECTOR)
    return check


DSM = [
    Case("TRIM one range", 0x06, dict(features=1, count=1, data_out=dsm_ranges((10, 5))), check=trimmed((10, 5))),
    Case("TRIM several ranges, adjacent ones merged, empty entries skipped", 0x06,
         dict(features=1, count=1, data_out=dsm_ranges((10, 5), (15, 5), (0, 0), (1 << 28, 0xFFFF)),),
         check=trimmed((10, 10), (1 << 28, 0xFFFF))),
    Case("TRIM entries in a second block", 0x06,
         dict(features=1, count=2, data_out=dsm_ranges(*([(0, 0)] * 64 + [(N - 8, 8)]), blocks=2)),
         check=trimmed((N - 8, 8))),
    Case("TRIM up to the last sector", 0x06, dict(features=1, count=1, data_out=dsm_ranges((N - 1, 1))),
         check=trimmed((N - 1, 1))),
    Case("TRIM past capacity: nothing trimmed", 0x06,
         dict(features=1, count=1, data_out=dsm_ranges((0, 1), (N - 1, 2))), status=FAIL, error=ABRT,
         check=untouched),
    Case("DSM without the TRIM bit", 0x06, dict(features=0, count=1), status=FAIL, error=ABRT, check=untouched),
    Case("DSM count 0", 0x06, dict(features=1, count=0, data_out=b""), status=FAIL, error=ABRT),
    Case("DSM more blocks than word 105", 0x06, dict(features=1, count=9, data_out=dsm_ranges(blocks=9)),
         status=FAIL, error=ABRT),
    Case("DSM on a device without TRIM", 0x06, dict(features=1, count=1, data_out=dsm_ranges((0, 1))),
         status=FAIL, error=ABRT, disk=dict(trim=False), check=untouched),
]

GEO = (16383, 16, 63)           # default geometry of the N-sector disk


def chs(c, h, s):
    return dict(device=0xA0 | h, lba=chs_address(c, 0, s))


def chs_lba(c, h, s, heads=16, spt=63):
    return (c * heads + h) * spt + s - 1


CHS = [
    Case("CHS C0/H0/S6 = LBA 5", 0x20, dict(count=1, **chs(0, 0, 6)), data=pattern(5),
         lba=chs_address(0, 0, 7)),
    Case("CHS C1/H2/S1", 0x20, dict(count=1, **chs(1, 2, 1)), data=pattern(chs_lba(1, 2, 1))),
    Case("CHS read across a track: registers written back in CHS", 0x20, dict(count=3, **chs(0, 0, 62)),
         data=pattern(61, 3), lba=chs_address(0, 1, 2)),
    Case("CHS last sector", 0xC8, dict(count=1, **chs(16382, 15, 63)), data=pattern(16383 * 16 * 63 - 1)),
    Case("CHS past the CHS capacity", 0x20, dict(count=2, **chs(16382, 15, 63)), status=FAIL, error=IDNF),
    Case("CHS sector 0", 0x20, dict(count=1, **chs(0, 0, 0)), status=FAIL, error=IDNF),
    Case("CHS sector > spt", 0x20, dict(count=1, **chs(0, 0, 64)), status=FAIL, error=IDNF),
    Case("CHS cylinder >= cylinders", 0x20, dict(count=1, **chs(16383, 0, 1)), status=FAIL, error=IDNF),
    Case("CHS head >= heads", 0x20, dict(count=1, **chs(0, 9, 1)), status=FAIL, error=IDNF,
         setup=cmd(0x91, count=32, device=0xA0 | 7)),
    Case("CHS with translated geometry", 0x20, dict(count=1, **chs(2, 3, 4)),
         data=pattern((2 * 8 + 3) * 32 + 3), setup=cmd(0x91, count=32, device=0xA0 | 7)),
    Case("CHS write", 0x30, dict(count=2, data_out=wdata(2), **chs(3, 4, 5)), check=written(chs_lba(3, 4, 5), 2)),
    Case("CHS SEEK out of range", 0x70, dict(**chs(16383, 0, 1)), status=FAIL, error=IDNF),
    Case("CHS READ VERIFY", 0x40, dict(count=1, **chs(5, 5, 5))),
]

NONDATA = [
    Case("FLUSH CACHE", 0xE7, check=flushed(1)),
    Case("FLUSH CACHE EXT", 0xEA, check=flushed(1)),
    Case("SEEK", 0x70, dict(lba=L28 - 1)),
    Case("SEEK out of range", 0x70, dict(lba=L28), status=FAIL, error=IDNF, lba=L28),
    Case("CHECK POWER MODE active", 0xE5, count=0xFF),
    Case("CHECK POWER MODE after STANDBY IMMEDIATE", 0xE5, count=0x00, setup=cmd(0xE0)),
    Case("CHECK POWER MODE after STANDBY then IDLE", 0xE5, count=0xFF, setup=chain(cmd(0xE2), cmd(0xE3))),
    Case("CHECK POWER MODE after standby then a read", 0xE5, count=0xFF,
         setup=chain(cmd(0xE0), cmd(0x20, count=1))),
    Case("CHECK POWER MODE (old opcode)", 0x98, count=0xFF),
    Case("EXECUTE DEVICE DIAGNOSTIC", 0x90, dict(count=7, lba=0x123456), error=0x01, count=1, lba=0x000001),
    Case("RECALIBRATE", 0x10),
    Case("READ NATIVE MAX ADDRESS", 0xF8, lba=L28 - 1),
    Case("READ NATIVE MAX ADDRESS EXT", 0x27, lba=N - 1),
    Case("READ NATIVE MAX ADDRESS small disk", 0xF8, lba=999, disk=dict(sectors=1000)),
    Case("READ NATIVE MAX ADDRESS in CHS mode", 0xF8, dict(device=0xA0), lba=chs_address(16382, 15, 63)),
    Case("READ NATIVE MAX ADDRESS empty disk", 0xF8, status=FAIL, error=ABRT, disk=dict(sectors=0)),
    Case("INITIALIZE DEVICE PARAMETERS", 0x91, dict(count=32, device=0xA0 | 7),
         check=lambda a, d, r: (a.geometry.heads, a.geometry.sectors, a.geometry.cylinders)
         == (8, 32, min(0xFFFF, 16383 * 16 * 63 // 256))),
    Case("INITIALIZE DEVICE PARAMETERS zero sectors", 0x91, dict(count=0, device=0xA0 | 7), status=FAIL,
         error=ABRT),
] + [Case(f"power command {op:#04x}", op) for op in (0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96, 0x97, 0x99)]


def ident_word(n, value, mask=0xFFFF):
    def check(ata, disk, r):
        assert words(ata.identify())[n] & mask == value, hex(words(ata.identify())[n])
    return check


SET_FEATURES = [
    Case("SET FEATURES write cache off", 0xEF, dict(features=0x82),
         check=both(ident_word(85, 0, 0x20), flushed(1), lambda a, d, r: not a.write_cache)),
    Case("SET FEATURES write cache on", 0xEF, dict(features=0x02), setup=cmd(0xEF, features=0x82),
         check=ident_word(85, 0x20, 0x20)),
    Case("SET FEATURES write cache off, flush fails", 0xEF, dict(features=0x82), status=FAIL, error=UNC,
         setup=lambda a, d: d.fail("flush")),
    Case("SET FEATURES look-ahead off", 0xEF, dict(features=0x55), check=ident_word(85, 0, 0x40)),
    Case("SET FEATURES look-ahead on", 0xEF, dict(features=0xAA), check=ident_word(85, 0x40, 0x40)),
    Case("SET FEATURES PIO default", 0xEF, dict(features=0x03, count=0x00), check=ident_word(88, 0x003F)),
    Case("SET FEATURES PIO default, IORDY off", 0xEF, dict(features=0x03, count=0x01)),
    Case("SET FEATURES PIO 4", 0xEF, dict(features=0x03, count=0x0C), check=ident_word(63, 0x0007)),
    Case("SET FEATURES single-word DMA 2", 0xEF, dict(features=0x03, count=0x12), check=ident_word(62, 0x0407)),
    Case("SET FEATURES multiword DMA 2", 0xEF, dict(features=0x03, count=0x22),
         check=both(ident_word(63, 0x0407), ident_word(88, 0x003F))),
    Case("SET FEATURES UDMA 2", 0xEF, dict(features=0x03, count=0x42), check=ident_word(88, 0x043F)),
    Case("SET FEATURES UDMA 5", 0xEF, dict(features=0x03, count=0x45), check=ident_word(88, 0x203F)),
] + [
    Case(f"SET FEATURES transfer mode {c:#04x} unsupported", 0xEF, dict(features=0x03, count=c), status=FAIL,
         error=ABRT) for c in (0x02, 0x07, 0x0D, 0x13, 0x23, 0x30, 0x46, 0x80)
] + [
    Case(f"SET FEATURES {f:#04x} accepted", 0xEF, dict(features=f)) for f in (0x66, 0xCC, 0x05, 0x85, 0x42, 0xC2)
] + [
    Case(f"SET FEATURES {f:#04x} unknown", 0xEF, dict(features=f), status=FAIL, error=ABRT)
    for f in (0x00, 0x77, 0x10, 0x90, 0xFF)
]

SET_MULTIPLE = [
    Case(f"SET MULTIPLE MODE {n}", 0xC6, dict(count=n), check=both(
        ident_word(59, 0x100 | n), lambda a, d, r, n=n: a.multiple == n)) for n in (0, 1, 2, 4, 8, 16)
] + [
    Case(f"SET MULTIPLE MODE {n} rejected", 0xC6, dict(count=n), status=FAIL, error=ABRT,
         check=lambda a, d, r: a.multiple == 16) for n in (3, 6, 24, 32, 128, 255)
]

UNKNOWN = [
    Case(f"opcode {op:#04x} aborts", op, status=FAIL, error=ABRT)
    for op in (0x00, 0x08, 0xA0, 0xA1, 0xB0, 0xF9, 0xE4, 0xE8, 0x3C, 0x50, 0xFF)
]

IDENTIFY = [
    Case("IDENTIFY DEVICE", 0xEC, check=lambda a, d, r: len(r.data_in) == 512 and checksum_ok(r.data_in)
         and r.data_in == a.identify()),
]

TABLE = READS + UNC_CASES + WRITES + READ_ONLY + DSM + CHS + NONDATA + SET_FEATURES + SET_MULTIPLE + UNKNOWN \
    + IDENTIFY


@pytest.mark.parametrize("case", TABLE, ids=[c.name for c in TABLE])
def test_command_table(case: Case):
    kw = dict(case.disk)
    ata, disk = make(kw.pop("sectors", N), **kw)
    if case.setup:
        case.setup(ata, disk)
    r = ata.execute(case.command, **case.kw)
    assert (r.status, r.error) == (case.status, case.error), (hex(r.status), hex(r.error))
    if case.command == 0xEC:
        assert len(r.data_in) == 512
    else:
        assert r.data_in == (case.data or b"")
    if case.lba is not None:
        assert r.lba == case.lba, (hex(r.lba), hex(case.lba))
    if case.count is not None:
        assert r.count == case.count
    if case.check:
        result = case.check(ata, disk, r)
        assert result is None or result is True
    assert not ata.irq and ata.dma_request is None and not ata.status & DRQ


def test_table_covers_every_supported_command():
    covered = {c.command for c in TABLE}
    assert set(SUPPORTED_COMMANDS) <= covered, sorted(hex(op) for op in set(SUPPORTED_COMMANDS) - covered)


def test_execute_validates_arguments():
    ata, _ = make()
    with pytest.raises(ValueError):
        ata.execute(0x20, count=256)
    with pytest.raises(ValueError):
        ata.execute(0x20, lba=1 << 28)
    with pytest.raises(ValueError):
        ata.execute(0x24, lba=1 << 48)
    with pytest.raises(ValueError):
        ata.execute(0x30, count=2, data_out=bytes(512))
    with pytest.raises(ValueError):
        ata.execute(0xCA, count=1)
    assert ata.execute(0xE5).status == OK            # nothing was left half-done


def test_result_equality_ignores_output_registers():
    assert AtaResult(0x50, 0, b"") == AtaResult(0x50, 0, b"", lba=5, count=1)
    assert AtaResult(0x50, 0).ok and not AtaResult(0x51, 4).ok


# ------------------------------------------------------------------------------------------------
# Part 2: the register interface

def regs(ata):
    return [ata.read_register(r) for r in (REG_COUNT, REG_LBA_LOW, REG_LBA_MID, REG_LBA_HIGH)]


def test_signature_after_hardware_reset():
    ata, _ = make()
    assert regs(ata) == [1, 1, 0, 0]
    assert ata.read_register(REG_ERROR) == 0x01
    assert ata.read_register(REG_STATUS) == OK


def test_soft_reset():
    ata, _ = make()
    ata.write_register(REG_COUNT, 9)
    ata.write_register(REG_DEVICE, 0xE5)
    ata.write_register(REG_COMMAND, 0x20)          # leave a PIO read pending
    assert ata.status & DRQ
    ata.write_control(CTL_SRST)
    assert ata.read_alt_status() == BSY
    assert ata.read_register(REG_STATUS) == BSY
    ata.write_register(REG_COMMAND, 0xEC)          # ignored while in reset
    ata.write_control(0)
    assert ata.read_register(REG_STATUS) == OK
    assert ata.read_register(REG_ERROR) == 0x01
    assert regs(ata) == [1, 1, 0, 0]
    assert ata.read_register(REG_DEVICE) & 0x0F == 0
    assert ata.read_data() == 0                    # the aborted transfer is gone
    assert not ata.irq


def test_soft_reset_keeps_settings_unless_revert_enabled():
    ata, _ = make()
    ata.execute(0xC6, count=4)
    ata.execute(0xEF, features=0x82)
    ata.write_control(CTL_SRST)
    ata.write_control(0)
    assert ata.multiple == 4 and not ata.write_cache
    ata.execute(0xEF, features=0xCC)               # revert to power-on defaults on reset
    ata.write_control(CTL_SRST)
    ata.write_control(0)
    assert ata.multiple == 16 and ata.write_cache
    ata.execute(0xC6, count=2)
    ata.hardware_reset()
    assert ata.multiple == 16


def test_hob_readback_and_clear():
    ata, _ = make()
    for reg, (hi, lo) in {REG_FEATURES: (0x11, 0x22), REG_COUNT: (0x33, 0x44), REG_LBA_LOW: (0x55, 0x66),
                          REG_LBA_MID: (0x77, 0x88), REG_LBA_HIGH: (0x99, 0xAA)}.items():
        ata.write_register(reg, hi)
        ata.write_register(reg, lo)
    ata.write_control(CTL_HOB)
    assert ata.read_register(REG_ERROR) == 0x11     # previous Features with HOB
    assert regs(ata) == [0x33, 0x55, 0x77, 0x99]
    ata.write_register(REG_LBA_LOW, 0x01)           # any register write clears HOB
    assert regs(ata) == [0x44, 0x01, 0x88, 0xAA]
    assert ata.read_register(REG_ERROR) == 0x01     # Error again (the reset diagnostic code)


def lba48_regs(ata, lba, count, features=0, device=0x40):
    for reg, value in ((REG_FEATURES, features >> 8), (REG_COUNT, count >> 8), (REG_LBA_LOW, lba >> 24),
                       (REG_LBA_MID, lba >> 32), (REG_LBA_HIGH, lba >> 40), (REG_FEATURES, features),
                       (REG_COUNT, count), (REG_LBA_LOW, lba), (REG_LBA_MID, lba >> 8),
                       (REG_LBA_HIGH, lba >> 16)):
        ata.write_register(reg, value & 0xFF)
    ata.write_register(REG_DEVICE, device)


def lba28_regs(ata, lba, count, features=0, lba_mode=True):
    ata.write_register(REG_FEATURES, features)
    ata.write_register(REG_COUNT, count)
    ata.write_register(REG_LBA_LOW, lba & 0xFF)
    ata.write_register(REG_LBA_MID, (lba >> 8) & 0xFF)
    ata.write_register(REG_LBA_HIGH, (lba >> 16) & 0xFF)
    ata.write_register(REG_DEVICE, (0xE0 if lba_mode else 0xA0) | ((lba >> 24) & 0x0F))


def test_pio_read_word_by_word_with_interrupts():
    seen = []
    ata, _ = make()
    ata.irq_callback = seen.append
    lba28_regs(ata, 40, 3)
    ata.write_register(REG_COMMAND, 0x20)
    data = bytearray()
    for sector in range(3):
        assert ata.irq and ata.read_alt_status() == 0x58
        assert ata.read_alt_status() and ata.irq        # alternate status leaves INTRQ alone
        assert ata.read_register(REG_STATUS) == 0x58 and not ata.irq
        assert ata.pio_remaining == 512
        for _ in range(256):
            w = ata.read_data()
            data += w.to_bytes(2, "little")
    assert bytes(data) == pattern(40, 3)
    assert ata.read_register(REG_STATUS) == OK and not ata.irq   # no interrupt after the last block
    assert seen == [True, False] * 3
    assert ata.read_data() == 0                         # nothing more to read
    assert regs(ata)[1:] == [43, 0, 0] and regs(ata)[0] == 0


def test_pio_read_multiple_blocks_and_32bit_access():
    ata, _ = make()
    ata.execute(0xC6, count=8)
    lba48_regs(ata, (1 << 28) + 1, 20)
    ata.write_register(REG_COMMAND, 0x29)
    got = bytearray()
    sizes = []
    while ata.read_register(REG_STATUS) & DRQ:
        sizes.append(ata.pio_remaining)
        for _ in range(ata.pio_remaining // 4):
            got += ata.read_data32().to_bytes(4, "little")
    assert sizes == [8 * 512, 8 * 512, 4 * 512]
    assert bytes(got) == pattern((1 << 28) + 1, 20)
    ata.write_control(CTL_HOB)
    assert ata.read_register(REG_LBA_LOW) == 0x10 and ata.read_register(REG_LBA_MID) == 0x00
    ata.write_control(0)
    assert ata.read_register(REG_LBA_LOW) == 21


def test_pio_read_bulk_spans_blocks_and_pads():
    ata, _ = make()
    lba28_regs(ata, 0, 2)
    ata.write_register(REG_COMMAND, 0x20)
    assert ata.read_data_bytes(1024) == pattern(0, 2)
    assert ata.read_data_bytes(4) == bytes(4)
    with pytest.raises(ValueError):
        ata.read_data_bytes(3)


def test_pio_write_protocol():
    ata, disk = make()
    lba28_regs(ata, 500, 3)
    ata.write_register(REG_COMMAND, 0x30)
    assert ata.read_alt_status() == 0x58 and not ata.irq      # first DRQ block: no interrupt
    for sector in range(3):
        assert ata.pio_remaining == 512
        for i in range(256):
            ata.write_data(0x0100 * sector + i)
        assert ata.irq                                         # after every block
        status = ata.read_register(REG_STATUS)
        assert status == (0x58 if sector < 2 else OK)
    for sector in range(3):
        expect = b"".join((0x0100 * sector + i).to_bytes(2, "little") for i in range(256))
        assert sectors(disk, 500 + sector, 1) == expect
    ata.write_data(0xFFFF)                                     # ignored: no DRQ
    assert disk.writes == [(500 * 512, 512), (501 * 512, 512), (502 * 512, 512)]


def test_write_multiple_bulk_with_partial_chunks():
    ata, disk = make()
    ata.execute(0xC6, count=4)
    lba28_regs(ata, 8, 6)
    ata.write_register(REG_COMMAND, 0xC5)
    payload = wdata(6)
    assert ata.write_data_bytes(payload[:1000]) == 1000       # less than one DRQ block
    assert disk.writes == []
    assert ata.write_data_bytes(payload[1000:]) == 6 * 512 - 1000
    assert disk.writes == [(8 * 512, 4 * 512), (12 * 512, 2 * 512)]
    assert sectors(disk, 8, 6) == payload
    assert ata.write_data_bytes(b"\0\0") == 0
    assert ata.read_register(REG_STATUS) == OK


def test_registers_and_commands_ignored_while_drq():
    ata, _ = make()
    lba28_regs(ata, 7, 1)
    ata.write_register(REG_COMMAND, 0x20)
    ata.write_register(REG_LBA_LOW, 0x99)
    ata.write_register(REG_COMMAND, 0xEC)
    assert ata.read_data_bytes(512) == pattern(7)
    assert ata.read_register(REG_LBA_LOW) == 8
    with pytest.raises(RuntimeError):
        ata.write_register(REG_COMMAND, 0x20)
        ata.execute(0xE5)


def test_nien_masks_the_interrupt_line():
    levels = []
    ata, _ = make()
    ata.irq_callback = levels.append
    ata.write_control(CTL_NIEN)
    ata.execute(0xE7)                      # execute() reads Status at the end: INTRQ cleared
    lba28_regs(ata, 0, 1, features=0)
    ata.write_register(REG_COMMAND, 0xE7)  # completes with INTRQ pending, but masked
    assert not ata.irq and levels == []
    ata.write_control(0)
    assert ata.irq and levels == [True]
    ata.read_register(REG_STATUS)
    assert levels == [True, False]


def test_dma_read_in_prd_sized_pieces():
    ata, _ = make()
    lba48_regs(ata, 1000, 10)
    ata.write_register(REG_COMMAND, 0x25)
    assert ata.dma_request == DmaRequest(DMA_IN, 5120) and ata.read_alt_status() == 0x58
    ata.write_register(REG_LBA_LOW, 0)     # ignored during the command
    got = bytearray()
    for piece in (1000, 24, 2048, 6):
        got += ata.dma_in(piece)
        assert not ata.irq
    assert ata.dma_request == DmaRequest(DMA_IN, 5120 - 3078)
    got += ata.dma_in(10_000)
    assert bytes(got) == pattern(1000, 10)
    assert ata.dma_request is None and ata.irq
    assert ata.read_register(REG_STATUS) == OK
    assert ata.dma_in() == b""


def test_dma_write_in_pieces():
    ata, disk = make()
    lba28_regs(ata, 64, 4)
    ata.write_register(REG_COMMAND, 0xCA)
    assert ata.dma_request == DmaRequest(DMA_OUT, 2048)
    payload = wdata(4)
    assert ata.dma_out(payload[:700]) == 700
    assert sectors(disk, 64, 1) == payload[:512]
    assert ata.dma_out(payload[700:1800]) == 1100
    assert not ata.irq
    assert ata.dma_out(payload[1800:] + b"extra") == 248       # bytes past the transfer are not taken
    assert ata.irq and ata.dma_request is None
    assert sectors(disk, 64, 4) == payload
    assert ata.dma_out(b"more") == 0


def test_dma_abort():
    ata, disk = make()
    lba28_regs(ata, 0, 4)
    ata.write_register(REG_COMMAND, 0xCA)
    ata.dma_out(bytes(512))
    ata.dma_abort()
    assert ata.read_register(REG_STATUS) == FAIL and ata.read_register(REG_ERROR) == ABRT
    assert ata.dma_request is None


def test_dma_read_error_mid_transfer():
    ata, disk = make()
    bad_sectors(disk, "readinto", 1003)
    lba28_regs(ata, 1000, 8)
    ata.write_register(REG_COMMAND, 0xC8)
    got = ata.dma_in(1024)
    assert got == pattern(1000, 2) and ata.dma_request is not None
    got = ata.dma_in(4096)
    assert got == pattern(1002, 1)
    assert ata.dma_request is None and ata.irq
    assert ata.read_register(REG_STATUS) == FAIL and ata.read_register(REG_ERROR) == UNC
    assert regs(ata)[1:] == [0xEB, 0x03, 0x00]                 # 1003 = 0x3EB


def test_dsm_through_dma():
    ata, disk = make()
    lba48_regs(ata, 0, 1, features=1)
    ata.write_register(REG_COMMAND, 0x06)
    assert ata.dma_request == DmaRequest(DMA_OUT, 512)
    payload = dsm_ranges((7, 3))
    assert ata.dma_out(payload[:100]) == 100 and not disk.discards
    assert ata.dma_out(payload[100:]) == 412
    assert disk.discards == [(7 * 512, 3 * 512)]
    assert ata.read_register(REG_STATUS) == OK


def test_unselected_device_stays_silent():
    ata, disk = make()
    ata.write_register(REG_DEVICE, 0xF0)          # selects device 1: not us
    assert not ata.selected
    ata.write_register(REG_COMMAND, 0xEC)
    assert ata.read_register(REG_STATUS) == 0 and ata.read_alt_status() == 0
    assert ata.read_register(REG_ERROR) == 0
    ata.write_register(REG_DEVICE, 0xE0)
    assert ata.read_register(REG_STATUS) == OK    # the command never ran
    slave = AtaDisk(ata_disk(100), unit=1)
    assert not slave.selected and slave.read_alt_status() == 0
    assert slave.execute(0xE5).status == OK and slave.selected


def test_command_clears_pending_interrupt_and_error():
    ata, _ = make()
    lba28_regs(ata, 0, 1)
    ata.write_register(REG_COMMAND, 0xFF)
    assert ata.irq and ata.read_alt_status() == FAIL and ata.error == ABRT
    ata.write_register(REG_COMMAND, 0xE5)
    assert ata.read_alt_status() == OK and ata.error == 0 and ata.irq
    ata.write_register(REG_FEATURES, 0x77)
    ata.write_register(REG_COMMAND, 0xEF)
    assert ata.read_register(REG_STATUS) == FAIL and not ata.irq


def test_chs_transfers_write_back_chs():
    ata, _ = make(sectors=20000)                  # default geometry 19/16/63
    assert (ata.geometry.cylinders, ata.geometry.heads, ata.geometry.sectors) == (19, 16, 63)
    lba28_regs(ata, chs_address(2, 0, 63), 2, lba_mode=False)
    ata.write_register(REG_DEVICE, 0xA0 | 15)
    ata.write_register(REG_COMMAND, 0x20)
    assert ata.read_data_bytes(1024) == pattern((2 * 16 + 15) * 63 + 62, 2)
    # next sector after C2/H15/S63 + 1 sector is C3/H0/S2
    assert regs(ata)[1:] == [2, 3, 0] and ata.read_register(REG_DEVICE) & 0x0F == 0


# ------------------------------------------------------------------------------------------------
# Part 3: on real images

@pytest.fixture(params=[("vhd", "dynamic"), ("vhd", "fixed"), ("vdi", "dynamic"), ("raw", "raw")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def image(request, tmp_path):
    fmt, sub = request.param
    path = tmp_path / f"disk.{fmt}"
    d = vdisk.create(path, 4 << 20, format=fmt, subtype=sub)
    yield d
    d.close()


def test_real_image_roundtrip(image):
    ata = AtaDisk(image)
    assert not ata.read_only
    total = image.size // 512
    payload = wdata(40)
    assert ata.execute(0xCA, count=40, lba=total - 40, data_out=payload).ok
    assert ata.execute(0x34, count=3, lba=2, data_out=wdata(3, 9)).ok
    assert ata.execute(0x20, count=40, lba=total - 40).data_in == payload
    assert ata.execute(0x25, count=3, lba=2).data_in == wdata(3, 9)
    assert image.pread(40 * 512, (total - 40) * 512) == payload
    r = ata.execute(0x06, features=1, count=1, data_out=dsm_ranges((total - 40, 20)))
    assert r.ok
    assert ata.execute(0xC8, count=40, lba=total - 40).data_in == bytes(20 * 512) + payload[20 * 512:]
    assert ata.execute(0xEA).ok
    assert ata.execute(0x24, count=1, lba=total).error == IDNF


def test_real_image_read_only(tmp_path):
    path = tmp_path / "ro.vhd"
    vdisk.create(path, 1 << 20).close()
    with vdisk.open(path) as d:
        ata = AtaDisk(d)
        assert ata.read_only
        assert ata.execute(0x30, count=1, data_out=bytes(512)).error == ABRT
        assert ata.execute(0x06, features=1, count=1, data_out=dsm_ranges((0, 1))).error == ABRT
        assert ata.execute(0x20, count=1).ok
    with vdisk.open(path, "r+") as d:
        ata = AtaDisk(d, read_only=True)               # the device may be stricter than the image
        assert ata.execute(0xCA, count=1, data_out=bytes(512)).error == ABRT
        assert AtaDisk(d).execute(0xCA, count=1, data_out=bytes(512)).ok


def test_disk_refusing_a_write_gives_abrt():
    disk = ata_disk(100)
    ata = AtaDisk(disk, read_only=False)
    disk.read_only = True                              # the image says no after all
    assert ata.execute(0x30, count=1, data_out=bytes(512)).error == ABRT
    assert ata.execute(0x06, features=1, count=1, data_out=dsm_ranges((0, 1))).error == ABRT


def test_a_disk_with_4096_byte_logical_sectors_is_refused_clearly():
    # ATA long logical sectors (IDENTIFY words 106/117-118) are not modelled; 512-byte sectors over
    # such a disk would put a 4Kn guest's partition table at the wrong LBAs (docs/ata.md).
    with pytest.raises(vdisk.VDiskError, match=r"^/x/4k\.vhdx: has 4096-byte logical sectors; an ATA disk "
                                               r"has 512-byte sectors \(export it as a SCSI disk instead\)$"):
        AtaDisk(FakeDisk(1 << 20, logical_sector_size=4096, path="/x/4k.vhdx"))
    assert AtaDisk(FakeDisk(1 << 20, logical_sector_size=512)).total_sectors == 2048


def test_read_only_is_the_disks_own_unless_the_device_says_so():
    disk = ata_disk(100, read_only=True)
    assert AtaDisk(disk).read_only and not AtaDisk(ata_disk(100)).read_only
    assert AtaDisk(ata_disk(100), read_only=True).read_only


def test_closed_image_gives_unc(tmp_path):
    path = tmp_path / "c.vdi"
    d = vdisk.create(path, 1 << 20, format="vdi")
    ata = AtaDisk(d)
    d.close()
    r = ata.execute(0x20, count=2, lba=6)
    assert (r.status, r.error, r.lba) == (FAIL, UNC, 6)
