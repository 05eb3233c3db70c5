"""vdisk itself must never break or bloat an image (issue 13, item 5).

A hostile header field is a claim, not a fact. A fixed VDI whose block map has a free or zero
entry still has a slot in the file for that block: a write fills that slot, it never appends one
past the blocks the image can have. A parent locator's reserved space is honoured only as far as
the file has room for it: compaction and repair never grow a file by more than the data they
write. `vdisk check` reports both claims before anything trusts them.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest

import vdisk
from vdisk.formats.vhd_structs import HEADER_CHECKSUM_OFFSET, Footer, with_checksum

pytestmark = pytest.mark.filterwarnings("ignore")

MiB = 1 << 20


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing (make test installs it)")
    return path


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def check_json(path) -> tuple[int, dict]:
    r = cli("check", "--json", path)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------
# Fixed VDI with a map entry that holds no slot
# ---------------------------------------------------------------------------------------------
def fixed_vdi_with_unmapped_entry(tmp_path, entry: int, value: int):
    """A 4 MiB fixed VDI (1 MiB blocks) whose map entry *entry* is *value*; the slot it held keeps
    stale bytes, which must never become readable."""
    path = tmp_path / "fixed.vdi"
    with vdisk.create(path, 4 * MiB, format="vdi", subtype="fixed", block_size=MiB) as d:
        d.pwrite(b"\xa5" * MiB, entry * MiB)
        layer = d.layers[0]
        table, slot_at = layer.offset_blocks, layer.offset_data + entry * MiB
    with open(path, "r+b") as f:
        f.seek(table + 4 * entry)
        f.write(struct.pack("<I", value))
    return path, slot_at


@pytest.mark.parametrize("value, what", [(0xFFFFFFFF, "free"), (0xFFFFFFFE, "zero")])
def test_check_reports_a_fixed_vdi_map_entry_without_a_slot_as_corruption(tmp_path, value, what):
    qemu_img = need("qemu-img")
    path, _ = fixed_vdi_with_unmapped_entry(tmp_path, 2, value)
    judge = subprocess.run([qemu_img, "check", path], capture_output=True, text=True)
    assert judge.returncode != 0, judge.stdout            # QEMU: "allocated blocks mismatch"
    code, report = check_json(path)
    assert code == 2
    (finding,) = [f for f in report["findings"] if f["kind"] == "fixed-unmapped"]
    assert finding["severity"] == "corruption"
    assert f"entry 2 is {what}" in finding["message"] and "1 of 4 block map entries" in finding["message"]


@pytest.mark.parametrize("value", [0xFFFFFFFF, 0xFFFFFFFE])
def test_a_write_to_a_fixed_vdi_block_without_a_slot_fills_the_unreferenced_slot(tmp_path, value):
    qemu_img, qemu_io = need("qemu-img"), need("qemu-io")
    path, slot_at = fixed_vdi_with_unmapped_entry(tmp_path, 1, value)
    size = path.stat().st_size
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"new data" * 64, MiB + 4096)
    assert path.stat().st_size == size                     # no slot appended past the image's blocks
    r = cli("info", path)
    assert r.returncode == 0, r.stderr
    code, report = check_json(path)
    assert code == 0, report["findings"]
    judge = subprocess.run([qemu_img, "check", path], capture_output=True, text=True)
    assert judge.returncode == 0, judge.stdout
    reads = subprocess.run([qemu_io, "-r", "-f", "vdi", "-c", f"read -P 0 {MiB} 4096",
                            "-c", f"read -v {MiB + 4096} 512", "-c", f"read -P 0 {MiB + 4608} {MiB - 4608}",
                            "-c", f"read -P 0 {2 * MiB} {2 * MiB}", path], capture_output=True, text=True)
    assert reads.returncode == 0 and "Pattern verification failed" not in reads.stdout, reads.stdout
    with vdisk.open(path) as d:                            # the stale bytes of the slot read as zeros
        block = d.pread(MiB, MiB)
    assert block[4096:4608] == b"new data" * 64
    assert block[:4096] == bytes(4096) and block[4608:] == bytes(MiB - 4608)
    with open(path, "rb") as f:
        f.seek(slot_at + 4096)
        assert f.read(512) == b"new data" * 64             # it went to the block's own slot


def test_a_fixed_vdi_block_whose_own_slot_is_taken_gets_the_free_one(tmp_path):
    """Entry 0 points at slot 3 and entry 3 is free: a write to block 3 lands in slot 0."""
    path = tmp_path / "perm.vdi"
    with vdisk.create(path, 4 * MiB, format="vdi", subtype="fixed", block_size=MiB) as d:
        table, data = d.layers[0].offset_blocks, d.layers[0].offset_data
    with open(path, "r+b") as f:
        f.seek(table)
        f.write(struct.pack("<4I", 3, 1, 2, 0xFFFFFFFF))
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"\x5a" * 512, 3 * MiB)
    with open(path, "rb") as f:
        f.seek(table)
        assert struct.unpack("<4I", f.read(16)) == (3, 1, 2, 0)
        f.seek(data)
        assert f.read(512) == b"\x5a" * 512
    assert check_json(path)[0] == 0
