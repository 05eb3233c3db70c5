"""Print how many crash states the write-crash matrix tries per combination (issue 12).

Runs the same seeded workloads as tests/test_crash_writes.py (same images, same judges: allowed
values, vdisk check, qemu-img check for base VDI, a read-write reopen) and prints one table:

    .venv/bin/python scripts/crash_counts.py               # the test's seeds
    .venv/bin/python scripts/crash_counts.py --seeds 20    # more workloads per combination
    .venv/bin/python scripts/crash_counts.py --only vdi-dynamic --first-seed 100 --ops 30

A bad state stops the run with the assertion that names it and a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import test_crash_writes as matrix  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=len(matrix.SEEDS), help="workloads per combination")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=list(matrix.COMBOS), help="one combination (repeatable)")
    ap.add_argument("--ops", type=int, default=matrix.OPS, help="operations per workload")
    args = ap.parse_args()
    matrix.OPS = args.ops
    tmp = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    states: dict = {}
    for combo in args.only or list(matrix.COMBOS):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            folder = tempfile.mkdtemp(prefix="vdisk-crash-", dir=tmp)
            try:
                counts = matrix.crash_states(folder, combo, seed=sum(map(ord, combo)) + seed)
            except AssertionError as exc:
                print(f"{combo} seed {seed}: BAD STATE: {exc}", file=sys.stderr)
                return 1
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            total = states.setdefault(combo, dict.fromkeys(counts, 0))
            for k, v in counts.items():
                total[k] += v
        print(f"{combo}: done", file=sys.stderr, flush=True)
    print(f"{args.seeds} workload(s) of {matrix.OPS} operations per combination, seeds from {args.first_seed}; "
          "kill/power_cut = states built, distinct = states judged, 0 bad")
    for line in matrix.format_table(states):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
