#!/usr/bin/env python3
"""Benchmark: `qemu-img convert nbd://... out.raw` from `vdisk serve nbd` vs from `qemu-nbd`,
both serving the same dynamic VHD, in the same run. Prints both wall times and the ratio
(target: vdisk <= 1.5x qemu-nbd).

The image (built once with vdisk, cached in bench/out/): 2 GiB dynamic VHD, 2 MiB blocks; half
of the blocks allocated — three quarters of those hold seeded random data, one quarter is
allocated but all zeros — and the other half are holes, in a seeded random order.

    .venv/bin/python bench/bench_nbd.py [--size-mib 2048] [--runs 3] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vdisk  # noqa: E402

OUT = ROOT / "bench" / "out"
BLOCK = 2 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                # a polite probe: greeting, client flags, NBD_OPT_ABORT, wait for the ACK
                greeting = b""
                while len(greeting) < 18:
                    chunk = s.recv(18 - len(greeting))
                    if not chunk:
                        raise OSError("closed")
                    greeting += chunk
                s.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 2, 0))
                s.recv(20)
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not come up")


def build_image(path: Path, size: int, seed: int = 1234) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(".partial.vhd")
    if tmp.exists():
        tmp.unlink()
    rnd = random.Random(seed)
    nblocks = size // BLOCK
    order = list(range(nblocks))
    rnd.shuffle(order)
    allocated = order[: nblocks // 2]
    zero_blocks = set(allocated[: len(allocated) // 4])
    print(f"building {path} ({size >> 20} MiB, {len(allocated)} of {nblocks} blocks allocated, "
          f"{len(zero_blocks)} of them zero-filled)...", flush=True)
    zeros = bytes(BLOCK)
    with vdisk.create(tmp, size, format="vhd", subtype="dynamic", block_size=BLOCK) as d:
        for b in sorted(allocated):
            data = zeros if b in zero_blocks else rnd.randbytes(BLOCK)
            d.pwrite(data, b * BLOCK)
    tmp.rename(path)


def timed_convert(uri: str, out: Path) -> float:
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(out)], check=True)
    return time.perf_counter() - t0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the converted raw files")
    ap.add_argument("--out-dir", default=None,
                    help="where qemu-img writes out.raw (default: /dev/shm when it has room, so "
                         "the page-cache writeback of the output does not drown the servers' "
                         "difference; else bench/out)")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install qemu-utils)")
    OUT.mkdir(parents=True, exist_ok=True)
    image = OUT / f"nbd-bench-{args.size_mib}m.vhd"
    build_image(image, args.size_mib << 20)
    out_dir = Path(args.out_dir) if args.out_dir else OUT
    if args.out_dir is None and os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 3 * (args.size_mib << 20):
            out_dir = Path("/dev/shm")

    servers = {}
    port_v, port_q = free_port(), free_port()
    code = ("import sys; from vdisk.serve.nbd import serve_nbd; "
            f"serve_nbd([{str(image)!r}], host='127.0.0.1', port={port_v}, names=['disk'])")
    servers["vdisk"] = subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT))
    servers["qemu-nbd"] = subprocess.Popen(
        ["qemu-nbd", "-f", "vpc", "-r", "-t", "-x", "disk", "-b", "127.0.0.1", "-p", str(port_q),
         "-e", "8", str(image)])
    try:
        wait_port(port_v, servers["vdisk"])
        wait_port(port_q, servers["qemu-nbd"])
        uris = {"vdisk": f"nbd://127.0.0.1:{port_v}/disk", "qemu-nbd": f"nbd://127.0.0.1:{port_q}/disk"}
        outs = {k: out_dir / f"nbd-bench-{k}.raw" for k in uris}
        times = {k: [] for k in uris}
        timed_convert(uris["qemu-nbd"], outs["qemu-nbd"])     # warm the page cache once
        for _ in range(args.runs):                             # alternate, same conditions
            for k in ("qemu-nbd", "vdisk"):
                times[k].append(timed_convert(uris[k], outs[k]))
        same = sha256(outs["vdisk"]) == sha256(outs["qemu-nbd"])
    finally:
        for p in servers.values():
            p.terminate()
        for p in servers.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["vdisk"] / med["qemu-nbd"]
    print(f"image: {image.name} ({args.size_mib} MiB virtual, dynamic VHD, half allocated); "
          f"output to {out_dir}")
    for k in ("qemu-nbd", "vdisk"):
        print(f"  qemu-img convert from {k:9s}: median {med[k]:.3f} s  "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[k])})")
    print(f"  outputs identical: {same}")
    print(f"ratio vdisk / qemu-nbd: {ratio:.2f}x  (target <= 1.5x)  {'OK' if ratio <= 1.5 else 'SLOWER THAN TARGET'}")
    if not args.keep:
        for p in outs.values():
            p.unlink(missing_ok=True)
    if not same:
        raise SystemExit("the two servers delivered different content")


if __name__ == "__main__":
    main()
