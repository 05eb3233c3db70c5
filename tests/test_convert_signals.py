"""An interrupted `vdisk convert` never leaves a file under the destination's name.

The child converts a source big enough (512 MiB of data) to still be copying when the signal
arrives; the signal is sent as soon as the temporary output appears beside the destination.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

DATA = 512 << 20
PATTERN = (bytes(range(1, 256)) * ((8 << 20) // 255 + 1))[: 8 << 20]


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("sig") / "big.raw"
    chunk = memoryview(PATTERN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, DATA + (256 << 20))            # data, then a hole
        for off in range(0, DATA, len(chunk)):
            os.pwrite(fd, chunk, off)
    finally:
        os.close(fd)
    return path


def _ctrl_c_as_in_a_terminal() -> None:
    # A command started from a terminal gets Ctrl-C's default handling. A test run started in
    # the background of a script (job control off) inherits "ignore SIGINT", and passes it on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(src, dst) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vdisk.cli", "convert", "--no-progress", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def _wait_for_temp(folder, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.listdir(folder):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("the convert never created its temporary file")


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_convert_removes_its_temporary_file(tmp_path, big_source, sig, status):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "disk.vhd"
    proc = _start(big_source, dst)
    _wait_for_temp(out, proc)
    assert not dst.exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert os.listdir(out) == []


@pytest.mark.slow
def test_killed_convert_leaves_nothing_under_the_destination_name(tmp_path, big_source):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "disk.vdi"
    proc = _start(big_source, dst)
    _wait_for_temp(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    leftovers = os.listdir(out)
    assert all(n.startswith(".disk.vdi.") and n.endswith(".vdisk-tmp") for n in leftovers), leftovers


@pytest.mark.slow
def test_the_same_convert_uninterrupted_does_produce_the_destination(tmp_path, big_source):
    dst = tmp_path / "disk.vhd"
    proc = _start(big_source, dst)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(os.listdir(tmp_path)) == ["disk.vhd"]
