"""`vdisk info --json` on every fixture: valid JSON, documented keys, sizes that agree with qemu-img
where qemu-img is right (docs/cli.md, "VHD sizes and qemu-img", says where and why it is not)."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess

import pytest

from conftest import FIXTURES, fixture_image, manifest, need
from vdisk.cli import main
from vdisk.ops.info import CHAIN_KEYS, INFO_KEYS

ROWS = manifest()
BIG = {"compactvd_3hfs.vdi.tar.bz2"}          # 7.7 GB sparse once decompressed
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in sorted(ROWS)]
QEMU_FMT = {"vhd": "vpc", "vdi": "vdi", "raw": "raw"}


def info_json(capsys, path) -> dict:
    status = main(["info", "--json", str(path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out)


def qemu_info(path, fmt: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], capture_output=True, text=True)


@functools.lru_cache(maxsize=None)       # fixture_image() re-reads a tar.bz2's index on every call
def _path(name: str):
    # The Windows differencing VHD's parent is not shipped: read it where it lies.
    return FIXTURES / name if name == "dfvfs_fat-differential.vhd" else fixture_image(name)


@pytest.mark.parametrize("name", NAMES)
def test_info_json_on_every_fixture(capsys, name):
    row = ROWS[name]
    info = info_json(capsys, _path(name))
    assert list(info) == list(INFO_KEYS)
    assert info["format"] == row["format"].lower()
    assert info["subtype"] == row["subtype"].split()[0]
    assert info["virtual_size"] == int(row["virtual_size"].split()[0])
    assert info["allocated_bytes"] + info["zero_bytes"] + info["unallocated_bytes"] == info["virtual_size"]
    for layer in info["chain"]:
        assert list(layer)[:len(CHAIN_KEYS)] == list(CHAIN_KEYS)
    assert info["chain_complete"] == (row["file"] != "dfvfs_fat-differential.vhd")


@pytest.mark.parametrize("name", NAMES)
def test_info_sizes_agree_with_qemu_where_qemu_is_right(capsys, name):
    need("qemu-img")
    info = info_json(capsys, _path(name))
    q = qemu_info(_path(name), QEMU_FMT[info["format"]])          # -f vpc: qemu probes fixed VHD as raw
    if info["format"] == "vdi" and info["subtype"] == "differencing":
        assert q.returncode != 0 and "link UUID" in q.stderr       # qemu refuses differencing VDI
        return
    assert q.returncode == 0, q.stderr
    qsize = json.loads(q.stdout)["virtual-size"]
    if info["format"] == "vhd" and info["creator"] in ("vpc ", "vs  ", "qemu") and info["chs_size"]:
        assert qsize == info["chs_size"]                           # qemu's CHS rule for these creators
    else:
        assert qsize == info["virtual_size"]


def test_qemu_probes_a_fixed_vhd_as_raw_and_we_do_not(capsys):
    need("qemu-img")
    path = fixture_image("rdisk_vhd_fixed_small.vhd")
    q = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    assert json.loads(q.stdout)["format"] == "raw"                 # footer counted as data
    info = info_json(capsys, path)
    assert (info["format"], info["subtype"], info["virtual_size"]) == ("vhd", "fixed", 3145728)


def test_differencing_vhd_without_its_parent_is_described_not_read(capsys, tmp_path):
    shutil.copy(FIXTURES / "dfvfs_fat-differential.vhd", tmp_path)
    path = tmp_path / "dfvfs_fat-differential.vhd"
    info = info_json(capsys, path)
    assert info["chain_complete"] is False
    assert "5fa21a55-f394-aa4d-9958-1951a67d5540" in info["parent_error"]
    assert info["parent_uuid"] == "5fa21a55-f394-aa4d-9958-1951a67d5540"
    # ...while reading its content (which qemu-img does, wrongly, as if it had no parent) fails:
    status = main(["convert", str(path), str(tmp_path / "out.raw")])
    _, err = capsys.readouterr()
    assert status == 1 and "not found" in err
    assert not (tmp_path / "out.raw").exists()
