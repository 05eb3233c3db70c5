"""Read errors on a real image file, through every front end.

One sector of a dynamic VHD (or VDI) made by qemu-img is made unreadable at the I/O seam
(``vdisk.io.read_fault_hook``): the device fails the read (EIO), or the file gives fewer bytes than
its metadata says it holds (a short read). Where the bad sector's bytes sit in the file is asked
of ``qemu-img map``, not of vdisk. Each front end must report the error the way its users expect
and go on serving:

- SCSI (``ScsiDisk``, and through the iSCSI target to QEMU's libiscsi driver): CHECK CONDITION,
  MEDIUM ERROR, UNRECOVERED READ ERROR (03/11/00) with the failing LBA; the next command is GOOD;
- ATA (``AtaDisk``): Status ERR, Error UNC, the LBA registers at the failing sector;
- NBD: an EIO error reply to that request on the same connection, which stays usable (a raw
  client, qemu-io and nbdcopy);
- FUSE: EIO to the reader; the mount keeps serving the other offsets;
- CLI: one line naming the file and the offset, exit status 1, no traceback; ``vdisk convert``,
  ``backup`` and ``shadow export`` leave no output file; ``compact``, ``resize`` and ``commit``
  change no byte of the images (a short read must never be taken for zeros: it made compact drop
  or zero-fill a block and resize move zeros in a block's place, before those were fixed).

The faults are injected in the process that runs the front end: the hook is set in this process
for the in-process devices and servers, before the fork for the FUSE daemon, and by running this
file as a script (``python tests/test_read_errors.py FAULT -- vdisk-args``) for the CLI.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import subprocess
import sys

import pytest

import vdisk
import vdisk.io as vio

from conftest import need

SECTOR = 512
MiB = 1 << 20
SIZE = 8 * MiB
CHUNK = 64 << 10                      # the model's pattern: each 64 KiB chunk k holds byte k + 1
BAD = 3 * MiB + 7 * SECTOR            # the unreadable virtual sector (in chunk 48)
BAD_LBA = BAD // SECTOR
MODES = ("eio", "short")
HERE = os.path.abspath(__file__)


def pattern(k: int) -> int:
    return k + 1


MODEL = b"".join(bytes([pattern(k)]) * CHUNK for k in range(SIZE // CHUNK))


# ----------------------------------------------------------------------------------------------
# the fault: one sector of one file
# ----------------------------------------------------------------------------------------------

def make_hook(path: str, file_offset: int, mode: str):
    """A read_fault_hook that fails every read of *path* touching the SECTOR at *file_offset*:
    "eio" raises EIO, "short" delivers only the bytes before the bad sector."""
    target = os.path.realpath(path)

    def hook(kind, image_file, offset, length):
        if os.path.realpath(image_file.path) != target:
            return None
        if offset < file_offset + SECTOR and offset + length > file_offset:
            if mode == "eio":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return max(0, file_offset - offset)
        return None
    return hook


@contextlib.contextmanager
def fault(path: str, file_offset: int, mode: str):
    with vio.injected_read_faults(make_hook(path, file_offset, mode)):
        yield


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def file_offset_of(path: str, virtual: int) -> int:
    """Where qemu-img says the byte at *virtual* is stored in *path*."""
    out = run("qemu-img", "map", "--output=json", path, check=True).stdout
    for run_ in json.loads(out):
        if run_["start"] <= virtual < run_["start"] + run_["length"] and run_.get("data"):
            return run_["offset"] + virtual - run_["start"]
    raise AssertionError(f"qemu-img map: {virtual} is not stored in {path}")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """{fmt: (path, file offset of the BAD sector)} for a dynamic VHD and a dynamic VDI holding
    MODEL, written by qemu-img."""
    need("qemu-img", "qemu-io")
    d = tmp_path_factory.mktemp("readerr")
    raw = d / "model.raw"
    raw.write_bytes(MODEL)
    out = {}
    for fmt, qfmt, opts in (("vhd", "vpc", "subformat=dynamic,force_size=on"), ("vdi", "vdi", "static=off")):
        path = str(d / f"disk.{fmt}")
        run("qemu-img", "convert", "-f", "raw", "-O", qfmt, "-o", opts, str(raw), path, check=True)
        out[fmt] = (path, file_offset_of(path, BAD))
    raw.unlink()
    return out


@pytest.fixture
def vhd(images):
    return images["vhd"]


def test_the_fault_makes_exactly_one_sector_unreadable(vhd):
    """The injection itself: the Disk API raises ReadError naming the file and the offset for the
    bad sector and for any read across it; every other sector reads the model."""
    path, foff = vhd
    with vdisk.open(path) as disk:
        for mode in MODES:
            with fault(path, foff, mode):
                for off, n in ((BAD, SECTOR), (BAD - 4096, 8192), (3 * MiB, MiB)):
                    with pytest.raises(vdisk.ReadError) as exc:
                        disk.pread(n, off)
                    assert exc.value.path == path and path in str(exc.value)
                    assert exc.value.offset <= foff < exc.value.offset + exc.value.length
                    assert f"offset {exc.value.offset}" in str(exc.value)
                    if mode == "short":
                        assert "short read" in str(exc.value)
                assert disk.pread(BAD - 3 * MiB, 3 * MiB) == MODEL[3 * MiB:BAD]
                assert disk.pread(SECTOR, BAD + SECTOR) == MODEL[BAD + SECTOR:BAD + 2 * SECTOR]
            assert disk.pread(SIZE, 0) == MODEL


# ----------------------------------------------------------------------------------------------
# SCSI
# ----------------------------------------------------------------------------------------------

def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def verify10(lba: int, blocks: int) -> bytes:       # BYTCHK 0: the device reads the medium itself
    return struct.pack(">BBIBHB", 0x2F, 0, lba, 0, blocks, 0)


@pytest.mark.parametrize("mode", MODES)
def test_scsi_medium_error_then_the_next_command_works(vhd, mode):
    from vdisk.devices.scsi import ScsiDisk
    from vdisk.devices.scsi_sense import CHECK_CONDITION, GOOD, decode_sense

    path, foff = vhd
    with vdisk.open(path) as disk, fault(path, foff, mode):
        dev = ScsiDisk(disk)
        for cdb in (read10(BAD_LBA - 3, 8), read16(BAD_LBA, 1), verify10(BAD_LBA - 1, 4)):
            res = dev.execute(cdb)
            assert res.status == CHECK_CONDITION and res.data_in == b""
            assert decode_sense(res.sense) == (0x03, 0x11, 0x00)          # MEDIUM ERROR, unrecovered read
            assert res.sense[0] & 0x80 and struct.unpack(">I", res.sense[3:7])[0] == BAD_LBA
            # the next command works, and so do reads right beside the bad sector
            assert dev.execute(bytes(6)).status == GOOD                     # TEST UNIT READY
            res = dev.execute(read10(BAD_LBA - 8, 8))
            assert res.status == GOOD and res.data_in == MODEL[BAD - 8 * SECTOR:BAD]
            res = dev.execute(read10(BAD_LBA + 1, 8))
            assert res.status == GOOD and res.data_in == MODEL[BAD + SECTOR:BAD + 9 * SECTOR]
        # REQUEST SENSE after the failure reports nothing pending: the sense came with the status
        res = dev.execute(bytes([0x03, 0, 0, 0, 18, 0]))
        assert res.status == GOOD and decode_sense(res.data_in) == (0, 0, 0)


@pytest.mark.parametrize("mode", MODES)
def test_scsi_write_over_an_unreadable_shadowed_sector_fails_and_keeps_both_views(vhd, tmp_path, mode):
    """With a shadow copy, a write must first preserve what it overwrites: when that cannot be
    read the write fails (MEDIUM ERROR) and neither the live disk nor the shadow changes."""
    import shutil
    from vdisk import shadow
    from vdisk.devices.scsi import ScsiDisk
    from vdisk.devices.scsi_sense import CHECK_CONDITION, GOOD, decode_sense

    path = str(tmp_path / "disk.vhd")
    shutil.copyfile(vhd[0], path)
    foff = vhd[1]
    with shadow.open_shadowed(path, "r+") as disk:
        snap = disk.create_shadow("before")
        dev = ScsiDisk(disk)
        with fault(path, foff, mode):
            res = dev.execute(struct.pack(">BBIBHB", 0x2A, 0, BAD_LBA, 0, 1, 0), b"\xab" * SECTOR)
            assert res.status == CHECK_CONDITION and decode_sense(res.sense)[0] == 0x03
            res = dev.execute(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), b"\xcd" * SECTOR)
            assert res.status == GOOD
        with disk.shadow_view(snap.id) as old:
            assert old.pread(SIZE, 0) == MODEL
        assert disk.pread(SIZE, 0) == b"\xcd" * SECTOR + MODEL[SECTOR:]


def test_scsi_over_iscsi_qemu_sees_an_io_error_then_good_reads(vhd):
    """QEMU's libiscsi driver, one session: the read across the bad sector fails with EIO, the
    reads after it on the same session return the right bytes."""
    need("qemu-io")
    if " iscsi" not in run("qemu-img", "--help").stdout:
        pytest.skip("qemu has no iscsi driver (install qemu-block-extra)")
    from vdisk.serve.iscsi import start_iscsi_server

    path, foff = vhd
    with fault(path, foff, "eio"):
        srv = start_iscsi_server(path)
        try:
            proc = run("qemu-io", "-r", "-f", "raw",
                       "-c", f"read -P {pattern(BAD // CHUNK)} {BAD - 4096} 8192",
                       "-c", f"read -P {pattern(0)} 0 64k",
                       "-c", f"read -P {pattern(BAD // CHUNK)} {BAD + SECTOR} 4096",
                       srv.url)
        finally:
            srv.stop()
    lines = proc.stdout.splitlines()
    assert lines[0] == "read failed: Input/output error", proc.stdout + proc.stderr
    assert [ln.split()[0] for ln in lines[1:]] == ["read", "64", "read", "4"], proc.stdout
    assert "Pattern verification failed" not in proc.stdout
    # QEMU decodes the sense itself: key 3, ASC/ASCQ 11/00, for the READ that began at BAD - 4096
    assert re.search(rf"failed at lba {(BAD - 4096) // SECTOR}: SENSE KEY:\S*\(3\) ASCQ:\S*\(0x1100\)", proc.stderr), proc.stderr


# ----------------------------------------------------------------------------------------------
# ATA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("command, ext", [(0x20, False), (0xC4, False), (0x24, True), (0xC8, False),
                                          (0x25, True), (0x40, False)],
                         ids=["READ SECTORS", "READ MULTIPLE", "READ SECTORS EXT", "READ DMA",
                              "READ DMA EXT", "READ VERIFY"])
def test_ata_err_unc_then_the_next_command_works(vhd, mode, command, ext):
    from vdisk.devices.ata import ABRT, BSY, DRDY, DRQ, ERR, UNC, AtaDisk

    path, foff = vhd
    with vdisk.open(path) as disk, fault(path, foff, mode):
        ata = AtaDisk(disk)
        start = BAD_LBA - 3
        r = ata.execute(command, count=8, lba=start)
        assert r.status & ERR and r.status & DRDY and not r.status & (BSY | DRQ)
        assert r.error == UNC and not r.error & ABRT
        assert r.lba == BAD_LBA                                 # the task file points at the bad sector
        if command != 0x40:
            # what reached the host before the error is the data in front of the bad sector
            assert MODEL[start * SECTOR:BAD].startswith(r.data_in)
        # the next command works: the sectors on either side, and IDENTIFY
        r = ata.execute(0x20, count=3, lba=start)
        assert r.ok and r.error == 0 and r.data_in == MODEL[start * SECTOR:BAD]
        r = ata.execute(0xC8, count=4, lba=BAD_LBA + 1)
        assert r.ok and r.data_in == MODEL[BAD + SECTOR:BAD + 5 * SECTOR]
        assert ata.execute(0xEC).ok
        # and the bad sector still fails, the same way
        r = ata.execute(0x20, count=1, lba=BAD_LBA)
        assert r.status & ERR and r.error == UNC


# ----------------------------------------------------------------------------------------------
# NBD
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def nbd_server(vhd):
    from vdisk.serve.nbd import BackgroundNBDServer
    path, _ = vhd
    with BackgroundNBDServer([path]) as srv:
        yield srv


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("mode", MODES)
def test_nbd_eio_reply_and_the_connection_stays_usable(vhd, nbd_server, mode, structured):
    from test_nbd_support import RawClient

    path, foff = vhd
    c = RawClient(nbd_server.port)
    try:
        c.greeting()
        size, _flags = c.go(os.path.basename(path).encode(), structured=structured)
        assert size == SIZE
        with fault(path, foff, mode):
            for rep in range(2):
                c.request(0, BAD - 4096, 8192, cookie=10 + rep)              # NBD_CMD_READ
                if structured:
                    flags, ctype, cookie, payload = c.chunk()
                    assert ctype in (0x8001, 0x8002) and flags & 1 and cookie == 10 + rep
                    err, mlen = struct.unpack(">IH", payload[:6])
                    assert err == errno.EIO
                    message = payload[6:6 + mlen].decode()
                    assert "read error" in message
                else:
                    err, cookie, data = c.simple_reply(8192)
                    assert (err, cookie, data) == (errno.EIO, 10 + rep, b"")
                # the same connection goes on: reads on either side of the bad sector
                for cookie, (off, n) in enumerate(((BAD - 8192, 8192), (BAD + SECTOR, 4096), (0, 65536)), 20):
                    c.request(0, off, n, cookie=cookie)
                    if structured:
                        pieces, err = c.structured_read(cookie)
                        assert err == 0
                        got = b"".join(pieces[k] for k in sorted(pieces))
                    else:
                        err, ck, got = c.simple_reply(n)
                        assert (err, ck) == (0, cookie)
                    assert got == MODEL[off:off + n]
        c.request(2)                                                          # NBD_CMD_DISC
        assert c.is_closed()
    finally:
        c.close()


def test_nbd_pipelined_requests_each_get_their_own_reply(vhd, nbd_server):
    """Requests sent back to back around a failing one: the failing one gets its EIO, the others
    their data, matched by cookie (the server may answer out of order)."""
    from test_nbd_support import RawClient

    path, foff = vhd
    wanted = {1: (0, 65536), 2: (BAD - 4096, 8192), 3: (BAD + SECTOR, 4096), 4: (BAD, SECTOR),
              5: (SIZE - 65536, 65536)}
    c = RawClient(nbd_server.port)
    try:
        c.greeting()
        c.go(os.path.basename(path).encode())
        with fault(path, foff, "eio"):
            for cookie, (off, n) in wanted.items():
                c.request(0, off, n, cookie=cookie)
            data = {k: {} for k in wanted}
            errs, done = {}, set()
            while done != set(wanted):
                flags, ctype, cookie, payload = c.chunk()
                assert cookie in wanted and cookie not in done
                if ctype == 1:
                    data[cookie][struct.unpack(">Q", payload[:8])[0]] = payload[8:]
                elif ctype == 2:
                    off, ln = struct.unpack(">QI", payload)
                    data[cookie][off] = bytes(ln)
                elif ctype & 0x8000:
                    errs[cookie] = struct.unpack(">I", payload[:4])[0]
                if flags & 1:
                    done.add(cookie)
        assert errs == {2: errno.EIO, 4: errno.EIO}
        for cookie in (1, 3, 5):
            off, n = wanted[cookie]
            assert b"".join(data[cookie][k] for k in sorted(data[cookie])) == MODEL[off:off + n]
    finally:
        c.close()


def test_nbd_clients_see_an_io_error_and_go_on(vhd, nbd_server, tmp_path):
    """qemu-io on one connection: the bad read fails with EIO, the next reads verify; nbdcopy of
    the whole export fails naming an I/O error; then a clean nbdcopy of the same export works."""
    need("qemu-io", "nbdcopy", "nbdinfo")
    path, foff = vhd
    uri = nbd_server.uri()
    with fault(path, foff, "eio"):
        proc = run("qemu-io", "-r", "-f", "raw",
                   "-c", f"read -P {pattern(BAD // CHUNK)} {BAD - 4096} 8192",
                   "-c", f"read -P {pattern(0)} 0 64k",
                   "-c", f"read -P {pattern(BAD // CHUNK)} {BAD + SECTOR} 4096",
                   uri)
        lines = proc.stdout.splitlines()
        assert lines[0] == "read failed: Input/output error", proc.stdout + proc.stderr
        assert [ln.split()[0] for ln in lines[1:]] == ["read", "64", "read", "4"], proc.stdout
        assert "Pattern verification failed" not in proc.stdout
        copy = run("nbdcopy", uri, str(tmp_path / "copy.raw"))
        assert copy.returncode != 0 and "Input/output error" in copy.stderr, copy
        info = run("nbdinfo", "--size", uri)
        assert info.returncode == 0 and info.stdout.strip() == str(SIZE)
    copy = run("nbdcopy", uri, str(tmp_path / "copy2.raw"))
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "copy2.raw").read_bytes() == MODEL


# ----------------------------------------------------------------------------------------------
# FUSE
# ----------------------------------------------------------------------------------------------

def _fuse_problem():
    import shutil
    try:
        from vdisk.mount import check_fuse
        check_fuse()
    except vdisk.VDiskError as exc:
        return str(exc)
    return None if shutil.which("fusermount3") else "fusermount3 missing"


@pytest.mark.parametrize("mode", MODES)
def test_fuse_reader_gets_eio_and_the_mount_keeps_serving(vhd, tmp_path, mode):
    problem = _fuse_problem()
    if problem is not None:
        pytest.skip(f"FUSE unavailable: {problem}")
    from vdisk.mount import mount_image, unmount

    path, foff = vhd
    mp = tmp_path / "m"
    mp.mkdir()
    with fault(path, foff, mode):            # the daemon is forked with the hook in place
        mount_image(path, mp)
    try:
        fd = os.open(mp / "disk", os.O_RDONLY)
        try:
            for off, n in ((BAD, SECTOR), (BAD - 4096, 8192), (3 * MiB, MiB)):
                with pytest.raises(OSError) as exc:
                    os.pread(fd, n, off)
                assert exc.value.errno == errno.EIO
                assert os.pread(fd, 4096, 0) == MODEL[:4096]
                assert os.pread(fd, BAD - 3 * MiB, 3 * MiB) == MODEL[3 * MiB:BAD]
                assert os.pread(fd, 4096, BAD + SECTOR) == MODEL[BAD + SECTOR:BAD + SECTOR + 4096]
                assert os.pread(fd, MiB, SIZE - MiB) == MODEL[-MiB:]
        finally:
            os.close(fd)
        # a fresh open works as well
        with open(mp / "disk", "rb") as f:
            f.seek(5 * MiB)
            assert f.read(65536) == MODEL[5 * MiB:5 * MiB + 65536]
    finally:
        try:
            unmount(mp)
        except vdisk.VDiskError:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            raise


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def vdisk_cli(fault_spec, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``vdisk ARGS`` in a child Python with a read fault (path, file offset, mode) installed."""
    path, foff, mode = fault_spec
    return run(sys.executable, HERE, json.dumps([path, foff, mode]), "--", *map(str, args), cwd=cwd)


def assert_one_line_error(proc, path: str, file_offset: int, status: int = 1) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("vdisk: error: ") and "Traceback" not in proc.stderr
    assert path in line and "read error at offset" in line
    offset = int(line.split("read error at offset ")[1].split()[0])
    length = int(line.split("(")[1].split()[0])
    assert offset <= file_offset < offset + length, line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("src_fmt", ["vhd", "vdi"])
@pytest.mark.parametrize("dst_fmt", ["vhd", "vdi", "raw"])
def test_cli_convert_one_line_exit_1_and_no_dst(images, tmp_path, mode, src_fmt, dst_fmt):
    path, foff = images[src_fmt]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / f"copy.{dst_fmt}"
    proc = vdisk_cli((path, foff, mode), "convert", path, dst)
    assert_one_line_error(proc, path, foff)
    assert os.listdir(out_dir) == []                 # no DST, no temporary file beside it
    # the same command without the fault makes the copy (the child runs the real CLI)
    proc = vdisk_cli((path, foff, "none"), "convert", path, dst)
    assert proc.returncode == 0, proc.stderr
    with vdisk.open(dst) as d:
        assert d.pread(SIZE, 0) == MODEL


def test_cli_names_the_parent_file_when_the_parent_cannot_be_read(vhd, tmp_path):
    """A differencing child whose parent holds the bad sector: the line names the parent."""
    import shutil
    parent = str(tmp_path / "base.vhd")
    shutil.copyfile(vhd[0], parent)
    foff = vhd[1]
    child = str(tmp_path / "child.vhd")
    proc = vdisk_cli((parent, foff, "none"), "create", "--parent", parent, child)
    assert proc.returncode == 0, proc.stderr
    with vdisk.open(child, "r+") as d:                # the child's own data, away from BAD
        d.pwrite(b"\xee" * 65536, 0)
    proc = vdisk_cli((parent, foff, "eio"), "convert", child, tmp_path / "flat.raw")
    assert_one_line_error(proc, parent, foff)
    assert child not in proc.stderr.replace(parent, "")
    assert not (tmp_path / "flat.raw").exists()


def test_cli_convert_over_an_existing_dst_keeps_it(vhd, tmp_path):
    """--force onto an existing file: the failed convert leaves the old DST as it was."""
    path, foff = vhd
    dst = tmp_path / "copy.raw"
    dst.write_bytes(b"old contents")
    proc = vdisk_cli((path, foff, "eio"), "convert", "--force", path, dst)
    assert_one_line_error(proc, path, foff)
    assert dst.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["copy.raw"]


def test_cli_compare_reports_the_read_error_as_an_error(vhd, images):
    """compare's exit 1 means "different": a read error is its error status 2, in one line."""
    path, foff = vhd
    proc = vdisk_cli((path, foff, "eio"), "compare", path, images["vdi"][0])
    assert_one_line_error(proc, path, foff, status=2)


def test_cli_backup_and_shadow_export_leave_nothing_behind(vhd, tmp_path):
    """backup (with the shadow it takes for itself) and shadow export write no output file on a
    read error, and the backup's own shadow is gone again."""
    import shutil
    path = str(tmp_path / "disk.vhd")
    shutil.copyfile(vhd[0], path)
    foff = vhd[1]
    out = tmp_path / "out"
    out.mkdir()
    proc = vdisk_cli((path, foff, "eio"), "backup", "-o", out / "full.vbk", path)
    assert_one_line_error(proc, path, foff)
    assert os.listdir(out) == []
    assert "no shadow copies" in vdisk_cli((path, foff, "none"), "shadow", "list", path).stdout
    proc = vdisk_cli((path, foff, "none"), "shadow", "create", path)
    assert proc.returncode == 0, proc.stderr
    shadow = proc.stdout.split()[-1]
    proc = vdisk_cli((path, foff, "short"), "shadow", "export", path, shadow, out / "shadow.vhd")
    assert_one_line_error(proc, path, foff)
    assert os.listdir(out) == []


def file_digest(path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_image(tmp_path, name: str, content: bytes) -> str:
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(content)
    path = str(tmp_path / f"{name}.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
        str(raw), path, check=True)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_cli_compact_of_an_unreadable_block_fails_and_changes_nothing(tmp_path, mode):
    """A block that holds zeros but for its last sector, and that sector cannot be read: compact
    must not take the block for a zero block (that would drop the sector's data)."""
    content = bytearray(SIZE)
    content[:4096] = b"\x11" * 4096
    last = 4 * MiB - SECTOR                         # the last sector of block 1 (2 MiB blocks)
    content[last:last + SECTOR] = b"\x77" * SECTOR
    path = model_image(tmp_path, "sparse", bytes(content))
    foff = file_offset_of(path, last)
    before = file_digest(path)
    proc = vdisk_cli((path, foff, mode), "compact", path)
    assert_one_line_error(proc, path, foff)
    assert file_digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["sparse.raw", "sparse.vhd"]      # no journal left
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vpc",
               str(tmp_path / "sparse.raw"), path).returncode == 0


@pytest.mark.parametrize("mode", MODES)
def test_cli_compact_that_moves_an_unreadable_block_fails_and_keeps_the_data(tmp_path, mode):
    """Compact drops zero block 1 and moves block 3 into its place: a sector of block 3 that
    cannot be read must stop the move (rolled back), not be copied as zeros."""
    path = str(tmp_path / "holey.vhd")
    run("qemu-img", "create", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", path, "8M", check=True)
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 4k", "-c", "write -P 0 2M 512",
        "-c", "write -P 0x55 4M 4M", path, check=True)
    content = b"\x11" * 4096 + bytes(4 * MiB - 4096) + b"\x55" * (4 * MiB)
    foff = file_offset_of(path, 7 * MiB + 4096)
    assert foff > 6 * MiB                            # block 3 is the last one in the file
    proc = vdisk_cli((path, foff, mode), "compact", path)
    assert_one_line_error(proc, path, foff)
    assert sorted(os.listdir(tmp_path)) == ["holey.vhd"]                   # no journal left
    with vdisk.open(path) as d:
        assert d.pread(SIZE, 0) == content
    assert run("qemu-img", "check", "-f", "vpc", path).returncode in (0, 63)   # 63: no checks
    # without the fault the same compaction goes through and keeps every byte
    proc = vdisk_cli((path, foff, "none"), "compact", path)
    assert proc.returncode == 0 and "1 moved" in proc.stdout, proc.stdout + proc.stderr
    with vdisk.open(path) as d:
        assert d.pread(SIZE, 0) == content


@pytest.mark.parametrize("mode", MODES)
def test_cli_commit_stops_and_changes_neither_file(vhd, tmp_path, mode):
    """Merging a child whose data cannot be read into its parent: one line, and the parent and the
    child keep every byte."""
    import shutil
    parent = str(tmp_path / "base.vhd")
    shutil.copyfile(vhd[0], parent)
    child = str(tmp_path / "child.vhd")
    proc = vdisk_cli((parent, 0, "none"), "create", "--parent", parent, child)
    assert proc.returncode == 0, proc.stderr
    with vdisk.open(child, "r+") as d:
        d.pwrite(b"\x99" * (2 * MiB), 2 * MiB)
        (_, _, _, layer, stored), = d.map_runs(BAD, SECTOR)     # where the child holds BAD
        assert layer == 0
    before = file_digest(parent), file_digest(child)
    proc = vdisk_cli((child, stored, mode), "commit", child)
    assert_one_line_error(proc, child, stored)
    assert (file_digest(parent), file_digest(child)) == before
    assert sorted(os.listdir(tmp_path)) == ["base.vhd", "child.vhd"]


@pytest.mark.parametrize("mode", MODES)
def test_cli_resize_that_moves_an_unreadable_block_fails_and_changes_nothing(tmp_path, mode):
    """Growing a dynamic VHD from 8 MiB to 2 GiB moves the first data block out of the larger
    block table's way: a sector of it that cannot be read must stop the resize, not be copied as
    zeros."""
    path = model_image(tmp_path, "grow", MODEL)
    bad = 5 * SECTOR                                # in block 0, the one that must move
    foff = file_offset_of(path, bad)
    before = file_digest(path)
    proc = vdisk_cli((path, foff, mode), "resize", path, "2G")
    assert_one_line_error(proc, path, foff)
    assert file_digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["grow.raw", "grow.vhd"]
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vpc",
               str(tmp_path / "grow.raw"), path).returncode == 0


# ----------------------------------------------------------------------------------------------
# child: python tests/test_read_errors.py '[path, file_offset, mode]' -- vdisk-args...
# ----------------------------------------------------------------------------------------------

def _child(argv) -> int:
    spec, sep, *args = argv
    assert sep == "--"
    path, file_offset, mode = json.loads(spec)
    if mode != "none":
        vio.read_fault_hook = make_hook(path, file_offset, mode)
    from vdisk.cli import main
    return main(args)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
