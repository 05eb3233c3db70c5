"""Relinking and rebasing a differencing VHDX: the parent locator is rewritten through the file's
own log, only FileWriteGuid changes, and the content stays what it was. libvhdi (pyvhdi) judges
the link it reads; a cut at every write (kill and power cut) leaves the old link or the new one."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

import vdisk
from vdisk.ops.check import check
from maint_crash import restore, snapshot
from vhdx_support import cut_everywhere

MiB = 1 << 20


def vd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True)


def digest(path, search=()) -> str:
    with vdisk.open(path, parent_search=search) as d:
        return hashlib.sha256(d.pread(d.size, 0)).hexdigest()


@pytest.fixture
def moved_chain(tmp_path):
    """a/child.avhdx over a base that was moved to b/renamed.vhdx (the link now points nowhere)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base, child = tmp_path / "a" / "base.vhdx", tmp_path / "a" / "child.avhdx"
    with vdisk.create(base, 16 * MiB, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"B" * MiB, 0)
        d.pwrite(b"C" * MiB, 5 * MiB)
    with vdisk.create(child, format="vhdx", parent=base) as d:
        d.pwrite(b"x" * 4096, 5 * MiB + 4096)
        d.pwrite(b"y" * 512, 9 * MiB + 512)
    content = digest(child)
    shutil.move(base, tmp_path / "b" / "renamed.vhdx")
    return child, tmp_path / "b", content


def guids(path) -> tuple[bytes, bytes]:
    from vdisk.probe import open_layer
    layer = open_layer(str(path))
    try:
        h = layer.headers.current
        return h["file_write_guid"], h["data_write_guid"]
    finally:
        layer.close()


def test_relink_finds_the_moved_parent_by_its_data_write_guid_and_rewrites_the_locator(moved_chain):
    import pyvhdi
    child, folder, content = moved_chain
    with pytest.raises(vdisk.ParentError):
        vdisk.open(child)
    fwg, dwg = guids(child)
    res = vd("relink", child, "--search", folder, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["found_by"].startswith("DataWriteGuid scan")
    assert any("relative_path" in c for c in report["changes"])
    assert digest(child) == content                        # found by the locator alone now
    new_fwg, new_dwg = guids(child)
    assert new_dwg == dwg and new_fwg != fwg               # children of the child keep their link
    f = pyvhdi.file()
    f.open(str(child))
    try:
        assert f.get_parent_filename().replace("\\", "/").endswith("/b/renamed.vhdx")
    finally:
        f.close()
    assert check(str(child)).exit_code == 0


def test_relink_dry_run_changes_no_byte(moved_chain):
    child, folder, _ = moved_chain
    before = child.read_bytes()
    res = vd("relink", child, "--search", folder, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would set relative_path" in res.stdout
    assert child.read_bytes() == before


def test_rebase_onto_other_content_keeps_what_the_child_shows(tmp_path):
    import pyvhdi
    base1, base2, child = tmp_path / "one.vhdx", tmp_path / "two.vhdx", tmp_path / "child.avhdx"
    for path, fill in ((base1, b"1"), (base2, b"2")):
        with vdisk.create(path, 8 * MiB, format="vhdx", block_size=MiB) as d:
            d.pwrite(fill * (3 * MiB), MiB)
    with vdisk.create(child, format="vhdx", parent=base1) as d:
        d.pwrite(b"c" * 4096, 2 * MiB)
    with vdisk.open(child) as d:
        before = d.pread(d.size, 0)
    res = vd("rebase", child, "--parent", base2, "--json")
    assert res.returncode == 0, res.stderr
    with vdisk.open(child) as d:
        assert d.chain[1].path == str(base2)
        assert d.pread(d.size, 0) == before
    # libvhdi, given the new parent, reads the same bytes.
    f, p = pyvhdi.file(), pyvhdi.file()
    p.open(str(base2))
    f.open(str(child))
    try:
        f.set_parent(p)
        assert f.read_buffer_at_offset(len(before), 0) == before
    finally:
        f.close()
        p.close()


def test_relink_refuses_a_parent_of_another_format(tmp_path):
    base, child, other = tmp_path / "base.vhdx", tmp_path / "child.avhdx", tmp_path / "other.vhd"
    vdisk.create(base, 4 * MiB, format="vhdx", block_size=MiB).close()
    vdisk.create(child, format="vhdx", parent=base).close()
    vdisk.create(other, 4 * MiB, format="vhd").close()
    res = vd("rebase", child, "--parent", other)
    assert res.returncode != 0
    assert res.stderr.startswith("vdisk: error: ") and len(res.stderr.strip().splitlines()) == 1


def test_relink_cut_at_every_write_leaves_the_old_link_or_the_new(moved_chain):
    child, folder, content = moved_chain
    work = child.parent

    def state():
        from vdisk.probe import open_layer
        vdisk.open(child, "r+", parent_search=[folder]).close()     # the next open replays the log
        layer = open_layer(str(child))
        try:
            rel = layer.md.locator["relative_path"]
        finally:
            layer.close()
        assert check(str(child), parent_search=[folder]).exit_code == 0
        return digest(child, [folder]), rel

    def relink():
        from vdisk.ops.relink import relink as do
        do(str(child), search=[folder])

    before = state()                                   # (nothing written yet but the log replay)
    work_copy = snapshot(work)
    relink()
    after = state()
    restore(work, work_copy)
    assert before[0] == after[0] == content and before[1] != after[1]
    outcomes = set()

    def judge(cut, power_cut):
        now = state()
        assert now in (before, after), f"cut {cut} (power cut {power_cut}): {now}"
        outcomes.add(now == after)

    cut_everywhere(work, relink, judge, search=[folder])
    assert outcomes == {False, True}


def test_snapshot_tree_of_a_differencing_vhdx_takes_reverts_and_deletes(tmp_path):
    # A Hyper-V VM's disk is often already a checkpoint child: the frozen files move into
    # IMAGE.snapshots/ and their links are rewritten through the VHDX log.
    from vdisk import snapshot
    base, vm = tmp_path / "base.vhdx", tmp_path / "vm.avhdx"
    with vdisk.create(base, 8 * MiB, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"a" * MiB, 0)
    with vdisk.create(vm, format="vhdx", parent=base) as d:
        d.pwrite(b"b" * 4096, MiB)
    states = []
    for fill in (b"c", b"d"):
        with vdisk.open(vm) as d:
            states.append(d.pread(d.size, 0))
        node = snapshot.take(vm)
        with vdisk.open(vm, "r+") as d:
            d.pwrite(fill * 4096, 2 * MiB)
    with vdisk.open(vm) as d:
        assert len(d.chain) == 4 and d.pread(d.size, 0) != states[1]
    snapshot.revert(vm, node.id, force=True)
    with vdisk.open(vm) as d:
        assert d.pread(d.size, 0) == states[1]
    first = snapshot.snapshot_list(vm)[0][0]
    snapshot.delete(vm, first.id)
    with vdisk.open(vm) as d:
        assert d.pread(d.size, 0) == states[1]
    for path in [vm, *sorted((tmp_path / "vm.avhdx.snapshots").glob("*.vhdx"))]:
        assert check(str(path)).exit_code == 0, path
