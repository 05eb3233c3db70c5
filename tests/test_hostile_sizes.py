"""Mistyped and hostile sizes given to `vdisk create` (issue 13, item 2).

A size beyond the format, or a block table beyond what vdisk will later agree to open, is refused
at once with one line naming the file; nothing is allocated first and no file is left behind.
Tables that are allowed are written in bounded chunks and read back exactly as the format says.
"""
from __future__ import annotations

import resource
import subprocess
import sys

import numpy as np
import pytest

import vdisk
from vdisk.limits import MAX_TABLE_ENTRIES, TABLE_CHUNK


def vdisk_cli(*argv, memory_limit: int = 1 << 30):
    """The real CLI in a child process under an address-space limit, so a table allocated from a
    claimed size fails loudly instead of swapping."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, argv)], capture_output=True, text=True,
                          timeout=60, preexec_fn=limit)


@pytest.mark.parametrize("name, size, extra, message", [
    ("x.vdi", "1P", (), "use a block size of at least 16777216"),
    ("x.vdi", "100T", (), "use a block size of at least 2097152"),
    ("x.vdi", "5P", (), "exceed the VDI limit"),
    ("x.vhd", "2000G", ("--block-size", "512"), "use a block size of at least"),
    ("x.vhd", "3T", (), "at most 2040 GiB"),
])
def test_a_size_beyond_the_format_or_the_table_budget_is_refused_in_one_line(tmp_path, name, size, extra,
                                                                             message):
    r = vdisk_cli("create", tmp_path / name, size, *extra)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert name in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / name).exists()


def test_the_largest_table_vdisk_opens_is_also_the_largest_it_creates(tmp_path):
    """A size one block past the budget is refused; one at the budget (sparse) is created and opens."""
    bs = 256 << 20                                  # few entries: the test stays small on disk
    at_budget = MAX_TABLE_ENTRIES * 4096
    with pytest.raises(vdisk.VDiskError, match="use a block size of at least 8192"):
        vdisk.create(tmp_path / "over.vdi", at_budget + 4096, format="vdi", block_size=4096)
    with vdisk.create(tmp_path / "ok.vdi", 1 << 40, format="vdi", block_size=bs) as d:
        assert d.size == 1 << 40
    with vdisk.open(tmp_path / "ok.vdi") as d:
        assert d.pread(4096, (1 << 40) - 4096) == bytes(4096)


@pytest.mark.parametrize("fmt, subtype", [("vdi", "dynamic"), ("vdi", "fixed"), ("vhd", "dynamic")])
def test_a_table_longer_than_one_write_chunk_is_written_whole(tmp_path, fmt, subtype):
    """More entries than one chunk of the table writer: every entry as the format defines it."""
    entries = TABLE_CHUNK + 777
    path = tmp_path / f"big.{fmt}"
    with vdisk.create(path, entries * 4096, format=fmt, subtype=subtype, block_size=4096) as d:
        d.pwrite(b"\x5a" * 4096, (entries - 1) * 4096)          # the last block, past the first chunk
    if fmt == "vdi":
        with open(path, "rb") as f:
            head = f.read(0x200)
            offset_blocks = int.from_bytes(head[0x154:0x158], "little")
            f.seek(offset_blocks)
            table = np.frombuffer(f.read(4 * entries), dtype="<u4")
        if subtype == "fixed":
            assert np.array_equal(table, np.arange(entries, dtype="<u4"))
        else:
            assert (table[:-1] == 0xFFFFFFFF).all() and table[-1] == 0
    else:
        raw = path.read_bytes()
        table_offset = int.from_bytes(raw[512 + 16:512 + 24], "big")
        table = np.frombuffer(raw[table_offset:table_offset + 4 * entries], dtype=">u4")
        assert (table[:-1] == 0xFFFFFFFF).all() and table[-1] != 0xFFFFFFFF
        padding = raw[table_offset + 4 * entries: table_offset + (-(-4 * entries // 512) * 512)]
        assert set(padding) <= {0xFF}
    with vdisk.open(path) as d:
        assert d.pread(4096, (entries - 1) * 4096) == b"\x5a" * 4096
        assert d.pread(4096, 0) == bytes(4096)
    check = subprocess.run([sys.executable, "-m", "vdisk", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("name, size, message", [
    ("g.vdi", "1P", "use a block size of at least 16777216"),
    ("g.vhd", "1T", "use a block size of at least 16384"),
])
def test_a_resize_beyond_the_table_budget_is_refused_and_the_image_is_unchanged(tmp_path, name, size, message):
    path = tmp_path / name
    vdisk.create(path, 1 << 20, format=name[-3:], block_size=4096 if name.endswith("vhd") else None).close()
    before = path.read_bytes()
    r = vdisk_cli("resize", path, size)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert path.read_bytes() == before
