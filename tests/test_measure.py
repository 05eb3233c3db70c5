"""`vdisk measure` predicts the file sizes `vdisk convert` and `vdisk create` then produce, and
agrees with `qemu-img measure` (raw) and `qemu-img create` (fixed vpc) where qemu knows the format."""
from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk.cli import main
from vdisk.ops.convert import convert
from vdisk.ops.measure import measure, stored_blocks

from conftest import FAST_TMP, fixture_image, need

KiB, MiB = 1 << 10, 1 << 20

#: (format, subtype, block size) of the outputs measured; None: the format's default.
OUTPUTS = [("vhd", "dynamic", None), ("vhd", "dynamic", 512 * KiB), ("vhd", "fixed", None),
           ("vdi", "dynamic", None), ("vdi", "dynamic", 256 * KiB), ("vdi", "fixed", None),
           ("raw", "raw", None)]


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def make_source(path, size: int, writes: list[tuple[int, int]], seed: int = 1, fmt: str = "vhd") -> None:
    """A dynamic image with random (never all-zero) data at each (offset, length)."""
    rng = random.Random(seed)
    with vdisk.create(path, size, format=fmt, subtype="dynamic", block_size=64 * KiB) as d:
        for off, n in writes:
            d.pwrite(bytes(rng.randrange(1, 256) for _ in range(min(n, size - off))), off)


def converted_size(src_path, dst_path, fmt, subtype, block_size, *, zero_detect: bool) -> int:
    with vdisk.open(src_path) as src:
        convert(src, dst_path, fmt, subtype, block_size=block_size, zero_detect=zero_detect, durable=False)
    size = os.path.getsize(dst_path)
    os.unlink(dst_path)
    return size


@pytest.mark.parametrize("fmt, subtype, bs", OUTPUTS)
def test_required_is_what_convert_writes(tmp_path, fmt, subtype, bs):
    src = tmp_path / "src.vhd"
    # Odd size (not a whole block), data in the first, a middle and the last (partial) block,
    # and one write straddling two output blocks.
    size = 5 * MiB + 3 * 512
    make_source(src, size, [(0, 100), (2 * MiB - 700, 1500), (size - 512, 512)])
    with vdisk.open(src) as d:
        m = measure(d, format=fmt, subtype=subtype, block_size=bs)
    dst = tmp_path / f"out.{fmt}"
    assert converted_size(src, dst, fmt, subtype, bs, zero_detect=False) == m.required
    assert converted_size(src, dst, fmt, subtype, bs, zero_detect=True) == m.required
    assert m.virtual_size == size and m.format == fmt and m.subtype == subtype


@pytest.mark.parametrize("fmt, subtype, bs", OUTPUTS)
def test_fully_allocated_is_what_convert_writes_of_a_full_disk(tmp_path, fmt, subtype, bs):
    src = tmp_path / "full.vhd"
    size = 3 * MiB + 512
    make_source(src, size, [(0, size)])
    with vdisk.open(src) as d:
        m = measure(d, format=fmt, subtype=subtype, block_size=bs)
    assert converted_size(src, tmp_path / "out", fmt, subtype, bs, zero_detect=True) == m.fully_allocated
    assert m.required == m.fully_allocated


@pytest.mark.parametrize("fmt, subtype, bs", OUTPUTS)
def test_a_new_image_of_size_n_is_what_create_makes(tmp_path, fmt, subtype, bs):
    size = 7 * MiB + 512
    m = measure(size=size, format=fmt, subtype=None if fmt == "raw" else subtype, block_size=bs)
    path = tmp_path / "new"
    vdisk.create(path, size, format=fmt, subtype=subtype if fmt != "raw" else "dynamic", block_size=bs).close()
    assert os.path.getsize(path) == m.required
    assert m.fully_allocated >= m.required


def test_zero_detection_only_ever_shrinks_the_output(tmp_path):
    src = tmp_path / "zeros.vhd"
    with vdisk.create(src, 4 * MiB, format="vhd", subtype="dynamic") as d:
        d.pwrite(b"\1" * 4096, 0)
    with vdisk.open(src, "r+") as d:                 # a stored 2 MiB block that holds only zeros
        d.layers[0].allocate(1, [(0, bytes(d.block_size))])
        d.flush()
    with vdisk.open(src) as d:
        m = measure(d, format="vdi")
    # Output (VDI, 1 MiB) blocks 0-3 all lie in stored source (VHD, 2 MiB) blocks; only block 0
    # holds a non-zero byte, and the zero scan drops the other three.
    assert converted_size(src, tmp_path / "o.vdi", "vdi", None, None, zero_detect=False) == m.required
    assert converted_size(src, tmp_path / "o.vdi", "vdi", None, None, zero_detect=True) == m.required - 3 * MiB
    assert type(m.required) is int


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 6 * MiB - 1), st.integers(1, 300 * KiB)), max_size=6),
       out=st.sampled_from(OUTPUTS), seed=st.integers(0, 1000))
def test_any_write_pattern_any_output(tmp_path_factory, writes, out, seed):
    folder = tmp_path_factory.mktemp("m", numbered=True)
    src = folder / "src.vhd"
    make_source(src, 6 * MiB, writes, seed)
    fmt, subtype, bs = out
    with vdisk.open(src) as d:
        m = measure(d, format=fmt, subtype=subtype, block_size=bs)
    assert converted_size(src, folder / "out", fmt, subtype, bs, zero_detect=False) == m.required


def test_stored_blocks_counts_a_block_shared_by_two_runs_once(tmp_path):
    src = tmp_path / "s.vdi"
    make_source(src, 4 * MiB, [(0, 64 * KiB), (128 * KiB, 64 * KiB), (3 * MiB, 64 * KiB)], fmt="vdi")
    with vdisk.open(src) as d:
        assert stored_blocks(d, 1 * MiB) == 2
        assert stored_blocks(d, 64 * KiB) == 3
        assert stored_blocks(d, 4 * MiB) == 1


@pytest.mark.parametrize("name", ["rdisk_win7dyn.vhd.xz", "rdisk_vhd_dynamic_small_gpt.vhd.xz",
                                  "dfvfs_ext2.vhd", "pyvbox_TestHD_4.0.8.vdi"])
def test_fixtures_convert_to_at_most_the_required_size(tmp_path, name):
    src = fixture_image(name)
    for fmt, subtype in (("vhd", "dynamic"), ("vdi", "dynamic")):
        with vdisk.open(src) as d:
            m = measure(d, format=fmt, subtype=subtype)
        dst = tmp_path / f"out.{fmt}"
        assert converted_size(src, dst, fmt, subtype, None, zero_detect=False) == m.required
        assert converted_size(src, dst, fmt, subtype, None, zero_detect=True) <= m.required


# -- qemu-img as the judge ----------------------------------------------------------------------
def qemu_measure(*args) -> dict:
    out = subprocess.run(["qemu-img", "measure", "--output=json", *map(str, args)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("size", [512, 1 * MiB, 10 * MiB + 512, 127 << 30])
def test_raw_of_size_n_agrees_with_qemu_img_measure(capsys, size):
    need("qemu-img")
    judge = qemu_measure("--size", size, "-O", "raw")
    status, out, _ = run(capsys, "measure", "--size", size, "-O", "raw", "--output=json")
    ours = json.loads(out)
    assert status == 0
    assert (ours["required"], ours["fully-allocated"]) == (judge["required"], judge["fully-allocated"])


def test_raw_of_an_image_agrees_with_qemu_img_measure(capsys, tmp_path):
    need("qemu-img")
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(9 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    judge = qemu_measure("-f", "raw", "-O", "raw", src)
    status, out, _ = run(capsys, "measure", src, "--json")
    assert status == 0
    ours = json.loads(out)
    assert (ours["required"], ours["fully-allocated"]) == (judge["required"], judge["fully-allocated"])


@pytest.mark.parametrize("size", [512, 10 * MiB, 10 * MiB + 512, 3 << 30])
def test_fixed_vpc_agrees_with_the_file_qemu_img_creates(capsys, size):
    need("qemu-img")
    folder = FAST_TMP or "/tmp"
    path = os.path.join(folder, f"vdisk-measure-{os.getpid()}.vhd")
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
                        path, str(size)], check=True)
        judge = os.path.getsize(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    status, out, _ = run(capsys, "measure", "--size", size, "-O", "vpc", "-o", "subformat=fixed", "--json")
    assert status == 0
    assert json.loads(out)["required"] == json.loads(out)["fully-allocated"] == judge


# -- the command line ---------------------------------------------------------------------------
def test_human_output_is_qemu_img_measures_two_lines(capsys):
    status, out, _ = run(capsys, "measure", "--size", "10G", "-O", "vdi")
    assert status == 0
    assert out.splitlines() == ["required size: 2097152", f"fully allocated size: {2 * MiB + 10 * 1024 * MiB}"]


def test_target_azure_rounds_to_whole_mib_and_is_fixed(capsys):
    status, out, _ = run(capsys, "measure", "--size", 3 * MiB + 512, "--target", "azure", "--json")
    facts = json.loads(out)
    assert status == 0 and (facts["format"], facts["subtype"]) == ("vhd", "fixed")
    assert facts["virtual_size"] == 4 * MiB and facts["required"] == 4 * MiB + 512


@pytest.mark.parametrize("argv, fragment", [
    ([], "give an IMAGE or --size"),
    (["--size", "1G", "-O", "vhd", "--subtype", "fixed", "--block-size", "1M"], "--block-size applies"),
    (["--size", "3T", "-O", "vhd"], "2040 GiB"),
    (["--size", "1G", "-O", "vdi", "--block-size", "3000"], "power of two"),
    (["/nonexistent.vhd"], "/nonexistent.vhd"),
])
def test_bad_requests_are_one_line_errors(capsys, argv, fragment):
    status, out, err = run(capsys, "measure", *argv)
    assert status == 1 and out == ""
    assert err.startswith("vdisk: error: ") and len(err.strip().splitlines()) == 1 and fragment in err, err
