"""qemu-img / qemu-io and libvhdi judge VHDX both ways: what vdisk writes (fixed and dynamic, block
sizes 1-256 MiB) they read identically and qemu-img check finds clean; what qemu writes (with
and without its zero-block states) vdisk reads identically."""
from __future__ import annotations

import subprocess

import pytest

import vdisk

MiB = 1 << 20
pytestmark = pytest.mark.judges("qemu-img", "qemu-io", "vhdiinfo", modules=("pyvhdi",))


def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed: {res.stderr or res.stdout}"
    return res.stdout


def writes_for(size: int, bs: int) -> list[tuple[int, int, int]]:
    """(offset, length, byte): the start, across a block boundary, unaligned, the last sector."""
    return [(0, 4096, 0x11), (bs - 1000, 3000, 0x22), (size // 2 + 7, 70001, 0x33), (size - 512, 512, 0x44)]


def expected_raw(tmp_path, size: int, writes) -> str:
    raw = tmp_path / "expected.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, n, byte in writes:
            f.seek(off)
            f.write(bytes([byte]) * n)
    return str(raw)


def pyvhdi_read(path, size: int, parent=None) -> bytes:
    import pyvhdi
    f = pyvhdi.file()
    f.open(str(path))
    p = None
    if parent is not None:
        p = pyvhdi.file()
        p.open(str(parent))
        f.set_parent(p)
    try:
        return f.read_buffer(size)
    finally:
        f.close()
        if p is not None:
            p.close()


@pytest.mark.parametrize("subtype,block_mib", [("dynamic", 1), ("dynamic", 2), ("dynamic", 32), ("dynamic", 256),
                                               ("fixed", 1), ("fixed", 2), ("fixed", 32)])
def test_images_written_by_vdisk_read_identically_in_qemu_and_libvhdi(tmp_path, subtype, block_mib):
    bs = block_mib * MiB
    size = max(3 * bs, 40 * MiB) + 4096 * 3          # a partial last block
    writes = writes_for(size, bs)
    path = tmp_path / "out.vhdx"
    with vdisk.create(path, size, format="vhdx", subtype=subtype, block_size=bs) as d:
        for off, n, byte in writes:
            d.pwrite(bytes([byte]) * n, off)
    raw = expected_raw(tmp_path, size, writes)
    assert "No errors" in run("qemu-img", "check", "-f", "vhdx", str(path))
    run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), raw)
    assert pyvhdi_read(path, size) == open(raw, "rb").read()
    assert str(size) in run("vhdiinfo", str(path))
    with vdisk.open(path) as d:                        # and the log is clean for readers that cannot replay
        assert d.layers[0].headers.current["log_guid"] == bytes(16)


def test_first_write_changes_file_and_data_write_guids_and_a_read_only_open_changes_nothing(tmp_path):
    path = tmp_path / "g.vhdx"
    with vdisk.create(path, 8 * MiB, format="vhdx", block_size=MiB):
        pass
    with vdisk.open(path) as d:
        before = dict(d.layers[0].headers.current)
    data = path.read_bytes()
    with vdisk.open(path, "r+"):
        pass
    assert path.read_bytes() == data                   # opened for writing, nothing written
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"x", 0)
    with vdisk.open(path) as d:
        after = d.layers[0].headers.current
    assert after["file_write_guid"] != before["file_write_guid"]
    assert after["data_write_guid"] != before["data_write_guid"]
    assert after["sequence_number"] > before["sequence_number"]


@pytest.mark.parametrize("zero_state", ["on", "off"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_images_written_by_qemu_read_identically_in_vdisk(tmp_path, subformat, zero_state):
    size = 70 * MiB
    path = tmp_path / "q.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o",
        f"subformat={subformat},block_size=2M,block_state_zero={zero_state}", str(path), str(size))
    writes = writes_for(size, 2 * MiB)
    for off, n, byte in writes:
        run("qemu-io", "-f", "vhdx", "-c", f"write -P {byte} {off} {n}", str(path))
    raw = expected_raw(tmp_path, size, writes)
    with vdisk.open(path) as d:
        assert d.pread(size, 0) == open(raw, "rb").read()
    # and vdisk writes into qemu's file, which qemu then still reads and checks clean
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"\x55" * 5000, 33 * MiB - 100)
    with open(raw, "r+b") as f:
        f.seek(33 * MiB - 100)
        f.write(b"\x55" * 5000)
    assert "No errors" in run("qemu-img", "check", "-f", "vhdx", str(path))
    run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), raw)


@pytest.mark.parametrize("lss", [512, 4096])
def test_differencing_chain_written_by_vdisk_reads_identically_in_libvhdi(tmp_path, lss):
    """qemu reads neither differencing nor 4096-byte-sector VHDX; libvhdi judges the chain
    (it is right wherever the child has no ZERO/UNMAPPED blocks, which vdisk's writes do not make)."""
    size = 24 * MiB
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    with vdisk.create(base, size, format="vhdx", block_size=MiB, logical_sector_size=lss) as d:
        d.pwrite(b"\xaa" * (6 * MiB), MiB)
    with vdisk.create(child, parent=base) as d:
        assert d.logical_sector_size == lss
        d.pwrite(b"\xbb" * 8192, 2 * MiB + 4096)           # partial block: bitmap bits
        d.pwrite(b"\xcc" * MiB, 4 * MiB)                   # whole block
        d.pwrite(b"\xdd" * 4096, 20 * MiB)                 # over a parent hole
        expect = d.pread(size, 0)
    assert expect[2 * MiB:2 * MiB + 4096] == b"\xaa" * 4096
    assert pyvhdi_read(child, size, parent=base) == expect
    info = run("vhdiinfo", str(child))
    with vdisk.open(base) as d:
        assert f"Parent identifier\t: {d.uuid}" in info          # parent_linkage = parent DataWriteGuid
    assert f"Bytes per sector\t: {lss} bytes" in info and "Differential" in info


def test_a_discarded_block_is_unmapped_punched_and_reused_by_a_later_write(tmp_path):
    size = 8 * MiB
    path = tmp_path / "t.vhdx"
    with vdisk.create(path, size, format="vhdx", block_size=MiB) as d:
        d.pwrite(b"\x66" * (3 * MiB), MiB)
    used = path.stat().st_blocks
    with vdisk.open(path, "r+") as d:
        d.discard(2 * MiB, MiB)
    with vdisk.open(path) as d:
        layer = d.layers[0]
        assert layer.state(2) == 3 and d.pread(MiB, 2 * MiB) == bytes(MiB)     # UNMAPPED, zeros
    assert path.stat().st_blocks <= used - (MiB >> 9)                           # storage released
    expect = bytearray(size)
    expect[MiB:4 * MiB] = b"\x66" * (3 * MiB)
    expect[2 * MiB:3 * MiB] = bytes(MiB)
    raw = tmp_path / "e.raw"
    raw.write_bytes(bytes(expect))
    assert "No errors" in run("qemu-img", "check", "-f", "vhdx", str(path))
    run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(path), str(raw))
    assert pyvhdi_read(path, size) == bytes(expect)
    file_size = path.stat().st_size
    with vdisk.open(path, "r+") as d:
        d.discard(3 * MiB, MiB)
        d.pwrite(b"\x77" * 100, 3 * MiB + 10)                  # same session: its own storage again
    assert path.stat().st_size == file_size
    with vdisk.open(path) as d:
        assert d.pread(200, 3 * MiB) == bytes(10) + b"\x77" * 100 + bytes(90)
    assert "No errors" in run("qemu-img", "check", "-f", "vhdx", str(path))
