"""Differencing images, raw/fixed images and interrupted runs.

A child is compacted with what the child alone can say: its own free blocks are given up where
the parent reads zeros there, a VDI or VHDX child marks free blocks ZERO over parent data (free,
costs no space), a VHD child leaves those. The parent never changes. Raw and fixed images get holes
punched. A run cut at any write recovers to the image before or after."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

import vdisk
from vdisk.ops.check import check
from vdisk.fsaware import analyse, compact_fs

from fsaware_support import (MiB, Part, copy_back, copy_range, judge_partition, make_disk, run, sha_file,
                             tools_for)
from maint_crash import Crash, CrashSim, count_mutations, crashing, recover_all, restore, snapshot, write_raw


def _vdisk(*args):
    exe = os.path.join(os.path.dirname(os.sys.executable), "vdisk")
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p


def _second_state(raw: str, raw2: str, part: Part, work: str) -> None:
    """raw2 = raw with the guest's later work: base files deleted, new files, some deleted again."""
    import shutil
    shutil.copyfile(raw, raw2)
    img = os.path.join(work, "p.img")
    copy_range(raw2, img, part.start, part.size)
    rng = np.random.default_rng(7)
    cmds = []
    gone = list(part.files)[:2]
    for name in gone:
        cmds.append(f"rm {name}")
        del part.files[name]
        part.deleted.append(name)
    import hashlib
    for i in range(4):
        data = rng.integers(0, 256, 3 * MiB + i, dtype=np.uint8).tobytes()
        src = os.path.join(work, f"new{i}")
        with open(src, "wb") as f:
            f.write(data)
        cmds.append(f"write {src} new{i}")
        part.files[f"new{i}"] = hashlib.sha256(data).hexdigest()
    cmds += ["rm new0", "rm new2"]
    for n in ("new0", "new2"):
        del part.files[n]
        part.deleted.append(n)
    script = os.path.join(work, "cmds")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, img])
    copy_back(img, raw2, part.start)


def _write_child(child: str, raw_parent: str, raw2: str, granule: int = 64 * 1024) -> None:
    """Store in *child* every granule where the second state differs from the parent."""
    with vdisk.open(child, "r+") as d, open(raw_parent, "rb") as a, open(raw2, "rb") as b:
        for off in range(0, d.size, granule):
            x, y = a.read(granule), b.read(granule)
            if x != y:
                d.pwrite(y, off)


@pytest.mark.judges(*tools_for("ext4"))
@pytest.mark.parametrize("fmt", ["vhd", "vdi", "vhdx"])
def test_a_differencing_child_gives_back_only_what_it_can_and_the_parent_stays(tmp_path, fmt):
    parts = [Part("ext4", 64 * MiB)]
    raw = str(tmp_path / "disk.raw")
    make_disk(raw, parts, nfiles=8)
    base = str(tmp_path / f"base.{fmt}")
    _vdisk("convert", raw, base, "--block-size", str(1 * MiB))
    compact_fs(base)                        # the base's free blocks read zeros from now on
    write_raw(base, raw)
    raw2 = str(tmp_path / "state2.raw")
    _second_state(raw, raw2, parts[0], str(tmp_path))
    child = str(tmp_path / f"child.{fmt}")
    vdisk.create(child, format=fmt, parent=base).close()
    _write_child(child, raw, raw2)
    parent_sha = sha_file(base)
    child_size = os.path.getsize(child)

    rep = json.loads(_vdisk("compact", child, "--filesystem-aware", "--json").stdout)
    assert rep["method"] == "compact (differencing)"
    assert sha_file(base) == parent_sha
    assert check(child).exit_code == 0
    assert os.path.getsize(child) < child_size

    after = str(tmp_path / "after.raw")
    write_raw(child, after)                 # qemu opens no differencing VHD / linked VDI
    judge_partition(after, parts[0], str(tmp_path))
    with vdisk.open(child) as d:
        bs = d.block_size
        ext = d.extents()
    # What changed in the guest's view: only free blocks, now zeros.
    with open(raw2, "rb") as f, open(after, "rb") as g:
        zeroed_over_parent = 0
        for b in range(os.path.getsize(raw2) // bs):
            x, y = f.read(bs), g.read(bs)
            if x != y:
                assert not any(y), f"block {b} changed and is not zeros"
                zeroed_over_parent += 1
    if fmt in ("vdi", "vhdx"):
        assert zeroed_over_parent > 0          # ZERO entries hide the parent's stale data
        assert any(e.kind == vdisk.ExtentKind.ZERO for e in ext)


@pytest.mark.judges(*tools_for("ext4"))
@pytest.mark.parametrize("kind", ["raw", "fixed"])
def test_raw_and_fixed_images_get_holes_punched(tmp_path, kind):
    parts = [Part("ext4", 48 * MiB)]
    raw = str(tmp_path / "disk.raw")
    make_disk(raw, parts)
    img = raw
    if kind == "fixed":
        img = str(tmp_path / "disk.vhd")
        _vdisk("convert", raw, img, "--subtype", "fixed")
    used_before = os.stat(img).st_blocks * 512
    rep = compact_fs(img)
    assert rep.method == "punch"
    used_after = os.stat(img).st_blocks * 512
    assert used_before - used_after >= rep.free_blocks * rep.block_size * 0.95 > 0
    out = str(tmp_path / "out.raw")
    run(["qemu-img", "convert", "-f", "vpc" if kind == "fixed" else "raw", "-O", "raw", img, out])
    judge_partition(out, parts[0], str(tmp_path))
    if kind == "fixed":
        assert check(img).exit_code == 0


def _content(path):
    with vdisk.open(path) as d:
        return d.pread(d.size, 0), d.block_size


@pytest.mark.slow
@pytest.mark.judges(*tools_for("fat16"))
@pytest.mark.parametrize("fmt,child", [("vhd", False), ("vdi", False), ("vdi", True), ("vhd", True)],
                         ids=["vhd", "vdi", "vdi-child", "vhd-child"])
def test_an_interrupted_filesystem_aware_compaction_recovers(tmp_path, fmt, child):
    """Cut at every write (every third cut also loses the unsynced writes): after recovery the
    image checks clean, every used block reads as before, and every planned free block reads
    either as before or as zeros (a rolled-back run may leave it discarded). Compacting again
    then finishes the job. In a VDI child the free blocks over parent data become ZERO entries;
    a VHD child leaves them (nothing is written)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = str(tmp_path / "disk.raw")
    parts = make_disk(raw, [Part("fat16", 16 * MiB)], nfiles=6)
    img = str(folder / f"d.{fmt}")
    _vdisk("convert", raw, img, "--block-size", str(1 * MiB if fmt == "vdi" else 512 * 1024))
    if child:                       # the guest deletes the rest in a child: free over parent data
        base, img = img, str(folder / f"child.{fmt}")
        vdisk.create(img, format=fmt, parent=base).close()
        raw2 = str(tmp_path / "state2.raw")
        run(["cp", raw, raw2])
        pimg = str(tmp_path / "p.img")
        copy_range(raw2, pimg, parts[0].start, parts[0].size)
        for name in list(parts[0].files):
            run(["mdel", "-i", pimg, f"::{name}"])
            del parts[0].files[name]
        copy_back(pimg, raw2, parts[0].start)
        _write_child(img, raw, raw2, granule=4096)
    orig, bs = _content(img)
    with vdisk.open(img) as d:
        mask = analyse(d, img)[1]
    assert mask.sum() >= 4
    pristine = snapshot(folder)
    total = count_mutations(lambda: compact_fs(img))
    done, _ = _content(img)
    if child and fmt == "vhd":
        # Free over parent data: a VHD child could only hide it with stored zeros. It is left.
        assert total == 0 and done == orig
        return
    assert total > 0
    seen = set()
    for cut in range(1, total + 1):
        restore(folder, pristine)
        with crashing(CrashSim(cut_at=cut, drop_unsynced=cut % 3 == 0, seed=cut)):
            try:
                compact_fs(img)
            except Crash:
                pass
        recover_all(folder)
        assert check(img).exit_code == 0, f"cut {cut}/{total}"
        now, _ = _content(img)
        for b in range(len(mask)):
            x, y = orig[b * bs:(b + 1) * bs], now[b * bs:(b + 1) * bs]
            if mask[b]:
                assert y == x or not any(y), f"cut {cut}/{total}: free block {b} is neither as before nor zeros"
            else:
                assert y == x, f"cut {cut}/{total}: used block {b} changed"
        seen.add(now == done)
        compact_fs(img)
        assert _content(img)[0] == done
    assert False in seen                     # some cuts left the run to roll back or finish
    out = str(tmp_path / "out.raw")
    write_raw(img, out)
    judge_partition(out, parts[0], str(tmp_path))
