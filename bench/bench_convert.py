#!/usr/bin/env python3
"""Benchmark: `vdisk convert` vs `qemu-img convert`, same images, same run.

Cases (the 2 GiB half-allocated image of bench/common.py):
  vhd-dynamic -> raw, raw -> vhd-dynamic, vhd-dynamic -> vdi-dynamic, vdi-dynamic -> vhd-dynamic

Each case runs both tools alternately (`--runs` times each, after one untimed warm-up of each),
with `sync` before every timed run so one run's write-back does not land in the next. Prints the
median wall times, the ratio vdisk/qemu (target <= 1.0) and each tool's peak RSS (target for
vdisk <= 100 MiB), measured per child with wait4(). Outputs are checked equal with
`qemu-img compare` once per case.

Note: `vdisk convert` makes its output durable (fsync) before renaming it into place;
qemu-img convert's default cache mode (unsafe) never syncs. `--qemu-cache writeback` makes
qemu flush too, for a like-for-like comparison.

    .venv/bin/python bench/bench_convert.py [--size-mib 2048] [--runs 3] [--qemu-cache unsafe]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, SEED, standard_images  # noqa: E402

QEMU_FMT = {"raw": "raw", "vhd": "vpc", "vdi": "vdi"}
CASES = [("vhd", "raw"), ("raw", "vhd"), ("vhd", "vdi"), ("vdi", "vhd")]


def vdisk_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("vdisk")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vdisk.cli"]


def run_child(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one command."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--qemu-cache", default="unsafe", help="qemu-img convert -t (default: qemu's own)")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is not installed (apt-get install qemu-utils)")
    size = args.size_mib << 20
    OUT.mkdir(parents=True, exist_ok=True)
    src = standard_images(size)
    print(f"image: {args.size_mib} MiB virtual, half allocated (1/4 of that all-zero), "
          f"seed {SEED}; {args.runs} timed runs each, median; qemu-img -t {args.qemu_cache}")
    print(f"{'case':<16} {'qemu-img':>9} {'vdisk':>9} {'ratio':>6} {'qemu RSS':>9} {'vdisk RSS':>10}  same")
    worst = 0.0
    for sfmt, dfmt in CASES:
        outs = {k: OUT / f"bench-convert-{k}.{dfmt}" for k in ("qemu", "vdisk")}
        cmds = {
            "qemu": ["qemu-img", "convert", "-t", args.qemu_cache, "-f", QEMU_FMT[sfmt], "-O", QEMU_FMT[dfmt],
                     str(src[sfmt]), str(outs["qemu"])],
            "vdisk": vdisk_cmd() + ["convert", "-f", sfmt, "-O", dfmt, "--no-progress", "--force",
                                    str(src[sfmt]), str(outs["vdisk"])],
        }
        times: dict[str, list[float]] = {"qemu": [], "vdisk": []}
        rss = {"qemu": 0, "vdisk": 0}
        for i in range(args.runs + 1):
            for k in ("qemu", "vdisk"):
                if outs[k].exists():
                    outs[k].unlink()
                wall, peak = run_child(cmds[k])
                rss[k] = max(rss[k], peak)
                if i:                                    # the first round warms the page cache
                    times[k].append(wall)
        same = subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[dfmt], "-F", QEMU_FMT[dfmt],
                               str(outs["vdisk"]), str(outs["qemu"])], capture_output=True).returncode == 0
        for p in outs.values():
            p.unlink()
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["vdisk"] / med["qemu"]
        worst = max(worst, ratio)
        print(f"{sfmt + ' -> ' + dfmt:<16} {med['qemu']:8.2f}s {med['vdisk']:8.2f}s {ratio:6.2f} "
              f"{rss['qemu'] / 1024:7.1f}Mi {rss['vdisk'] / 1024:8.1f}Mi  {same}")
    print(f"worst ratio {worst:.2f} (target <= 1.00)")


if __name__ == "__main__":
    main()
