"""The block plan never covers a used allocation unit, and misses no block that is wholly free:
checked against a byte-per-byte model of random bitmaps in random volumes."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from vdisk.fsaware import subtract
from vdisk.fsaware.base import FreeMap, bits_free, mask_runs
from vdisk.fsaware.plan import BlockPlan


@st.composite
def layouts(draw):
    block = draw(st.sampled_from([512, 4096, 65536, 1 << 20]))
    vols = []
    pos = draw(st.integers(0, 3)) * 512
    for _ in range(draw(st.integers(1, 3))):
        unit = draw(st.sampled_from([512, 1024, 4096, 32768]))
        n = draw(st.integers(1, 300))
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        # long free runs are what real filesystems have: stretch some bits
        stretch = draw(st.integers(1, 4))
        free = np.repeat(np.array(bits, dtype=bool), stretch)
        first = draw(st.integers(0, 3)) * 512                  # units start after a header
        cuts = sorted(draw(st.lists(st.integers(0, len(free)), max_size=4)))
        length = first + len(free) * unit + draw(st.integers(0, 2)) * 512
        vols.append((pos, length, unit, first, free, cuts))
        pos += length + draw(st.integers(0, 2)) * 512
    size = pos + draw(st.integers(0, 3)) * 512
    return block, size, vols


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_the_plan_covers_exactly_the_wholly_free_blocks(layout):
    block, size, vols = layout
    model = np.zeros(size, dtype=bool)                 # byte-level truth: free or not
    plan = BlockPlan(size, block)
    for start, length, unit, first, free, cuts in vols:
        fm = FreeMap("model", unit, len(free), sink=plan.sink(start, start + length))
        edges = [0] + cuts + [len(free)]
        for a, b in zip(edges, edges[1:]):             # chunks split anywhere
            if b > a:
                fm.add(first + a * unit, free[a:b])
        for i in np.flatnonzero(free):
            lo = start + first + int(i) * unit
            model[lo:lo + unit] = True
        assert fm.free_units == int(free.sum())
    mask = plan.free_blocks()
    assert len(mask) == -(-size // block)
    for b in range(len(mask)):
        lo, hi = b * block, min(size, (b + 1) * block)
        assert mask[b] == bool(model[lo:hi].all()), (b, mask[b])
    for start, length, *_ in vols:                     # bytes_in agrees with the model
        want = sum(int(model[max(b * block, start):min((b + 1) * block, start + length)].sum())
                   for b in np.flatnonzero(mask))
        assert plan.bytes_in(mask, start, start + length) == want


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 512))
def test_bits_free_reads_little_endian_bitmaps(raw, n):
    n = min(n, len(raw) * 8)
    got = bits_free(raw, n)
    want = [not (raw[i // 8] >> (i % 8)) & 1 for i in range(n)]
    assert got.tolist() == want
    s, e = mask_runs(got)
    rebuilt = np.zeros(n, dtype=bool)
    for a, b in zip(s, e):
        rebuilt[a:b] = True
    assert rebuilt.tolist() == want


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), max_size=200), st.lists(st.booleans(), max_size=200))
def test_subtract_removes_exactly_the_holes(a, b):
    n = max(len(a), len(b))
    a = np.array(a + [False] * (n - len(a)), dtype=bool)
    b = np.array(b + [False] * (n - len(b)), dtype=bool)
    ranges = list(zip(*[x.tolist() for x in mask_runs(a)]))
    holes = list(zip(*[x.tolist() for x in mask_runs(b)]))
    out = subtract(ranges, holes)
    got = np.zeros(n, dtype=bool)
    for s, e in out:
        assert s < e
        got[s:e] = True
    assert got.tolist() == (a & ~b).tolist()


def test_a_partly_free_block_is_planned_only_when_its_used_bytes_read_zeros(tmp_path):
    """Whole-disk swap, 64 KiB image blocks: bad pages are the used units. Block 1 holds a bad
    page of zeros (planned: giving it up changes no used byte), block 2 a bad page of data (kept),
    block 0 the header page (kept)."""
    import struct
    import subprocess
    import vdisk
    from vdisk.fsaware import analyse
    from conftest import need
    need("mkswap")
    path = str(tmp_path / "swap.raw")
    rng = np.random.default_rng(3)
    with open(path, "wb") as f:
        f.write(rng.integers(1, 256, 4 << 20, dtype=np.uint8).tobytes())
    subprocess.run(["mkswap", "-q", path], check=True)
    with open(path, "r+b") as f:
        f.seek(1024 + 8)
        f.write(struct.pack("<I", 2))
        f.seek(1536)
        f.write(struct.pack("<II", 20, 40))
        f.seek(20 * 4096)
        f.write(bytes(4096))
    with vdisk.open(path) as d:
        vols, mask, _ = analyse(d, path, 65536)
    assert vols[0].filesystem == "swap"
    assert not mask[0] and mask[1] and not mask[2] and mask[3:].all()
