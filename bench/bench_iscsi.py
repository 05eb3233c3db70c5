"""iSCSI with several sessions: N concurrent libiscsi readers of one `vdisk serve iscsi` target,
against one session and against the NBD export of the same image, in the same run.

    .venv/bin/python bench/bench_iscsi.py [--sessions 1,2,4] [--seconds 5] [--rounds 3] [--random]

The image is the standard 2 GiB half-allocated VHD (bench/out/half.vhd, see common.py), served
read-only by `vdisk serve iscsi` and by `vdisk serve nbd` (separate processes). Each of the N
readers is one `iscsi-perf -m 32 -b 256` session (32 READs of 128 KiB in flight, sequential, or
random with --random) running for --seconds; its "iops average" is summed over the readers.
The NBD side is the same load through fio's nbd engine: N jobs (one connection each), 128 KiB
reads at queue depth 32. targetcli (the kernel target, the natural anchor) is not available
here, so the ratios printed are N sessions / 1 session and iSCSI / NBD at each N. Rounds
alternate iSCSI and NBD; each figure is the median over --rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, standard_images

sys.path.insert(0, str(ROOT / "bench"))
from bench_nbd import free_port, wait_port  # noqa: E402

MiB = 1 << 20
REQUEST = 128 * 1024


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not come up")


def iscsi_readers(url: str, n: int, seconds: float, rand: bool) -> float:
    """Bytes/s of n concurrent iscsi-perf sessions, summed."""
    procs = []
    for i in range(n):
        cmd = ["iscsi-perf", "-i", f"iqn.2026-01.org.vdisk.bench:reader{i}", "-m", "32", "-b",
               str(REQUEST // 512)] + (["-r"] if rand else []) + [url]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        out, _ = p.communicate(timeout=30)
        found = re.findall(r"iops average (\d+)", out)
        if not found:
            raise SystemExit(f"iscsi-perf printed no figures:\n{out[-2000:]}")
        total += int(found[-1]) * REQUEST
    return total


def nbd_readers(uri: str, n: int, seconds: float, rand: bool) -> float:
    """Bytes/s of fio's nbd engine with n jobs (connections), 128 KiB at queue depth 32."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}",
                        f"--rw={'randread' if rand else 'read'}", f"--bs={REQUEST}", "--iodepth=32",
                        f"--numjobs={n}", "--group_reporting", "--size=2g",
                        f"--runtime={seconds:g}", "--time_based", "--output-format=json",
                        f"--output={out.name}"], check=True, capture_output=True)
        job = json.load(open(out.name))["jobs"][0]
        return job["read"]["bw_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--random", action="store_true", help="random instead of sequential reads")
    args = ap.parse_args()
    for tool in ("iscsi-perf", "fio"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install libiscsi-bin fio)")
    sessions = [int(x) for x in args.sessions.split(",")]
    image = str(standard_images()["vhd"])
    pi, pn = free_port(), free_port()
    iqn = "iqn.2026-01.org.vdisk:bench"
    py = sys.executable
    servers = {
        "iscsi": subprocess.Popen([py, "-c", "from vdisk.serve.iscsi import serve_iscsi; "
                                   f"serve_iscsi({image!r}, port={pi}, iqn={iqn!r})"],
                                  cwd=str(ROOT), stderr=subprocess.DEVNULL),
        "nbd": subprocess.Popen([py, "-c", "from vdisk.serve.nbd import serve_nbd; "
                                 f"serve_nbd([{image!r}], port={pn}, names=['disk'], shared=0, "
                                 "on_connection=None)"], cwd=str(ROOT), stderr=subprocess.DEVNULL),
    }
    try:
        wait_tcp(pi, servers["iscsi"])
        wait_port(pn, servers["nbd"])
        url, uri = f"iscsi://127.0.0.1:{pi}/{iqn}/0", f"nbd://127.0.0.1:{pn}/disk"
        print(f"{'random' if args.random else 'sequential'} 128 KiB reads, 32 in flight per "
              f"session, {args.seconds:g} s per run, median of {args.rounds} rounds", flush=True)
        res = {}
        for n in sessions:
            runs = {"iscsi": [], "nbd": []}
            for _ in range(args.rounds):
                runs["iscsi"].append(iscsi_readers(url, n, args.seconds, args.random))
                runs["nbd"].append(nbd_readers(uri, n, args.seconds, args.random))
            res[n] = {k: statistics.median(v) for k, v in runs.items()}
            base = res[sessions[0]]
            print(f"{n} session(s): iSCSI {res[n]['iscsi'] / MiB:7.0f} MiB/s "
                  f"({res[n]['iscsi'] / base['iscsi']:4.2f}x of {sessions[0]})   "
                  f"NBD {res[n]['nbd'] / MiB:7.0f} MiB/s ({res[n]['nbd'] / base['nbd']:4.2f}x)   "
                  f"iSCSI/NBD {res[n]['iscsi'] / res[n]['nbd']:4.2f}x", flush=True)
    finally:
        for p in servers.values():
            p.terminate()
        for p in servers.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
