"""Paths that are not images: a FIFO, a socket, a character device. Refused before any I/O open."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import vdisk


def vdisk_cli(*argv):
    # A FIFO opened for reading blocks until a writer comes: the timeout turns a hang into a failure.
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, argv)], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], ["map"], ["check"], ["compact"],
                                  ["convert", "{out}"], ["compare", "{img}"]])
def test_a_fifo_given_as_the_image_is_refused_at_once(tmp_path, argv):
    fifo = tmp_path / "disk.vhd"
    os.mkfifo(fifo)
    img = tmp_path / "real.vhd"
    vdisk.create(img, 1 << 20, format="vhd").close()
    words = [w.format(out=tmp_path / "out.vdi", img=img) for w in argv]
    r = vdisk_cli(words[0], fifo, *words[1:])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    out = r.stderr + r.stdout
    assert str(fifo) in out and "FIFO" in out, out
    assert not (tmp_path / "out.vdi").exists()


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_the_library_refuses_a_fifo_a_socket_and_a_character_device(tmp_path, mode):
    fifo = tmp_path / "f.vhd"
    os.mkfifo(fifo)
    with pytest.raises(vdisk.VDiskError, match="FIFO"):
        vdisk.open(fifo, mode)
    sock_path = tmp_path / "s.vhd"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        with pytest.raises(vdisk.VDiskError, match="socket"):
            vdisk.open(sock_path, mode)
    finally:
        s.close()
    with pytest.raises(vdisk.VDiskError, match="character device"):
        vdisk.open("/dev/null", mode)
