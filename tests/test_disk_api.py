"""The Disk API as the rest of vdisk (and a VMM) relies on it."""
from __future__ import annotations

import io
import os
import shutil
import threading

import numpy as np
import pytest

import vdisk
from vdisk import ExtentKind

MiB = 1 << 20


@pytest.mark.parametrize("fmt,subtype", [("raw", "raw"), ("vhd", "fixed"), ("vhd", "dynamic"),
                                         ("vdi", "fixed"), ("vdi", "dynamic")])
def test_identity_attributes(tmp_path, fmt, subtype):
    with vdisk.create(tmp_path / f"x.{fmt}", 3 * MiB, format=fmt, subtype=subtype) as d:
        assert (d.format, d.subtype, d.size) == (fmt, subtype, 3 * MiB)
        assert d.read_only is False
        assert (d.uuid is None) == (fmt == "raw")
        assert d.chain[0].path == str(tmp_path / f"x.{fmt}")
    with vdisk.open(tmp_path / f"x.{fmt}") as d:
        assert d.read_only and d.subtype == subtype and d.size == 3 * MiB


def test_as_file_is_a_seekable_raw_io(tmp_path):
    with vdisk.create(tmp_path / "a.vdi", 2 * MiB, format="vdi") as d:
        f = d.as_file()
        assert isinstance(f, io.RawIOBase)
        f.seek(MiB - 3)
        f.write(b"abcdef")
        f.seek(-6, io.SEEK_CUR)
        assert f.read(6) == b"abcdef"
        f.seek(0, io.SEEK_END)
        assert f.read(10) == b""
        buffered = io.BufferedReader(d.as_file())
        buffered.seek(MiB - 3)
        assert buffered.read(3) == b"abc"


def test_extents_name_the_layer_and_kind(tmp_path):
    base = tmp_path / "b.vdi"
    with vdisk.create(base, 4 * MiB, format="vdi") as d:
        d.pwrite(b"\1" * MiB, 0)
    with vdisk.create(tmp_path / "c.vdi", format="vdi", parent=base) as c:
        c.pwrite(b"\2" * 10, MiB)
        c.write_zeroes(0, MiB)
        ext = c.extents()
    assert ext == [vdisk.Extent(0, MiB, ExtentKind.ZERO, 0), vdisk.Extent(MiB, MiB, ExtentKind.DATA, 0),
                   vdisk.Extent(2 * MiB, 2 * MiB, ExtentKind.UNALLOCATED, None)]


def test_discard_releases_dynamic_vhd_blocks(tmp_path):
    with vdisk.create(tmp_path / "d.vhd", 8 * MiB, format="vhd") as d:
        d.pwrite(os.urandom(4 * MiB), 0)
        d.discard(0, 2 * MiB)
        d.discard(2 * MiB + 512, 1000)
        assert d.pread(2 * MiB, 0) == bytes(2 * MiB)
        assert d.pread(1000, 2 * MiB + 512) == bytes(1000)
        assert d.extents(0, 2 * MiB)[0].kind == ExtentKind.UNALLOCATED


def test_discard_of_the_last_vdi_slot_shrinks_the_file(tmp_path):
    path = tmp_path / "d.vdi"
    with vdisk.create(path, 8 * MiB, format="vdi") as d:
        d.pwrite(b"\7" * (2 * MiB), 0)
        before = os.path.getsize(path)
        d.discard(MiB, MiB)
        d.flush()
        assert os.path.getsize(path) == before - MiB
        assert d.pread(MiB, MiB) == bytes(MiB)
    with vdisk.open(path) as d:
        assert d.pread(MiB, 0) == b"\7" * MiB
        assert not d.warnings


def test_raw_discard_punches_holes(tmp_path):
    path = tmp_path / "r.raw"
    with vdisk.create(path, 8 * MiB, format="raw") as d:
        d.pwrite(os.urandom(8 * MiB), 0)
        d.discard(MiB, 4 * MiB)
        assert d.pread(4 * MiB, MiB) == bytes(4 * MiB)
    assert os.stat(path).st_blocks * 512 <= 5 * MiB


def test_vdi_parent_found_through_a_virtualbox_registry(tmp_path):
    (tmp_path / "disks").mkdir()
    (tmp_path / "snaps").mkdir()
    base = tmp_path / "disks" / "base.vdi"
    with vdisk.create(base, 2 * MiB, format="vdi") as d:
        d.pwrite(b"B" * 512, 0)
        base_uuid = d.uuid
    child = tmp_path / "snaps" / "{child}.vdi"
    vdisk.create(child, format="vdi", parent=base).close()
    with pytest.raises(vdisk.ParentError):
        vdisk.open(child)
    reg = tmp_path / "VirtualBox.xml"
    reg.write_text(f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/"><Global><MediaRegistry><HardDisks>
<HardDisk uuid="{{{base_uuid}}}" location="disks/base.vdi" format="VDI" type="Normal"/>
</HardDisks></MediaRegistry></Global></VirtualBox>""")
    with vdisk.open(child, vbox_registry=str(reg)) as d:
        assert d.pread(1, 0) == b"B"
        assert "registry" in d.chain[1].found_by
    with vdisk.open(child, parent_search=[str(tmp_path / "disks")]) as d:
        assert d.pread(1, 0) == b"B"


def test_vhd_parent_found_by_locator_after_moving_the_pair(tmp_path):
    base = tmp_path / "a" / "base.vhd"
    base.parent.mkdir()
    with vdisk.create(base, 2 * MiB, format="vhd") as d:
        d.pwrite(b"P" * 512, 0)
    vdisk.create(tmp_path / "a" / "child.vhd", format="vhd", parent=base).close()
    shutil.move(tmp_path / "a", tmp_path / "moved")
    with vdisk.open(tmp_path / "moved" / "child.vhd") as d:
        assert d.pread(1, 0) == b"P"
        assert d.chain[1].found_by.startswith("relative locator")


def test_vhd_parent_found_in_a_search_folder(tmp_path):
    base = tmp_path / "base.vhd"
    vdisk.create(base, 2 * MiB, format="vhd").close()
    vdisk.create(tmp_path / "child.vhd", format="vhd", parent=base).close()
    (tmp_path / "lib").mkdir()
    (tmp_path / "kids").mkdir()
    shutil.move(base, tmp_path / "lib" / "base.vhd")
    shutil.move(tmp_path / "child.vhd", tmp_path / "kids" / "child.vhd")
    with vdisk.open(tmp_path / "kids" / "child.vhd", parent_search=[str(tmp_path / "lib")]) as d:
        assert d.chain[1].found_by == f"search folder {tmp_path / 'lib'}"


def test_concurrent_readers_and_writers_agree_with_a_model(tmp_path):
    size = 16 * MiB
    model = bytearray(size)
    with vdisk.create(tmp_path / "t.vhd", size, format="vhd") as d:
        def writer(k: int):
            rng = np.random.default_rng(k)
            for _ in range(60):
                # each thread owns the 64 KiB slots congruent to k mod 4
                slot = int(rng.integers(0, size // (64 << 10) // 4)) * 4 + k
                data = rng.integers(0, 256, 64 << 10, dtype=np.uint8).tobytes()
                d.pwrite(data, slot * (64 << 10))
                model[slot * (64 << 10):(slot + 1) * (64 << 10)] = data
                d.pread(64 << 10, int(rng.integers(0, size - (64 << 10))))

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert d.pread(size, 0) == bytes(model)
    with vdisk.open(tmp_path / "t.vhd") as d:
        assert d.pread(size, 0) == bytes(model)


def test_vhd_sizes_agree_with_every_reader(tmp_path):
    """Exact sizes that are not CHS products are labelled so that qemu reads current_size."""
    with vdisk.create(tmp_path / "e.vhd", 5 * MiB + 512, format="vhd") as d:
        assert d.size == 5 * MiB + 512
        assert d.layers[0].creator == "win "
    with vdisk.create(tmp_path / "c.vhd", 5 * MiB + 512, format="vhd", size_policy="chs") as d:
        assert d.size >= 5 * MiB + 512
        c, h, s = d.geometry
        assert c * h * s * 512 == d.size


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        vdisk.open(tmp_path / "x", mode="a")
    with pytest.raises(ValueError):
        vdisk.create(tmp_path / "x.vhd", 0, format="vhd")
    with pytest.raises(ValueError):
        vdisk.create(tmp_path / "x.vhd", 1000, format="vhd")      # not a multiple of 512
    assert not (tmp_path / "x.vhd").exists()
    with pytest.raises(ValueError):
        vdisk.create(tmp_path / "x.qcow2", MiB, format="qcow2")


def test_a_block_allocated_after_discarding_the_last_vdi_slot_survives_flush(tmp_path):
    path = tmp_path / "d.vdi"
    with vdisk.create(path, 4 * MiB, format="vdi") as d:
        d.pwrite(b"\1" * 4096, 0)
        d.discard(0, MiB)
        d.pwrite(b"\2" * 4096, 0)
    with vdisk.open(path) as d:
        assert d.pread(4096, 0) == b"\2" * 4096


def test_a_differencing_image_takes_its_parents_format_by_default(tmp_path):
    vdisk.create(tmp_path / "b.vdi", MiB, format="vdi").close()
    with vdisk.create(tmp_path / "c.vdi", parent=tmp_path / "b.vdi") as c:
        assert (c.format, c.subtype) == ("vdi", "differencing")
