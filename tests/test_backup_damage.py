"""Damaged and unfinished backups: a corrupted chunk, a truncated file, a missing link, lying
headers and an interrupted backup each give one clear error, and `vdisk verify` finds them."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import vdisk
from vdisk import backup as B
from vdisk.backup import container as C
from vdisk.cli import main
from vdisk.errors import VDiskError
from vdisk.shadow import open_shadowed

MiB = 1 << 20


@pytest.fixture
def chain(tmpfs_path):
    """disk.vhd with a full backup b0.vbk and an incremental b1.vbk."""
    rng = np.random.default_rng(0)
    image = str(tmpfs_path / "disk.vhd")
    with vdisk.create(image, 8 * MiB, format="vhd") as d:
        d.pwrite(rng.integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes(), 0)
    B.backup(image, tmpfs_path / "b0.vbk", chunk_size=MiB)
    with open_shadowed(image, "r+") as d:
        d.pwrite(b"\x07" * 5000, 6 * MiB)
    B.backup(image, tmpfs_path / "b1.vbk", since=str(tmpfs_path / "b0.vbk"), chunk_size=MiB)
    return image, str(tmpfs_path / "b0.vbk"), str(tmpfs_path / "b1.vbk")


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def entry(path: str, kind: int, nth: int = 0):
    with B.BackupFile(path) as bf:
        rows = [e for e in bf.entries if e["kind"] == kind and e["frame_length"]]
        return rows[nth].copy()


def one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)
    assert "Traceback" not in err


def test_a_corrupted_chunk_is_an_error_naming_file_and_offset(capsys, chain, tmpfs_path):
    _, b0, b1 = chain
    e = entry(b0, C.KIND_DATA, 1)
    flip(b0, int(e["frame_offset"]) + int(e["frame_length"]) // 2)
    status, _, err = run(capsys, "restore", b1, "-o", tmpfs_path / "out.vhd")
    assert status == 1
    one_error_line(err, b0, f"offset {int(e['offset'])}", "damaged")
    assert not os.path.exists(tmpfs_path / "out.vhd")
    assert not [n for n in os.listdir(tmpfs_path) if n.endswith(".vdisk-tmp")]
    status, out, err = run(capsys, "verify", b1)
    assert status == 1
    one_error_line(err, b0, f"offset {int(e['offset'])}")
    assert f"{b1}: ok" in out
    with vdisk.open(b1) as d:                     # reading elsewhere still works; there it fails
        d.pread(4096, 0)
        with pytest.raises(VDiskError, match="damaged"):
            d.pread(4096, int(e["offset"]))


def test_a_damaged_zero_frame_is_found_by_verify(capsys, chain):
    _, b0, _ = chain
    e = entry(b0, C.KIND_ZERO)
    flip(b0, int(e["frame_offset"]) + int(e["frame_length"]) - 6)
    status, _, err = run(capsys, "verify", b0)
    assert status == 1
    one_error_line(err, b0, f"offset {int(e['offset'])}")


def test_a_damaged_index_is_refused_at_open(chain):
    _, b0, _ = chain
    with B.BackupFile(b0) as bf:
        at = bf.index_offset + 8 + 16 + 3          # inside the first entry
    flip(b0, at)
    with pytest.raises(VDiskError, match="index.*checksum mismatch"):
        vdisk.open(b0)
    assert not B.verify([b0]).ok


def test_a_truncated_file_says_so(capsys, chain, tmpfs_path):
    _, b0, b1 = chain
    for cut in (1, C.FOOTER_SIZE + 1, os.path.getsize(b1) // 2):
        data = open(b1, "rb").read()
        short = str(tmpfs_path / f"short{cut}.vbk")
        with open(short, "wb") as f:
            f.write(data[:-cut])
        status, _, err = run(capsys, "restore", short, "-o", tmpfs_path / "x.raw")
        assert status == 1
        one_error_line(err, short, "truncated")
        status, _, err = run(capsys, "verify", short)
        assert status == 1 and "truncated" in err
    assert not os.path.exists(tmpfs_path / "x.raw")


def test_a_missing_link_is_one_error_naming_it(capsys, chain, tmpfs_path):
    _, b0, b1 = chain
    with B.BackupFile(b0) as bf:
        missing = bf.header.backup_id
    os.rename(b0, tmpfs_path / "b0.moved")           # not a backup name? still found by content
    status, _, _ = run(capsys, "verify", b1)
    assert status == 0
    os.unlink(tmpfs_path / "b0.moved")
    status, _, err = run(capsys, "restore", b1, "-o", tmpfs_path / "x.vdi")
    assert status == 1
    one_error_line(err, b1, missing, "missing")
    status, _, err = run(capsys, "verify", b1)
    assert status == 1
    one_error_line(err, b1, missing, "missing")


def test_headers_that_lie_are_refused_without_allocating(tmpfs_path):
    bad = str(tmpfs_path / "lie.vbk")
    with open(bad, "wb") as f:                       # a header frame claiming 4 GiB
        f.write(struct.pack("<II", C.SKIPPABLE_MAGIC, 0xFFFFFFF0) + C.HEADER_TAG + bytes(100))
    with pytest.raises(VDiskError, match="does not fit"):
        vdisk.open(bad)


def test_a_footer_that_lies_about_the_index_is_refused(chain):
    _, b0, _ = chain
    size = os.path.getsize(b0)
    with open(b0, "r+b") as f:
        f.seek(size - C.FOOTER_SIZE)
        raw = bytearray(f.read())
        struct.pack_into("<Q", raw, 8 + 24, 10 ** 12)            # entries
        struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[8:60])))
        f.seek(size - C.FOOTER_SIZE)
        f.write(raw)
    with pytest.raises(VDiskError, match="does not end where the footer starts"):
        B.BackupFile(b0)


def test_an_interrupted_backup_leaves_no_file_and_no_shadow(chain, tmpfs_path):
    image, _, _ = chain
    with open_shadowed(image) as d:
        before = [s.id for s in d.shadows]

    def stop(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        B.backup(image, tmpfs_path / "x.vbk", chunk_size=256 << 10, progress=stop)
    assert not os.path.exists(tmpfs_path / "x.vbk")
    assert not [n for n in os.listdir(tmpfs_path) if n.endswith(".vdisk-tmp")]
    with open_shadowed(image) as d:
        assert [s.id for s in d.shadows] == before


def test_a_killed_backup_leaves_nothing_that_looks_complete(tmpfs_path):
    image = str(tmpfs_path / "big.raw")
    with open(image, "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 48 * MiB, dtype=np.uint8).tobytes())
    out = str(tmpfs_path / "killed.vbk")
    proc = subprocess.Popen([sys.executable, "-m", "vdisk", "backup", image, "-o", out, "--level", "19",
                             "--threads", "1", "--chunk-size", "256K"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        tmp = []
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [n for n in os.listdir(tmpfs_path) if n.endswith(".vdisk-tmp")]
            if tmp and os.path.getsize(tmpfs_path / tmp[0]) > MiB:
                break
            time.sleep(0.02)
        assert proc.poll() is None and tmp, "the backup ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(out)
    leftover = str(tmpfs_path / tmp[0])
    with pytest.raises(VDiskError, match="truncated or was never finished"):
        vdisk.open(leftover)
    assert not B.verify([leftover]).ok
