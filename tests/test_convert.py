"""`convert`: every source kind to every destination kind gives the same content, sparse.

Sources are small images of odd sizes holding unaligned random data, allocated all-zero blocks,
holes and (for chains) child writes that overwrite and zero out parent data. A bytearray model
holds what every source must read as; qemu-img judges the outputs it can read.
"""
from __future__ import annotations

import os
import random
import subprocess

import pytest

import vdisk
from vdisk.ops.convert import ConvertResult, convert, nonzero_runs, plan_output, work_ranges

MiB = 1 << 20
SIZE = 5 * MiB + 3 * 4096 + 1024            # not a multiple of any block size
ZERO_RANGE = (2 * MiB, 3 * MiB)              # allocated in the source, all zeros

SOURCES = ["raw", "vhd-fixed", "vhd-dynamic", "vhd-chain", "vdi-fixed", "vdi-dynamic", "vdi-chain"]
DESTS = ["raw", "vhd-fixed", "vhd-dynamic", "vdi-fixed", "vdi-dynamic"]
QEMU_FMT = {"raw": "raw", "vhd": "vpc", "vdi": "vdi"}


def _write(d, model: bytearray, offset: int, data: bytes) -> None:
    d.pwrite(data, offset)
    model[offset:offset + len(data)] = data


def store_zeros(d, start: int, end: int) -> None:
    """Make [start, end) *stored* zeros: allocated blocks / written bytes, not holes."""
    top = d.layers[0]
    bs = d.block_size
    if d.format == "raw" or d.subtype == "fixed":
        for b in range(start // bs, -(-end // bs)):            # fixed: every block has a place
            s, e = max(start, b * bs), min(end, (b + 1) * bs)
            at = int(top.block_map[b]) if top.block_map[b] >= 0 else getattr(top, "data_start", 0) + b * bs
            top.file.pwrite(bytes(e - s), at + s - b * bs)
        return
    for b in range(start // bs, -(-end // bs)):
        assert top.block_map[b] < 0, "store_zeros needs blocks nobody wrote yet"
        top.allocate(b, [(0, bytes(min(bs, d.size - b * bs)))])


def _fill_base(d, model: bytearray, rnd: random.Random) -> None:
    _write(d, model, 0, rnd.randbytes(100_000))
    _write(d, model, MiB + 1000, rnd.randbytes(300_000))
    store_zeros(d, *ZERO_RANGE)
    _write(d, model, SIZE - 5000, rnd.randbytes(5000))


def _fill_child(d, model: bytearray, rnd: random.Random) -> None:
    _write(d, model, 50_000, rnd.randbytes(100_000))            # overlaps parent data, unaligned
    _write(d, model, MiB + 100_000, bytes(100_000))             # zeros hiding parent data
    _write(d, model, 4 * MiB, rnd.randbytes(4096))


def build_source(kind: str, folder, seed: int = 7) -> tuple[str, bytearray]:
    """Create a source image of *kind* (see SOURCES) in *folder*; returns (path, expected content)."""
    rnd = random.Random(f"{kind}-{seed}")
    model = bytearray(SIZE)
    fmt, _, sub = kind.partition("-")
    folder = str(folder)
    if fmt == "raw":
        path = os.path.join(folder, "src.raw")
        with vdisk.create(path, SIZE, format="raw") as d:
            _fill_base(d, model, rnd)
        return path, model
    if sub == "chain":
        base = os.path.join(folder, f"base.{fmt}")
        with vdisk.create(base, SIZE, format=fmt, subtype="dynamic") as d:
            _fill_base(d, model, rnd)
        path = os.path.join(folder, f"child.{fmt}")
        with vdisk.create(path, format=fmt, parent=base) as d:
            _fill_child(d, model, rnd)
        return path, model
    path = os.path.join(folder, f"src-{sub}.{fmt}")
    with vdisk.create(path, SIZE, format=fmt, subtype=sub) as d:
        _fill_base(d, model, rnd)
    return path, model


def read_all(path: str) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def _raw_file(folder, model: bytes) -> str:
    path = os.path.join(str(folder), "expected.raw")
    with open(path, "wb") as f:
        f.write(model)
    return path


@pytest.mark.parametrize("dst_kind", DESTS)
@pytest.mark.parametrize("src_kind", SOURCES)
@pytest.mark.judges("qemu-img")
def test_convert_matrix_preserves_content(tmp_path, src_kind, dst_kind):
    src_path, model = build_source(src_kind, tmp_path)
    fmt, _, sub = dst_kind.partition("-")
    dst = str(tmp_path / f"out.{fmt}")
    with vdisk.open(src_path) as src:
        result = convert(src, dst, fmt, sub or None)
    assert isinstance(result, ConvertResult) and result.format == fmt
    got = read_all(dst)
    assert got[:SIZE] == model
    assert not any(got[SIZE:])                       # VHD/VDI round the size up to a sector
    assert len(got) == (SIZE if fmt == "raw" else -(-SIZE // 512) * 512)
    with vdisk.open(dst) as out:
        assert (out.format, out.subtype) == (fmt, sub or "raw")
        if dst_kind == "vdi-fixed":              # every block is allocated: look for a file hole
            at = out.layers[0].offset_data + ZERO_RANGE[0]
            with open(dst, "rb") as f:
                assert os.lseek(f.fileno(), at, os.SEEK_DATA) >= at + ZERO_RANGE[1] - ZERO_RANGE[0]
        else:
            stored = [e for e in out.extents() if e.kind == vdisk.ExtentKind.DATA]
            assert not any(e.offset <= ZERO_RANGE[0] and ZERO_RANGE[1] <= e.offset + e.length
                           for e in stored), "the source's all-zero allocated blocks must not be stored"
    expected = _raw_file(tmp_path, model)
    r = subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[fmt], "-F", "raw", dst, expected],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    if fmt == "vdi":
        r = subprocess.run(["qemu-img", "check", "-f", "vdi", dst], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dst_kind", ["raw", "vhd-dynamic", "vdi-dynamic", "vhd-fixed", "vdi-fixed"])
def test_allocated_zero_blocks_are_not_stored(tmp_path, dst_kind):
    src = str(tmp_path / "zeros.vhd")
    with vdisk.create(src, 8 * MiB, format="vhd", subtype="dynamic") as d:
        store_zeros(d, 0, 8 * MiB)                               # every block allocated, all zeros
        d.pwrite(b"\x01" * 512, 6 * MiB)                         # except one sector
    fmt, _, sub = dst_kind.partition("-")
    dst = str(tmp_path / f"out.{fmt}")
    with vdisk.open(src) as s:
        assert sum(e.length for e in s.extents() if e.kind == vdisk.ExtentKind.DATA) == 8 * MiB
        result = convert(s, dst, fmt, sub or None)
    assert result.bytes_read == 8 * MiB
    with vdisk.open(dst) as out:
        if dst_kind != "vdi-fixed":                              # (a fixed VDI maps every block)
            stored = sum(e.length for e in out.extents() if e.kind == vdisk.ExtentKind.DATA)
            assert 512 <= stored <= 2 * MiB                      # only the block holding the sector
        assert out.pread(512, 6 * MiB) == b"\x01" * 512
    assert os.stat(dst).st_blocks * 512 <= 4 * MiB               # and the file itself is sparse


def test_no_zero_detect_stores_allocated_zero_blocks(tmp_path):
    src = str(tmp_path / "zeros.vdi")
    with vdisk.create(src, 4 * MiB, format="vdi", subtype="dynamic") as d:
        store_zeros(d, 0, 4 * MiB)
    dst = str(tmp_path / "out.vhd")
    with vdisk.open(src) as s:
        convert(s, dst, "vhd", "dynamic", zero_detect=False)
    with vdisk.open(dst) as out:
        assert all(e.kind == vdisk.ExtentKind.DATA for e in out.extents())
        assert not any(out.pread(out.size, 0))


def test_raw_source_of_odd_byte_size_becomes_whole_sectors(tmp_path):
    src = tmp_path / "odd.raw"
    data = random.Random(1).randbytes(1_000_001)
    src.write_bytes(data)
    with vdisk.open(str(src)) as s:
        convert(s, str(tmp_path / "o.vhd"), "vhd", "dynamic")
        convert(s, str(tmp_path / "o.raw"), "raw")
    got = read_all(str(tmp_path / "o.vhd"))
    assert len(got) == 1_000_448 and got[:len(data)] == data and not any(got[len(data):])
    assert (tmp_path / "o.raw").read_bytes() == data


def test_output_format_defaults_to_the_destination_name(tmp_path):
    src, model = build_source("vdi-dynamic", tmp_path)
    with vdisk.open(src) as s:
        assert convert(s, str(tmp_path / "a.vhd")).format == "vhd"
        assert convert(s, str(tmp_path / "a.vdi")).format == "vdi"
        assert convert(s, str(tmp_path / "a.img")).format == "raw"
    assert read_all(str(tmp_path / "a.vhd"))[:SIZE] == model


@pytest.mark.judges("qemu-img")
def test_target_azure_is_a_fixed_vhd_of_whole_mebibytes(tmp_path):
    src, model = build_source("vdi-dynamic", tmp_path)
    dst = str(tmp_path / "azure.vhd")
    with vdisk.open(src) as s:
        convert(s, dst, target="azure")
    with vdisk.open(dst) as d:
        assert (d.format, d.subtype, d.size) == ("vhd", "fixed", 6 * MiB)
        assert d.pread(SIZE, 0) == model
    assert os.path.getsize(dst) == 6 * MiB + 512                  # data + footer, nothing else
    out = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", dst], capture_output=True,
                         text=True, check=True).stdout
    assert '"virtual-size": 6291456' in out


@pytest.mark.judges("qemu-img")
def test_target_hyper_v_keeps_an_exact_size_that_qemu_reads(tmp_path):
    src, model = build_source("raw", tmp_path)
    dst = str(tmp_path / "hv.vhd")
    with vdisk.open(src) as s:
        convert(s, dst, target="hyper-v")
    with vdisk.open(dst) as d:
        assert (d.format, d.subtype, d.size) == ("vhd", "dynamic", SIZE)
        assert d.layers[0].creator == "win "                    # qemu reads current_size for it
    out = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", dst], capture_output=True,
                         text=True, check=True).stdout
    assert f'"virtual-size": {SIZE}' in out


def test_target_virtualbox_is_a_dynamic_vdi(tmp_path):
    src, _ = build_source("vhd-chain", tmp_path)
    with vdisk.open(src) as s:
        r = convert(s, str(tmp_path / "vb.vdi"), target="virtualbox")
    assert (r.format, r.subtype) == ("vdi", "dynamic")


def test_target_conflicting_with_explicit_format_is_refused():
    with pytest.raises(ValueError, match="azure"):
        plan_output(MiB, "vdi", None, "azure", "x.vdi")
    with pytest.raises(ValueError, match="hyper-v"):
        plan_output(MiB, None, "fixed", "hyper-v", "x.vhd")


def test_existing_destination_is_refused_unless_forced(tmp_path):
    src, model = build_source("vhd-dynamic", tmp_path)
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"precious")
    with vdisk.open(src) as s:
        with pytest.raises(vdisk.VDiskError, match="already exists"):
            convert(s, str(dst), "raw")
        assert dst.read_bytes() == b"precious"
        convert(s, str(dst), "raw", force=True)
    assert dst.read_bytes() == bytes(model)


def test_failure_midway_leaves_neither_destination_nor_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr("vdisk.ops.convert.CHUNK", 1 << 20)         # several reads for a small image
    src, _ = build_source("vhd-dynamic", tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    class Failing:
        """A Disk whose reads fail after the first one (an I/O error in the middle of a copy)."""
        def __init__(self, disk):
            self._d, self.calls = disk, 0
        def __getattr__(self, name):
            return getattr(self._d, name)
        def readinto(self, buf, off):
            self.calls += 1
            if self.calls > 1:
                raise vdisk.VDiskError("simulated read error")
            return self._d.readinto(buf, off)

    with vdisk.open(src) as s:
        with pytest.raises(vdisk.VDiskError, match="simulated"):
            convert(Failing(s), str(out_dir / "x.vdi"), "vdi")
    assert os.listdir(out_dir) == []


def test_block_size_of_the_output_can_be_chosen(tmp_path):
    src, model = build_source("raw", tmp_path)
    dst = str(tmp_path / "bs.vhd")
    with vdisk.open(src) as s:
        convert(s, dst, "vhd", "dynamic", block_size=512 * 1024)
    with vdisk.open(dst) as d:
        assert d.block_size == 512 * 1024
        assert d.pread(SIZE, 0) == model
    with vdisk.open(src) as s, pytest.raises(ValueError, match="block-size"):
        convert(s, str(tmp_path / "x.raw"), "raw", block_size=4096)


def test_progress_reports_every_byte_read(tmp_path):
    src, _ = build_source("vdi-chain", tmp_path)
    calls = []
    with vdisk.open(src) as s:
        r = convert(s, str(tmp_path / "p.vhd"), progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == r.bytes_read > 0
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


# -- the pieces ---------------------------------------------------------------------------------
def test_nonzero_runs_finds_granules_holding_any_non_zero_byte():
    g = 4096
    buf = bytearray(8 * g)
    buf[g + 4095] = 1                       # last byte of granule 1
    buf[3 * g] = 1                          # first byte of granule 3
    buf[4 * g + 100] = 1                    # granule 4: joins granule 3's run
    assert nonzero_runs(buf, 8 * g, g) == [(g, 2 * g), (3 * g, 5 * g)]
    assert nonzero_runs(buf, 6 * g - 10, g) == [(g, 2 * g), (3 * g, 5 * g)]
    assert nonzero_runs(bytearray(8 * g), 8 * g, g) == []
    full = bytearray(b"\xff" * 8 * g)
    assert nonzero_runs(full, 8 * g - 1, g) == [(0, 8 * g - 1)]


def test_work_ranges_cover_only_stored_data_widened_to_granules(tmp_path):
    path = str(tmp_path / "w.vhd")
    with vdisk.create(path, 16 * MiB, format="vhd", subtype="dynamic") as d:
        d.pwrite(b"x", 5 * MiB + 3)
        d.pwrite(b"y", 15 * MiB)
    with vdisk.open(path) as d:
        assert work_ranges(d, 2 * MiB) == [(4 * MiB, 6 * MiB), (14 * MiB, 16 * MiB)]
        assert work_ranges(d, 8 * MiB) == [(0, 16 * MiB)]


@pytest.mark.parametrize("dst_kind", ["raw", "vhd-dynamic", "vdi-dynamic"])
@pytest.mark.judges("qemu-img")
def test_convert_without_syncs_gives_the_same_image(tmp_path, dst_kind):
    src, model = build_source("vhd-chain", tmp_path)
    fmt, _, sub = dst_kind.partition("-")
    dst = str(tmp_path / f"fast.{fmt}")
    with vdisk.open(src) as s:
        convert(s, dst, fmt, sub or None, durable=False)
    assert read_all(dst)[:SIZE] == model
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".vdisk-tmp")]
    if fmt == "vdi":
        r = subprocess.run(["qemu-img", "check", "-f", "vdi", dst], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("zero_detect", [True, False])
@pytest.mark.judges("qemu-img")
def test_output_blocks_bigger_than_a_chunk_are_filled_by_several_chunks(tmp_path, monkeypatch, zero_detect):
    monkeypatch.setattr("vdisk.ops.convert.CHUNK", 256 << 10)          # 8 chunks per 2 MiB block
    src, model = build_source("vdi-chain", tmp_path)
    dst = str(tmp_path / "big-blocks.vhd")
    with vdisk.open(src) as s:
        convert(s, dst, "vhd", "dynamic", zero_detect=zero_detect)
    assert read_all(dst)[:SIZE] == model
    r = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", dst, _raw_file(tmp_path, model)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.judges("qemu-img")
@pytest.mark.parametrize("fmt,block", [("vhd", 32 * MiB), ("vhdx", 32 * MiB), ("vdi", 8 * MiB)])
def test_zeros_inside_a_big_output_block_are_neither_written_nor_stored(tmp_path, fmt, block):
    """A block gets storage at its first non-zero byte; its zero 4 KiB granules stay holes (the
    unwritten parts of a new block read as zeros), however big the block is."""
    src = str(tmp_path / "src.vhd")
    rnd = random.Random(3)
    with vdisk.create(src, 48 * MiB, format="vhd", subtype="dynamic") as d:
        store_zeros(d, 0, 48 * MiB)                              # every source block stored
        for off in range(0, 48 * MiB, 3 * MiB):                  # 64 KiB of data every 3 MiB
            d.pwrite(rnd.randbytes(64 << 10), off + 4096)
    dst = str(tmp_path / f"out.{fmt}")
    with vdisk.open(src) as s:
        convert(s, dst, fmt, "dynamic", block_size=block)
    if fmt == "vdi":                     # qemu reads VDI of 1 MiB blocks only: vdisk reads it back
        judged = str(tmp_path / "back.raw")
        with vdisk.open(dst) as out:
            convert(out, judged, "raw")
        dst_fmt = "raw"
    else:
        judged, dst_fmt = dst, {"vhd": "vpc"}.get(fmt, fmt)
    r = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", dst_fmt, src, judged],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    data = 16 * (64 << 10)
    assert os.stat(dst).st_blocks * 512 <= data + 8 * MiB        # the data, and the format's own tables
