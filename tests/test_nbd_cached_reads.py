"""The event-loop read path of the NBD backend (``read_cached``): a READ whose bytes are all in
the page cache is answered without a worker thread, and must be byte for byte the reply the
worker path (``handle_request``) gives; anything it cannot answer exactly it declines (None)."""
from __future__ import annotations

import os
import random
import struct

import pytest

import vdisk
from vdisk import io as vio
from vdisk.serve import nbd_backend as B
from vdisk.serve.nbd_conn import Request
from vdisk.serve.nbd_wire import BASE_ALLOCATION_ID, CMD_FLAG_DF, CMD_READ, ExportInfo
from test_nbd_support import MemDisk, build_chain


def read_request(size, offset, length, structured, flags=0):
    return Request(CMD_READ, flags, 9, offset, length, None, ExportInfo("x", size), structured,
                   BASE_ALLOCATION_ID if structured else None)


def joined(buffers):
    return b"".join(bytes(b) for b in buffers)


@pytest.mark.parametrize("fmt, depth", [("vhd", 1), ("vhd", 3), ("vdi", 2)])
def test_cached_reads_equal_the_worker_path(tmp_path, fmt, depth):
    path, model = build_chain(tmp_path, "c", fmt, depth, size=24 << 20, seed=3)
    rnd = random.Random(5)
    with vdisk.open(path) as d:
        d.pread(d.size, 0)                               # everything in the page cache
        for i in range(120):
            off = rnd.randrange(0, d.size)
            ln = min(rnd.choice([0, 1, 4096, 65536, 300000, 3 << 20]), d.size - off)
            structured = i % 3 != 0
            flags = CMD_FLAG_DF if structured and i % 5 == 0 else 0
            req = read_request(d.size, off, ln, structured, flags)
            got = B.read_cached(req, d)
            assert got is not None, (off, ln)
            assert joined(got) == joined(B.handle_request(req, d))
            if not structured:
                assert joined(got)[16:] == bytes(model[off:off + ln])


def test_uncached_bytes_go_to_the_worker(tmp_path):
    path, _ = build_chain(tmp_path, "u", "vhd", 1, size=8 << 20, seed=4)
    with vdisk.open(path) as d:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        req = read_request(d.size, 0, d.size, False)
        got = B.read_cached(req, d)
        if got is not None:                              # a page the kernel kept: still exact
            assert joined(got) == joined(B.handle_request(req, d))
        d.pread(d.size, 0)
        assert B.read_cached(req, d) is not None


def test_declines_what_it_cannot_answer_exactly(tmp_path):
    path, _ = build_chain(tmp_path, "n", "vhd", 1, size=8 << 20, seed=6)
    mem = MemDisk(1 << 20)                               # not a vdisk.Disk: worker path
    assert B.read_cached(read_request(1 << 20, 0, 4096, True), mem) is None
    with vdisk.open(path) as d:
        d.pread(d.size, 0)
        req = read_request(d.size, 0, 65536, True)
        old = vio.read_fault_hook
        vio.read_fault_hook = lambda kind, f, offset, length: None    # fault injection on
        try:
            assert B.read_cached(req, d) is None
        finally:
            vio.read_fault_hook = old

        class Filtered(type(d)):                        # a Disk whose reads are its own
            def readinto(self, buffer, offset):
                return super().readinto(buffer, offset)
        d.__class__ = Filtered
        try:
            assert B.read_cached(req, d) is None
        finally:
            d.__class__ = vdisk.Disk
    req = read_request(8 << 20, 0, 4096, True)
    assert B.read_cached(req, d) is None                 # closed


def test_a_file_shorter_than_its_map_is_left_to_the_worker(tmp_path):
    """The file is cut under an open disk (another process, a full disk's repair...)."""
    path, model = build_chain(tmp_path, "s", "vhd", 1, size=8 << 20, seed=8)
    with vdisk.open(path) as d:
        d.pread(d.size, 0)
        runs = d.file_runs(0, d.size)
        last = max((r for r in runs if r[1] >= 0), key=lambda r: r[2])
        _kind, fd, foff, n = last
        voff = sum(r[3] for r in runs[:runs.index(last)])
        os.truncate(path, foff + n // 2)                # inside the last data run
        req = read_request(d.size, voff, n, False)
        assert B.read_cached(req, d) is None
        reply = joined(B.handle_request(req, d))
        assert struct.unpack(">I", reply[4:8])[0] != 0   # the worker reports the error
