"""Core read throughput: vdisk.Disk vs plain Python I/O on the equivalent raw file, same run.

    .venv/bin/python bench/bench_core.py [--reads N]
    .venv/bin/python bench/bench_core.py --writes 20000 [--flush-every 32] [--dir /dev/shm]

Targets (issue 2): sequential 1 MiB readinto >= 0.85x raw readinto; random 4 KiB pread >= 0.30x
raw os.pread. Every file is read once before timing so that all runs read from the page cache.

``--writes N`` measures random writes instead (issue 12: the cost of crash-safe write
ordering): N 4 KiB writes at seeded random aligned offsets into new, empty 1 GiB images (raw,
dynamic VHD with 2 MiB blocks, dynamic VDI with 1 MiB blocks) in bench/out/writes (or --dir: on
tmpfs a barrier is free and only the code path is timed), with a flush every --flush-every
writes and at the end, timed with the flushes; the anchor is os.pwrite on a sparse raw file with
os.fdatasync at the same points. Best of 3, each on new files. An untimed run counts what
reached the I/O seam: barriers (fdatasync) and writes per 4 KiB guest write.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Optional

from common import OUT, standard_images

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


WRITE_SIZE = 1 << 30


def rand_write_raw(path: str, offs: list[int], flush_every: int) -> float:
    with open(path, "wb") as f:
        f.truncate(WRITE_SIZE)
    buf = random.Random(2).randbytes(4096)
    fd = os.open(path, os.O_RDWR)
    try:
        t = time.perf_counter()
        for i, o in enumerate(offs, 1):
            os.pwrite(fd, buf, o)
            if i % flush_every == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        return len(offs) / (time.perf_counter() - t)
    finally:
        os.close(fd)


def rand_write_disk(path: str, fmt: str, offs: list[int], flush_every: int) -> float:
    vdisk.create(path, WRITE_SIZE, format=fmt).close()
    buf = random.Random(2).randbytes(4096)
    with vdisk.open(path, "r+") as d:
        t = time.perf_counter()
        for i, o in enumerate(offs, 1):
            d.pwrite(buf, o)
            if i % flush_every == 0:
                d.flush()
        d.flush()
        return len(offs) / (time.perf_counter() - t)


def seam_counts(path: str, fmt: str, offs: list[int], flush_every: int) -> dict:
    """{kind: calls} that reached the I/O seam during one (untimed) run."""
    import vdisk.io
    counts = {"write": 0, "truncate": 0, "sync": 0}

    def count(kind, _file, _offset, _length):
        counts[kind] += 1

    old, vdisk.io.fault_hook = vdisk.io.fault_hook, count
    try:
        rand_write_disk(path, fmt, offs, flush_every)
    finally:
        vdisk.io.fault_hook = old
    return counts


def writes(n: int, flush_every: int, where: Optional[str]) -> None:
    folder = Path(where) / "vdisk-bench-writes" if where else OUT / "writes"
    folder.mkdir(parents=True, exist_ok=True)
    offs = offsets(WRITE_SIZE, n)

    def fresh(name: str) -> str:
        path = folder / name
        if path.exists():
            path.unlink()
        return str(path)

    print(f"random 4 KiB writes: {n} into new 1 GiB images in {folder}, a flush every {flush_every} writes")
    raw = best_of(lambda: rand_write_raw(fresh("anchor.raw"), offs, flush_every))
    print(f"raw file (os.pwrite + fdatasync)  {raw:9.0f} IOPS          barriers {n // flush_every + 1}, file writes {n}")
    for fmt in ("raw", "vhd", "vdi"):
        r = best_of(lambda: rand_write_disk(fresh(f"w.{fmt}"), fmt, offs, flush_every))
        c = seam_counts(fresh(f"w.{fmt}"), fmt, offs, flush_every)
        print(f"vdisk {fmt:3s} {'dynamic' if fmt != 'raw' else '       '}               {r:9.0f} IOPS ({r / raw:4.2f}x)"
              f"   barriers {c['sync']}, file writes {c['write']}, truncations {c['truncate']}")
    for p in folder.iterdir():
        p.unlink()
    if where:
        folder.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=200_000, help="random reads per measurement")
    ap.add_argument("--writes", type=int, default=0, help="measure this many random 4 KiB writes instead")
    ap.add_argument("--flush-every", type=int, default=32, help="with --writes: writes between flushes")
    ap.add_argument("--dir", help="with --writes: where the images go (default bench/out/writes)")
    args = ap.parse_args()
    if args.writes:
        writes(args.writes, args.flush_every, args.dir)
        return
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
