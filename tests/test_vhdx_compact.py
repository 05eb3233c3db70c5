"""Compacting a dynamic or differencing VHDX in place: zero (and filesystem-free) blocks given up
(in a child: ZERO over parent data), the last blocks moved into the holes, the file cut — through
the file's own log. qemu-img judges the content and
the structure; a cut at every write (kill and power cut) leaves the content unchanged, the file
opening in vdisk and qemu-img check clean."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import vdisk
from vhdx_support import cut_everywhere

MiB = 1 << 20
pytestmark = pytest.mark.judges("qemu-img")


def vd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True)


def qemu_clean(path) -> None:
    res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def qemu_reads(path, expected: bytes, ref) -> None:
    ref.write_bytes(expected)
    res = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), str(ref)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def holey(path, size=24 * MiB) -> bytearray:
    """A dynamic VHDX (1 MiB blocks) whose blocks 0..11 are written, then 2, 5 and 7 zeroed by
    writes (still allocated), so compaction gives up three blocks and moves the last ones down."""
    model = bytearray(size)
    with vdisk.create(path, size, format="vhdx", block_size=MiB) as d:
        for b in range(12):
            d.pwrite(bytes([b + 1]) * MiB, b * MiB)
            model[b * MiB:(b + 1) * MiB] = bytes([b + 1]) * MiB
    with vdisk.open(path, "r+") as d:
        for b in (2, 5, 7):
            d.pwrite(bytes(MiB), b * MiB)
            model[b * MiB:(b + 1) * MiB] = bytes(MiB)
    return model


def test_compact_gives_up_zero_blocks_moves_the_rest_and_shrinks(tmp_path):
    path = tmp_path / "c.vhdx"
    model = holey(path)
    size_before = os.path.getsize(path)
    dry = vd("compact", path, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert os.path.getsize(path) == size_before
    res = vd("compact", path, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["unallocated"] == 3 and report["moved"] >= 1
    assert os.path.getsize(path) == size_before - 3 * MiB == report["size_after"]
    qemu_clean(path)
    qemu_reads(path, bytes(model), tmp_path / "ref.raw")
    with vdisk.open(path, "r+") as d:                     # writes after compaction land safely
        d.pwrite(b"w" * MiB, 20 * MiB)
        model[20 * MiB:21 * MiB] = b"w" * MiB
    qemu_clean(path)
    qemu_reads(path, bytes(model), tmp_path / "ref.raw")


def test_compact_after_discards_does_not_reuse_storage_an_unmapped_entry_still_names(tmp_path):
    path = tmp_path / "u.vhdx"
    model = holey(path)
    with vdisk.open(path, "r+") as d:
        d.discard(3 * MiB, MiB)                          # UNMAPPED, its offset kept for reuse
        model[3 * MiB:4 * MiB] = bytes(MiB)
    assert vd("compact", path).returncode == 0
    with vdisk.open(path, "r+") as d:                     # block 3 written again: no other block may change
        d.pwrite(b"r" * MiB, 3 * MiB)
        model[3 * MiB:4 * MiB] = b"r" * MiB
    qemu_clean(path)
    qemu_reads(path, bytes(model), tmp_path / "ref.raw")


def chain(folder, size=16 * MiB) -> tuple[bytearray, object, object]:
    """A base VHDX (1 MiB blocks, data in blocks 0-7) and a child holding every kind of block:
    full data (8, 9, 12), data zeroed over parent data (2: must stay zeros), data zeroed over a
    zero parent (10: may go), partially present blocks (3: data; 11: zeros over a zero parent),
    so sector bitmap blocks exist. The model is the bytearray of what the chain must read."""
    base, child = folder / "b.vhdx", folder / "c.avhdx"
    model = bytearray(size)
    with vdisk.create(base, size, format="vhdx", block_size=MiB) as d:
        for b in range(8):
            d.pwrite(bytes([0x40 + b]) * MiB, b * MiB)
            model[b * MiB:(b + 1) * MiB] = bytes([0x40 + b]) * MiB
    vdisk.create(child, format="vhdx", parent=base).close()

    def put(d, data, at):
        d.pwrite(data, at)
        model[at:at + len(data)] = data
    with vdisk.open(child, "r+") as d:
        for b in (2, 8, 9, 10, 12):
            put(d, bytes([0x80 + b]) * MiB, b * MiB)
        put(d, b"p" * 8192, 3 * MiB + 65536)
        put(d, b"q" * 16384, 11 * MiB + 4096)
        put(d, bytes(16384), 11 * MiB + 4096)           # stored zeros: the block stays partial
        for b in (2, 10):
            put(d, bytes(MiB), b * MiB)
    return model, base, child


def test_a_differencing_vhdx_gives_up_what_reads_zeros_and_keeps_the_chain_content(tmp_path):
    model, base, child = chain(tmp_path)
    parent = base.read_bytes()
    size_before = os.path.getsize(child)
    with vdisk.open(child) as d:
        states = {b: d.layers[0].state(b) for b in (2, 3, 10, 11)}
    assert states[3] == states[11] == 7 and states[2] == states[10] == 6     # PARTIALLY / FULLY present
    res = vd("compact", child, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["unallocated"] == 3                        # 2 (now ZERO), 10 and 11 (NOT_PRESENT)
    assert base.read_bytes() == parent
    assert os.path.getsize(child) <= size_before - 3 * MiB
    with vdisk.open(child) as d:
        assert d.pread(d.size, 0) == bytes(model)
        top = d.layers[0]
        assert top.state(2) == 2 and top.state(10) == 0 and top.state(11) == 0 and top.state(3) == 7
    assert vd("check", child).returncode == 0
    again = json.loads(vd("compact", child, "--json").stdout)
    assert again["reclaimed"] == 0


def test_a_differencing_vhdx_compaction_cut_at_every_write_keeps_the_content(tmp_path):
    from vdisk.ops.compact import compact
    work = tmp_path / "w"
    work.mkdir()
    model, base, child = chain(work)
    expected = bytes(model)

    def judge(cut, power_cut):
        with vdisk.open(child) as d:
            assert d.pread(d.size, 0) == expected, f"cut {cut} (power cut {power_cut})"
        assert vd("check", child).returncode in (0, 3), f"cut {cut} (power cut {power_cut})"

    assert cut_everywhere(work, lambda: compact(str(child)), judge) > 3


def test_a_fixed_vhdx_is_not_compacted_and_not_changed(tmp_path):
    path = tmp_path / "f.vhdx"
    vdisk.create(path, 8 * MiB, format="vhdx", subtype="fixed", block_size=MiB).close()
    before = path.read_bytes()
    res = vd("compact", path)
    assert res.returncode == 1 and res.stderr.startswith("vdisk: error: ") and "fixed" in res.stderr
    assert path.read_bytes() == before


def test_compact_cut_at_every_write_keeps_the_content(tmp_path):
    from vdisk.ops.compact import compact
    work = tmp_path / "w"
    work.mkdir()
    path = work / "k.vhdx"
    model = bytes(holey(path))

    def judge(cut, power_cut):
        with vdisk.open(path) as d:
            assert d.pread(d.size, 0) == model, f"cut {cut} (power cut {power_cut})"
        qemu_clean(path)

    cut_everywhere(work, lambda: compact(str(path)), judge)


@pytest.mark.judges("mkfs.ext4", "debugfs", "e2fsck")
def test_filesystem_aware_compaction_of_a_vhdx_gives_back_deleted_files(tmp_path):
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    keep.write_bytes(os.urandom(5 * MiB))
    gone.write_bytes(os.urandom(20 * MiB))
    for cmd in (f"write {gone} gone", f"write {keep} keep", "rm gone"):
        subprocess.run(["debugfs", "-w", "-R", cmd, str(raw)], check=True, capture_output=True)
    img = tmp_path / "fs.vhdx"
    assert vd("convert", "-O", "vhdx", "--block-size", "1M", raw, img).returncode == 0
    before = os.path.getsize(img)
    res = vd("compact", img, "--filesystem-aware", "--json")
    assert res.returncode == 0, res.stderr
    assert os.path.getsize(img) <= before - 16 * MiB     # most of the deleted file's 20 MiB
    qemu_clean(img)
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(img), str(out)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["debugfs", "-R", f"dump keep {tmp_path / 'back'}", str(out)], check=True, capture_output=True)
    assert (tmp_path / "back").read_bytes() == keep.read_bytes()
