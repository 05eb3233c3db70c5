#!/usr/bin/env python3
"""Benchmark: `vdisk compact --filesystem-aware` vs the zero-fill ritual, same run, same image.

Image: a dynamic VHD (2 MiB blocks) of --size-gib (default 8) holding one MBR partition with
ext4, filled to about 90 % with files and then a third of them deleted: about 60 % used, the
deleted files' data left behind in free space (so zero detection alone finds nothing).

Compared, each on a fresh copy of that image (copies are not timed; `sync` before each run):

  vdisk     `vdisk compact IMG --filesystem-aware` (reads the bitmaps, gives up the free
            blocks, compacts: one journaled, durable transaction; the moves rewrite data)
  --punch   `vdisk compact IMG --filesystem-aware --punch` (reads the bitmaps, punches the free
            space out of the file: nothing rewritten, the file keeps its length)
  ritual A  the host ritual the issue names: `vdisk mount --rw IMG MNT` (FUSE, no loop device),
            `zerofree MNT/p1`, unmount, `vdisk compact IMG`
  ritual B  the qemu-only ritual: `qemu-img dd` the partition out, `zerofree` it, reassemble a
            sparse raw disk (`qemu-img dd` of the table + `dd conv=sparse`), `qemu-img convert
            -O vpc` to a new image (drops the zeros)
  (`virt-sparsify` too, when it is installed)

Prints wall time, resulting file size and storage (st_blocks; "reclaimed" is storage given back
to the host), bytes the processes wrote (rusage block output, 512-byte
units, from wait4) and the ratios vdisk/ritual; targets: reclaimed >= ritual A's, wall time
<= 0.3x, bytes written <= 0.05x. Checks that all results read the same used data: e2fsck -fn on
each result and kept files byte-identical (debugfs dump).

    .venv/bin/python bench/bench_fsaware.py [--size-gib 8] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
FILE = 256 * MiB


def vdisk_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("vdisk")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vdisk.cli"]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, bytes written) of one command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}")
    return dt, ru.ru_oublock * 512


def build(work: Path, size: int) -> tuple[Path, int]:
    """The VHD with its ext4 partition; returns (image, partition start)."""
    part = work / "p1.img"
    start = MiB
    psize = size - start
    with open(part, "wb") as f:
        f.truncate(psize)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(part)])
    src = work / "data.bin"
    import numpy as np
    rng = np.random.default_rng(5)
    with open(src, "wb") as f:
        f.write(rng.integers(0, 256, FILE, dtype=np.uint8).tobytes())
    nfiles = int(psize * 0.9) // FILE
    cmds = [f"write {src} f{i:03d}" for i in range(nfiles)] + [f"rm f{i:03d}" for i in range(0, nfiles, 3)]
    script = work / "cmds"
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", str(script), str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    global SOURCE_SHA
    SOURCE_SHA = _sha(src)
    src.unlink()
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "-q", str(disk)], input=f"label: dos\nstart={start // 512}, type=83\n", text=True)
    with open(part, "rb") as a, open(disk, "r+b") as b:
        b.seek(start)
        shutil.copyfileobj(a, b, 16 * MiB)
    part.unlink()
    img = work / "base.vhd"
    run(vdisk_cmd() + ["convert", str(disk), str(img)])
    disk.unlink()
    return img, start


def fresh(src: Path, dst: Path) -> Path:
    if dst.exists():
        dst.unlink()
    run(["cp", "--sparse=always", str(src), str(dst)])
    with open(dst, "rb") as f:                      # as warm as the source qemu-img re-reads
        while f.read(16 * MiB):
            pass
    run(["sync"])
    return dst


def ritual_a(img: Path, work: Path) -> tuple[float, int]:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    server = subprocess.Popen(vdisk_cmd() + ["mount", "--rw", "--foreground", str(img), str(mnt)],
                              stdout=subprocess.DEVNULL)
    for _ in range(200):
        if (mnt / "p1").exists():
            break
        time.sleep(0.05)
    else:
        server.kill()
        raise SystemExit("vdisk mount did not come up")
    _, w1 = measured(["zerofree", str(mnt / "p1")])
    run(["fusermount3", "-u", str(mnt)])
    _, _, ru = os.wait4(server.pid, 0)
    server.returncode = 0
    _, w2 = measured(vdisk_cmd() + ["compact", str(img)])
    return time.perf_counter() - t0, w1 + ru.ru_oublock * 512 + w2


def ritual_b(img: Path, work: Path, start: int, out: Path) -> tuple[float, int]:
    """qemu-img dd the partition out, zerofree it, reassemble a (sparse) raw disk, convert it."""
    raw, part = work / "b.raw", work / "b-p1.img"
    mb = start // MiB
    t0 = time.perf_counter()
    written = 0
    for cmd in (["qemu-img", "dd", "-f", "vpc", "-O", "raw", "bs=1M", f"skip={mb}", f"if={img}", f"of={part}"],
                ["zerofree", str(part)],
                ["qemu-img", "dd", "-f", "vpc", "-O", "raw", "bs=1M", f"count={mb}", f"if={img}", f"of={raw}"],
                ["dd", f"if={part}", f"of={raw}", "bs=4M", f"seek={start}", "oflag=seek_bytes", "conv=sparse,notrunc",
                 "status=none"]):
        _, w = measured(cmd)
        written += w
    part.unlink()
    _, w = measured(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(raw), str(out)])
    written += w
    dt = time.perf_counter() - t0
    raw.unlink()
    return dt, written


SOURCE_SHA = ""


def _sha(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(16 * MiB), b""):
            h.update(b)
    return h.hexdigest()


def judge(img: Path, fmt: str, start: int, work: Path) -> None:
    """e2fsck -fn clean, and kept files (f001, f002, the last) byte-identical via debugfs dump."""
    raw = work / "judge.raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(raw)])
    part = work / "judge-p1.img"
    run(["dd", f"if={raw}", f"of={part}", "bs=4M", f"skip={start}", "iflag=skip_bytes", "conv=sparse",
         "status=none"])
    raw.unlink()
    r = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"e2fsck on {img}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    out = work / "dump.bin"
    for name in ("f001", "f002"):
        run(["debugfs", "-R", f"dump {name} {out}", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _sha(out) != SOURCE_SHA:
            raise SystemExit(f"{img}: file {name} changed")
        out.unlink()
    part.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=8.0)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = ap.parse_args()
    for tool in ("mkfs.ext4", "debugfs", "e2fsck", "zerofree", "qemu-img", "sfdisk", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_fsaware: {tool} is missing (see APT_PACKAGES in the Makefile)")
    size = int(args.size_gib * GiB) // MiB * MiB
    work = Path(args.keep or tempfile.mkdtemp(prefix="vdisk-bench-fsaware-", dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building a {size / GiB:.1f} GiB VHD with a 60 %-full ext4 and stale data in free space ...", flush=True)
        t = time.perf_counter()
        base, start = build(work, size)
        print(f"  built in {time.perf_counter() - t:.1f} s: {base.stat().st_size / MiB:.0f} MiB", flush=True)
        def stored(p: Path) -> int:
            return p.stat().st_blocks * 512

        rows = []                                      # (method, wall, apparent size, stored, written)
        for name, extra in (("vdisk compact --filesystem-aware", []),
                            ("vdisk compact --filesystem-aware --punch", ["--punch"])):
            a = fresh(base, work / "vdisk.vhd")
            before = stored(a)
            t, w = measured(vdisk_cmd() + ["compact", str(a), "--filesystem-aware", *extra])
            rows.append((name, t, a.stat().st_size, stored(a), w))
            judge(a, "vpc", start, work)
            a.unlink()

        r = fresh(base, work / "ritualA.vhd")
        t_a, w_a = ritual_a(r, work)
        rows.append(("ritual A: mount + zerofree + vdisk compact", t_a, r.stat().st_size, stored(r), w_a))
        judge(r, "vpc", start, work)
        r.unlink()

        out_b = work / "ritualB.vhd"                   # qemu-img only reads its source: no copy
        run(["sync"])
        t_b, w_b = ritual_b(base, work, start, out_b)
        rows.append(("ritual B: qemu-img dd + zerofree + qemu-img convert", t_b, out_b.stat().st_size, stored(out_b),
                     w_b))
        judge(out_b, "vpc", start, work)
        out_b.unlink()

        if shutil.which("virt-sparsify"):
            v = fresh(base, work / "vs-src.vhd")
            t_s, w_s = measured(["virt-sparsify", "--quiet", str(v), str(work / "vs.vhd")])
            rows.append(("virt-sparsify", t_s, (work / "vs.vhd").stat().st_size, stored(work / "vs.vhd"), w_s))
        print(f"\nimage before: {base.stat().st_size / MiB:.0f} MiB, {before / MiB:.0f} MiB stored "
              f"(reclaimed = storage given back to the host)")
        print(f"{'method':<52} {'wall s':>8} {'file MiB':>9} {'stored MiB':>11} {'reclaimed MiB':>14} "
              f"{'written MiB':>12}")
        for name, t, size_, st, w in rows:
            print(f"{name:<52} {t:8.2f} {size_ / MiB:9.0f} {st / MiB:11.0f} {(before - st) / MiB:14.0f} "
                  f"{w / MiB:12.1f}")
        for vname, t_v, _, st_v, w_v in rows[:2]:
            for name, t, _, st, w in rows[2:]:
                print(f"{vname[6:]} / {name.split(':')[0]}: wall {t_v / t:.3f}x (target <= 0.3), written "
                      f"{w_v / max(w, 1):.4f}x (target <= 0.05), reclaimed {(before - st_v) / max(before - st, 1):.3f}x "
                      f"(target >= 1)")

        print("all results: e2fsck -fn clean, kept files byte-identical (debugfs dump)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
