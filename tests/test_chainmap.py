"""The resolved map of a chain (vdisk/chainmap.py, issue 19): reads through it equal a bytearray
model while the top layer is written, zeroed and discarded; its memory stays inside its budget;
and a read through it still goes through the I/O seam (a device error is a ReadError)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk import chainmap, io as vio

SIZE = 1 << 20
BLOCK = 64 << 10


def build_chain(folder, fmt: str, depth: int, seed: int):
    """A chain of *depth* layers, each with a few random writes; returns (top path, model)."""
    rng = np.random.default_rng(seed)
    model = bytearray(SIZE)
    paths = [folder / f"l{i}.{fmt}" for i in range(depth)]
    vdisk.create(paths[0], SIZE, format=fmt, block_size=BLOCK if fmt == "vhd" else None).close()
    for i, p in enumerate(paths):
        if i:
            vdisk.create(p, parent=paths[i - 1]).close()
        with vdisk.open(p, "r+") as d:
            for _ in range(6):
                off = int(rng.integers(0, SIZE - 1)) // 512 * 512
                n = min(int(rng.integers(1, 40)) * 512, SIZE - off)
                data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                d.pwrite(data, off)
                model[off:off + n] = data
    return paths[-1], model


ops = st.lists(st.tuples(st.sampled_from(["read", "write", "zero", "discard"]),
                         st.integers(0, SIZE - 1), st.integers(1, 3 * BLOCK)), min_size=1, max_size=25)


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops, seed=st.integers(0, 2**16))
def test_reads_through_the_map_follow_every_change_of_the_top(tmp_path_factory, fmt, script, seed):
    top, model = build_chain(tmp_path_factory.mktemp("cm"), fmt, 4, seed)
    with vdisk.open(top, "r+") as d:
        assert d._engine.map is not None
        assert d.pread(SIZE, 0) == model                      # every block resolved once
        for op, off, n in script:
            n = min(n, SIZE - off)
            if op == "read":
                assert d.pread(n, off) == model[off:off + n]
            elif op == "write":
                data = bytes([(off + n) % 251 + 1]) * n
                d.pwrite(data, off)
                model[off:off + n] = data
            elif op == "zero":
                d.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                d.discard(off, n)
                model[off:off + n] = bytes(n)
        assert d.pread(SIZE, 0) == model
    with vdisk.open(top) as d:
        assert d.pread(SIZE, 0) == model


def test_the_map_keeps_to_its_budget(tmp_path):
    top, model = build_chain(tmp_path, "vhd", 3, 7)
    with vdisk.open(top) as d:
        small = chainmap.ChainMap(d._engine, max_blocks=3, max_runs=40)
        d._engine.map = small
        for off in range(0, SIZE, 4096):
            assert d.pread(4096, off) == model[off:off + 4096]
            assert len(small.entries) <= 3 and small.runs <= 40


def test_a_read_error_under_the_map_is_a_read_error(tmp_path, monkeypatch):
    """Block 0 is stored only in the base, so the child's read of it goes through the map."""
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    with vdisk.create(base, SIZE, format="vdi") as d:
        d.pwrite(b"\x77" * 4096, 0)
    vdisk.create(child, parent=base).close()
    with vdisk.open(child) as d:
        assert d.pread(4096, 0) == b"\x77" * 4096
        assert 0 in d._engine.map.entries

        def fail(kind, file, offset, length):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(vio, "read_fault_hook", fail)
        with pytest.raises(vdisk.ReadError):
            d.pread(4096, 0)
        monkeypatch.setattr(vio, "read_fault_hook", None)
        assert d.pread(4096, 0) == b"\x77" * 4096
