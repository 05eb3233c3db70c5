"""The ATA device against a model: random command sequences agree byte for byte with a bytearray.

Writes (PIO sectors / multiple, DMA, FUA, LBA28, LBA48 and CHS), TRIMs, flushes, write-cache and
multiple-mode changes and reads go to the device through ``execute`` or straight through the
registers (word-by-word or bulk PIO in random pieces, DMA in random PRD-sized pieces), on an
in-memory disk and on real VHD, VDI and raw images, including differencing children over a filled
parent (where a TRIM must read back as zeros, not as the parent's data). Every read must return exactly the model's
bytes; every command must leave the device idle with the right status.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vdisk
from vdisk.devices.ata import (ABRT, DRQ, IDNF, REG_COMMAND, REG_COUNT, REG_DEVICE, REG_ERROR, REG_FEATURES,
                               REG_LBA_HIGH, REG_LBA_LOW, REG_LBA_MID, REG_STATUS, AtaDisk, chs_address)

from test_ata_helpers import ata_disk, dsm_ranges

SECTOR = 512
SECTORS = 4608 + 3                 # crosses VHD (2 MiB) and VDI (1 MiB) blocks, not block-aligned
EXT = {0x24, 0x25, 0x29, 0x34, 0x35, 0x39, 0x3D, 0xCE, 0x42, 0xEA, 0x06}
READS = [0x20, 0x21, 0x24, 0xC4, 0x29, 0xC8, 0xC9, 0x25]
WRITES = [0x30, 0x31, 0x34, 0xC5, 0x39, 0xCE, 0xCA, 0xCB, 0x35, 0x3D]
MULTIPLE = {0xC4, 0x29, 0xC5, 0x39, 0xCE}
# small transfers mostly, plus the edges: DRQ-block multiples, 256 (count 0 for 28-bit commands) and
# counts that need the high (HOB) count byte
WRITE_COUNTS = st.one_of(st.integers(1, 40), st.sampled_from([15, 16, 17, 255, 256, 257, 300]))
READ_COUNTS = st.one_of(st.integers(1, 40), st.integers(1, 600), st.sampled_from([16, 255, 256, 257, 513]))


def open_backend(kind: str, folder: str, content: bytes):
    """A disk holding ``content``: in memory, a base image, or an empty child over a filled base."""
    if kind == "memory":
        disk = ata_disk(SECTORS, patterned=False)
        disk.pwrite(content, 0)
        return disk
    fmt, sub = kind.split("-")
    if sub == "diff":                  # the child shadows nothing yet: every read starts in the parent
        base = os.path.join(folder, f"base.{fmt}")
        with vdisk.create(base, SECTORS * SECTOR, format=fmt, subtype="dynamic") as parent:
            parent.pwrite(content, 0)
        return vdisk.create(os.path.join(folder, f"child.{fmt}"), format=fmt, parent=base)
    disk = vdisk.create(os.path.join(folder, f"model.{fmt}"), SECTORS * SECTOR, format=fmt, subtype=sub)
    disk.pwrite(content, 0)
    return disk


def write_regs(ata: AtaDisk, op: int, lba: int, count: int, features: int = 0, chs_mode: bool = False):
    """Program the task file the way a driver does (HOB bytes first for EXT commands)."""
    if op in EXT:
        for reg, value in ((REG_FEATURES, features >> 8), (REG_COUNT, count >> 8), (REG_LBA_LOW, lba >> 24),
                           (REG_LBA_MID, lba >> 32), (REG_LBA_HIGH, lba >> 40)):
            ata.write_register(reg, value & 0xFF)
        device = 0x40
    elif chs_mode:
        geo = ata.geometry
        c, h, s = geo.to_chs(lba)
        lba = chs_address(c, 0, s)
        device = 0xA0 | h
    else:
        device = 0xE0 | ((lba >> 24) & 0x0F)
    ata.write_register(REG_DEVICE, device)
    for reg, value in ((REG_FEATURES, features), (REG_COUNT, count), (REG_LBA_LOW, lba),
                       (REG_LBA_MID, lba >> 8), (REG_LBA_HIGH, lba >> 16)):
        ata.write_register(reg, value & 0xFF)
    ata.write_register(REG_COMMAND, op)


def run_registers(ata: AtaDisk, op: int, lba: int, count: int, rng: random.Random, data_out: bytes = b"",
                  features: int = 0, chs_mode: bool = False):
    """One command through the register interface with randomly sized PIO/DMA pieces."""
    write_regs(ata, op, lba, count, features, chs_mode)
    data_in = bytearray()
    pos = 0
    for _ in range(1_000_000):
        req = ata.dma_request
        if req is not None:
            piece = rng.choice([2, 512, 4096, 6000, 65536, req.remaining])
            if req.direction == "in":
                data_in += ata.dma_in(piece)
            else:
                taken = ata.dma_out(data_out[pos:pos + piece])
                assert taken == min(piece, req.remaining, len(data_out) - pos)
                pos += taken
            continue
        status = ata.read_register(REG_STATUS)
        if not status & DRQ:
            break
        n = ata.pio_remaining
        assert n > 0
        style = rng.randrange(3)
        if data_out:                                   # PIO out
            if style == 0:
                for i in range(0, min(n, 64), 2):
                    ata.write_data(int.from_bytes(data_out[pos + i:pos + i + 2], "little"))
                pos += min(n, 64)
            else:
                piece = min(n, rng.choice([2, 100, 512, n]))
                assert ata.write_data_bytes(data_out[pos:pos + piece]) == piece
                pos += piece
        else:                                          # PIO in
            if style == 0:
                for _ in range(min(n, 64) // 2):
                    data_in += ata.read_data().to_bytes(2, "little")
            elif style == 1:
                for _ in range(min(n, 64) // 4):
                    data_in += ata.read_data32().to_bytes(4, "little")
            else:
                data_in += ata.read_data_bytes(min(n, rng.choice([2, 100, 512, n])))
    else:                                              # pragma: no cover
        raise AssertionError("transfer never ended")
    return ata.read_register(REG_STATUS), ata.read_register(REG_ERROR), bytes(data_in)


class AtaModel(RuleBasedStateMachine):
    backend = "memory"

    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="ata-model-")
        # start from non-zero content so that every TRIM and every misplaced write shows
        self.total = SECTORS
        self.model = bytearray(random.Random(self.total).randbytes(self.total * SECTOR))
        self.disk = open_backend(self.backend, self.folder, bytes(self.model))
        self.ata = AtaDisk(self.disk)
        assert self.disk.size == self.total * SECTOR
        self.flushes = 0

    def teardown(self):
        close = getattr(self.disk, "close", None)
        if close:
            close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------
    def do(self, op, lba, count, via, seed, data_out=b"", features=0, chs_mode=False):
        if via == "execute":
            kw = dict(count=count & (0xFFFF if op in EXT else 0xFF), features=features, data_out=data_out or None)
            if chs_mode:
                c, h, s = self.ata.geometry.to_chs(lba)
                r = self.ata.execute(op, lba=chs_address(c, 0, s), device=0xA0 | h, **kw)
            else:
                r = self.ata.execute(op, lba=lba, **kw)
            return r.status, r.error, r.data_in
        return run_registers(self.ata, op, lba, count & (0xFFFF if op in EXT else 0xFF), random.Random(seed),
                             data_out, features, chs_mode)

    def check_image(self, start, n):
        """The backing image itself holds the model's bytes around what a command touched."""
        start, end = max(0, start), min(self.total, start + n)
        got = bytearray((end - start) * SECTOR)
        self.disk.readinto(got, start * SECTOR)
        assert got == bytes(self.model[start * SECTOR:end * SECTOR])

    def usable(self, op, chs_mode):
        if op in MULTIPLE and not self.ata.multiple:
            return False
        return not (chs_mode and op in EXT)

    # -- rules -----------------------------------------------------------------------------------
    @rule(op=st.sampled_from(WRITES), start=st.integers(0, SECTORS - 1), count=WRITE_COUNTS,
          via=st.sampled_from(["execute", "registers"]), seed=st.integers(0, 2 ** 32 - 1),
          chs_mode=st.booleans())
    def write(self, op, start, count, via, seed, chs_mode):
        if not self.usable(op, chs_mode):
            return
        count = min(count, self.total - start, 65536 if op in EXT else 256)
        if chs_mode and start + count > self.ata.geometry.capacity:
            return
        payload = random.Random(seed).randbytes(count * SECTOR)
        status, error, _ = self.do(op, start, count, via, seed, payload, chs_mode=chs_mode)
        assert (status, error) == (0x50, 0)
        self.model[start * SECTOR:(start + count) * SECTOR] = payload
        self.check_image(start - 1, count + 2)

    @rule(op=st.sampled_from(READS), start=st.integers(0, SECTORS - 1), count=READ_COUNTS,
          via=st.sampled_from(["execute", "registers"]), seed=st.integers(0, 2 ** 32 - 1),
          chs_mode=st.booleans())
    def read(self, op, start, count, via, seed, chs_mode):
        if not self.usable(op, chs_mode):
            return
        count = min(count, self.total - start, 65536 if op in EXT else 256)
        if chs_mode and start + count > self.ata.geometry.capacity:
            return
        status, error, data = self.do(op, start, count, via, seed, chs_mode=chs_mode)
        assert (status, error) == (0x50, 0)
        assert data == bytes(self.model[start * SECTOR:(start + count) * SECTOR])

    @rule(op=st.sampled_from(READS + WRITES), start=st.integers(SECTORS - 5, SECTORS + 5),
          count=st.integers(6, 20), via=st.sampled_from(["execute", "registers"]), seed=st.integers(0, 99))
    def out_of_range(self, op, start, count, via, seed):
        if not self.usable(op, False):
            return
        data_out = bytes(count * SECTOR) if op in WRITES else b""
        status, error, data = self.do(op, start, count, via, seed, data_out)
        assert (status, error) == (0x51, IDNF) and data == b""

    @rule(ranges=st.lists(st.tuples(st.integers(0, SECTORS - 1), st.integers(0, 600)), min_size=1, max_size=70),
          adjacent=st.booleans(), via=st.sampled_from(["execute", "registers"]), seed=st.integers(0, 2 ** 32 - 1))
    def trim(self, ranges, adjacent, via, seed):
        if adjacent:                       # back-to-back ranges from the first one's start
            lba, out = ranges[0][0], []
            for _, n in ranges:
                n = min(n, self.total - lba) // 4
                out.append((lba, n))
                lba += n
            ranges = out
        ranges = [(lba, min(n, self.total - lba)) for lba, n in ranges]
        blocks = -(-len(ranges) // 64)
        status, error, _ = self.do(0x06, 0, blocks, via, seed, dsm_ranges(*ranges, blocks=blocks), features=1)
        assert (status, error) == (0x50, 0)
        for lba, n in ranges:
            self.model[lba * SECTOR:(lba + n) * SECTOR] = bytes(n * SECTOR)
        for lba, n in ranges:
            self.check_image(lba - 1, n + 2)

    @rule(lba=st.integers(0, SECTORS - 1), via=st.sampled_from(["execute", "registers"]))
    def trim_past_end_changes_nothing(self, lba, via):
        status, error, _ = self.do(0x06, 0, 1, via, 0, dsm_ranges((lba, self.total - lba + 1)), features=1)
        assert (status, error) == (0x51, ABRT)

    @rule(op=st.sampled_from([0xE7, 0xEA]), via=st.sampled_from(["execute", "registers"]))
    def flush(self, op, via):
        assert self.do(op, 0, 0, via, 0)[:2] == (0x50, 0)

    @rule(n=st.sampled_from([0, 1, 2, 4, 8, 16]))
    def set_multiple(self, n):
        assert self.ata.execute(0xC6, count=n).ok
        assert self.ata.multiple == n

    @rule(on=st.booleans())
    def write_cache(self, on):
        assert self.ata.execute(0xEF, features=0x02 if on else 0x82).ok

    @precondition(lambda self: self.backend != "memory")
    @rule()
    def reopen_device(self):
        """A new AtaDisk on the same image (a VM restart) sees the same bytes."""
        self.ata = AtaDisk(self.disk)

    @invariant()
    def idle(self):
        assert self.ata.dma_request is None and not self.ata.read_alt_status() & DRQ

    @rule(start=st.integers(0, SECTORS - 1))
    def image_agrees(self, start):
        self.check_image(start, 64)


SETTINGS = settings(max_examples=15, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", ["memory", "vhd-dynamic", "vhd-fixed", "vdi-dynamic", "raw-raw", "vhd-diff",
                                     "vdi-diff"])
def test_ata_agrees_with_bytearray(backend):
    machine = type(f"AtaModel_{backend.replace('-', '_')}", (AtaModel,), {"backend": backend})
    machine.TestCase.settings = SETTINGS
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(machine, settings=SETTINGS)
