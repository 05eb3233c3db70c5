"""VHDX test helpers: the fixtures of fixtures/vhdx (decompressed once, sparse, into tmp/), their
MANIFEST, and a copy of a fixture's folder for tests that write or need the parent beside it."""
from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import os
from pathlib import Path

from conftest import ROOT, _write_sparse

VHDX_FIXTURES = ROOT / "fixtures" / "vhdx"
#: fixtures are decompressed here (tmp/ is ignored by git); one copy per worktree
VHDX_CACHE = ROOT / "tmp" / "vhdx-fixtures"
OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def vhdx_manifest() -> dict[str, dict]:
    with open(VHDX_FIXTURES / "MANIFEST.tsv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def image_name(name: str) -> str:
    """The image's file name once decompressed (the MANIFEST name without .gz/.xz/.bz2)."""
    return name.rsplit(".", 1)[0] if os.path.splitext(name)[1] in OPENERS else name


def vhdx_fixture(name: str) -> Path:
    """Path of a decompressed MANIFEST fixture (read-only use: copy it before writing). The other
    fixtures of its MANIFEST folder (a chain's parents) are decompressed beside it too, so that a
    child opens whatever order the tests run in."""
    sub = os.path.dirname(name)
    if sub:
        for other in vhdx_manifest():
            if os.path.dirname(other) == sub and other != name:
                _decompressed(other)
    return _decompressed(name)


def _decompressed(name: str) -> Path:
    dst = VHDX_CACHE / image_name(name)
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    with OPENERS[os.path.splitext(name)[1]](VHDX_FIXTURES / name, "rb") as f:
        _write_sparse(f, tmp)
    tmp.rename(dst)
    os.chmod(dst, 0o444)
    return dst


def copy_fixture(name: str, folder: Path) -> Path:
    """A writable copy of the fixture (sparse) and of every fixture of its MANIFEST folder."""
    sub = os.path.dirname(name)
    out = None
    for other in vhdx_manifest():
        if os.path.dirname(other) != sub:
            continue
        src = vhdx_fixture(other)
        dst = folder / os.path.basename(image_name(other))
        if not dst.exists():
            with open(src, "rb") as f:
                _write_sparse(f, dst)
        if other == name:
            out = dst
    assert out is not None
    return out


def cut_everywhere(work: Path, operation, after, search=()) -> int:
    """Run *operation()* once to count its mutations, then again from the same files (*work*'s
    snapshot) cut at each one, as a kill and as a power cut (unsynced writes lost at random).
    After every cut, vdisk's journals are settled and each VHDX in *work* is opened read-write once
    (its log replayed, as the next session would; parents also looked for in *search*); then
    ``after(cut, power_cut)`` judges.
    Returns how many mutations the operation makes."""
    from maint_crash import Crash, CrashSim, crashing, recover_all, restore, snapshot
    import vdisk
    pristine = snapshot(work)
    sim = CrashSim()
    with crashing(sim):
        operation()
    total = sim.count
    assert total > 0
    for cut in range(1, total + 1):
        for power_cut in (False, True):
            restore(work, pristine)
            with crashing(CrashSim(cut_at=cut, drop_unsynced=power_cut, seed=cut)):
                try:
                    operation()
                except Crash:
                    pass
            recover_all(work)
            for p in sorted(work.iterdir()):
                if p.suffix in (".vhdx", ".avhdx"):
                    vdisk.open(p, "r+", parent_search=[work, *search]).close()
            after(cut, power_cut)
    restore(work, pristine)
    return total
