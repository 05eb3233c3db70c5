"""VHDX chains against a bytearray: qemu reads neither differencing nor 4096-byte-sector VHDX, and
libvhdi misreads ZERO blocks in children, so a plain bytearray judges every byte after random
writes, zero writes, discards, flushes, reopens and new children (partial blocks through the
sector bitmap, ZERO blocks over a parent), with 512- and 4096-byte logical sectors."""
from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vdisk

MiB = 1 << 20
SIZE = 6 * MiB + 64 * 1024          # six 1 MiB blocks and a partial one


class VhdxChain(RuleBasedStateMachine):
    lss = 512

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vdisk-vhdx-model-")
        self.depth = 0
        self.disk = None

    @initialize(seed=st.integers(0, 255))
    def start(self, seed):
        self.model = bytearray(SIZE)
        path = os.path.join(self.dir, "layer0.vhdx")
        self.disk = vdisk.create(path, SIZE, format="vhdx", block_size=MiB, logical_sector_size=self.lss)
        data = bytes([seed | 1]) * (2 * MiB + 4096)
        self._write(MiB - 4096, data)

    def _write(self, off: int, data: bytes) -> None:
        self.disk.pwrite(data, off)
        self.model[off:off + len(data)] = data

    offsets = st.integers(0, SIZE - 1)

    @rule(off=offsets, n=st.integers(1, 300_000), byte=st.integers(0, 255))
    def write(self, off, n, byte):
        n = min(n, SIZE - off)
        self._write(off, bytes([byte]) * n)

    @rule(off=offsets, n=st.integers(1, 2 * MiB))
    def write_zeroes(self, off, n):
        n = min(n, SIZE - off)
        self.disk.write_zeroes(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(block=st.integers(0, 6))
    def discard_block(self, block):
        off = block * MiB
        n = min(MiB, SIZE - off)
        self.disk.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule()
    def flush(self):
        self.disk.flush()

    @rule()
    def reopen(self):
        path = self.disk.path
        self.disk.close()
        self.disk = vdisk.open(path, "r+")

    @rule()
    def new_child(self):
        if self.depth >= 3:
            return
        parent = self.disk.path
        self.disk.close()
        self.depth += 1
        self.disk = vdisk.create(os.path.join(self.dir, f"layer{self.depth}.avhdx"), parent=parent)

    @invariant()
    def reads_like_the_model(self):
        if self.disk is not None:
            assert self.disk.logical_sector_size == self.lss
            assert self.disk.pread(SIZE, 0) == bytes(self.model)

    def teardown(self):
        if self.disk is not None:
            path = self.disk.path
            self.disk.close()
            with vdisk.open(path) as d:                    # what reached the files
                assert d.pread(SIZE, 0) == bytes(self.model)
        shutil.rmtree(self.dir, ignore_errors=True)


class VhdxChain4K(VhdxChain):
    lss = 4096


SETTINGS = settings(max_examples=20, stateful_step_count=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestVhdxChain512 = VhdxChain.TestCase
TestVhdxChain512.settings = SETTINGS
TestVhdxChain4096 = VhdxChain4K.TestCase
TestVhdxChain4096.settings = SETTINGS
