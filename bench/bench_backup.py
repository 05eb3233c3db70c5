#!/usr/bin/env python3
"""Benchmark: `vdisk backup` against the do-it-yourself way, in the same run (issue 20).

    .venv/bin/python bench/bench_backup.py [--size-mib 2048] [--level 3] [--runs 2] [--dir bench/out]

The image is the shared half-allocated dynamic VHD (bench/common.py: 2 GiB, half holes, a
quarter of the allocated units all zeros), copied so its shadows stay out of the shared cache.
One shadow is taken; then, alternating, each run times

* anchor:  `vdisk shadow export IMAGE ID x.raw` followed by `zstd -T0 -3 x.raw` (what a user
           scripts today: the raw export plus the zstd CLI at the same level);
* vdisk:   `vdisk backup IMAGE --shadow ID -o full.vbk --level 3` (one command, streaming).

Judged: full backup wall <= 1.0x the anchor; the backup's size within 5 % of the zstd CLI's
output; `zstd -d` of the backup equals the raw export (sha256). Then, in rounds, 1 % of the 2 MiB units get
new data on the live image and `vdisk backup --new-shadow --since PREVIOUS` runs: the best
incremental must cost <= 3 % of the best full backup (both timed in-process, so interpreter
start-up, the same for both, is not counted).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, UNIT, make_half_allocated, sha256  # noqa: E402

import vdisk  # noqa: E402
from vdisk import backup as vbackup  # noqa: E402
from vdisk.shadow import open_shadowed  # noqa: E402

VDISK = [sys.executable, "-m", "vdisk"]


def run(cmd: list) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, cwd=str(ROOT), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fresh_copy(src: Path, dst: Path) -> Path:
    """A sparse copy of *src* with no shadows, snapshots or backups next to it."""
    for stale in (dst, Path(str(dst) + ".vdisk-shadows")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def change_one_percent(image: Path, seed: int = 7) -> int:
    """New random data in 1 % of the image's 2 MiB units (on the live image, past the shadow)."""
    rnd = random.Random(seed)
    with vdisk.open(image, "r+") as d:
        units = d.size // UNIT
        picked = rnd.sample(range(units), max(1, units // 100))
        for u in picked:
            d.pwrite(rnd.randbytes(UNIT), u * UNIT)
    return len(picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", default=None, help="working folder (default: a temporary folder in bench/out)")
    args = ap.parse_args()
    if shutil.which("zstd") is None:
        raise SystemExit("zstd is not installed (apt-get install zstd)")
    from common import SEED
    size = args.size_mib << 20
    stem = "half" if size == 2 << 30 else f"half-{args.size_mib}m-{SEED}"
    source = make_half_allocated(OUT / f"{stem}.vhd", "vhd", size)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-backup-", dir=OUT))
    work.mkdir(parents=True, exist_ok=True)
    try:
        image = fresh_copy(source, work / "disk.vhd")
        with open_shadowed(str(image), "r+") as d:
            sid = d.create_shadow("bench").id
        raw, zst, vbk = work / "export.raw", work / "export.raw.zst", work / "full.vbk"
        anchor, ours = [], []
        for _ in range(args.runs):                    # alternate, so load hits both alike
            for p in (raw, zst):
                p.unlink(missing_ok=True)
            anchor.append(run([*VDISK, "shadow", "export", image, sid, raw])
                          + run(["zstd", "-q", "-T0", f"-{args.level}", raw, "-o", zst]))
            vbk.unlink(missing_ok=True)
            ours.append(run([*VDISK, "backup", image, "--shadow", sid, "-o", vbk, "--level", args.level]))
        identical = subprocess.run(f"zstd -q -d -c {vbk} | sha256sum", shell=True, check=True,
                                   capture_output=True, text=True).stdout.split()[0] == sha256(raw)
        sizes = vbk.stat().st_size, zst.stat().st_size
        size_ratio = sizes[0] / sizes[1]

        t_full, t_inc, incs = [], [], []
        for i in range(args.runs):                     # best of runs, like the CLI figures above
            t0 = time.perf_counter()
            full = vbackup.backup(str(image), str(work / f"lib-full-{i}.vbk"), shadow=sid, level=args.level)
            t_full.append(time.perf_counter() - t0)
        previous = work / "lib-full-0.vbk"
        for i in range(args.runs + 1):                 # each round: 1 % changes, then an incremental
            changed = change_one_percent(image, seed=7 + i)
            nxt = work / f"lib-inc-{i}.vbk"
            t0 = time.perf_counter()
            inc = vbackup.backup(str(image), str(nxt), new_shadow=True, since=str(previous), level=args.level)
            t_inc.append(time.perf_counter() - t0)
            incs.append(str(nxt))
            previous = nxt
        chain_ok = vbackup.verify([str(work / "lib-full-0.vbk"), *incs]).ok
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    a, o = min(anchor), min(ours)
    wall = o / a
    inc_share = min(t_inc) / min(t_full)
    print(f"image: {source.name} ({args.size_mib} MiB virtual, dynamic VHD, half allocated), zstd level {args.level}")
    print(f"  anchor  shadow export + zstd -T0 -{args.level}: best {a:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in anchor)})")
    print(f"  vdisk   backup (full, CLI):             best {o:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ours)})")
    print(f"  sizes: backup {mib(sizes[0])} vs zstd CLI {mib(sizes[1])}"
          f" -> {size_ratio:.3f}x  (target within 5 %)  {'OK' if abs(size_ratio - 1) <= 0.05 else 'OUTSIDE TARGET'}")
    print(f"  zstd -d of the backup equals the raw export: {identical}")
    print(f"ratio vdisk backup / (export + zstd): {wall:.2f}x  (target <= 1.0x)  {'OK' if wall <= 1.0 else 'SLOWER THAN TARGET'}")
    print(f"  in-process: full best {min(t_full):.3f} s ({full.bytes_read >> 20} MiB read; runs: "
          f"{', '.join(f'{t:.3f}' for t in t_full)}); after {changed} of {size // UNIT} units changed, "
          f"incremental best {min(t_inc):.3f} s ({inc.bytes_read >> 20} MiB read, {inc.bytes_stored >> 10} KiB "
          f"stored; runs: {', '.join(f'{t:.3f}' for t in t_inc)}); chain of {len(incs) + 1} verifies: {chain_ok}")
    print(f"ratio incremental / full: {inc_share * 100:.1f} %  (target <= 3 %)  {'OK' if inc_share <= 0.03 else 'ABOVE TARGET'}")
    if not identical or not chain_ok:
        raise SystemExit("the backup does not hold the shadow's content")


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


if __name__ == "__main__":
    main()
