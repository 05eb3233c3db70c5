"""`vdisk map --svg` draws what Disk.extents says, cell by cell, with the partition table's
boundaries and a legend; `vdisk info` on a terminal prints a one-line density strip."""
from __future__ import annotations

import os
import pty
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import vdisk
from vdisk.cli import main
from vdisk.engine import ExtentKind
from vdisk.ops.svgmap import (CELL_H, LAYER_COLOURS, UNALLOCATED_COLOUR, ZERO_COLOUR, allocation_cells,
                          cell_size_for, density_strip, render_svg)

from conftest import fixture_image

KiB, MiB = 1 << 10, 1 << 20
SVG = "{http://www.w3.org/2000/svg}"
#: (start LBA, sectors, MBR type) of the partitions written into the test disk's MBR.
PARTITIONS = [(2048, 8192, 0x83), (10240 + 100, 12000, 0x07)]


def write_mbr(d) -> None:
    mbr = bytearray(512)
    for slot, (lba, count, ptype) in enumerate(PARTITIONS):
        mbr[446 + 16 * slot:446 + 16 * (slot + 1)] = struct.pack("<B3sB3sII", 0, b"\0" * 3, ptype, b"\0" * 3, lba, count)
    mbr[510:512] = b"\x55\xaa"
    d.pwrite(bytes(mbr), 0)


@pytest.fixture
def chain(tmp_path):
    """base.vdi (1 MiB blocks, 16 MiB: MBR, data, a zero block) under child.vdi (more data)."""
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    with vdisk.create(base, 16 * MiB, format="vdi", subtype="dynamic") as d:
        write_mbr(d)
        d.pwrite(b"\x11" * (3 * MiB // 2), 2 * MiB)          # blocks 2 and 3
        d.layers[0].mark_zero(6)                             # a VDI zero block
        d.pwrite(b"\x22" * 4096, 15 * MiB + 8192)
    with vdisk.create(child, format="vdi", parent=base) as d:
        d.pwrite(b"\x33" * MiB, 3 * MiB)                     # hides base's block 3
        d.pwrite(b"\x44" * 10, 9 * MiB + 1000)
    return child


def expected_cells(d, cell: int) -> list[dict]:
    """Independent of svgmap: bytes of each (kind, layer) in every cell, from Disk.extents()."""
    cells = []
    for start in range(0, d.size, cell):
        end = min(d.size, start + cell)
        counts: dict = {}
        for e in d.extents():
            lo, hi = max(start, e.offset), min(end, e.offset + e.length)
            if lo < hi:
                kind = {ExtentKind.DATA: "data", ExtentKind.ZERO: "zero", ExtentKind.UNALLOCATED: "unallocated"}[e.kind]
                key = (kind, e.layer if e.kind == ExtentKind.DATA else None)
                counts[key] = counts.get(key, 0) + hi - lo
        cells.append({"start": start, "length": end - start, "counts": counts})
    return cells


def parse(svg_text: str) -> ET.Element:
    root = ET.fromstring(svg_text)
    assert root.tag == SVG + "svg"
    return root


def drawn_cells(root: ET.Element) -> list[dict]:
    out = []
    for g in root.find(f"{SVG}g[@id='cells']").findall(f"{SVG}g"):
        counts, height, fills = {}, 0.0, {}
        for rect in g.findall(f"{SVG}rect"):
            layer = rect.get("data-layer")
            key = (rect.get("data-kind"), None if layer is None else int(layer))
            counts[key] = int(rect.get("data-bytes"))
            fills[key] = rect.get("fill")
            height += float(rect.get("height"))
        out.append({"start": int(g.get("data-start")), "length": int(g.get("data-length")),
                    "counts": counts, "height": height, "fills": fills})
    return out


@pytest.mark.parametrize("max_cells", [64, 100, 1024])
def test_every_cell_shows_exactly_the_extents_it_covers(chain, max_cells):
    with vdisk.open(chain) as d:
        cells = allocation_cells(d, max_cells)
        root = parse(render_svg(d, cells))
        want = expected_cells(d, cells.cell_bytes)
    got = drawn_cells(root)
    assert [(c["start"], c["length"]) for c in got] == [(c["start"], c["length"]) for c in want]
    for g, w in zip(got, want):
        assert g["counts"] == w["counts"], g["start"]
        assert sum(g["counts"].values()) == g["length"]
        assert g["height"] == pytest.approx(CELL_H, abs=0.01)          # the column is full
    assert len(got) <= max_cells


def test_colours_say_kind_and_layer(chain):
    with vdisk.open(chain) as d:
        got = drawn_cells(parse(render_svg(d, allocation_cells(d, 16))))    # 1 MiB cells = VDI blocks
    fills = {key: fill for c in got for key, fill in c["fills"].items()}
    assert fills[("data", 0)] == LAYER_COLOURS[0] and fills[("data", 1)] == LAYER_COLOURS[1]
    assert fills[("zero", None)] == ZERO_COLOUR and fills[("unallocated", None)] == UNALLOCATED_COLOUR
    assert got[3]["counts"] == {("data", 0): MiB}                          # the child hides base here
    assert got[2]["counts"] == {("data", 1): MiB}
    assert got[6]["counts"] == {("zero", None): MiB}


def test_partition_boundaries_come_from_the_partition_table(chain):
    with vdisk.open(chain) as d:
        root = parse(render_svg(d, allocation_cells(d, 64)))
    marks = root.find(f"{SVG}g[@id='partitions']").findall(f"{SVG}g")
    assert [(int(g.get("data-start")), int(g.get("data-end")), g.get("data-type")) for g in marks] == [
        (lba * 512, (lba + n) * 512, f"0x{ptype:02x}") for lba, n, ptype in PARTITIONS]
    for g in marks:
        assert len(g.findall(f"{SVG}line")) == 2                           # start and end
    legend = " ".join(t.text for t in root.find(f"{SVG}g[@id='legend']").iter(f"{SVG}text"))
    assert "p1" in legend and "Linux" in legend and "p2" in legend and "NTFS" in legend


def test_legend_names_each_layer_and_kind_with_its_total(chain):
    with vdisk.open(chain) as d:
        root = parse(render_svg(d, allocation_cells(d, 64)))
        totals = {k: 0 for k in ("data0", "data1", "zero", "unallocated")}
        for e in d.extents():
            key = f"data{e.layer}" if e.kind == ExtentKind.DATA else {ExtentKind.ZERO: "zero"}.get(e.kind, "unallocated")
            totals[key] += e.length
    texts = [t.text for t in root.find(f"{SVG}g[@id='legend']").iter(f"{SVG}text")]
    from vdisk.progress import human_bytes
    assert texts[0] == f"data in layer 0: child.vdi — {human_bytes(totals['data0'])}"
    assert texts[1] == f"data in layer 1: base.vdi — {human_bytes(totals['data1'])}"
    assert texts[2].startswith("zero blocks") and texts[2].endswith(human_bytes(totals["zero"]))
    assert texts[3].startswith("unallocated") and texts[3].endswith(human_bytes(totals["unallocated"]))


def test_a_gpt_fixture_shows_its_partitions(tmp_path):
    src = fixture_image("rdisk_win7dyn.vhd.xz")
    out = tmp_path / "map.svg"
    assert main(["map", str(src), "--svg", str(out)]) == 0
    root = parse(out.read_text())
    starts = [int(g.get("data-start")) for g in root.find(f"{SVG}g[@id='partitions']").findall(f"{SVG}g")]
    # GPT entries as the Windows 7 disk's table has them (sgdisk -p lists sectors 34 and 65664).
    assert starts == [34 * 512, 65664 * 512]
    with vdisk.open(src) as d:
        want = expected_cells(d, cell_size_for(d.size, 512))
    assert [c["counts"] for c in drawn_cells(root)] == [c["counts"] for c in want]


def test_map_svg_writes_only_the_file(capsys, tmp_path, chain):
    out = tmp_path / "m.svg"
    assert main(["map", str(chain), "--svg", str(out), "--cells", "32"]) == 0
    stdout, err = capsys.readouterr()
    assert stdout == "" and "32 cells" in err
    assert len(drawn_cells(parse(out.read_text()))) == 32
    assert main(["map", str(chain)]) == 0                       # the table is unchanged without --svg
    assert capsys.readouterr()[0].splitlines()[0].split() == ["start", "length", "kind", "layer", "offset", "file"]


def test_map_svg_into_a_missing_folder_is_a_one_line_error(capsys, tmp_path, chain):
    assert main(["map", str(chain), "--svg", str(tmp_path / "no" / "m.svg")]) == 1
    err = capsys.readouterr()[1]
    assert err.startswith("vdisk: error: ") and len(err.splitlines()) == 1


def test_cell_count_is_bounded_whatever_the_size():
    assert cell_size_for(8 << 40, 1024) == 8 << 30
    assert cell_size_for(1000, 1024) == 512
    assert cell_size_for(3 * MiB + 512, 4) == MiB


# -- the text strip -----------------------------------------------------------------------------
def test_density_strip_levels(chain):
    with vdisk.open(chain) as d:
        strip = density_strip(allocation_cells(d, 16))
        coarse = density_strip(allocation_cells(d, 4))           # 4 MiB: four VDI blocks each
    assert len(strip) == 16
    assert strip[0] == strip[2] == strip[3] == strip[9] == "█"    # stored blocks
    assert strip[1] == strip[4] == strip[6] == " "                # unallocated, zero block
    # 3 of 4 blocks; none (a zero block is no data); 1 of 4; 1 of 4 -- partly never looks full
    assert coarse == "▆ ▂▂"


def test_info_prints_the_strip_on_a_terminal_only(chain):
    argv = [sys.executable, "-m", "vdisk", "info", str(chain)]
    piped = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "allocation" not in piped
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, argv)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    line = next(l for l in text.splitlines() if l.startswith("allocation"))
    with vdisk.open(chain) as d:
        assert f"|{density_strip(allocation_cells(d, 64))}|" in line
