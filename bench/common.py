"""Benchmark images shared by the benchmarks in bench/ (built once, cached in bench/out/).

The standard image is 2 GiB, laid out in 2 MiB units in a seeded random order: half of the
units are holes (never written); of the other half, three quarters hold seeded random data and
one quarter is *allocated but all zeros* (really stored, so readers and converters must detect
the zeros themselves).

    from common import make_half_allocated, make_raw_twin
    vhd = make_half_allocated(OUT / "half.vhd", "vhd")        # dynamic VHD, 2 MiB blocks
    vdi = make_half_allocated(OUT / "half.vdi", "vdi")        # dynamic VDI, 1 MiB blocks
    raw = make_raw_twin(OUT / "half.raw")                     # same content: holes + written zeros

Every variant built with the same size and seed has the same virtual content.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

import vdisk  # noqa: E402


def compile_package() -> None:
    """Write vdisk's bytecode (.pyc) now, as `pip install` does for an installed package.

    The benchmarks run the `vdisk` command from this source tree. Without up-to-date bytecode
    (an editable install, edited sources, or PYTHONDONTWRITEBYTECODE=1 in the environment) every
    run would compile vdisk's modules again, which no installed copy does.
    """
    import compileall
    for folder in ("vdisk", "formats", "mount"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)


compile_package()

UNIT = 2 << 20
SIZE = 2 << 30
SEED = 20261126


def sha256(path) -> str:
    """Hex SHA-256 of a file, read 8 MiB at a time (the benchmarks' byte-exact judge)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def layout(size: int = SIZE, seed: int = SEED) -> tuple[list[int], set[int]]:
    """(sorted allocated unit numbers, the subset of them that are all zeros)."""
    rnd = random.Random(seed)
    units = -(-size // UNIT)
    order = list(range(units))
    rnd.shuffle(order)
    allocated = order[: units // 2]
    zeros = set(allocated[: len(allocated) // 4])
    return sorted(allocated), zeros


def unit_data(unit: int, seed: int = SEED, length: int = UNIT) -> bytes:
    """The seeded random content of one data unit."""
    return np.random.default_rng([seed, unit]).bytes(length)


def standard_images(size: int = SIZE, seed: int = SEED) -> dict[str, Path]:
    """The shared benchmark images {"vhd", "vdi", "raw"} (bench/out/half.*), built when missing."""
    stem = "half" if (size, seed) == (SIZE, SEED) else f"half-{size >> 20}m-{seed}"
    return {"vhd": make_half_allocated(OUT / f"{stem}.vhd", "vhd", size, seed),
            "vdi": make_half_allocated(OUT / f"{stem}.vdi", "vdi", size, seed),
            "raw": make_raw_twin(OUT / f"{stem}.raw", size, seed)}


def _fresh(path: Path) -> Path:
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    return tmp


def make_half_allocated(path, fmt: str = "vhd", size: int = SIZE, seed: int = SEED) -> Path:
    """Build (once) the half-allocated image at *path* as a dynamic *fmt* ('vhd' or 'vdi') image."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    allocated, zeros = layout(size, seed)
    tmp = _fresh(path)
    block = UNIT if fmt == "vhd" else None
    with vdisk.create(tmp, size, format=fmt, subtype="dynamic", block_size=block) as d:
        top = d.layers[0]
        bs = d.block_size
        for u in allocated:
            off = u * UNIT
            n = min(UNIT, size - off)
            if u in zeros:
                # Disk.pwrite never allocates for zeros; allocate the blocks explicitly so the
                # zeros are really stored, as other tools leave them.
                for b in range(off // bs, -(-(off + n) // bs)):
                    top.allocate(b, [(0, bytes(min(bs, size - b * bs)))])
            else:
                d.pwrite(unit_data(u, seed, n), off)
    tmp.rename(path)
    return path


def make_raw_twin(path, size: int = SIZE, seed: int = SEED) -> Path:
    """Build (once) a raw file with the same content: holes where the images have holes, written zeros."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    allocated, zeros = layout(size, seed)
    tmp = _fresh(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        for u in allocated:
            off = u * UNIT
            n = min(UNIT, size - off)
            os.pwrite(fd, bytes(n) if u in zeros else unit_data(u, seed, n), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(path)
    return path
