#!/usr/bin/env python3
"""Benchmark: reading a mounted image through `vdisk mount` vs `vhdimount` vs a raw passthrough.

The image is bench/common.py's standard one: a 2 GiB dynamic VHD (2 MiB blocks), half allocated
(seeded random data and stored zero blocks) and half holes; the passthrough serves its raw twin.
Three mounts, measured in the same run, interleaved run by run:

* ``vdisk``       — ``vdisk.mount.mount_image(half.vhd)``, file ``disk``
* ``vhdimount``   — libvhdi's FUSE mount (C, libfuse 2), file ``vhdi1``
* ``passthrough`` — a minimal mfusepy file system defined below that serves the raw twin with
  ``os.preadv``: the ceiling of a Python FUSE file system. It gets the same FUSE settings as
  vdisk (libfuse 3, direct_io, 1 MiB max_read, reads straight into the request buffer, worker
  threads that keep their Python thread state), so the ratio measures what vdisk's image layer
  costs, not a difference in FUSE tuning.

All three serve from a process group of their own in the benchmark's session (vhdimount runs with
-v, its foreground mode): with autogroup scheduling a session is also a CPU-scheduling group, and
a daemon in another session than its reader is much slower on a busy machine.

Sequential: ``dd if=FILE of=/dev/null bs=1M`` over the whole file. Random: a Python loop of
seeded 4 KiB ``os.preadv`` at 4 KiB-aligned offsets (the same offsets for every mount). Medians
over the runs; targets: vdisk >= 0.8x passthrough sequential, >= 5x vhdimount sequential and
random IOPS.

    .venv/bin/python bench/bench_mount.py [--runs 3] [--random-ops 20000]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
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

MiB = 1 << 20


# -- the minimal passthrough (runs in its own process: bench_mount.py --passthrough RAW MP) ------
def passthrough_main(raw: str, mountpoint: str) -> None:
    if ctypes.util.find_library("fuse3") and not os.environ.get("FUSE_LIBRARY_PATH"):
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    import errno
    import stat
    import threading

    import mfusepy

    max_read = (256 if mfusepy.fuse_version_major >= 3 else 32) * os.sysconf("SC_PAGE_SIZE")
    fd = os.open(raw, os.O_RDONLY)
    size = os.fstat(fd).st_size
    tls = threading.local()
    ctypes.pythonapi.PyGILState_Ensure.restype = ctypes.c_int

    class Passthrough(mfusepy.Operations):
        use_ns = True
        flag_nopath = True
        flag_nullpath_ok = True

        def getattr(self, path, fh=None):
            if fh or path == "/disk":
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size}
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return [".", "..", "disk"]

        def open(self, path, flags):
            return 1

        def read(self, path, length, offset, fh):
            return os.pread(fd, length, offset)

        def init_with_config(self, conn, config):
            if conn is not None and hasattr(conn, "max_read"):
                conn.max_read = max_read
            if config is not None:
                config.direct_io = 1

    class FastFUSE(mfusepy.FUSE):
        def _wrapper(self, func, *args, **kwargs):
            if not getattr(tls, "pinned", False):
                ctypes.pythonapi.PyGILState_Ensure()
                tls.pinned = True
            return super()._wrapper(func, *args, **kwargs)

        def read(self, path, buf, length, offset, fip):
            view = (ctypes.c_char * length).from_address(ctypes.cast(buf, ctypes.c_void_p).value)
            return os.preadv(fd, [view], offset)

    options = dict(foreground=True, ro=True, max_read=max_read, fsname="passthrough")
    if mfusepy.fuse_version_major >= 3:
        options["max_idle_threads"] = 10
    FastFUSE(Passthrough(), mountpoint, raw_fi=False, **options)


# -- harness -----------------------------------------------------------------------------------
def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.exists():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def fuse_unmount(mountpoint: Path) -> None:
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool) and subprocess.run([tool, "-u", str(mountpoint)], capture_output=True).returncode == 0:
            return


def seq_read(path: Path) -> float:
    """MiB/s of dd bs=1M over the whole file."""
    size = path.stat().st_size
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    return size / MiB / (time.perf_counter() - t)


def random_reads(path: Path, offsets: list[int]) -> float:
    """IOPS of 4 KiB reads at *offsets*."""
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in offsets:
            os.preadv(fd, [buf], off)
        return len(offsets) / (time.perf_counter() - t)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-ops", type=int, default=20000)
    ap.add_argument("--passthrough", nargs=2, metavar=("RAW", "MOUNTPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.passthrough:
        passthrough_main(*args.passthrough)
        return 0

    from common import OUT, make_half_allocated, make_raw_twin
    from vdisk.mount import mount_image, unmount

    if shutil.which("vhdimount") is None:
        raise SystemExit("vhdimount is missing: apt-get install libvhdi-utils")
    vhd = make_half_allocated(OUT / "half.vhd", "vhd")
    raw = make_raw_twin(OUT / "half.raw")
    for image in (vhd, raw):              # the backing files come from the page cache for everyone
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)

    work = Path(tempfile.mkdtemp(prefix="vdisk-bench-mount-"))
    mps = {name: work / name for name in ("passthrough", "vdisk", "vhdimount")}
    for mp in mps.values():
        mp.mkdir()
    passthrough = vhdi = None
    try:
        passthrough = subprocess.Popen([sys.executable, __file__, "--passthrough", str(raw), str(mps["passthrough"])],
                                       stderr=subprocess.DEVNULL, process_group=0)
        mount_image(vhd, mps["vdisk"])
        vhdi = subprocess.Popen(["vhdimount", "-v", str(vhd), str(mps["vhdimount"])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, process_group=0)
        files = {"passthrough": mps["passthrough"] / "disk", "vdisk": mps["vdisk"] / "disk",
                 "vhdimount": mps["vhdimount"] / "vhdi1"}
        for f in files.values():
            wait_for(f)
        size = min(f.stat().st_size for f in files.values())
        rnd = random.Random(42)
        offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(args.random_ops)]
        print(f"image: {vhd} ({vhd.stat().st_size / MiB:.0f} MiB file, {size / MiB:.0f} MiB virtual); "
              f"{args.runs} runs, {args.random_ops} random reads each; {os.cpu_count()} CPUs")
        seq = {name: [] for name in files}
        iops = {name: [] for name in files}
        for run in range(args.runs):
            for name, f in files.items():
                seq[name].append(seq_read(f))
                iops[name].append(random_reads(f, offsets))
                print(f"  run {run + 1}: {name:12s} sequential {seq[name][-1]:8.0f} MiB/s   "
                      f"random 4 KiB {iops[name][-1]:8.0f} IOPS", flush=True)
    finally:
        if os.path.ismount(mps["vdisk"]):
            unmount(mps["vdisk"])
        fuse_unmount(mps["vhdimount"])
        fuse_unmount(mps["passthrough"])
        for proc in (passthrough, vhdi):
            if proc is not None:
                proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    med_seq = {k: statistics.median(v) for k, v in seq.items()}
    med_iops = {k: statistics.median(v) for k, v in iops.items()}
    print("median:")
    for name in files:
        print(f"  {name:12s} sequential {med_seq[name]:8.0f} MiB/s   random 4 KiB {med_iops[name]:8.0f} IOPS")
    r_pass = med_seq["vdisk"] / med_seq["passthrough"]
    r_seq = med_seq["vdisk"] / med_seq["vhdimount"]
    r_rand = med_iops["vdisk"] / med_iops["vhdimount"]
    print(f"vdisk / passthrough sequential: {r_pass:.2f}x (target >= 0.8x) "
          f"{'OK' if r_pass >= 0.8 else 'MISSED'}")
    print(f"vdisk / vhdimount   sequential: {r_seq:.1f}x (target >= 5x) {'OK' if r_seq >= 5 else 'MISSED'}")
    print(f"vdisk / vhdimount   random 4 KiB IOPS: {r_rand:.1f}x (target >= 5x) {'OK' if r_rand >= 5 else 'MISSED'}")
    print(f"(vdisk / passthrough random 4 KiB IOPS: {med_iops['vdisk'] / med_iops['passthrough']:.2f}x)")
    return 0 if r_pass >= 0.8 and r_seq >= 5 and r_rand >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
