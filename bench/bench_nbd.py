#!/usr/bin/env python3
"""Benchmark: `qemu-img convert nbd://... out.raw` from `vdisk serve nbd` vs from `qemu-nbd`,
both serving the same dynamic VHD, in the same run. Prints both wall times and the ratio
(target: vdisk <= 1.5x qemu-nbd).

The image (built once with vdisk, cached in bench/out/): 2 GiB dynamic VHD, 2 MiB blocks; half
of the blocks allocated — three quarters of those hold seeded random data, one quarter is
allocated but all zeros — and the other half are holes, in a seeded random order.

With ``--tls`` both servers require TLS (a throw-away CA and server certificate made with
openssl; vdisk ``--tls-creds``, qemu-nbd ``--object tls-creds-x509``) and qemu-img connects with
``tls-creds`` (issue 16's figure: 512 MiB, target <= 1.5x).

    .venv/bin/python bench/bench_nbd.py [--size-mib 2048] [--runs 3] [--keep] [--tls]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vdisk  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import sha256  # noqa: E402

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


def timed_convert(port: int, out: Path, certs: "Path | None") -> float:
    """qemu-img convert of export 'disk' on *port* (over TLS when *certs* names a client folder)."""
    if out.exists():
        out.unlink()
    if certs is None:
        source = ["nbd://127.0.0.1:%d/disk" % port]
    else:
        source = ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
                  f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},"
                  "file.export=disk,file.tls-creds=tls0"]
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", *source, "-O", "raw", str(out)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the converted raw files")
    ap.add_argument("--out-dir", default=None,
                    help="where qemu-img writes out.raw (default: /dev/shm when it has room, so "
                         "the page-cache writeback of the output does not drown the servers' "
                         "difference; else bench/out)")
    ap.add_argument("--tls", action="store_true", help="both servers require TLS")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", *(("openssl",) if args.tls else ())):
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

    pki_dir = tempfile.TemporaryDirectory(prefix="vdisk-bench-pki-") if args.tls else None
    certs = server_tls = qemu_tls = None
    if pki_dir is not None:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_nbd_tls_support import make_pki
        pki = make_pki(Path(pki_dir.name))
        certs = pki.anonymous
        server_tls = (f"tls=TlsConfig.from_options({str(pki.server)!r}, 'require'), "
                      "on_connection=None, ")
        qemu_tls = ["--object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server,verify-peer=off",
                    "--tls-creds", "tls0"]

    servers = {}
    port_v, port_q = free_port(), free_port()
    code = ("import sys; from vdisk.serve.nbd import serve_nbd; "
            "from vdisk.serve.nbd_tls import TlsConfig; "
            f"serve_nbd([{str(image)!r}], host='127.0.0.1', port={port_v}, names=['disk'], "
            f"{server_tls or ''})")
    servers["vdisk"] = subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT))
    servers["qemu-nbd"] = subprocess.Popen(
        ["qemu-nbd", *(qemu_tls or ()), "-f", "vpc", "-r", "-t", "-x", "disk", "-b", "127.0.0.1",
         "-p", str(port_q), "-e", "8", str(image)])
    try:
        wait_port(port_v, servers["vdisk"])
        wait_port(port_q, servers["qemu-nbd"])
        ports = {"vdisk": port_v, "qemu-nbd": port_q}
        outs = {k: out_dir / f"nbd-bench-{k}.raw" for k in ports}
        times = {k: [] for k in ports}
        timed_convert(ports["qemu-nbd"], outs["qemu-nbd"], certs)     # warm the page cache once
        for _ in range(args.runs):                                     # alternate, same conditions
            for k in ("qemu-nbd", "vdisk"):
                times[k].append(timed_convert(ports[k], outs[k], certs))
        same = sha256(outs["vdisk"]) == sha256(outs["qemu-nbd"])
    finally:
        for p in servers.values():
            p.terminate()
        for p in servers.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if pki_dir is not None:
            pki_dir.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["vdisk"] / med["qemu-nbd"]
    print(f"image: {image.name} ({args.size_mib} MiB virtual, dynamic VHD, half allocated); "
          f"output to {out_dir}; {'over TLS (both servers require it)' if args.tls else 'plain TCP'}")
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
