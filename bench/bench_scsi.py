"""READ(16) through ScsiDisk.execute vs Disk.pread on the same image, in the same run.

    .venv/bin/python bench/bench_scsi.py [--format vhd] [--size-mib 256] [--seconds 1.0]

Both paths read the same sequential ranges of an image full of random data (page cache warm),
alternating in batches of 32 requests so that load on the machine hits both alike. The device
layer's cost is ``1 - scsi/pread``, printed over all batches and for the best batch of each path
(the uncontended cost, which the verdict uses); the target is <= 25% at 128 KiB.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time

import vdisk
from vdisk.devices.scsi import ScsiDisk

MiB = 1 << 20


def make_image(folder: str, fmt: str, size: int) -> str:
    path = os.path.join(folder, f"bench.{fmt}")
    d = vdisk.create(path, size, format=fmt)
    block = os.urandom(4 * MiB)
    for off in range(0, size, len(block)):
        d.pwrite(block[:min(len(block), size - off)], off)
    d.close()
    return path


def _timed_pread(pread, length: int, offsets) -> float:
    t0 = time.perf_counter()
    for off in offsets:
        pread(length, off)
    return time.perf_counter() - t0


def _timed_scsi(execute, cdbs) -> float:
    t0 = time.perf_counter()
    for cdb in cdbs:
        if execute(cdb).status:
            raise RuntimeError("READ(16) failed")
    return time.perf_counter() - t0


def bench(path: str, length: int, seconds: float) -> tuple[float, float, float, float]:
    """(pread, scsi) throughput in bytes/s: totals over interleaved batches, and best batches.

    The two paths alternate batch by batch over the same offsets, so a busy machine slows
    both alike; the best batch of each shows the uncontended cost.
    """
    batch = 32
    with vdisk.open(path) as d:
        lu = ScsiDisk(d)
        offsets = list(range(0, d.size - length + 1, length))
        header = struct.Struct(">BBQIBB")
        blocks = length >> 9
        cdbs = [header.pack(0x88, 0, off >> 9, blocks, 0, 0) for off in offsets]
        pread, execute = d.pread, lu.execute
        t_pread = t_scsi = 0.0
        best_pread = best_scsi = float("inf")
        done, i = 0, 0
        deadline = time.perf_counter() + 2 * seconds
        while time.perf_counter() < deadline or done == 0:
            if i + batch > len(offsets):
                i = 0
            chunk_offsets, chunk_cdbs = offsets[i:i + batch], cdbs[i:i + batch]
            scsi_first = (i // batch) % 2 == 1        # alternate who reads a range first
            if scsi_first:
                dt_scsi = _timed_scsi(execute, chunk_cdbs)
                dt_pread = _timed_pread(pread, length, chunk_offsets)
            else:
                dt_pread = _timed_pread(pread, length, chunk_offsets)
                dt_scsi = _timed_scsi(execute, chunk_cdbs)
            t_pread += dt_pread
            t_scsi += dt_scsi
            best_pread, best_scsi = min(best_pread, dt_pread), min(best_scsi, dt_scsi)
            done += batch * length
            i += batch
    unit = batch * length
    return done / t_pread, done / t_scsi, unit / best_pread, unit / best_scsi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="vhd", choices=["raw", "vhd", "vdi"])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=1.5, help="per path and transfer size")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = make_image(folder, args.format, args.size_mib * MiB)
        print(f"image: {args.format}, {args.size_mib} MiB of random data")
        verdict = 0
        for length in (4096, 128 << 10):
            pread_bps, scsi_bps, best_pread, best_scsi = bench(path, length, args.seconds)
            cost = 1 - scsi_bps / pread_bps
            print(f"{length // 1024:>4} KiB  Disk.pread {pread_bps / MiB:7.1f} MiB/s   "
                  f"ScsiDisk READ(16) {scsi_bps / MiB:7.1f} MiB/s   ratio {scsi_bps / pread_bps:.3f}   "
                  f"device-layer cost {cost * 100:4.1f}%   (best batches: "
                  f"{best_pread / MiB:.0f} vs {best_scsi / MiB:.0f} MiB/s, "
                  f"cost {(1 - best_scsi / best_pread) * 100:.1f}%)")
            if length == 128 << 10 and 1 - best_scsi / best_pread > 0.25:
                verdict = 1
        print("target (<= 25% at 128 KiB):", "met" if verdict == 0 else "NOT met")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
