#!/usr/bin/env python3
"""Benchmark: in-place `vdisk compact` vs `qemu-img convert` (qemu's only way to compact), same run.

Image: the 2 GiB half-allocated dynamic image of bench/common.py (half the 2 MiB units written;
a quarter of those hold stored zeros: 128 zero 2 MiB VHD blocks, 256 zero 1 MiB VDI blocks),
as a VHD and as a VDI. Each timed vdisk run compacts a fresh copy (the copy is not timed); qemu-img converts the same image to a new file of the same format. `sync` runs before
every timed run; the copy is read once beforehand, as warm as the source qemu-img re-reads. Prints median wall times and the ratio vdisk/qemu (target <= 1.0), and checks
once per format that both results read the same as the source (`qemu-img compare`).

Note: vdisk compact makes the journal and the image durable (fdatasync) before it returns;
qemu-img convert's default cache mode (unsafe) never syncs. `--qemu-cache writeback` makes qemu
flush too.

    .venv/bin/python bench/bench_compact.py [--runs 5] [--qemu-cache unsafe]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, make_half_allocated  # noqa: E402

QEMU_FMT = {"vhd": "vpc", "vdi": "vdi"}


def vdisk_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("vdisk")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vdisk.cli"]


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


IN_PROCESS = ("import sys, time; from vdisk.ops.compact import compact; t = time.perf_counter(); "
              "compact(sys.argv[1]); print(time.perf_counter() - t)")


def timed_in_process(path: Path) -> float:
    """The library call alone (no interpreter start-up or imports), as an embedding program sees it."""
    subprocess.run(["sync"], check=True)
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def fresh_copy(src: Path, dst: Path) -> None:
    """A copy of *src* (its stored zeros stay stored: cp keeps only the source's own holes),
    read once so that it is as warm in the page cache as the source qemu-img re-reads."""
    if dst.exists():
        dst.unlink()
    subprocess.run(["cp", "--sparse=auto", str(src), str(dst)], check=True)
    with open(dst, "rb") as f:
        while f.read(16 << 20):
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qemu-cache", default="unsafe", help="qemu-img convert -t MODE (default unsafe)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for fmt in ("vhd", "vdi"):
        src = make_half_allocated(OUT / f"half.{fmt}", fmt)
        work = OUT / f"compact-work.{fmt}"
        qout = OUT / f"compact-qemu.{fmt}"
        ours, lib, theirs = [], [], []
        for _ in range(args.runs):
            fresh_copy(src, work)
            lib.append(timed_in_process(work))
            fresh_copy(src, work)
            ours.append(timed([*vdisk_cmd(), "compact", str(work)]))
            if qout.exists():
                qout.unlink()
            theirs.append(timed(["qemu-img", "convert", "-t", args.qemu_cache, "-f", QEMU_FMT[fmt],
                                 "-O", QEMU_FMT[fmt], str(src), str(qout)]))
        for out in (work, qout):
            r = subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[fmt], "-F", QEMU_FMT[fmt], str(src), str(out)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{fmt}: {out.name} differs from the source: {r.stdout.strip()}", file=sys.stderr)
                return 1
        a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(lib)
        print(f"{fmt}-dynamic 2 GiB: vdisk compact {a:.2f} s ({os.path.getsize(src) >> 20} -> "
              f"{os.path.getsize(work) >> 20} MiB), qemu-img convert {b:.2f} s "
              f"({os.path.getsize(qout) >> 20} MiB); ratio {a / b:.2f}; "
              f"library call alone {c:.2f} s, ratio {c / b:.2f}")
        for p in (work, qout):
            p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
