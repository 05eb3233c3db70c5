"""Core read throughput: vdisk.Disk vs plain Python I/O on the equivalent raw file, same run.

    .venv/bin/python bench/bench_core.py [--seconds N]

Targets (issue 2): sequential 1 MiB readinto >= 0.85x raw readinto; random 4 KiB pread >= 0.30x
raw os.pread. Every file is read once before timing so that all runs read from the page cache.
"""
from __future__ import annotations

import argparse
import os
import random
import time

from common import standard_images

import vdisk

MiB = 1 << 20


def best_of(fn, repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


def seq_raw(path: str, size: int) -> float:
    buf = bytearray(MiB)
    with open(path, "rb", buffering=0) as f:
        t = time.perf_counter()
        while f.readinto(buf):
            pass
        return size / (time.perf_counter() - t)


def seq_disk(disk, size: int) -> float:
    buf = bytearray(MiB)
    t = time.perf_counter()
    for off in range(0, size, MiB):
        disk.readinto(buf, off)
    return size / (time.perf_counter() - t)


def offsets(size: int, n: int) -> list[int]:
    rnd = random.Random(1)
    return [rnd.randrange(size // 4096) * 4096 for _ in range(n)]


def rand_raw(path: str, offs: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for o in offs:
            os.pread(fd, 4096, o)
        return len(offs) / (time.perf_counter() - t)
    finally:
        os.close(fd)


def rand_disk(disk, offs: list[int]) -> float:
    t = time.perf_counter()
    for o in offs:
        disk.pread(4096, o)
    return len(offs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reads", type=int, default=200_000, help="random reads per measurement")
    args = ap.parse_args()
    images = standard_images()
    raw = str(images["raw"])
    size = os.path.getsize(raw)
    offs = offsets(size, args.reads)
    seq_raw(raw, size)
    raw_seq = best_of(lambda: seq_raw(raw, size))
    raw_rand = best_of(lambda: rand_raw(raw, offs))
    print(f"raw file        sequential {raw_seq / MiB:8.0f} MiB/s   random 4K {raw_rand:9.0f} IOPS")
    for fmt in ("vhd", "vdi"):
        with vdisk.open(images[fmt]) as d:
            seq_disk(d, size)
            s = best_of(lambda: seq_disk(d, size))
            r = best_of(lambda: rand_disk(d, offs))
        print(f"vdisk {fmt} dynamic sequential {s / MiB:8.0f} MiB/s ({s / raw_seq:4.2f}x)   "
              f"random 4K {r:9.0f} IOPS ({r / raw_rand:4.2f}x)")


if __name__ == "__main__":
    main()
