"""Snapshot trees: naming, refusals, the base-image cases, and interruptions at the I/O seam."""
from __future__ import annotations

import json
import os

import pytest

import vdisk
import vdisk.io
from vdisk import snapshot
from vdisk.ops.check import check
from vdisk.shadow import open_shadowed

MiB = 1 << 20

@pytest.fixture
def tmp_path(tmpfs_path):
    """These tests fsync a lot: run them on tmpfs when there is one."""
    return tmpfs_path


class Crash(Exception):
    pass


def make(tmp_path, fmt: str, fill: bytes = b"\x01") -> str:
    path = str(tmp_path / f"disk.{fmt}")
    with vdisk.create(path, 4 * MiB, format=fmt) as d:
        d.pwrite(fill * MiB, 0)
    return path


def write(path: str, data: bytes, offset: int) -> None:
    with vdisk.open(path, "r+") as d:
        d.pwrite(data, offset)


def read(path: str) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_image_keeps_naming_the_current_state_for_a_plain_open(tmp_path, fmt):
    img = make(tmp_path, fmt)
    before = read(img)
    node = snapshot.take(img, name="clean")
    with vdisk.open(img) as d:                              # no parent_search given
        assert d.subtype == "differencing"
        assert d.chain[1].path.endswith(os.path.join(os.path.basename(img) + ".snapshots", node.file))
    write(img, b"\x02" * 4096, 0)
    assert read(img)[:4096] == b"\x02" * 4096
    snapshot.revert(img, "clean", force=True)
    assert read(img) == before


def test_the_tree_file_is_documented_json(tmp_path):
    img = make(tmp_path, "vhd")
    a = snapshot.take(img, name="a", description="first")
    with open(os.path.join(snapshot.snapshot_dir(img), snapshot.TREE)) as f:
        tree = json.load(f)
    assert tree["format"] == "vdisk-snapshot-tree" and tree["version"] == 1
    assert tree["image"] == "disk.vhd" and tree["current"] == a.id and tree["pending"] is None
    assert tree["snapshots"] == [{"id": a.id, "name": "a", "created": a.created, "file": f"{a.id}.vhd",
                                  "parent": None, "description": "first"}]


def test_refusals_are_clear_errors(tmp_path):
    raw = str(tmp_path / "disk.raw")
    vdisk.create(raw, MiB, format="raw").close()
    with pytest.raises(vdisk.UnsupportedError, match="raw"):
        snapshot.take(raw)
    img = make(tmp_path, "vhd")
    snapshot.take(img, name="a")
    with pytest.raises(vdisk.VDiskError, match="already a snapshot named"):
        snapshot.take(img, name="a")
    with pytest.raises(vdisk.VDiskError, match="no snapshot named"):
        snapshot.revert(img, "nope")
    write(img, b"\x05", 0)
    with pytest.raises(vdisk.VDiskError, match="--force"):
        snapshot.revert(img, "a")
    with open_shadowed(img, "r+") as d:
        d.create_shadow()
        with pytest.raises(vdisk.LockError):
            snapshot.take(img, name="b")                     # the image is open read-write
    with pytest.raises(vdisk.UnsupportedError, match="shadow copies"):
        snapshot.take(img, name="b")


def test_a_snapshot_with_two_dependents_cannot_be_deleted(tmp_path):
    img = make(tmp_path, "vdi")
    snapshot.take(img, name="a")
    snapshot.take(img, name="b")
    snapshot.revert(img, "a")                                # a now has b and the current state
    with pytest.raises(vdisk.UnsupportedError, match="2 dependents"):
        snapshot.delete(img, "a")


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_deleting_the_only_snapshot_makes_image_a_base_image_again(tmp_path, fmt):
    img = make(tmp_path, fmt)
    snapshot.take(img, name="a")
    write(img, b"\x07" * 4096, 2 * MiB)
    expect = read(img)
    snapshot.delete(img, "a")
    with vdisk.open(img) as d:
        assert d.subtype == "dynamic" and len(d.chain) == 1
        assert d.pread(d.size, 0) == expect
    assert os.listdir(snapshot.snapshot_dir(img)) == [snapshot.TREE]
    assert check(img).clean


def test_a_differencing_image_can_start_a_tree(tmp_path):
    base = str(tmp_path / "base.vhd")
    with vdisk.create(base, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\x09" * 4096, 0)
    img = str(tmp_path / "disk.vhd")
    with vdisk.create(img, format="vhd", parent=base) as d:
        d.pwrite(b"\x0a" * 4096, 4096)
    snapshot.take(img, name="a")
    with vdisk.open(img) as d:
        assert [os.path.basename(c.path) for c in d.chain][2] == "base.vhd"
        assert d.pread(8192, 0) == b"\x09" * 4096 + b"\x0a" * 4096
    snapshot.delete(img, "a")                                # pulled down into IMAGE, onto base.vhd
    with vdisk.open(img) as d:
        assert [os.path.basename(c.path) for c in d.chain] == ["disk.vhd", "base.vhd"]
        assert d.pread(8192, 0) == b"\x09" * 4096 + b"\x0a" * 4096


def _tree_state(img: str) -> tuple:
    nodes, current = snapshot.snapshot_list(img)
    contents = {n.name: read(os.path.join(snapshot.snapshot_dir(img), n.file)) for n in nodes}
    return read(img), contents, next((n.name for n in nodes if n.id == current), None)


def _setup(tmp_path, fmt):
    img = make(tmp_path, fmt)
    snapshot.take(img, name="a")
    write(img, b"\x02" * 8192, MiB)
    snapshot.take(img, name="b")
    write(img, b"\x03" * 4096, 3 * MiB)
    return img


OPS = {
    "take": lambda img: snapshot.take(img, name="c"),
    "revert": lambda img: snapshot.revert(img, "a", force=True),
    "delete-middle": lambda img: snapshot.delete(img, "a"),
    "delete-current": lambda img: snapshot.delete(img, "b"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_an_interrupted_operation_is_finished_by_the_next_one(tmp_path, fmt, op):
    """Cut the I/O seam at every write of the operation in turn; the next tree access completes
    or forgets the operation."""
    work = tmp_path / "ref"
    work.mkdir()
    ref = _setup(work, fmt)
    OPS[op](ref)
    want = _tree_state(ref)
    cut = 0
    while True:
        cut += 1
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        img = _setup(case, fmt)
        before = _tree_state(img)
        calls = [0]

        def hook(kind, file, offset, length):
            calls[0] += 1
            if calls[0] >= cut:                             # the process is gone from here on
                raise Crash(f"cut {cut}")

        vdisk.io.fault_hook = hook
        try:
            OPS[op](img)
            finished = True
        except Crash:
            finished = False
        finally:
            vdisk.io.fault_hook = None
        got = _tree_state(img)                               # recovers a pending operation first
        if finished:
            assert got == want
            break
        # Interrupted before the intent was recorded: nothing happened; afterwards: all of it.
        assert got in (before, want), f"cut {cut}"
        for f in [img] + [os.path.join(snapshot.snapshot_dir(img), n) for n in os.listdir(snapshot.snapshot_dir(img))
                          if n != snapshot.TREE]:
            assert check(f, parent_search=snapshot.search_paths(img)).clean, (cut, f)
        assert cut < 500
