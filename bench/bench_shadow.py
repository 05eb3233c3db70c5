"""Copy-on-write cost of a live shadow copy: random 4 KiB writes with one shadow vs with none.

    .venv/bin/python bench/bench_shadow.py [--format vhd|vdi|raw] [--size-mib 256] [--writes 4000]
                                           [--rounds 5] [--dir bench/out]

Three kinds of write, all 4 KiB at random 4 KiB-aligned offsets of a fully allocated image:

* plain      no shadows (the anchor);
* first      one shadow, each write the first touch of its 64 KiB block: the old block is read,
             appended to the diff area and fsync'd before the write goes through;
* rewrite    one shadow, blocks already preserved: only the in-memory index is consulted.

Plain and rewrite runs alternate for several rounds (the median of each is reported) so page
cache and disk noise hit both alike. The goal: rewrite <= 1.2x plain.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vdisk  # noqa: E402
from vdisk.shadow import open_shadowed  # noqa: E402

PAGE = 4096
STORE_BLOCK = 64 << 10


def build(folder: str, fmt: str, size: int) -> str:
    path = os.path.join(folder, f"bench.{fmt}")
    chunk = os.urandom(4 << 20)
    with vdisk.create(path, size, format=fmt) as d:
        for off in range(0, size, len(chunk)):
            d.pwrite(chunk[: min(len(chunk), size - off)], off)
    return path


def timed_writes(disk, offsets: list[int], payload: bytes) -> float:
    """Seconds per write for 4 KiB writes at *offsets*, flushed once at the end."""
    t0 = time.perf_counter()
    for off in offsets:
        disk.pwrite(payload, off)
    disk.flush()
    return (time.perf_counter() - t0) / len(offsets)


def _preserve_pool(disk, blocks: list[int], payload: bytes) -> None:
    """A new shadow with every block of the pool preserved (not timed)."""
    disk.create_shadow("bench")
    for b in blocks:
        disk.pwrite(payload, b * STORE_BLOCK)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", default="vhd", choices=("vhd", "vdi", "raw"))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--writes", type=int, default=4000)
    ap.add_argument("--first-writes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args(argv)
    size = args.size_mib << 20
    os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="bench-shadow-", dir=args.dir)
    rnd = random.Random(8)
    payload = os.urandom(PAGE)
    try:
        path = build(folder, args.format, size)
        blocks = size // STORE_BLOCK
        first_blocks = rnd.sample(range(blocks), min(args.first_writes, blocks))
        first = [b * STORE_BLOCK + rnd.randrange(STORE_BLOCK // PAGE) * PAGE for b in first_blocks]
        rewrite_pool = first_blocks
        plain, rewrite = [], []
        with open_shadowed(path, "r+") as d:
            d.create_shadow("bench")
            first_s = timed_writes(d, first, payload)
            for i in range(args.rounds):
                offs = [rnd.choice(rewrite_pool) * STORE_BLOCK + rnd.randrange(STORE_BLOCK // PAGE) * PAGE
                        for _ in range(args.writes)]
                if i % 2:                                  # alternate which kind runs first
                    d.delete_all_shadows()
                    plain.append(timed_writes(d, offs, payload))
                    _preserve_pool(d, rewrite_pool, payload)
                    rewrite.append(timed_writes(d, offs, payload))
                else:
                    rewrite.append(timed_writes(d, offs, payload))
                    d.delete_all_shadows()                 # same image, same blocks, no shadow
                    plain.append(timed_writes(d, offs, payload))
                    _preserve_pool(d, rewrite_pool, payload)
        p, r = statistics.median(plain), statistics.median(rewrite)
        kind = "raw" if args.format == "raw" else f"{args.format} dynamic"
        print(f"image: {kind}, {args.size_mib} MiB, fully allocated; folder {args.dir}")
        print(f"plain   (no shadow)              : {p * 1e6:9.1f} us/write  (median of {args.rounds} x {args.writes})")
        print(f"first   (copy-on-write + fsync)  : {first_s * 1e6:9.1f} us/write  ({len(first)} writes) "
              f"= {first_s / p:6.1f}x plain")
        print(f"rewrite (block already preserved): {r * 1e6:9.1f} us/write  = {r / p:6.2f}x plain "
              f"(goal <= 1.20x: {'met' if r / p <= 1.2 else 'NOT met'})")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
