"""Reports bounded by what a file holds, not by what it claims (issue 13, item 4).

`vdisk check` summarises its findings by kind: a count and the first ten examples, in the text
(one line per kind) and in --json, and it examines tables with numpy a chunk at a time, so a
crafted table of a million bad entries costs one line and a few MiB. `vdisk map` and `vdisk info`
walk the disk in windows whose runs are bounded from the block maps, and map writes each run as
it is found, so memory stays flat however many runs there are.

Memory is bounded by running the real CLI in a child under an address-space limit: what the
same command needs on a tiny clean image, plus MARGIN. The vectorized check is held to the
entry-by-entry rules it replaced (a model written out below), and the windowed walk to
``Disk.map_runs`` over the whole range; qemu-img judges a map with thousands of runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
import vdisk.formats.findings as check_module
import vdisk.ops.runs as runs_module
from vdisk import limits
from vdisk.ops.check import EXAMPLES, CheckReport, Finding, check
from vdisk.cli import main
from vdisk.ops.runs import _run_bound, iter_runs

MiB = 1 << 20
TiB = 1 << 40
#: Memory a crafted image may cost beyond what the same command needs on a tiny clean image.
MARGIN = 64 * MiB
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- running the CLI in a child under an address-space limit -------------------------------------
def cli(*argv, limit: int) -> subprocess.CompletedProcess:
    def set_limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, preexec_fn=set_limit, env=env)


def _fits(argv, limit: int) -> bool:
    r = cli(*argv, limit=limit)
    return r.returncode == 0 and not r.stderr


@functools.lru_cache(maxsize=None)
def _baseline(kind: str, folder: str) -> int:
    """The smallest address space (to 8 MiB) in which the command runs on a tiny clean image."""
    folder = os.path.join(folder, kind)
    os.mkdir(folder)
    if kind == "check":
        image = os.path.join(folder, "tiny.vdi")
        vdisk.create(image, MiB, format="vdi").close()
        argv = ("check", image)
    else:
        image = every_other_sector_child(folder, 4 * MiB)
        argv = (kind, "--json", image)
    lo, hi = 16 * MiB, 4096 * MiB
    assert _fits(argv, hi), "the tiny image needs more than 4 GiB?"
    while hi - lo > 8 * MiB:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(argv, mid) else (mid, hi)
    return hi


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    """budget(command): the address-space limit for a crafted image under *command*."""
    folder = str(tmp_path_factory.mktemp("baseline"))
    return lambda kind: _baseline(kind, folder) + MARGIN


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- crafted images -------------------------------------------------------------------------------
def zeroed_vdi(path, *, one_slot: bool) -> str:
    """A 1 TiB VDI (1,048,576 map entries) whose map is all zeros: every block claims slot 0,
    which the file holds (*one_slot*) or not."""
    with vdisk.create(path, TiB, format="vdi") as d:
        if one_slot:
            d.pwrite(b"\x01" * 512, 0)
    with open(path, "r+b") as f:
        offset_blocks, offset_data = struct.unpack_from("<II", f.read(0x200), 0x154)
        f.seek(offset_blocks)
        f.write(bytes(offset_data - offset_blocks))
    return str(path)


def vhd_tables(path):
    """(dynamic header offset, table offset, entries) of a dynamic or differencing VHD."""
    with open(path, "rb") as f:
        hoff = struct.unpack_from(">Q", f.read(512), 16)[0]
        f.seek(hoff)
        h = f.read(1024)
    return hoff, struct.unpack_from(">Q", h, 16)[0], struct.unpack_from(">I", h, 28)[0]


def zeroed_vhd(path) -> str:
    """A 1 TiB dynamic VHD of 512 KiB blocks (2,097,152 BAT entries) whose BAT is all zeros."""
    vdisk.create(path, TiB, format="vhd", block_size=512 << 10).close()
    _, toff, n = vhd_tables(path)
    with open(path, "r+b") as f:
        f.seek(toff)
        f.write(bytes(4 * n))
    return str(path)


def every_other_sector_child(folder, size: int) -> str:
    """A valid differencing VHD over an empty parent, every block allocated and every other sector
    of it present (bitmap bytes 0xAA): one run per sector. The data area is left sparse."""
    base, child = os.path.join(folder, f"base{size}.vhd"), os.path.join(folder, f"child{size}.vhd")
    vdisk.create(base, size, format="vhd").close()
    with vdisk.create(child, parent=base) as d:
        bs = d.block_size
        for b in range(size // bs):
            d.pwrite(b"\x01" * 512, b * bs)
    _, toff, n = vhd_tables(child)
    with open(child, "r+b") as f:
        f.seek(toff)
        for entry in struct.unpack(f">{n}I", f.read(4 * n)):
            f.seek(entry * 512)
            f.write(b"\xaa" * (bs // 512 // 8))
    return child


# -- check: one line per kind ---------------------------------------------------------------------
@pytest.mark.parametrize("one_slot, kind, count, first", [
    (False, "map-range", 1 << 20, "entry 0 -> slot 0"),
    (True, "map-overlap", (1 << 20) - 1, "entry 1 -> slot 0 of entry 0"),
])
def test_check_of_a_zeroed_1tib_vdi_map_is_one_line_per_kind_in_bounded_memory(tmp_path, budget, one_slot, kind,
                                                                               count, first):
    path = zeroed_vdi(tmp_path / "zeroed.vdi", one_slot=one_slot)
    before = digest(path)
    r = cli("check", path, limit=budget("check"))
    assert r.returncode == 2 and not r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, lines[:5]                       # the kind, then the totals
    assert lines[0].startswith(f"corruption: {kind}: {count} found, ")
    assert f"(first {EXAMPLES}: {first};" in lines[0]
    assert lines[1] == f"{path}: {count} corruption(s), 0 leak(s)"
    r = cli("check", "--json", path, limit=budget("check"))
    report = json.loads(r.stdout)
    assert r.returncode == 2 and report["exit_code"] == 2
    [finding] = report["findings"]
    assert finding["kind"] == kind and finding["count"] == count and finding["fixable"]
    assert len(finding["examples"]) == EXAMPLES and finding["examples"][0] == first
    assert digest(path) == before


def test_check_of_a_zeroed_vhd_bat_of_two_million_entries_is_one_line(tmp_path, budget):
    path = zeroed_vhd(tmp_path / "zeroed.vhd")
    before = digest(path)
    r = cli("check", path, limit=budget("check"))
    assert r.returncode == 2 and not r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"corruption: bat-range: {1 << 21} found, ")
    assert digest(path) == before


def test_repair_of_a_zeroed_map_in_bounded_memory_leaves_a_clean_image(tmp_path, budget):
    path = zeroed_vdi(tmp_path / "zeroed.vdi", one_slot=True)
    r = cli("check", "--repair", path, limit=budget("check"))
    assert r.returncode == 0 and "repaired: dropped block map entries that shared a slot" in r.stdout, r.stdout
    after = check(path)
    assert after.clean and after.allocated_blocks == 1
    with vdisk.open(path) as d:
        assert d.pread(512, 0) == b"\x01" * 512 and d.pread(512, MiB) == bytes(512)


def test_a_table_beyond_vdisks_budget_is_an_error_not_an_allocation(tmp_path, monkeypatch):
    path = zeroed_vdi(tmp_path / "zeroed.vdi", one_slot=False)
    monkeypatch.setattr(limits, "MAX_TABLE_ENTRIES", 1 << 19)
    r = check(path)
    assert r.exit_code == 1 and "exceed vdisk's limit" in r.error and path in r.error


def test_check_refuses_a_sparse_vhd_claiming_100_million_entries_in_one_line(tmp_path, budget):
    """400 MB (sparse) that could hold the table, but 100 M entries exceed vdisk's table budget."""
    from vdisk.formats.vhd.structs import HEADER_CHECKSUM_OFFSET, with_checksum
    path = tmp_path / "claims.vhd"
    vdisk.create(path, 64 * MiB, format="vhd", block_size=4096).close()
    hoff, _, _ = vhd_tables(path)
    with open(path, "r+b") as f:
        f.seek(hoff)
        header = bytearray(f.read(1024))
        struct.pack_into(">I", header, 28, 100_000_000)
        f.seek(hoff)
        f.write(with_checksum(bytes(header), HEADER_CHECKSUM_OFFSET))
        f.seek(-512, os.SEEK_END)
        footer = f.read(512)
        f.truncate(420_000_000 - 512)
        f.seek(0, os.SEEK_END)
        f.write(footer)
    r = cli("check", path, limit=budget("check"))
    assert r.returncode == 1 and not r.stderr
    assert r.stdout.splitlines() == [f"check failed: {path}: dynamic header.max_table_entries at offset "
                                     f"{hoff + 28:#x}: 100000000 table entries exceed vdisk's limit of "
                                     f"{limits.MAX_TABLE_ENTRIES} (512 MiB of memory)"]


# -- the grouping itself --------------------------------------------------------------------------
def test_findings_of_one_kind_are_counted_and_the_first_ten_kept():
    report = CheckReport("x.vhd", "vhd", "dynamic")
    for i in range(25):
        report.findings.append(Finding("bat-overlap", "corruption", f"block {i} overlaps block {i + 1}", True))
    report.findings.append(Finding("leak-tail", "leak", "4096 bytes at the end are referenced by nothing"))
    report.findings.append(Finding.many("bat-overlap", "corruption", 1000, "blocks overlapping metadata",
                                        [f"block {i}" for i in range(50, 80)]))
    assert [f.kind for f in report.findings] == ["bat-overlap", "leak-tail"]
    overlap, leak = report.findings
    assert overlap.count == 1025 and overlap.examples == [f"block {i} overlaps block {i + 1}" for i in range(10)]
    assert leak.count == 1 and leak.examples == [leak.message]
    lines = report.summary().splitlines()
    assert lines == [
        "corruption: bat-overlap: 1025 found (first 10: " + "; ".join(overlap.examples) + ")",
        "leak: 4096 bytes at the end are referenced by nothing",
        "x.vhd: 1025 corruption(s), 1 leak(s)",
    ]
    as_json = report.to_dict()["findings"]
    assert [(f["kind"], f["count"], len(f["examples"])) for f in as_json] == [("bat-overlap", 1025, 10),
                                                                              ("leak-tail", 1, 1)]
    assert report.exit_code == 2


def test_a_batch_found_at_once_says_what_it_is_then_shows_examples():
    few = Finding.many("map-range", "corruption", 3, "block map entries pointing past the image",
                       ["entry 1 -> slot 9", "entry 2 -> slot 9", "entry 5 -> slot 9"])
    assert few.text() == ("map-range: 3 found, block map entries pointing past the image "
                          "(entry 1 -> slot 9; entry 2 -> slot 9; entry 5 -> slot 9)")
    many = Finding.many("map-range", "corruption", 11, "entries", [f"e{i}" for i in range(11)])
    assert len(many.examples) == EXAMPLES and many.text().endswith("(first 10: e0; e1; e2; e3; e4; e5; e6; e7; e8; e9)")


# -- the vectorized check against the entry-by-entry rules ---------------------------------------
def assert_findings(report, expected: dict) -> None:
    """Each kind in *expected* is reported with the model's count and its first examples (or not at all)."""
    found = {f.kind: f for f in report.findings}
    for kind, messages in expected.items():
        if messages:
            assert (found[kind].count, found[kind].examples) == (len(messages), messages[:EXAMPLES]), kind
        else:
            assert kind not in found, found[kind]


def vdi_model(entries, n, file_slots):
    """The VDI map rules one entry at a time: an entry past the image or the file is out of range;
    the first entry of a slot owns it, later ones share it."""
    far, shared, owner = [], [], {}
    for blk, s in enumerate(entries):
        if s >= 0xFFFFFFFE:
            continue
        if s >= min(n, file_slots):
            far.append(f"entry {blk} -> slot {s}")
        elif s in owner:
            shared.append(f"entry {blk} -> slot {s} of entry {owner[s]}")
        else:
            owner[s] = blk
    repaired = [0xFFFFFFFF if s < 0xFFFFFFFE and (s >= min(n, file_slots) or owner.get(s) != blk) else s
                for blk, s in enumerate(entries)]
    return far, shared, len(owner), repaired


@SETTINGS
@given(data=st.data())
def test_vdi_map_findings_match_the_entry_by_entry_rules(tmp_path_factory, monkeypatch, data):
    n, slots = 24, 6
    entries = data.draw(st.lists(st.one_of(st.integers(0, n + 2), st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE])),
                                 min_size=n, max_size=n))
    monkeypatch.setattr(check_module, "CHECK_CHUNK", data.draw(st.sampled_from([1, 5, 1 << 18])))
    path = str(tmp_path_factory.mktemp("vdi") / "m.vdi")
    with vdisk.create(path, n * 4096, format="vdi", block_size=4096) as d:
        for b in range(slots):
            d.pwrite(b"\x07" * 4096, b * 4096)
    with open(path, "r+b") as f:
        offset_blocks = struct.unpack_from("<I", f.read(0x200), 0x154)[0]
        f.seek(offset_blocks)
        f.write(struct.pack(f"<{n}I", *entries))
    far, shared, used, repaired = vdi_model(entries, n, slots)
    report = check(path)
    assert_findings(report, {"map-range": far, "map-overlap": shared})
    assert report.allocated_blocks == used
    check(path, repair=True)
    with open(path, "rb") as f:
        f.seek(offset_blocks)
        assert list(struct.unpack(f"<{n}I", f.read(4 * n))) == repaired


def vhd_model(bat, unit, meta, end_of_data):
    """The BAT rules one entry at a time: outside the data area, over metadata, then (in order of
    offset) over the last kept block. Returns the findings' examples, the kept offsets, the drops."""
    ranged, overlaps, drop, candidates = [], [], set(), []
    for blk, e in enumerate(bat):
        if e == 0xFFFFFFFF:
            continue
        s = e * 512
        if s + unit > end_of_data or s < 512:
            ranged.append(f"entry {blk} -> {s:#x}..{s + unit:#x}")
            drop.add(blk)
            continue
        hit = next(((lo, hi) for lo, hi in meta if s < hi and s + unit > lo), None)
        if hit:
            overlaps.append(f"block {blk} at {s:#x} overlaps metadata at {hit[0]:#x}..{hit[1]:#x}")
            drop.add(blk)
        else:
            candidates.append((s, blk))
    last_end, last_blk, live = 0, -1, []
    for s, blk in sorted(candidates):
        if s < last_end:
            overlaps.append(f"block {blk} at {s:#x} overlaps block {last_blk}")
            drop.add(blk)
            continue
        last_end, last_blk = s + unit, blk
        live.append(s)
    return ranged, overlaps, live, drop


@SETTINGS
@given(data=st.data())
def test_vhd_bat_findings_match_the_entry_by_entry_rules(tmp_path_factory, monkeypatch, data):
    bs, n = 4096, 16
    path = str(tmp_path_factory.mktemp("vhd") / "m.vhd")
    with vdisk.create(path, n * bs, format="vhd", block_size=bs) as d:
        for b in range(8):
            d.pwrite(bytes([b + 1]) * bs, b * bs)
    hoff, toff, entries = vhd_tables(path)
    with open(path, "rb") as f:
        f.seek(toff)
        real = [e for e in struct.unpack(f">{entries}I", f.read(4 * entries)) if e != 0xFFFFFFFF]
    size = os.path.getsize(path)
    # Real blocks, shifted ones overlapping their neighbours, metadata, the ends of the file.
    candidates = real + [e + k for e in real for k in (1, 8)] + [0, 1, hoff // 512, toff // 512,
                                                                (size - 512) // 512, (size + bs) // 512]
    bat = data.draw(st.lists(st.one_of(st.sampled_from(candidates), st.just(0xFFFFFFFF)), min_size=n, max_size=n))
    monkeypatch.setattr(check_module, "CHECK_CHUNK", data.draw(st.sampled_from([1, 3, 1 << 18])))
    with open(path, "r+b") as f:
        f.seek(toff)
        f.write(struct.pack(f">{n}I", *bat))
    unit = 512 + bs
    meta = [(0, 512), (hoff, hoff + 1024), (toff, toff + -(-4 * entries // 512) * 512)]
    ranged, overlaps, live, drop = vhd_model(bat, unit, meta, size - 512)
    report = check(path)
    assert_findings(report, {"bat-range": ranged, "bat-overlap": overlaps})
    assert report.allocated_blocks == len(live)
    gaps = 0
    pos = max(hi for _, hi in meta)
    for s in live:
        gaps += s - pos if s - pos >= unit else 0
        pos = max(pos, s + unit)
    tail = size - 512 - max([max(hi for _, hi in meta)] + [s + unit for s in live])
    assert report.leaked_bytes == gaps + (tail if tail >= unit else 0)
    check(path, repair=True)
    with open(path, "rb") as f:
        f.seek(toff)
        after = struct.unpack(f">{n}I", f.read(4 * n))
    assert list(after) == [0xFFFFFFFF if blk in drop else e for blk, e in enumerate(bat)]


# -- map and info: a window at a time -------------------------------------------------------------
@pytest.mark.parametrize("size", [16 * MiB, 128 * MiB])
def test_map_json_of_a_child_with_a_run_per_sector_streams_in_flat_memory(tmp_path, budget, size):
    child = every_other_sector_child(str(tmp_path), size)
    with vdisk.open(child) as d:
        block_map = d.layers[0].block_map.copy()
    r = cli("map", "--json", child, limit=budget("map"))
    assert r.returncode == 0 and not r.stderr, r.stderr
    runs = json.loads(r.stdout)
    assert len(runs) == size // 512
    assert [r["start"] for r in runs] == list(range(0, size, 512)) and {r["length"] for r in runs} == {512}
    for i, run in enumerate(runs[:: 1 + len(runs) // 997]):
        start = run["start"]
        if start // 512 % 2 == 0:
            b = start // (2 * MiB)
            assert (run["kind"], run["layer"], run["offset"]) == ("data", 0, block_map[b] + start % (2 * MiB))
        else:
            assert (run["kind"], run["layer"], run["offset"], run["file"]) == ("unallocated", None, None, None)


def test_map_and_info_of_the_same_child_also_stay_in_flat_memory(tmp_path, budget):
    size = 128 * MiB
    child = every_other_sector_child(str(tmp_path), size)
    r = cli("map", child, limit=budget("map"))
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 1 + size // 512
    r = cli("info", "--json", child, limit=budget("info"))
    assert r.returncode == 0 and not r.stderr, r.stderr
    info = json.loads(r.stdout)
    assert info["allocated_bytes"] == info["unallocated_bytes"] == size // 2


def _chain(folder, data, fmt):
    """A two-layer chain with random writes, zero-writes and discards in both layers."""
    bs = 4096 if fmt == "vdi" else 8192
    size = 48 * bs
    base, top = os.path.join(folder, f"base.{fmt}"), os.path.join(folder, f"top.{fmt}")
    ops = st.tuples(st.sampled_from(["write", "zero"]), st.integers(0, size // 512 - 1), st.integers(1, 40))

    def scribble(d, fill: bytes) -> None:
        for op, sector, count in data.draw(st.lists(ops, max_size=12)):
            count = min(count, size // 512 - sector)
            if op == "write":
                d.pwrite(fill * 512 * count, sector * 512)
            else:
                d.write_zeroes(sector * 512, 512 * count)

    with vdisk.create(base, size, format=fmt, block_size=bs) as d:
        scribble(d, b"\x11")
    with vdisk.create(top, parent=base) as d:
        scribble(d, b"\x22")
    return top


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(["vhd", "vdi"]))
def test_the_windowed_walk_yields_exactly_the_runs_of_one_resolve(tmp_path_factory, monkeypatch, data, fmt):
    monkeypatch.setattr(runs_module, "WINDOW_RUNS", data.draw(st.sampled_from([4, 16, 1 << 15])))
    monkeypatch.setattr(runs_module, "MIN_WINDOW", 1024)
    top = _chain(str(tmp_path_factory.mktemp("chain")), data, fmt)
    with vdisk.open(top) as d:
        assert list(iter_runs(d)) == d.map_runs(0, d.size)
        start = data.draw(st.integers(0, d.size - 1))
        length = data.draw(st.integers(1, d.size - start))
        assert list(iter_runs(d, start, length)) == d.map_runs(start, length)
        # The bound the window sizes come from is never below what a window really yields.
        for _ in range(5):
            a = data.draw(st.integers(0, d.size - 1))
            b = data.draw(st.integers(a + 1, d.size))
            assert len(d.map_runs(a, b - a)) <= _run_bound(d.layers, a, b)


def test_map_of_thousands_of_runs_in_small_windows_agrees_with_qemu_img(tmp_path, capsys, monkeypatch):
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img (the judge) is not installed")
    monkeypatch.setattr(runs_module, "WINDOW_RUNS", 64)
    path = tmp_path / "sparse.vhd"
    bs = 4096
    with vdisk.create(path, 4096 * bs, format="vhd", block_size=bs) as d:
        for b in range(0, 4096, 2):
            d.pwrite(b"\x5a" * bs, b * bs)
    assert main(["map", "--json", str(path)]) == 0
    ours = [(r["start"], r["length"]) for r in json.loads(capsys.readouterr().out) if r["kind"] == "data"]
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "vpc", str(path)], capture_output=True,
                         text=True, check=True).stdout
    theirs = [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]
    assert len(ours) == 2048 and ours == theirs
