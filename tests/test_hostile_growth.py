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
from vdisk.formats.vhd.structs import HEADER_CHECKSUM_OFFSET, Footer, with_checksum

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.judges("qemu-img", "qemu-io")]

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


def test_a_dynamic_vdi_counting_slots_the_file_lacks_grows_by_one_slot_per_new_block(tmp_path):
    """blocks_allocated says 7936 slots, the file holds 1: the next block goes right after the
    file's slots (the write grew the file from 3 MiB to 8.3 GB), and the count is corrected."""
    qemu_img, qemu_io = need("qemu-img"), need("qemu-io")
    path = tmp_path / "dyn.vdi"
    with vdisk.create(path, 8 << 30, format="vdi", block_size=MiB) as d:
        d.pwrite(b"a" * 512, 0)
    with open(path, "r+b") as f:
        f.seek(0x184)
        f.write(struct.pack("<I", 7936))
    assert check_json(path)[0] == 2                              # allocated-count: check sees it
    size = path.stat().st_size
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"b" * 512, 1 << 30)
    assert path.stat().st_size == size + MiB
    assert check_json(path)[0] == 0
    assert subprocess.run([qemu_img, "check", path], capture_output=True).returncode == 0
    reads = subprocess.run([qemu_io, "-r", "-c", "read -P 0x61 0 512", "-c", f"read -P 0x62 {1 << 30} 512",
                            "-c", f"read -P 0 {(1 << 30) + 512} {MiB - 512}", path], capture_output=True, text=True)
    assert reads.returncode == 0 and "verification failed" not in reads.stdout, reads.stdout


# ---------------------------------------------------------------------------------------------
# VHD parent locator claiming more reserved space than the file has
# ---------------------------------------------------------------------------------------------
PLAT_W2RU = 0x57327275


def set_locator(path, index: int, *, space: int, code: int = PLAT_W2RU, length=None, offset=None) -> None:
    """Rewrite parent locator *index* of a dynamic header, checksum recomputed (so the image
    opens and the deeper code trusts it)."""
    raw = bytearray(path.read_bytes()[:64 * 1024])
    hoff = Footer.parse(bytes(raw[:512])).data_offset
    at = hoff + 0x240 + 24 * index
    old_code, _, old_length, _, old_offset = struct.unpack(">IIIIQ", raw[at:at + 24])
    entry = struct.pack(">IIIIQ", code, space, old_length if length is None else length, 0,
                        old_offset if offset is None else offset)
    header = bytearray(raw[hoff:hoff + 1024])
    header[0x240 + 24 * index:0x240 + 24 * index + 24] = entry
    with open(path, "r+b") as f:
        f.seek(hoff)
        f.write(with_checksum(bytes(header), HEADER_CHECKSUM_OFFSET))


def written_image(path, *, parent=None):
    """8 MiB VHD with data in blocks 0 and 2 (a dynamic one, or a differencing child of *parent*)."""
    if parent is None:
        d = vdisk.create(path, 8 * MiB, format="vhd")
    else:
        d = vdisk.create(path, format="vhd", parent=parent)
    with d:
        d.pwrite(b"\x11" * 4096, 0)
        d.pwrite(b"\x22" * 4096, 4 * MiB + 512)
    return path


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.vhd"
    with vdisk.create(path, 8 * MiB, format="vhd") as d:
        d.pwrite(b"\x33" * MiB, 2 * MiB)
    return path


def hostile_pair(tmp_path, kind: str, base):
    """(image with locator 0 claiming 0xFFFFFFFF bytes, untouched copy to compare with)."""
    if kind == "dynamic":
        image = written_image(tmp_path / "dyn.vhd")
        # A dynamic image has no locators: give it one pointing at the header, as a fuzzer did.
        set_locator(image, 0, space=0xFFFFFFFF, length=16, offset=0x200)
    else:
        image = written_image(tmp_path / "child.vhd", parent=base)
        set_locator(image, 0, space=0xFFFFFFFF)
    reference = tmp_path / f"ref-{image.name}"
    shutil.copyfile(image, reference)
    return image, reference


def judge_same(a, b) -> None:
    """QEMU opens a differencing VHD on its own (no parent): it compares the blocks each file holds."""
    r = subprocess.run([need("qemu-img"), "compare", "-f", "vpc", "-F", "vpc", a, b], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_check_reports_a_locator_claiming_space_the_file_does_not_have(tmp_path, base, kind):
    need("qemu-img")
    image, _ = hostile_pair(tmp_path, kind, base)
    code, report = check_json(image)
    assert code == 2
    (finding,) = [f for f in report["findings"] if f["kind"] == "locator-space"]
    assert finding["severity"] == "corruption" and finding["fixable"]
    assert "parent locator 0" in finding["message"] and "0x" in finding["message"]
    assert not [f for f in report["findings"] if f["kind"].startswith("bat-")]   # the blocks are fine


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_compact_never_grows_a_file_whose_locator_claims_4_gib(tmp_path, base, kind):
    need("qemu-img")
    image, reference = hostile_pair(tmp_path, kind, base)
    size = image.stat().st_size
    r = cli("compact", image)
    assert r.returncode == 0, r.stderr
    assert "reclaimed -" not in r.stdout
    assert image.stat().st_size <= size
    judge_same(image, reference)                             # and no block was taken for a hole


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize("footer", ["present", "missing"])
def test_check_repair_cuts_the_claim_and_never_grows_the_file(tmp_path, base, kind, footer):
    need("qemu-img")
    image, reference = hostile_pair(tmp_path, kind, base)
    size = image.stat().st_size
    if footer == "missing":                                  # repair then rebuilds the end of the file
        with open(image, "r+b") as f:
            f.truncate(size - 512)
    r = cli("check", "--repair", image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "locator" in r.stdout
    assert image.stat().st_size <= size
    assert check_json(image)[0] == 0
    judge_same(image, reference)


def test_a_reservation_over_the_blocks_does_not_make_them_corrupt(tmp_path, base):
    """Locator 1's data is 32 bytes at 0xc00; a 1 MiB reservation would cover the first blocks. The
    claim gives way to the data: check offers to cut it, and repair keeps every block."""
    need("qemu-img")
    image = written_image(tmp_path / "child.vhd", parent=base)
    set_locator(image, 1, space=MiB)
    reference = tmp_path / "ref.vhd"
    shutil.copyfile(image, reference)
    assert cli("info", image).returncode == 0
    code, report = check_json(image)
    assert code == 2 and [f["kind"] for f in report["findings"]] == ["locator-space"]
    r = cli("check", "--repair", image)
    assert r.returncode == 0, r.stdout + r.stderr
    with vdisk.open(image) as d:
        assert d.pread(4096, 0) == b"\x11" * 4096
    judge_same(image, reference)


def test_opening_a_child_without_its_end_footer_for_writing_does_not_grow_it(tmp_path, base):
    """The driver rebuilds a lost end footer after the last structure: a claimed reservation past
    the file is not a structure."""
    image = tmp_path / "child.vhd"
    vdisk.create(image, format="vhd", parent=base).close()
    set_locator(image, 1, space=0xFFFFFFFF)
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.truncate(size - 512)
    with vdisk.open(image, "r+") as d:
        assert d.pread(MiB, 2 * MiB) == b"\x33" * MiB
    assert image.stat().st_size <= size


def test_relink_never_writes_a_longer_path_into_a_claimed_reservation_over_a_block(tmp_path, base):
    """Locator 1 (32 bytes at 0xc00, block 0 at 0x1000) claims 4 GiB. A parent moved to a long
    path needs more than the 1 KiB there is: the path goes to the end of the file instead of over
    block 0's bitmap (which left an image that no longer opened)."""
    need("qemu-img")
    image = written_image(tmp_path / "child.vhd", parent=base)
    for i in (0, 1):
        set_locator(image, i, space=0xFFFFFFFF)
    reference = tmp_path / "ref.vhd"
    shutil.copyfile(image, reference)
    far = tmp_path.joinpath(*["d" * 60] * 9)
    far.mkdir(parents=True)
    base.rename(far / base.name)
    size = image.stat().st_size
    r = cli("relink", image, "--parent-search", far)
    assert r.returncode == 0, r.stdout + r.stderr
    assert image.stat().st_size <= size + 4096                # the two new paths, nothing more
    judge_same(image, reference)
    with vdisk.open(image) as d:                              # the locator now names the new place
        assert d.chain[1].path == str(far / base.name)
        assert d.pread(4096, 0) == b"\x11" * 4096 and d.pread(MiB, 2 * MiB) == b"\x33" * MiB


def test_resize_moves_only_the_locator_bytes_the_file_holds(tmp_path):
    """A larger table must move what lies in its way; a locator claiming 4 GiB there moved 4 GiB
    (a MemoryError traceback under a memory limit)."""
    need("qemu-img")
    image = written_image(tmp_path / "dyn.vhd")
    set_locator(image, 0, space=0xFFFFFFFF, length=16, offset=0x800)     # over block 0's bitmap
    reference = tmp_path / "ref.vhd"
    shutil.copyfile(image, reference)
    r = subprocess.run([sys.executable, "-m", "vdisk", "resize", image, "1G"], capture_output=True, text=True,
                       timeout=120, preexec_fn=lambda: __import__("resource").setrlimit(
                           __import__("resource").RLIMIT_AS, (1 << 30, 1 << 30)))
    assert r.returncode == 0, r.stderr
    assert image.stat().st_size < reference.stat().st_size + 2 * (2 * MiB + 512) + 8192
    with vdisk.open(image) as d, vdisk.open(reference) as ref:
        assert d.size == 1 << 30
        assert d.pread(8 * MiB, 0) == ref.pread(8 * MiB, 0)
    assert check_json(image)[0] == 0
