#!/usr/bin/env python3
"""Benchmark: `vdisk convert` vs `qemu-img convert`, same images, same run.

Cases (the 2 GiB half-allocated images of bench/common.py):
  vhd-dynamic -> raw, raw -> vhd-dynamic, vhd-dynamic -> vdi-dynamic, vdi-dynamic -> vhd-dynamic

Two pairings per case, because the tools differ in what they promise when they return:
  * durable:  `vdisk convert` (default: DST is flushed before it gets its name, as the CLI issue
              requires) vs `qemu-img convert -t writeback` (flushes the output at the end).
              Same work, same guarantee: the target (<= 1.0) is judged on this pairing.
  * fast:     `vdisk convert --no-sync` vs `qemu-img convert` (default cache mode "unsafe": never
              flushes). Shown for completeness; here vdisk's fixed start-up (Python, numpy:
              about 0.12 s) is a large share of a 0.3-0.4 s job.

Each command runs `--runs` times after one untimed warm-up, all commands of a case alternating
(order reversed every other round), with `sync` before every run so that one run's write-back
does not land in the next (and then a wait until the disk is idle: deleted outputs are discarded
after the sync), and each output deleted as soon as its run ends.
Prints median wall times, the ratio vdisk/qemu (target <= 1.0) and peak RSS of each child
(wait4; target for vdisk <= 100 MiB). The outputs are checked equal with `qemu-img compare`.
Then a 64 GiB sparse VHD (16 MiB of data) is converted to raw, VHD and VDI by both tools: memory
must stay bounded whatever the virtual size (``--sparse-gib 0`` skips it).

    .venv/bin/python bench/bench_convert.py [--size-mib 2048] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import random
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


def wait_idle(path: Path = OUT, quiet: float = 0.2, limit: float = 15.0) -> None:
    """Wait until the block device holding *path* has nothing in flight and completes no more
    writes or discards for *quiet* seconds (at most *limit*). After `sync`, a deleted output's
    blocks are still being discarded here (the root filesystem is mounted with `discard`), and a
    run that starts then shares the device with them."""
    st = os.stat(path)
    stat = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    if not stat.exists():
        return
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        f = stat.read_text().split()
        now = (f[4], f[11] if len(f) > 11 else "", f[8])      # writes done, discards done, in flight
        if now == last and f[8] == "0":
            return
        last = now
        time.sleep(quiet)


def run_child(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS in KiB, CPU seconds user+system) of one command."""
    os.sync()
    wait_idle()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sparse-gib", type=int, default=64, help="also convert a sparse image this large (0: skip)")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is not installed (apt-get install qemu-utils)")
    OUT.mkdir(parents=True, exist_ok=True)
    src = standard_images(args.size_mib << 20)
    print(f"image: {args.size_mib} MiB virtual, half allocated (1/4 of that all-zero), seed {SEED}; "
          f"median of {args.runs} runs")
    print(f"{'case':<12} {'pairing':<8} {'qemu-img':>9} {'vdisk':>8} {'ratio':>6} {'qemu RSS':>9} "
          f"{'vdisk RSS':>10} {'qemu CPU':>9} {'vdisk CPU':>10}  same")
    worst = {"durable": 0.0, "fast": 0.0}
    peak_vdisk = 0
    for sfmt, dfmt in CASES:
        out = {k: OUT / f"bench-convert-{k}.{dfmt}" for k in ("q-durable", "v-durable", "q-fast", "v-fast")}
        vd = vdisk_cmd() + ["convert", "-f", sfmt, "-O", dfmt, "--no-progress", "--force"]
        qi = ["qemu-img", "convert", "-f", QEMU_FMT[sfmt], "-O", QEMU_FMT[dfmt]]
        cmds = {
            "q-durable": qi + ["-t", "writeback", str(src[sfmt]), str(out["q-durable"])],
            "v-durable": vd + [str(src[sfmt]), str(out["v-durable"])],
            "q-fast": qi + [str(src[sfmt]), str(out["q-fast"])],
            "v-fast": vd + ["--no-sync", str(src[sfmt]), str(out["v-fast"])],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        cpu: dict[str, list[float]] = {k: [] for k in cmds}
        rss = {k: 0 for k in cmds}
        for p in out.values():
            if p.exists():
                p.unlink()
        # Warm-up round (untimed): fills the page cache with the source; its outputs are compared.
        for k, cmd in cmds.items():
            rss[k] = max(rss[k], run_child(cmd)[1])
        same = all(subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[dfmt], "-F", QEMU_FMT[dfmt],
                                   str(out["q-fast"]), str(out[k])], capture_output=True).returncode == 0
                   for k in ("v-durable", "v-fast"))
        for p in out.values():
            p.unlink()
        # Timed rounds. Each output is deleted as soon as its run ends, so every run starts the
        # same way: right after a 768 MiB output was freed, with nothing left to write back (an
        # output left in place would make the next run's `sync` flush it, and that run would
        # start with memory freed long before, which a VM's host may have taken back and must
        # hand out again, page by page). The order is reversed every other round.
        order = list(cmds)
        for i in range(args.runs):
            for k in order if i % 2 == 0 else order[::-1]:
                wall, peak, used = run_child(cmds[k])
                out[k].unlink()
                rss[k] = max(rss[k], peak)
                times[k].append(wall)
                cpu[k].append(used)
        med = {k: statistics.median(v) for k, v in times.items()}
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        for pairing in ("durable", "fast"):
            q, v = med[f"q-{pairing}"], med[f"v-{pairing}"]
            ratio = v / q
            worst[pairing] = max(worst[pairing], ratio)
            peak_vdisk = max(peak_vdisk, rss[f"v-{pairing}"])
            print(f"{sfmt + '->' + dfmt:<12} {pairing:<8} {q:8.2f}s {v:7.2f}s {ratio:6.2f} "
                  f"{rss[f'q-{pairing}'] / 1024:7.1f}Mi {rss[f'v-{pairing}'] / 1024:8.1f}Mi "
                  f"{mcpu[f'q-{pairing}']:8.2f}s {mcpu[f'v-{pairing}']:9.2f}s  {same}")
    print(f"worst ratio: durable {worst['durable']:.2f} (target <= 1.00), fast {worst['fast']:.2f} "
          f"(qemu-img never flushes); vdisk peak RSS {peak_vdisk / 1024:.1f} MiB (target <= 100)")
    if args.sparse_gib:
        sparse_case(args.sparse_gib)


def sparse_case(gib: int) -> None:
    """Memory must not grow with what an image claims: a *gib* GiB dynamic VHD holding 16 MiB
    (1 MiB every 4 GiB), converted to each format, durable, by both tools."""
    import vdisk
    src = OUT / f"bench-sparse-{gib}g.vhd"
    if not src.exists():
        with vdisk.create(src, gib << 30, format="vhd") as d:
            rng = random.Random(SEED)
            for i in range(16):
                d.pwrite(rng.randbytes(1 << 20), i * ((gib << 30) // 16))
    print(f"\nsparse: {gib} GiB virtual dynamic VHD holding 16 MiB; durable converts, one run each")
    print(f"{'case':<12} {'qemu-img':>9} {'vdisk':>8} {'qemu RSS':>9} {'vdisk RSS':>10}  same")
    worst = 0
    for dfmt in ("raw", "vhd", "vdi"):
        q_out, v_out = OUT / f"bench-sparse-q.{dfmt}", OUT / f"bench-sparse-v.{dfmt}"
        for p in (q_out, v_out):
            if p.exists():
                p.unlink()
        qw, qrss, _ = run_child(["qemu-img", "convert", "-t", "writeback", "-f", "vpc", "-O", QEMU_FMT[dfmt],
                                 str(src), str(q_out)])
        vw, vrss, _ = run_child(vdisk_cmd() + ["convert", "-O", dfmt, "--no-progress", str(src), str(v_out)])
        same = subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[dfmt], "-F", QEMU_FMT[dfmt], str(q_out),
                               str(v_out)], capture_output=True).returncode == 0
        for p in (q_out, v_out):
            p.unlink()
        worst = max(worst, vrss)
        print(f"{'vhd->' + dfmt:<12} {qw:8.2f}s {vw:7.2f}s {qrss / 1024:7.1f}Mi {vrss / 1024:8.1f}Mi  {same}")
    print(f"sparse: vdisk peak RSS {worst / 1024:.1f} MiB (target <= 100, whatever the virtual size)")


if __name__ == "__main__":
    main()
