"""Committing a differencing VHDX into its parent (or an ancestor): the chain reads the same, the
parent alone then holds it (judged by qemu-img, which reads the base), the child is emptied and
relinked through its own log, DataWriteGuids that children link to are kept; a cut at every write
(kill and power cut) leaves the chain reading the same."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

import vdisk
from vhdx_support import cut_everywhere

MiB = 1 << 20
pytestmark = pytest.mark.judges("qemu-img")


def vd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True)


def content(path) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def chain(folder):
    base, mid, top = folder / "base.vhdx", folder / "mid.avhdx", folder / "top.avhdx"
    with vdisk.create(base, 16 * MiB, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"a" * (3 * MiB), 0)
    with vdisk.create(mid, format="vhdx", parent=base) as d:
        d.pwrite(b"m" * 8192, MiB + 4096)
        d.pwrite(b"n" * MiB, 6 * MiB)
    with vdisk.create(top, format="vhdx", parent=mid) as d:
        d.pwrite(b"t" * 4096, 2 * MiB + 1536)
    return base, mid, top


def qemu_base_reads(base, expected: bytes, ref) -> None:
    ref.write_bytes(expected)
    res = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(base), str(ref)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(base)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_commit_into_the_parent_keeps_the_chain_and_the_grandchild_link(tmp_path):
    base, mid, top = chain(tmp_path)
    want, mid_view = content(top), content(mid)
    res = vd("commit", mid, "--verify")
    assert res.returncode == 0, res.stderr
    assert content(top) == want                          # top still links to mid
    qemu_base_reads(base, mid_view, tmp_path / "ref.raw")
    with vdisk.open(mid) as d:
        assert not any(e.layer == 0 for e in d.extents())   # mid holds nothing of its own now


def test_commit_into_an_ancestor_relinks_the_child(tmp_path):
    base, mid, top = chain(tmp_path)
    want = content(top)
    res = vd("commit", top, "--into", base)
    assert res.returncode == 0, res.stderr
    with vdisk.open(top) as d:
        assert [info.path for info in d.chain][1] == str(base)
        assert d.pread(d.size, 0) == want
    qemu_base_reads(base, want, tmp_path / "ref.raw")


def test_commit_cut_at_every_write_keeps_what_the_chain_reads(tmp_path):
    from vdisk.ops.commit import commit
    work = tmp_path / "w"
    work.mkdir()
    base, mid, top = chain(work)
    want = hashlib.sha256(content(top)).digest()

    def judge(cut, power_cut):
        assert hashlib.sha256(content(top)).digest() == want, f"cut {cut} (power cut {power_cut})"
        res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(base)], capture_output=True, text=True)
        assert res.returncode == 0, f"cut {cut}: {res.stdout}{res.stderr}"

    cut_everywhere(work, lambda: commit(str(mid)), judge)
