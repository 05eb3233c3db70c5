"""A real process compacting a 1 GiB image is killed with SIGKILL at random moments; after
recovery the image checks clean and reads exactly as before."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import vdisk
from vdisk import journal
from vdisk.ops.check import check
from vdisk.ops.digest import path_digest

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPACT = "import sys; from vdisk.ops.compact import compact; compact(sys.argv[1])"


def _build(path, fmt):
    with vdisk.create(path, 1 << 30, format=fmt) as d:
        bs = d.block_size
        n = (1 << 30) // bs
        for b in range(n):
            d.pwrite(bytes([b % 251 + 1]) * bs, b * bs)
        for b in range(0, n, 3):
            d.write_zeroes(b * bs, bs)


def _compact_process(path):
    return subprocess.Popen([sys.executable, "-c", COMPACT, path], cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["vdi", "vhd"])
def test_kill_9_during_compaction_then_recover(tmp_path, fmt):
    pristine = str(tmp_path / f"pristine.{fmt}")
    _build(pristine, fmt)
    want = path_digest(pristine)
    work = str(tmp_path / f"work.{fmt}")
    subprocess.run(["cp", "--sparse=always", pristine, work], check=True)
    t0 = time.monotonic()
    assert _compact_process(work).wait() == 0
    duration = time.monotonic() - t0
    compacted_size = os.path.getsize(work)
    rng = random.Random(fmt)
    for trial in range(3):
        os.unlink(work)
        subprocess.run(["cp", "--sparse=always", pristine, work], check=True)
        proc = _compact_process(work)
        time.sleep(rng.uniform(0.2, 0.9) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result = journal.recover(work)
        report = check(work)
        assert report.exit_code == 0, f"trial {trial} ({result}): {report.summary()}"
        assert os.path.getsize(work) in (os.path.getsize(pristine), compacted_size)
        assert path_digest(work) == want, f"trial {trial}: content changed ({result})"
