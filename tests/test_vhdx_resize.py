"""Resizing a VHDX in place: grow (dynamic and fixed; past the BAT region's room the BAT moves)
and shrink (nothing allocated past the end; a fixed file is cut after its last kept block),
through the file's own log. qemu-img judges the result; a cut at every write (kill and
power cut) leaves the old size or the new, content kept, and qemu-img check clean."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vdisk
from vhdx_support import cut_everywhere

MiB = 1 << 20
pytestmark = pytest.mark.judges("qemu-img")


def vd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True)


def qemu_size(path) -> int:
    out = subprocess.run(["qemu-img", "info", "-f", "vhdx", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["virtual-size"]


def qemu_clean(path) -> None:
    res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def qemu_reads(path, expected: bytes, tmp_path) -> None:
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    res = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), str(ref)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def make(path, size, subtype="dynamic", block=2 * MiB) -> bytearray:
    model = bytearray(size)
    with vdisk.create(path, size, format="vhdx", subtype=subtype, block_size=block) as d:
        for at, fill in ((0, b"a"), (5 * MiB + 4096, b"b")):
            d.pwrite(fill * 8192, at)
            model[at:at + 8192] = fill * 8192
    return model


@pytest.mark.parametrize("subtype", ["dynamic", "fixed"])
def test_grow_reads_the_old_content_then_zeros_in_qemu(tmp_path, subtype):
    path = tmp_path / "g.vhdx"
    model = make(path, 16 * MiB, subtype, block=MiB)
    res = vd("resize", path, "48M")
    assert res.returncode == 0, res.stderr
    assert qemu_size(path) == 48 * MiB
    qemu_clean(path)
    qemu_reads(path, bytes(model) + bytes(32 * MiB), tmp_path)
    with vdisk.open(path, "r+") as d:                     # the new range is writable
        d.pwrite(b"z" * 4096, 40 * MiB)
    qemu_clean(path)


def test_shrink_when_nothing_lies_past_the_end(tmp_path):
    path = tmp_path / "s.vhdx"
    model = make(path, 64 * MiB)
    res = vd("resize", path, "8M", "--shrink")
    assert res.returncode == 0, res.stderr
    assert qemu_size(path) == 8 * MiB
    qemu_clean(path)
    qemu_reads(path, bytes(model[:8 * MiB]), tmp_path)


def test_a_fixed_vhdx_shrinks_and_its_file_is_cut_after_the_last_kept_block(tmp_path):
    path = tmp_path / "f.vhdx"
    model = make(path, 64 * MiB, "fixed", block=MiB)
    before = path.stat().st_size
    res = vd("resize", path, "7M", "--shrink")                # 5 MiB + 4096 holds data: block 5 stays
    assert res.returncode == 0, res.stderr
    assert qemu_size(path) == 7 * MiB
    qemu_clean(path)
    qemu_reads(path, bytes(model[:7 * MiB]), tmp_path)
    assert path.stat().st_size == before - 57 * MiB             # the 57 dropped blocks' storage is gone
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "vhdx"
    assert vd("check", path).returncode == 0
    with vdisk.open(path, "r+") as d:                         # still fixed, still writable, and grows again
        assert d.subtype == "fixed"
        d.pwrite(b"q" * 4096, 7 * MiB - 4096)
    assert vd("resize", path, "9M").returncode == 0
    expect = bytearray(model[:7 * MiB]) + bytes(2 * MiB)
    expect[7 * MiB - 4096:7 * MiB] = b"q" * 4096
    qemu_reads(path, bytes(expect), tmp_path)
    qemu_clean(path)


def test_a_fixed_vhdx_does_not_shrink_over_non_zero_data(tmp_path):
    path = tmp_path / "n.vhdx"
    make(path, 16 * MiB, "fixed", block=MiB)
    before = path.read_bytes()
    res = vd("resize", path, "5M", "--shrink")               # data at 5 MiB + 4096
    assert res.returncode == 1 and "virtual offset" in res.stderr, res.stderr
    assert path.read_bytes() == before


def test_shrink_over_data_and_growth_past_the_format_limit_are_refused_unchanged(tmp_path):
    path = tmp_path / "r.vhdx"
    make(path, 64 * MiB, block=MiB)
    before = path.read_bytes()
    for args in (("4M", "--shrink"), ("65T",)):                 # data in the way; past VHDX's 64 TiB
        res = vd("resize", path, *args)
        assert res.returncode == 1 and res.stderr.startswith("vdisk: error: "), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before


@pytest.mark.parametrize("subtype,new", [("dynamic", 40 * MiB), ("dynamic", 6 * MiB), ("fixed", 24 * MiB),
                                         ("fixed", 7 * MiB)])
def test_resize_cut_at_every_write_leaves_the_old_size_or_the_new(tmp_path, subtype, new):
    from vdisk.ops.resize import resize
    work = tmp_path / "w"
    work.mkdir()
    path = work / "c.vhdx"
    model = make(path, 16 * MiB, subtype, block=MiB)
    keep = min(new, 16 * MiB)
    outcomes = set()

    def judge(cut, power_cut):
        with vdisk.open(path) as d:
            size = d.size
            assert size in (16 * MiB, new), f"cut {cut} (power cut {power_cut}): size {size}"
            assert d.pread(keep, 0) == bytes(model[:keep]), f"cut {cut}: content changed"
        assert qemu_size(path) == size
        qemu_clean(path)
        outcomes.add(size)

    cut_everywhere(work, lambda: resize(str(path), new, shrink=new < 16 * MiB), judge)
    assert outcomes == {16 * MiB, new}


def qemu_io_reads(path, *checks) -> None:
    """qemu-io reads each (offset, length, byte) and finds that byte throughout."""
    cmds = []
    for off, n, byte in checks:
        cmds += ["-c", f"read -P {byte:#x} {off} {n}"]
    res = subprocess.run(["qemu-io", "-f", "vhdx", *cmds, str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout + res.stderr


@pytest.mark.judges("qemu-img", "qemu-io", modules=("pyvhdi",))
def test_growing_past_the_bat_region_moves_the_bat(tmp_path):
    """A 1 MiB BAT region of 1 MiB blocks holds 128 GiB; growing to 200 GiB writes a larger
    region at the end of the file and points both region tables at it."""
    path = tmp_path / "big.vhdx"
    make(path, 16 * MiB, block=MiB)
    res = vd("resize", path, "200G")
    assert res.returncode == 0, res.stderr
    assert qemu_size(path) == 200 << 30
    qemu_clean(path)
    with vdisk.open(path, "r+") as d:                         # blocks past the old room are writable
        d.pwrite(b"c" * 4096, 150 << 30)
        d.pwrite(b"d" * 4096, (200 << 30) - 4096)
    qemu_clean(path)
    qemu_io_reads(path, (0, 8192, 0x61), (5 * MiB + 4096, 8192, 0x62), (150 << 30, 4096, 0x63),
                  ((200 << 30) - 4096, 4096, 0x64), (16 * MiB, MiB, 0), ((129 << 30), MiB, 0))
    import pyvhdi
    f = pyvhdi.file()
    f.open(str(path))
    try:
        assert f.get_media_size() == 200 << 30
        for off, byte in ((0, b"a"), (150 << 30, b"c"), ((200 << 30) - 4096, b"d")):
            f.seek(off)
            assert f.read(4096) == byte * 4096
    finally:
        f.close()
    assert vd("check", path).returncode == 0
    info = json.loads(vd("info", "--json", path).stdout)
    assert info["virtual_size"] == 200 << 30
    assert vd("resize", path, "100G", "--shrink").returncode == 1       # data at 150 GiB is in the way


@pytest.mark.judges("qemu-img", "qemu-io")
def test_a_fixed_vhdx_grows_past_its_bat_region(tmp_path):
    """128 GiB of 1 MiB blocks fill the region (a sparse file: the blocks are holes); 130 GiB
    needs a new region, then 2048 new blocks after it."""
    path = tmp_path / "fixed.vhdx"
    with vdisk.create(path, 128 << 30, format="vhdx", subtype="fixed", block_size=MiB) as d:
        d.pwrite(b"e" * 4096, (128 << 30) - 4096)
    res = vd("resize", path, "130G")
    assert res.returncode == 0, res.stderr
    assert qemu_size(path) == 130 << 30
    qemu_clean(path)
    with vdisk.open(path, "r+") as d:
        assert d.subtype == "fixed"
        d.pwrite(b"f" * 4096, (130 << 30) - 4096)
    qemu_clean(path)
    qemu_io_reads(path, ((128 << 30) - 4096, 4096, 0x65), (128 << 30, MiB, 0), ((130 << 30) - 4096, 4096, 0x66))
    assert vd("check", path).returncode == 0


def test_moving_the_bat_cut_at_every_write_leaves_the_old_size_or_the_new(tmp_path):
    from vdisk.ops.resize import resize
    work = tmp_path / "w"
    work.mkdir()
    path = work / "m.vhdx"
    model = make(path, 16 * MiB, block=MiB)
    new = 129 << 30
    outcomes = set()

    def judge(cut, power_cut):
        with vdisk.open(path) as d:
            size = d.size
            assert size in (16 * MiB, new), f"cut {cut} (power cut {power_cut}): size {size}"
            assert d.pread(16 * MiB, 0) == bytes(model), f"cut {cut}: content changed"
        assert qemu_size(path) == size
        qemu_clean(path)
        outcomes.add(size)

    cut_everywhere(work, lambda: resize(str(path), new), judge)
    assert outcomes == {16 * MiB, new}
