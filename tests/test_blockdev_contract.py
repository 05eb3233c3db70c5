"""The BlockDevice contract: the same cases, run against every object that claims the protocol.

The test fake (tests/fakes.py), a real :class:`vdisk.Disk` of each format (raw, VHD fixed,
dynamic and differencing, VDI fixed and dynamic), a shadow-protected disk (the wrapper
``vdisk.open`` returns when shadows exist), a shadow's read-only view and a backup's read-only
view. Each is compared byte for byte with a bytearray model of what it must hold.
"""
from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import vdisk
from vdisk import backup, shadow
from vdisk.blockdev import BlockDevice, ExtentKind

from fakes import FakeDisk

MiB = 1 << 20
SIZE = 4 * MiB
BLOCK = MiB                     # the images' allocation unit: several blocks to cross


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7 + (i >> 9)) & 0xFF for i in range(n))


#: What every device holds before a case runs: runs of data inside and across blocks, the rest
#: never written (so extents have DATA and UNALLOCATED/ZERO to report).
CONTENT = [(0, pattern(4096, 1)), (BLOCK - 1000, pattern(3000, 2)), (3 * BLOCK, pattern(BLOCK, 3))]


@dataclass
class Device:
    dev: BlockDevice
    model: bytearray
    writable: bool


def _model() -> bytearray:
    m = bytearray(SIZE)
    for off, data in CONTENT:
        m[off:off + len(data)] = data
    return m


def _fill(d) -> None:
    for off, data in CONTENT:
        d.pwrite(data, off)


def _image(tmp_path, fmt: str, subtype: str = "dynamic") -> str:
    path = str(tmp_path / f"base.{fmt}")
    kw = {} if fmt == "raw" or subtype == "fixed" else {"block_size": BLOCK}
    with vdisk.create(path, SIZE, format=fmt, subtype=subtype, **kw) as d:
        _fill(d)
    return path


def fake(tmp_path, mode):
    d = FakeDisk(SIZE, block_size=BLOCK, uuid=uuidlib.uuid4())
    _fill(d)
    d.read_only = mode == "r"
    return d


def image(fmt, subtype="dynamic"):
    def make(tmp_path, mode):
        return vdisk.open(_image(tmp_path, fmt, subtype), mode)
    return make


def differencing(tmp_path, mode):
    parent = str(tmp_path / "parent.vhd")
    with vdisk.create(parent, SIZE, format="vhd", block_size=BLOCK) as d:
        d.pwrite(pattern(BLOCK, 9), 0)            # under the child's data and its holes
        d.pwrite(pattern(2 * BLOCK, 3), 2 * BLOCK)
    child = str(tmp_path / "child.vhd")
    with vdisk.create(child, parent=parent) as d:
        d.write_zeroes(0, BLOCK)                  # the child hides the parent's first block
        d.write_zeroes(2 * BLOCK, BLOCK)
        _fill(d)
    return vdisk.open(child, mode)


def shadowed(tmp_path, mode):
    path = _image(tmp_path, "vhd")
    with shadow.open_shadowed(path, "r+") as d:
        d.create_shadow("contract")
    d = vdisk.open(path, mode)
    if mode == "r+":
        assert isinstance(d, shadow.ShadowedDisk)
    return d


def shadow_view(tmp_path, mode):
    path = _image(tmp_path, "vdi")
    with shadow.open_shadowed(path, "r+") as d:
        sid = d.create_shadow("contract").id
        d.pwrite(pattern(2 * BLOCK, 7), BLOCK // 2)      # the live image moves on; the view does not
        d.discard(3 * BLOCK, BLOCK)
    return shadow.open_shadow_view(path, sid)


def backup_view(tmp_path, mode):
    path = _image(tmp_path, "vhd")
    out = str(tmp_path / "full.vbk")
    backup.backup(path, out)
    with vdisk.open(path, "r+") as d:                    # the image moves on; the backup does not
        d.pwrite(pattern(BLOCK, 8), 0)
    return vdisk.open(out)


FACTORIES: dict[str, tuple[Callable, bool]] = {     # name: (factory, can be opened writable)
    "fake": (fake, True),
    "raw": (image("raw"), True),
    "vhd-fixed": (image("vhd", "fixed"), True),
    "vhd-dynamic": (image("vhd"), True),
    "vhd-differencing": (differencing, True),
    "vdi-fixed": (image("vdi", "fixed"), True),
    "vdi-dynamic": (image("vdi"), True),
    "shadowed": (shadowed, True),
    "shadow-view": (shadow_view, False),
    "backup-view": (backup_view, False),
}
WRITABLE = [n for n, (_, w) in FACTORIES.items() if w]


def _open(name: str, tmp_path, mode: str) -> Device:
    factory, can_write = FACTORIES[name]
    return Device(factory(tmp_path, mode), _model(), can_write and mode == "r+")


@pytest.fixture(params=list(FACTORIES))
def device(request, tmp_path):
    d = _open(request.param, tmp_path, "r+" if FACTORIES[request.param][1] else "r")
    yield d
    d.dev.close()


@pytest.fixture(params=WRITABLE)
def writable(request, tmp_path):
    d = _open(request.param, tmp_path, "r+")
    yield d
    d.dev.close()


@pytest.fixture(params=list(FACTORIES))
def read_only(request, tmp_path):
    d = _open(request.param, tmp_path, "r")
    yield d
    d.dev.close()


def read(dev, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert dev.readinto(buf, offset) == length
    return bytes(buf)


def assert_holds(d: Device) -> None:
    assert read(d.dev, 0, SIZE) == bytes(d.model)


# -- identity ------------------------------------------------------------------------------------
def test_it_is_a_block_device_of_the_right_size(device):
    dev = device.dev
    assert isinstance(dev, BlockDevice)
    assert dev.size == SIZE
    assert dev.read_only is (not device.writable)
    assert dev.block_size > 0 and dev.logical_sector_size in (512, 4096)
    assert dev.uuid is None or isinstance(dev.uuid, uuidlib.UUID)


# -- reading -------------------------------------------------------------------------------------
def test_reads_return_the_content_at_every_edge(device):
    dev, m = device.dev, device.model
    assert_holds(device)
    for off, n in [(0, 1), (0, 512), (BLOCK - 1, 2), (BLOCK - 1000, 3000), (BLOCK - 512, BLOCK + 1024),
                   (SIZE - 1, 1), (SIZE - 4096, 4096), (12345, 0), (SIZE, 0)]:
        assert read(dev, off, n) == bytes(m[off:off + n]), (off, n)
    buf = bytearray(1000)                                   # a memoryview slice is filled in place
    assert dev.readinto(memoryview(buf)[100:600], BLOCK - 250) == 500
    assert bytes(buf[100:600]) == bytes(m[BLOCK - 250:BLOCK + 250]) and not any(buf[:100] + buf[600:])


@pytest.mark.parametrize("off, n", [(SIZE - 1, 2), (SIZE, 1), (-1, 1), (0, SIZE + 1)])
def test_reads_outside_the_disk_are_refused(device, off, n):
    with pytest.raises(vdisk.RangeError):
        device.dev.readinto(bytearray(n), off)


# -- writing -------------------------------------------------------------------------------------
def test_writes_round_trip_at_every_edge(writable):
    dev, m = writable.dev, writable.model
    for i, (off, n) in enumerate([(0, 1), (511, 2), (BLOCK - 3, 7), (2 * BLOCK - 4096, 8192),
                                  (SIZE - 1, 1), (SIZE - 700, 700), (BLOCK // 2, 2 * BLOCK)]):
        data = pattern(n, 40 + i)
        assert dev.pwrite(data, off) == n
        m[off:off + n] = data
        assert read(dev, off, n) == data
    assert dev.pwrite(memoryview(pattern(600, 5))[50:550], 3 * BLOCK + 1) == 500   # any buffer
    m[3 * BLOCK + 1:3 * BLOCK + 501] = pattern(600, 5)[50:550]
    assert dev.pwrite(b"", 77) == 0
    assert_holds(writable)


def test_writes_outside_the_disk_are_refused_and_change_nothing(writable):
    for off, n in [(SIZE - 1, 2), (SIZE, 1), (-1, 1)]:
        with pytest.raises(vdisk.RangeError):
            writable.dev.pwrite(bytes(n), off)
        with pytest.raises(vdisk.RangeError):
            writable.dev.write_zeroes(off, n)
    assert_holds(writable)


@pytest.mark.parametrize("op", ["write_zeroes", "write_zeroes_keep", "discard"])
def test_zeroed_and_discarded_ranges_read_as_zeros(writable, op):
    dev, m = writable.dev, writable.model
    for off, n in [(100, 300), (BLOCK - 1000, 2000), (3 * BLOCK, BLOCK), (BLOCK // 2, 2 * BLOCK), (SIZE - 10, 10)]:
        if op == "discard":
            dev.discard(off, n)
        else:
            dev.write_zeroes(off, n, keep_allocated=op == "write_zeroes_keep")
        m[off:off + n] = bytes(n)
        assert read(dev, off, n) == bytes(n)
    assert_holds(writable)
    check_extents(writable)


def test_a_read_only_device_refuses_every_change(read_only):
    dev = read_only.dev
    assert dev.read_only
    for change in (lambda: dev.pwrite(b"x" * 512, 0), lambda: dev.write_zeroes(0, 512),
                   lambda: dev.discard(0, BLOCK), lambda: dev.write_zeroes(0, 512, keep_allocated=True)):
        with pytest.raises(vdisk.ReadOnlyError):
            change()
    dev.flush()
    assert_holds(read_only)


# -- extents -------------------------------------------------------------------------------------
def check_extents(d: Device, offset: int = 0, length: int = SIZE) -> list:
    ext = d.dev.extents(offset, length) if (offset, length) != (0, SIZE) else d.dev.extents()
    pos = offset
    for i, e in enumerate(ext):
        assert isinstance(e.kind, ExtentKind), e
        assert e.offset == pos and e.length > 0, (pos, e)      # in order, no gap, no overlap
        if e.kind == ExtentKind.UNALLOCATED:
            assert e.layer is None, e                          # stored nowhere in the chain
        if e.kind != ExtentKind.DATA:
            assert read(d.dev, e.offset, e.length) == bytes(e.length), e
        if i:
            prev = ext[i - 1]
            assert (prev.kind, prev.layer) != (e.kind, e.layer), f"unmerged neighbours {prev} {e}"
        pos += e.length
    assert pos == offset + length
    return ext


def test_extents_cover_the_disk_in_order(device):
    ext = check_extents(device)
    data = np.zeros(SIZE, bool)
    for e in ext:
        if e.kind == ExtentKind.DATA:
            data[e.offset:e.offset + e.length] = True
    stored = np.frombuffer(bytes(device.model), np.uint8) != 0
    assert not (stored & ~data).any(), "content outside every DATA extent"
    assert data.any()


def test_extents_of_a_range_are_the_whole_answer_clipped(device):
    whole = check_extents(device)
    for off, n in [(0, 1), (BLOCK - 1000, 3000), (BLOCK + 7, 2 * BLOCK), (SIZE - 1, 1)]:
        part = check_extents(device, off, n)
        clipped = [(max(e.offset, off), min(e.offset + e.length, off + n) - max(e.offset, off), e.kind)
                   for e in whole if e.offset < off + n and e.offset + e.length > off]
        assert [(e.offset, e.length, e.kind) for e in part] == clipped


def test_extents_outside_the_disk_are_refused(device):
    with pytest.raises(vdisk.RangeError):
        device.dev.extents(SIZE - 1, 2)


# -- flush ---------------------------------------------------------------------------------------
def test_flush_keeps_what_was_written(writable):
    writable.dev.pwrite(pattern(5000, 77), BLOCK - 2500)
    writable.model[BLOCK - 2500:BLOCK + 2500] = pattern(5000, 77)
    assert writable.dev.flush() is None
    writable.dev.flush()
    assert_holds(writable)


# -- the fake's own hooks (what device tests lean on) ---------------------------------------------
def test_the_fakes_faults_fire_before_anything_changes_and_only_where_asked():
    d = FakeDisk(SIZE, block_size=BLOCK)
    d.fail("pwrite", BLOCK, 512, vdisk.VDiskError("bad sector"))
    with pytest.raises(vdisk.VDiskError, match="bad sector"):
        d.pwrite(b"x" * 1024, BLOCK - 512)                    # touches the bad range
    assert d.content(BLOCK - 512, 1024) == bytes(1024) and d.writes == []
    d.pwrite(b"y" * 512, BLOCK - 512)                         # next to it: fine
    d.fail("flush")
    with pytest.raises(OSError):
        d.flush()
    assert d.flushes == 0
    d.heal()
    d.flush()
    assert d.flushes == 1 and [c[0] for c in d.calls] == ["pwrite", "pwrite", "flush", "flush"]


def test_an_aligned_fake_refuses_partial_sectors():
    d = FakeDisk(SIZE, logical_sector_size=4096, aligned=True)
    for change in (lambda: d.pwrite(bytes(512), 0), lambda: d.write_zeroes(4096, 100), lambda: d.discard(512, 4096)):
        with pytest.raises(vdisk.RangeError, match="whole 4096-byte sectors"):
            change()
    d.pwrite(bytes(8192), 4096)
    assert d.writes == [(4096, 8192)]
