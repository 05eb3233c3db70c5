"""A real Linux guest judges vdisk's servers: Debian's cloud kernel boots under QEMU (TCG) on a
differencing VHD served read-write by vdisk, once over NBD (virtio-blk) and once over iSCSI
(virtio-scsi with ``scsi-block``, so the guest's own SCSI commands -- READ/WRITE, UNMAP,
SYNCHRONIZE CACHE, the VPD pages it probes -- reach vdisk's SCSI device model unchanged).

In the guest, /init (busybox sh) checks the parent's data through the child, writes a pattern
with O_DIRECT and reads it back, discards a range whose parent holds data, makes ext4 with the
host's mke2fs, writes files, runs fstrim, remounts and compares, runs the host's e2fsck -fn,
then prints one verdict line on the serial console and powers off. The host then checks the
verdict, the base image unchanged, the pattern and the discarded range through ``vdisk.open``,
and the filesystem with ``e2fsck -fn`` and ``debugfs`` on a raw copy read through vdisk.

Layout of the 64 MiB disk (MiB): 0-40 ext4, 44 the guest's pattern, 48-50 discarded by the
guest, 56 the parent's blob; the parent also holds noise at 0-8 and 20-22, under the filesystem.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import vdisk
from vdisk.devices.scsi import ScsiDisk
from vdisk.serve.iscsi import BackgroundIscsiServer
from vdisk.serve.nbd import BackgroundNBDServer

import guest_support

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 64 * MiB
FS_BLOCKS = 10240                       # 4 KiB blocks: the first 40 MiB
PATTERN_AT, PATTERN_LEN = 44 * MiB, 1 * MiB
DISCARD_AT, DISCARD_LEN = 48 * MiB, 2 * MiB
PARENT_AT, PARENT_LEN = 56 * MiB, 1 * MiB
NOISE = ((0, 8 * MiB), (20 * MiB, 2 * MiB), (DISCARD_AT, DISCARD_LEN))
FILES = 24
VERDICT = "VDISK-GUEST"

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "@VERDICT@ FAIL $*"; sync; poweroff -f; sleep 5; }
for m in $(cat /modules.order); do insmod /modules/$m || fail "insmod $m"; done
DEV=@DEV@
i=0
while [ ! -b $DEV ]; do
  i=$((i+1)); [ $i -gt 300 ] && fail "no $DEV"; sleep 0.1
done
echo "guest: $DEV is $(cat /sys/class/block/${DEV#/dev/}/size) sectors, discard max" \
  "$(cat /sys/class/block/${DEV#/dev/}/queue/discard_max_bytes) bytes," \
  "rotational $(cat /sys/class/block/${DEV#/dev/}/queue/rotational)"
# read_at FILE OFFSET LENGTH: O_DIRECT, so the bytes come from the disk, not the page cache
read_at() { dd if=$DEV of=$1 bs=64k skip=$(($2/65536)) count=$(($3/65536)) iflag=direct 2>/dev/null; }

# The parent's blob, through the child.
read_at /tmp/parent @PARENT_AT@ @PARENT_LEN@ || fail "parent read"
cmp -s /tmp/parent /data/parent || fail "parent blob differs through the child"

# A pattern written with O_DIRECT and read back after the caches are dropped.
dd if=/data/pattern of=$DEV bs=64k seek=$((@PATTERN_AT@/65536)) oflag=direct conv=fsync 2>/dev/null \
  || fail "pattern write"
echo 3 > /proc/sys/vm/drop_caches
read_at /tmp/back @PATTERN_AT@ @PATTERN_LEN@ || fail "pattern read"
cmp -s /tmp/back /data/pattern || fail "pattern read back differs"

# A discard over the parent's noise: what does the range read afterwards?
blkdiscard -o @DISCARD_AT@ -l @DISCARD_LEN@ $DEV || fail "blkdiscard"
read_at /tmp/disc @DISCARD_AT@ @DISCARD_LEN@ || fail "discarded range read"
if cmp -s /tmp/disc /data/noise; then DISCARD=kept
elif [ "$(tr -d '\000' < /tmp/disc | wc -c)" = 0 ]; then DISCARD=zeros; else DISCARD=other; fi

# ext4 on the first @FS_BLOCKS@ blocks, files, fstrim, a remount that compares.
/sbin/mke2fs -q -F -t ext4 -b 4096 -L vdiskguest $DEV @FS_BLOCKS@ || fail "mke2fs"
mount -t ext4 $DEV /mnt || fail "mount"
cp /data/pattern /mnt/pattern || fail "cp"
mkdir /mnt/dir
n=0
while [ $n -lt @FILES@ ]; do
  echo "file $n of @FILES@ written by the guest" > /mnt/dir/f$n; n=$((n+1))
done
dd if=/dev/zero of=/mnt/scratch bs=1M count=12 2>/dev/null || fail "scratch"
sync
rm /mnt/scratch
sync
TRIM=$(fstrim -v /mnt) || fail "fstrim"
TRIMMED=$(echo "$TRIM" | sed -n 's/.*(\([0-9]*\) bytes).*/\1/p')
[ -n "$TRIMMED" ] || TRIMMED=$(echo "$TRIM" | tr -cd '0-9 ' | awk '{print $1}')
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $DEV /mnt || fail "remount"
cmp -s /mnt/pattern /data/pattern || fail "pattern file differs after remount"
[ "$(cat /mnt/dir/f7)" = "file 7 of @FILES@ written by the guest" ] || fail "small file differs"
[ "$(ls /mnt/dir | wc -l)" = @FILES@ ] || fail "file count"
umount /mnt || fail "umount ro"
FSCK=$(/sbin/e2fsck -fn $DEV 2>&1) || { echo "$FSCK"; fail "e2fsck in the guest"; }
sync
Q=/sys/class/block/${DEV#/dev/}/queue
echo "@VERDICT@ OK trimmed=$TRIMMED rotational=$(cat $Q/rotational)" \
  "optimal_io=$(cat $Q/optimal_io_size) max_sectors_kb=$(cat $Q/max_sectors_kb) discard=$DISCARD"
poweroff -f
sleep 5
"""


def init_script(device: str) -> str:
    values = dict(VERDICT=VERDICT, DEV=device, PARENT_AT=PARENT_AT, PARENT_LEN=PARENT_LEN,
                  PATTERN_AT=PATTERN_AT, PATTERN_LEN=PATTERN_LEN, DISCARD_AT=DISCARD_AT,
                  DISCARD_LEN=DISCARD_LEN, FS_BLOCKS=FS_BLOCKS, FILES=FILES)
    text = INIT
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    assert "@" not in text.replace("$@", "")
    return text


@pytest.fixture(scope="module")
def judges():
    """The guest's tools, checked before any vdisk code runs: missing ones fail the test."""
    missing = guest_support.missing_judges()
    if missing:
        pytest.fail("the guest test needs: " + "; ".join(missing))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Chain:
    """base.vhd with the parent's blob and noise; child.vhd over it, empty."""

    def __init__(self, folder: Path, seed: int):
        rnd = random.Random(seed)
        self.folder = folder
        self.pattern = rnd.randbytes(PATTERN_LEN)
        self.parent_blob = rnd.randbytes(PARENT_LEN)
        self.noise = [rnd.randbytes(n) for _, n in NOISE]
        self.base, self.child = folder / "base.vhd", folder / "child.vhd"
        with vdisk.create(self.base, SIZE) as disk:
            disk.pwrite(self.parent_blob, PARENT_AT)
            for (at, _), blob in zip(NOISE, self.noise):
                disk.pwrite(blob, at)
        vdisk.create(self.child, parent=self.base).close()
        self.base_digest = sha256(self.base)

    def initrd(self, device: str) -> Path:
        path = self.folder / "initrd.cpio"
        path.write_bytes(guest_support.build_initramfs(init_script(device), {
            "data/pattern": self.pattern, "data/parent": self.parent_blob,
            "data/noise": self.noise[-1]}))
        return path


def boot(chain: Chain, device: str, drive_args: list[str]) -> tuple[str, guest_support.GuestResult]:
    result = guest_support.run_guest(chain.initrd(device), drive_args, chain.folder / "console.log",
                                     timeout=90)
    verdicts = result.lines(VERDICT)
    assert verdicts, f"no verdict from the guest (exit {result.returncode}):\n{result.tail()}"
    assert verdicts[-1].startswith(f"{VERDICT} OK"), f"{verdicts[-1]}\n{result.tail()}"
    assert result.returncode == 0, result.tail()
    print(f"guest: {verdicts[-1]} in {result.seconds:.1f} s")
    return verdicts[-1], result


def field(verdict: str, name: str) -> str:
    return next(word.split("=", 1)[1] for word in verdict.split() if word.startswith(name + "="))


def check_from_host(chain: Chain, verdict: str) -> None:
    """What the guest left, read back through vdisk and judged by e2fsprogs."""
    assert sha256(chain.base) == chain.base_digest, "the guest's writes reached the parent"
    raw = chain.folder / "fs.raw"
    with vdisk.open(chain.child) as disk:
        assert disk.pread(PATTERN_LEN, PATTERN_AT) == chain.pattern
        assert disk.pread(PARENT_LEN, PARENT_AT) == chain.parent_blob
        discarded = disk.pread(DISCARD_LEN, DISCARD_AT)
        with open(raw, "wb") as out:
            for at in range(0, FS_BLOCKS * 4096, 4 * MiB):
                out.write(disk.pread(4 * MiB, at))
    # The guest saw the same bytes the host sees now.
    seen = field(verdict, "discard")
    expected = {chain.noise[-1]: "kept", bytes(DISCARD_LEN): "zeros"}.get(discarded, "other")
    assert seen == expected
    assert seen != "other", "a discarded range reads neither zeros nor what it held"
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = chain.folder / "pattern.out"
    subprocess.run(["debugfs", "-R", f"dump /pattern {dumped}", str(raw)], check=True,
                   capture_output=True)
    assert dumped.read_bytes() == chain.pattern
    listing = subprocess.run(["debugfs", "-R", "ls -p /dir", str(raw)], capture_output=True,
                             text=True, check=True).stdout
    names = sorted(row.split("/")[5] for row in listing.splitlines() if row.count("/") >= 6)
    assert names == sorted([".", ".."] + [f"f{n}" for n in range(FILES)])
    script = chain.folder / "cat.debugfs"
    script.write_text("".join(f"cat /dir/f{n}\n" for n in range(FILES)))
    cat = subprocess.run(["debugfs", "-f", str(script), str(raw)], capture_output=True, check=True)
    assert cat.stdout.replace(b"debugfs: ", b"") == b"".join(
        b"cat /dir/f%d\nfile %d of %d written by the guest\n" % (n, n, FILES) for n in range(FILES))


class CommandLog:
    """Every SCSI command vdisk's device model ran: opcodes, the VPD pages asked for, and the
    (opcode, sense key) of each CHECK CONDITION."""

    def __init__(self, monkeypatch):
        self.ops: Counter = Counter()
        self.vpd: set[int] = set()
        self.checks: Counter = Counter()
        execute = ScsiDisk.execute_lun      # what the target runs (execute also answers checks
        log = self                          # made before a write's data arrives)

        def recording(lu, lun, cdb, data_out=None, **kw):
            result = execute(lu, lun, cdb, data_out, **kw)
            if result is None:              # a write's checks passed; it runs when its data is in
                return None
            op = cdb[0]
            log.ops[op] += 1
            if op == 0x12 and cdb[1] & 1:
                log.vpd.add(cdb[2])
            if not result.ok:
                log.checks[(op, result.sense[2] & 0x0F if len(result.sense) > 2 else None)] += 1
            return result

        monkeypatch.setattr(ScsiDisk, "execute_lun", recording)


def counting(monkeypatch, disk, names: tuple[str, ...]) -> Counter:
    """Count the calls the server makes to these methods of ``disk``."""
    calls: Counter = Counter()
    for name in names:
        method = getattr(disk, name)

        def counted(*args, _method=method, _name=name, **kw):
            calls[_name] += 1
            return _method(*args, **kw)

        monkeypatch.setattr(disk, name, counted)
    return calls


def test_guest_over_nbd_virtio_blk(judges, tmp_path, monkeypatch):
    chain = Chain(tmp_path, seed=13)
    with vdisk.open(chain.child, "r+") as disk:
        calls = counting(monkeypatch, disk, ("pwrite", "discard", "write_zeroes", "flush"))
        with BackgroundNBDServer([disk], names=["guest"], rw=True) as server:
            uri = f"nbd://127.0.0.1:{server.port}/guest"
            verdict, _ = boot(chain, "/dev/vda", [
                "-drive", f"file={uri},format=raw,if=none,id=d0,cache=writeback,discard=unmap",
                "-device", "virtio-blk-pci,drive=d0"])
    print("NBD server calls:", dict(calls))
    check_from_host(chain, verdict)
    assert int(field(verdict, "trimmed")) > 0
    # blkdiscard, mke2fs and fstrim reached vdisk as NBD_CMD_TRIM, sync as NBD_CMD_FLUSH.
    assert calls["discard"] > 0 and calls["flush"] > 0 and calls["pwrite"] > 0


def test_guest_over_iscsi_scsi_block(judges, tmp_path, monkeypatch):
    chain = Chain(tmp_path, seed=31)
    log = CommandLog(monkeypatch)
    iqn = "iqn.2026-01.org.example.vdisk:guest"
    with BackgroundIscsiServer(str(chain.child), iqn=iqn, rw=True).start() as server:
        verdict, _ = boot(chain, "/dev/sda", [
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.port},target={iqn},"
                      "lun=0,if=none,id=d1,cache=writeback,discard=unmap",
            "-device", "scsi-block,drive=d1,bus=scsi0.0"])
    check_from_host(chain, verdict)
    assert int(field(verdict, "trimmed")) > 0
    # The guest's view of the disk came from vdisk's own VPD pages (scsi-block passes them
    # through): non-rotating (B1), optimal transfer = the VHD's 2 MiB block (B0), and a discard
    # over the parent's data reads zeros, as LBPRZ promises.
    assert field(verdict, "rotational") == "0"
    assert field(verdict, "optimal_io") == str(2 * MiB)
    assert field(verdict, "discard") == "zeros"
    print("SCSI commands:", {f"{op:02x}": n for op, n in sorted(log.ops.items())},
          "VPD pages:", sorted(f"{p:02x}" for p in log.vpd),
          "CHECK CONDITIONs:", {f"{op:02x}/{key}": n for (op, key), n in log.checks.items()})
    # The guest's own probing reached the device model (QEMU's iscsi driver asks for neither).
    assert {0xB0, 0xB1}.issubset(log.vpd) and log.ops[0x1A] + log.ops[0x5A] > 0
    assert log.ops[0x42] + log.ops[0x93] + log.ops[0x41] > 0, "no UNMAP/WRITE SAME from fstrim"
    assert log.ops[0x35] + log.ops[0x91] > 0, "no SYNCHRONIZE CACHE from sync"
    data_path = {0x28, 0x2A, 0x88, 0x8A, 0x35, 0x91, 0x41, 0x93, 0x42}
    failed = {k: n for k, n in log.checks.items() if k[0] in data_path or k[1] in (3, 4)}
    assert not failed, f"the guest's commands failed: {failed}"
