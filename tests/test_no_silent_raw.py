"""No silent raw: a file that carries any sign of being a VHD or a VDI is never read as a raw disk
without being asked. Such a file is a damaged image: opening it is a FormatError naming the file,
what was found and what is wrong, with the hint that `-f raw` / format="raw" reads it as raw on
purpose. A file with no such sign is raw, as before."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import vdisk
from vdisk.ops.check import check

MiB = 1 << 20


def vdisk_cli(*argv):
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, argv)], capture_output=True, text=True,
                          timeout=60)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        f.write(data)


def damaged_vhd(folder, name="disk.vhd", subtype="dynamic"):
    """A VHD whose footer (and, when dynamic, the footer copy at 0) no longer says 'conectix'."""
    path = folder / name
    vdisk.create(path, 4 * MiB, format="vhd", subtype=subtype).close()
    patch(path, -512, b"garbage!")
    if subtype == "dynamic":
        patch(path, 0, b"garbage!")
    return path


def damaged_vdi(folder, name="disk.vdi", text=True):
    """A VDI whose signature at 0x40 is gone (and, unless *text*, its header text at 0 too)."""
    path = folder / name
    vdisk.create(path, 4 * MiB, format="vdi").close()
    patch(path, 0x40, b"\0\0\0\0")
    if not text:
        patch(path, 0, bytes(64))
    return path


CASES = {
    # case: (make, words every message must hold)
    "dynamic VHD, footer and copy damaged": (lambda d: damaged_vhd(d), ["name ends in .vhd", "'cxsparse'", "'conectix'"]),
    "fixed VHD, footer damaged, upper-case name": (lambda d: damaged_vhd(d, "DISK.VHD", "fixed"),
                                                   ["name ends in .vhd", "'conectix'"]),
    "dynamic VHD renamed .img": (lambda d: damaged_vhd(d, "disk.img"), ["'cxsparse' dynamic header at offset 0x200"]),
    "VDI, signature damaged": (lambda d: damaged_vdi(d), ["name ends in .vdi", "VDI header text", "0xbeda107f"]),
    "VDI renamed .bin, signature damaged": (lambda d: damaged_vdi(d, "disk.bin"), ["VDI header text", "0xbeda107f"]),
    "VDI, text and signature damaged, mixed-case name": (lambda d: damaged_vdi(d, "disk.Vdi", text=False),
                                                         ["name ends in .vdi", "signature 0x00000000"]),
}


@pytest.fixture(params=sorted(CASES))
def damaged(request, tmp_path):
    make, words = CASES[request.param]
    return make(tmp_path), words


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_the_library_refuses_a_damaged_image_instead_of_reading_it_as_raw(damaged, mode):
    path, words = damaged
    before = sha(path)
    with pytest.raises(vdisk.FormatError) as info:
        vdisk.open(path, mode).close()
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for word in [*words, "damaged", "-f raw", 'format="raw"']:
        assert word in message, message
    assert sha(path) == before


def test_format_raw_opens_a_damaged_image_as_raw_on_purpose(damaged):
    path, _ = damaged
    data = open(path, "rb").read()
    with vdisk.open(path, format="raw") as d:
        assert d.format == "raw" and d.size == len(data)
        assert d.pread(len(data), 0) == data


@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["map"], ["convert", "{dst}"],
                                     ["compare", "{src}"]])
def test_the_cli_says_so_in_one_line_and_convert_leaves_no_dst(damaged, tmp_path, command):
    path, words = damaged
    dst = tmp_path / "out.raw"
    before = sha(path)
    r = vdisk_cli(command[0], path, *[w.format(dst=dst, src=path) for w in command[1:]])
    assert r.returncode == (2 if command[0] == "compare" else 1), r   # compare: 1 means "differ"
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vdisk: error: {path}: "), r.stderr
    for word in [*words, "-f raw"]:
        assert word in lines[0]
    assert not dst.exists()
    assert sha(path) == before


def test_the_cli_reads_a_damaged_image_as_raw_when_told_to(damaged, tmp_path):
    path, _ = damaged
    dst = tmp_path / "out.raw"
    r = vdisk_cli("convert", "-f", "raw", path, dst)
    assert r.returncode == 0, r.stderr
    assert open(dst, "rb").read() == open(path, "rb").read()
    r = vdisk_cli("info", "-f", "raw", "--json", path)
    assert r.returncode == 0 and '"format": "raw"' in r.stdout, r


def test_check_reports_the_damage_instead_of_a_clean_raw_file(damaged):
    path, words = damaged
    report = check(path)
    assert report.exit_code == 1 and report.format is None
    assert all(word in report.error for word in words), report.error


@pytest.mark.parametrize("name", ["x.img", "x.raw", "x", "x.vhdx.bak"])
def test_a_genuine_raw_image_still_opens_as_raw(tmp_path, name):
    path = tmp_path / name
    data = os.urandom(MiB)
    path.write_bytes(data)
    with vdisk.open(path) as d:
        assert d.format == "raw" and d.pread(MiB, 0) == data
    r = vdisk_cli("info", "--json", path)
    assert r.returncode == 0 and '"format": "raw"' in r.stdout, r


def test_an_intact_image_under_the_other_name_opens_as_what_it_is(tmp_path):
    vhd, vdi = tmp_path / "a.vdi", tmp_path / "b.vhd"
    vdisk.create(vhd, MiB, format="vhd").close()
    vdisk.create(vdi, MiB, format="vdi").close()
    with vdisk.open(vhd) as a, vdisk.open(vdi) as b:
        assert (a.format, b.format) == ("vhd", "vdi")
