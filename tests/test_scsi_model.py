"""ScsiDisk against a model: random WRITE / WRITE SAME / UNMAP / COMPARE AND WRITE / MODE SELECT
(write cache) / SYNCHRONIZE CACHE / READ sequences agree byte for byte with a bytearray, on raw,
dynamic VHD, dynamic VDI and a differencing VHD.

UNMAP and WRITE SAME with UNMAP may deallocate; the LU reports LBPRZ=1, so the model says those
blocks read back as zeros. Ranges that run past the end must fail with LBA OUT OF RANGE and
change nothing.
"""
from __future__ import annotations

import os
import struct
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vdisk
from vdisk.devices.scsi import ScsiDisk
from vdisk.devices.scsi_sense import GOOD, decode_sense

SIZE = 1 << 20
BLOCKS = SIZE // 512
GRAIN = 64 << 10          # small allocation blocks, so ranges often straddle them

lbas = st.integers(min_value=0, max_value=BLOCKS - 1)
counts = st.integers(min_value=0, max_value=300)


def make_image(kind: str, folder: str) -> str:
    if kind == "vhd-diff":
        parent = os.path.join(folder, "parent.vhd")
        d = vdisk.create(parent, SIZE, format="vhd", block_size=GRAIN)
        d.pwrite(bytes(range(256)) * (SIZE // 256), 0)
        d.close()
        path = os.path.join(folder, "child.vhd")
        vdisk.create(path, format="vhd", parent=parent).close()
        return path
    path = os.path.join(folder, f"disk.{kind}")
    grain = {"raw": {}, "vhd": {"block_size": GRAIN}, "vdi": {"block_size": GRAIN}}[kind]
    vdisk.create(path, SIZE, format=kind, **grain).close()
    return path


class ScsiModel(RuleBasedStateMachine):
    kind = "raw"

    def __init__(self):
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.path = make_image(self.kind, self._tmp.name)
        self.disk = vdisk.open(self.path, "r+")
        self.lu = ScsiDisk(self.disk)
        self.model = bytearray(self.disk.pread(SIZE, 0))
        self.seed = 0

    def teardown(self):
        self.disk.close()
        self._tmp.cleanup()

    def _data(self, n: int) -> bytes:
        self.seed += 1
        return bytes(((self.seed * 131 + i) * 7) & 0xFF for i in range(n * 512))

    def _run(self, cdb: bytes, data_out=None, *, in_range: bool):
        res = self.lu.execute(cdb, data_out)
        if in_range:
            assert res.status == GOOD, decode_sense(res.sense)
        else:
            assert decode_sense(res.sense) == (5, 0x21, 0)
        return res

    @rule(lba=lbas, n=counts, fua=st.booleans(), size=st.sampled_from([10, 16]))
    def write(self, lba, n, fua, size):
        data = self._data(n)
        flags = 0x08 if fua else 0
        cdb = (struct.pack(">BBIBHB", 0x2A, flags, lba, 0, n, 0) if size == 10
               else struct.pack(">BBQIBB", 0x8A, flags, lba, n, 0, 0))
        ok = lba + n <= BLOCKS
        self._run(cdb, data, in_range=ok)
        if ok:
            self.model[lba * 512:(lba + n) * 512] = data

    @rule(ranges=st.lists(st.tuples(lbas, counts), min_size=1, max_size=4))
    def unmap(self, ranges):
        desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
        param = struct.pack(">HH4x", len(desc) + 6, len(desc)) + desc
        ok = all(lba + n <= BLOCKS for lba, n in ranges)
        self._run(struct.pack(">BBxxxxxHB", 0x42, 0, len(param), 0), param, in_range=ok)
        if ok:
            for lba, n in ranges:
                self.model[lba * 512:(lba + n) * 512] = bytes(n * 512)

    @rule(lba=lbas, n=st.integers(min_value=1, max_value=600), zero=st.booleans(),
          unmap=st.booleans(), size=st.sampled_from([10, 16]))
    def write_same(self, lba, n, zero, unmap, size):
        block = bytes(512) if zero else self._data(1)
        flags = 0x08 if unmap else 0
        cdb = (struct.pack(">BBIBHB", 0x41, flags, lba, 0, n, 0) if size == 10
               else struct.pack(">BBQIBB", 0x93, flags, lba, n, 0, 0))
        ok = lba + n <= BLOCKS
        self._run(cdb, block, in_range=ok)
        if ok:
            self.model[lba * 512:(lba + n) * 512] = block * n

    @rule(lba=lbas, n=st.integers(min_value=1, max_value=16), matches=st.booleans())
    def compare_and_write(self, lba, n, matches):
        ok = lba + n <= BLOCKS
        current = bytes(self.model[lba * 512:(lba + n) * 512]) if ok else bytes(n * 512)
        expected = current if matches else bytes(b ^ 0xFF for b in current)
        new = self._data(n)
        res = self.lu.execute(struct.pack(">BBQxxxBBB", 0x89, 0, lba, n, 0, 0), expected + new)
        if not ok:
            assert decode_sense(res.sense) == (5, 0x21, 0)
        elif matches:
            assert res.status == GOOD, decode_sense(res.sense)
            self.model[lba * 512:(lba + n) * 512] = new
        else:
            assert decode_sense(res.sense) == (0xE, 0x1D, 0)            # and nothing written

    @rule(write_cache=st.booleans())
    def set_write_cache(self, write_cache):
        page = bytearray(0x14)
        page[0], page[1], page[2] = 0x08, 0x12, 0x04 if write_cache else 0
        param = bytes(4) + bytes(page)
        res = self.lu.execute(bytes((0x15, 0x10, 0, 0, len(param), 0)), param)
        assert res.status == GOOD and self.lu.write_cache == write_cache

    @rule(lba=lbas, n=counts)
    def synchronize_cache(self, lba, n):
        self._run(struct.pack(">BBQIBB", 0x91, 0, lba, n, 0, 0), in_range=lba + n <= BLOCKS)

    @rule(lba=lbas, n=counts)
    def read(self, lba, n):
        ok = lba + n <= BLOCKS
        res = self._run(struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0), in_range=ok)
        if ok:
            assert res.data_in == bytes(self.model[lba * 512:(lba + n) * 512])

    @precondition(lambda self: self.seed % 5 == 4)
    @rule()
    def reopen(self):
        self.disk.close()
        self.disk = vdisk.open(self.path, "r+")
        self.lu = ScsiDisk(self.disk)

    @invariant()
    def capacity_is_stable(self):
        res = self.lu.execute(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
        assert struct.unpack(">Q", res.data_in[:8])[0] == BLOCKS - 1

    def check_everything(self):
        assert self.disk.pread(SIZE, 0) == bytes(self.model)


SETTINGS = settings(max_examples=25, stateful_step_count=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _machine(kind: str):
    class Machine(ScsiModel):
        pass

    Machine.kind = kind

    def teardown(self):
        try:
            self.check_everything()
        finally:
            ScsiModel.teardown(self)

    Machine.teardown = teardown
    Machine.__name__ = f"ScsiModel_{kind.replace('-', '_')}"
    return Machine


TestScsiModelRaw = _machine("raw").TestCase
TestScsiModelRaw.settings = SETTINGS
TestScsiModelVhd = _machine("vhd").TestCase
TestScsiModelVhd.settings = SETTINGS
TestScsiModelVdi = _machine("vdi").TestCase
TestScsiModelVdi.settings = SETTINGS
TestScsiModelVhdDifferencing = _machine("vhd-diff").TestCase
TestScsiModelVhdDifferencing.settings = SETTINGS
