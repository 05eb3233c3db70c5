"""A full backup and incrementals taken while the live image keeps changing: every restore point
reads exactly its shadow's content (a bytearray model), and links are checked by identity."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk import backup as B
from vdisk.errors import ParentError, VDiskError
from vdisk.shadow import open_shadowed

MiB = 1 << 20
SIZE = 6 * MiB
CHUNK = 256 << 10


def mutate(d, model: bytearray, rng, n: int) -> None:
    """*n* random writes, zeroings and discards on the live image, mirrored in *model*."""
    for _ in range(n):
        off = int(rng.integers(0, SIZE - 1))
        ln = int(rng.integers(1, min(300_000, SIZE - off) + 1))
        op = rng.integers(0, 4)
        if op < 2:
            data = rng.integers(0, 256 if op == 0 else 3, ln, dtype=np.uint8).tobytes()
            d.pwrite(data, off)
            model[off:off + ln] = data
        elif op == 2:
            d.discard(off, ln)
            model[off:off + ln] = bytes(ln)
        else:
            d.write_zeroes(off, ln)
            model[off:off + ln] = bytes(ln)


def take_chain(folder: str, fmt: str, seed: int, incrementals: int = 3, chunk: int = CHUNK):
    """Image + full backup + incrementals; the live image changes between shadows and *during*
    each backup (from the progress callback, while worker threads read the shadow)."""
    rng = np.random.default_rng(seed)
    image = os.path.join(folder, f"disk.{fmt}")
    vdisk.create(image, SIZE, format=fmt).close()
    model = bytearray(SIZE)
    points: list[tuple[str, bytes]] = []
    with open_shadowed(image, "r+") as d:
        mutate(d, model, rng, 30)
        prev = None
        for k in range(incrementals + 1):
            sid = d.create_shadow(f"point {k}").id
            frozen = bytes(model)
            out = os.path.join(folder, f"b{k}.vbk")
            r = B.backup(d, out, shadow=sid, since=prev, chunk_size=chunk, threads=2,
                         progress=lambda done, total: mutate(d, model, rng, 1))
            assert r.kind == ("full" if k == 0 else "incremental")
            points.append((out, frozen))
            prev = out
            mutate(d, model, rng, int(rng.integers(1, 25)))
    return image, points


@pytest.mark.parametrize("fmt", ["vhd", "vdi", "raw"])
def test_every_restore_point_of_a_chain_reads_its_shadow(fmt, tmpfs_path):
    image, points = take_chain(str(tmpfs_path), fmt, seed={"vhd": 1, "vdi": 2, "raw": 3}[fmt])
    for k, (path, want) in enumerate(points):
        with vdisk.open(path) as d:                         # parents found by id in the folder
            assert len(d.backups) == k + 1
            assert d.pread(SIZE, 0) == want
        dst = str(tmpfs_path / f"restore{k}.vhd")
        given = [p for p, _ in points[:k + 1]][::-1]          # any order
        B.restore(given, dst)
        with vdisk.open(dst) as out:
            assert out.pread(SIZE, 0) == want
    report = B.verify([points[-1][0]])
    assert report.ok and len(report.chain) == len(points)
    with B.BackupFile(points[1][0]) as inc, B.BackupFile(points[0][0]) as full:
        assert inc.header.parent == full.header.backup_id
        assert inc.header.base_shadow == full.header.shadow["id"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([64 << 10, 256 << 10, 1 << 20]))
def test_chains_of_random_histories_restore_exactly(tmpfs_path, seed, chunk):
    folder = tmpfs_path / f"h{seed}-{chunk}"
    folder.mkdir()
    try:
        _, points = take_chain(str(folder), "vhd", seed, incrementals=2, chunk=chunk)
        with B.open_backup([p for p, _ in points]) as d:
            assert d.pread(SIZE, 0) == points[-1][1]
        for path, want in points:
            with B.open_backup(path) as d:
                rng = np.random.default_rng(seed)
                for _ in range(20):
                    off = int(rng.integers(0, SIZE - 1))
                    n = int(rng.integers(1, SIZE - off + 1))
                    assert d.pread(n, off) == want[off:off + n]
    finally:
        shutil.rmtree(folder)


def test_an_incremental_applied_to_the_wrong_base_is_refused(tmpfs_path):
    a, b = tmpfs_path / "a", tmpfs_path / "b"
    a.mkdir()
    b.mkdir()
    _, pa = take_chain(str(a), "vhd", seed=11, incrementals=1)
    _, pb = take_chain(str(b), "vhd", seed=12, incrementals=1)
    # b's incremental finds its own base beside it: a's full backup is named as foreign.
    with pytest.raises(ParentError, match="not part of the chain") as exc:
        B.restore([pa[0][0], pb[1][0]], str(tmpfs_path / "x.vhd"))
    assert pa[0][0] in str(exc.value) and pb[1][0] in str(exc.value)
    # Without it, the missing base is named, and what was given instead.
    os.unlink(pb[0][0])
    with pytest.raises(ParentError) as exc:
        B.restore([pa[0][0], pb[1][0]], str(tmpfs_path / "x.vhd"))
    msg = str(exc.value)
    assert pb[1][0] in msg and "missing" in msg and pa[0][0] in msg
    assert not os.path.exists(tmpfs_path / "x.vhd")


def test_a_missing_link_is_named(tmpfs_path):
    _, points = take_chain(str(tmpfs_path), "vdi", seed=5, incrementals=3)
    with B.BackupFile(points[1][0]) as bf:
        missing = bf.header.backup_id
    os.unlink(points[1][0])
    with pytest.raises(ParentError) as exc:
        vdisk.open(points[3][0])
    assert missing in str(exc.value) and points[2][0] in str(exc.value) and "missing" in str(exc.value)
    report = B.verify([points[3][0]])
    assert not report.ok and missing in report.chain_error
    with vdisk.open(points[0][0]) as d:                      # what is left still opens
        assert d.pread(SIZE, 0) == points[0][1]


def test_an_incremental_needs_the_shadow_its_base_was_taken_from(tmpfs_path):
    image, points = take_chain(str(tmpfs_path), "vhd", seed=9, incrementals=0)
    with open_shadowed(image, "r+") as d:
        d.delete_all_shadows()
    with pytest.raises(VDiskError, match="no longer has"):
        B.backup(image, tmpfs_path / "inc.vbk", since=points[0][0])
    assert not os.path.exists(tmpfs_path / "inc.vbk")


def test_since_a_shadow_id_finds_the_backup_taken_from_it(tmpfs_path):
    image, points = take_chain(str(tmpfs_path), "vhd", seed=4, incrementals=0)
    with B.BackupFile(points[0][0]) as bf:
        base, full_id = bf.header.shadow["id"], bf.header.backup_id
    r = B.backup(image, tmpfs_path / "inc.vbk", since=base[:8])
    assert r.kind == "incremental" and r.parent == full_id and r.base_shadow == base
    (tmpfs_path / "elsewhere").mkdir()
    with pytest.raises(VDiskError, match="no backup of shadow"):
        B.backup(image, tmpfs_path / "elsewhere" / "inc2.vbk", since=r.shadow)


def test_keep_shadows_drops_the_oldest_but_never_the_backed_up_one(tmpfs_path):
    image = str(tmpfs_path / "disk.vhd")
    with vdisk.create(image, SIZE, format="vhd") as d:
        d.pwrite(b"a" * 4096, 0)
    B.backup(image, tmpfs_path / "b0.vbk")
    B.backup(image, tmpfs_path / "b1.vbk", since=str(tmpfs_path / "b0.vbk"))
    r = B.backup(image, tmpfs_path / "b2.vbk", since=str(tmpfs_path / "b1.vbk"), keep_shadows=1)
    assert len(r.deleted_shadows) == 2
    with open_shadowed(image) as d:
        assert [s.id for s in d.shadows] == [r.shadow]
    r3 = B.backup(image, tmpfs_path / "b3.vbk", since=str(tmpfs_path / "b2.vbk"))
    assert r3.kind == "incremental"


# -- crafted loops: files whose headers name each other as parents ------------------------------
def crafted(folder, name: str, backup_id: str, parent: str, shadow: str, base_shadow: str) -> str:
    """An incremental backup with no entries whose header says what the test wants."""
    from vdisk.backup.writer import BackupWriter
    header = B.Header(backup_id=backup_id, kind="incremental", parent=parent, base_shadow=base_shadow,
                      shadow={"id": shadow, "created": "2026-12-04T00:00:00Z", "description": ""},
                      image={"name": "disk.vhd", "format": "vhd", "subtype": "dynamic",
                             "uuid": "00000000-0000-0000-0000-000000000001"},
                      virtual_size=SIZE, chunk_size=CHUNK, level=3, created="2026-12-04T00:00:00Z")
    path = os.path.join(folder, name)
    BackupWriter(path, header).finish()
    return path


IDS = {k: f"00000000-0000-0000-0000-00000000000{i}" for i, k in enumerate("abc", start=2)}


def test_given_backups_that_build_on_each_other_in_a_loop_are_refused(tmp_path):
    a = crafted(tmp_path, "a.vbk", IDS["a"], IDS["b"], "sa", "sb")
    b = crafted(tmp_path, "b.vbk", IDS["b"], IDS["a"], "sb", "sa")
    with pytest.raises(ParentError, match="loop"):
        B.open_backup([a, b])
    report = B.verify([a, b])
    assert not report.ok and "loop" in report.chain_error


def test_a_loop_through_parents_found_in_the_folder_is_refused(tmp_path):
    """a -> b -> c -> b: b and c are found by identity in a's folder, and b again is the loop."""
    a = crafted(tmp_path, "a.vbk", IDS["a"], IDS["b"], "sa", "sb")
    crafted(tmp_path, "b.vbk", IDS["b"], IDS["c"], "sb", "sc")
    crafted(tmp_path, "c.vbk", IDS["c"], IDS["b"], "sc", "sb")
    with pytest.raises(ParentError, match="loops back"):
        B.open_backup([a])
    assert "loops back" in B.verify([a]).chain_error


def test_info_of_an_incremental_without_its_parent_names_the_missing_link(tmp_path):
    """Not a raw image of the backup file's bytes: the parent error, in one line, exit 1."""
    import subprocess
    import sys
    a = crafted(tmp_path, "a.vbk", IDS["a"], IDS["b"], "sa", "sb")
    r = subprocess.run([sys.executable, "-m", "vdisk", "info", a], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "raw" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "is missing" in r.stderr and "a.vbk" in r.stderr
