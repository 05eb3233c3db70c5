"""`compare`: content equality across formats and chains, first differing byte, qemu-img's rules."""
from __future__ import annotations

import random
import subprocess

import pytest

import vdisk
from conftest import need
from test_convert import SIZE, SOURCES, build_source
from vdisk.ops.compare import compare
from vdisk.ops.convert import convert

MiB = 1 << 20


@pytest.mark.parametrize("kind", SOURCES)
def test_an_image_equals_its_conversion_to_every_other_format(tmp_path, kind):
    src, _ = build_source(kind, tmp_path)
    with vdisk.open(src) as s:
        for fmt, sub in (("raw", None), ("vhd", "fixed"), ("vdi", "dynamic")):
            dst = str(tmp_path / f"copy-{fmt}.{fmt}")
            convert(s, dst, fmt, sub)
            with vdisk.open(dst) as d:
                r = compare(s, d)
                assert r.identical and r.offset is None, r.reason


@pytest.mark.parametrize("where", [0, 511, 1 << 20, 2 * MiB + 17, SIZE - 1])
def test_the_first_differing_byte_is_reported(tmp_path, where):
    src, model = build_source("vhd-chain", tmp_path)
    other = str(tmp_path / "other.vdi")
    with vdisk.open(src) as s:
        convert(s, other)
    with vdisk.open(other, "r+") as d:
        d.pwrite(bytes([model[where] ^ 0x5A]), where)
        d.pwrite(bytes([model[SIZE - 1] ^ 1]), SIZE - 1)              # a later difference too
    with vdisk.open(src) as a, vdisk.open(other) as b:
        r = compare(a, b)
    assert not r.identical and r.offset == where
    assert r.as_dict()["offset"] == where and r.as_dict()["identical"] is False


def test_a_difference_hidden_by_a_child_is_not_reported(tmp_path):
    """The chain's content, not its files, is compared: a child zeroing parent data counts as zeros."""
    base = str(tmp_path / "base.vhd")
    with vdisk.create(base, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\xee" * 4096, MiB)
    top = str(tmp_path / "top.vhd")
    with vdisk.create(top, format="vhd", parent=base) as d:
        d.pwrite(bytes(4096), MiB)
    empty = str(tmp_path / "empty.raw")
    vdisk.create(empty, 4 * MiB, format="raw").close()
    with vdisk.open(top) as a, vdisk.open(empty) as b:
        assert compare(a, b).identical
    with vdisk.open(base) as a, vdisk.open(empty) as b:
        assert compare(a, b).offset == MiB


def test_unallocated_in_both_is_not_read(tmp_path):
    a_path, b_path = str(tmp_path / "a.vhd"), str(tmp_path / "b.vdi")
    vdisk.create(a_path, 64 << 30, format="vhd").close()
    vdisk.create(b_path, 64 << 30, format="vdi").close()
    with vdisk.open(a_path) as a, vdisk.open(b_path) as b:
        r = compare(a, b)
    assert r.identical and r.bytes_compared == 0


def test_sizes_differ_identical_when_the_rest_is_zero_unless_strict(tmp_path):
    small, big = str(tmp_path / "s.raw"), str(tmp_path / "b.vhd")
    data = random.Random(5).randbytes(MiB)
    with vdisk.create(small, MiB, format="raw") as d:
        d.pwrite(data, 0)
    with vdisk.create(big, 3 * MiB, format="vhd") as d:
        d.pwrite(data, 0)
        d.pwrite(bytes(4096), 2 * MiB)                                # stored zeros past the end
    with vdisk.open(small) as a, vdisk.open(big) as b:
        r = compare(a, b)
        assert r.identical and r.as_dict()["size_mismatch"]
        assert not compare(a, b, strict=True).identical
    with vdisk.open(big, "r+") as d:
        d.pwrite(b"x", 2 * MiB + 100)
    with vdisk.open(small) as a, vdisk.open(big) as b:
        r = compare(b, a)
    assert not r.identical and r.offset == 2 * MiB + 100


def test_qemu_img_compare_agrees(tmp_path):
    need("qemu-img")
    src, _ = build_source("vhd-dynamic", tmp_path)
    with vdisk.open(src) as s:
        convert(s, str(tmp_path / "c.vdi"))
    with vdisk.open(str(tmp_path / "c.vdi"), "r+") as d:
        d.pwrite(b"\x01", 3 * MiB + 5)
    with vdisk.open(src) as a, vdisk.open(str(tmp_path / "c.vdi")) as b:
        ours = compare(a, b)
    q = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "vdi", src, str(tmp_path / "c.vdi")],
                       capture_output=True, text=True)
    assert q.returncode == 1 and not ours.identical
    # qemu names the first differing sector; we name the byte inside it.
    assert f"offset {ours.offset // 512 * 512}" in q.stdout
