"""The maintenance commands through the `vdisk` command line: exit codes, JSON, one-line errors."""
from __future__ import annotations

import json
import os
import struct

import vdisk
from vdisk import journal
from vdisk.cli import main
from vdisk.io import ImageFile

MiB = 1 << 20


def _run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _img(tmp_path, fmt="vdi"):
    p = tmp_path / f"a.{fmt}"
    with vdisk.create(str(p), 16 * MiB, format=fmt) as d:
        for b in range(16):
            d.pwrite(bytes([b + 1]) * 4096, b * MiB)
        for b in range(0, 16, 4):
            d.write_zeroes(b * MiB, MiB)
    return p


def test_check_exit_codes_follow_qemu_img(tmp_path, capsys):
    p = _img(tmp_path)
    assert _run(capsys, "check", p)[0] == 0
    assert _run(capsys, "check", tmp_path / "missing.vdi")[0] == 1
    with open(p, "ab") as f:
        f.write(b"\x01" * MiB)                          # a leaked slot at the end
    status, out, _ = _run(capsys, "check", p, "--json")
    assert status == 3 and json.loads(out)["exit_code"] == 3
    with open(p, "r+b") as f:                           # plus a corruption
        f.seek(0x184)
        f.write(struct.pack("<I", 1))
    assert _run(capsys, "check", p)[0] == 2
    status, out, _ = _run(capsys, "check", p, "--repair", "--verify")
    assert status == 0 and "repaired:" in out


def test_compact_dry_run_then_verify(tmp_path, capsys):
    p = _img(tmp_path)
    size = os.path.getsize(p)
    status, out, _ = _run(capsys, "compact", p, "--dry-run", "--json")
    assert status == 0 and json.loads(out)["reclaimed"] == 4 * MiB and os.path.getsize(p) == size
    status, out, _ = _run(capsys, "compact", p, "--verify", "--json")
    r = json.loads(out)
    assert status == 0 and r["verified"] and os.path.getsize(p) == size - 4 * MiB


def test_compact_to_a_new_file(tmp_path, capsys):
    p = _img(tmp_path, "vhd")
    q = tmp_path / "b.vhd"
    status, out, _ = _run(capsys, "compact", p, "--to", q, "--verify")
    assert status == 0 and q.exists() and "into" in out


def test_resize_relative_sizes_and_refusals(tmp_path, capsys):
    p = _img(tmp_path)
    assert _run(capsys, "resize", p, "+16M", "--verify")[0] == 0
    with vdisk.open(str(p)) as d:
        assert d.size == 32 * MiB
    status, _, err = _run(capsys, "resize", p, "8M")
    assert status == 1 and err.startswith("vdisk: error:") and "--shrink" in err
    status, _, err = _run(capsys, "resize", p, "8M", "--shrink")
    assert status == 1 and "allocated" in err and "Traceback" not in err


def test_commit_relink_rebase_and_recover(tmp_path, capsys):
    base = _img(tmp_path)
    child = tmp_path / "c.vdi"
    with vdisk.create(str(child), format="vdi", parent=str(base)) as d:
        d.pwrite(b"\x77" * 4096, 0)
    status, out, _ = _run(capsys, "commit", child, "--verify", "--json")
    assert status == 0 and json.loads(out)["verified"]
    status, out, _ = _run(capsys, "relink", child, "--dry-run")
    assert status == 0 and "nothing to rewrite" in out
    status, out, _ = _run(capsys, "rebase", child, "--parent", base, "--verify")
    assert status == 0
    f = ImageFile(str(base), writable=True)
    tx = journal.Transaction(f, "compact")
    tx.begin()
    tx.write(0x100000, b"\x00" * 512)
    f.close()
    status, _, err = _run(capsys, "check", base)
    assert status == 2
    status, out, _ = _run(capsys, "recover", base, "--verify")
    assert status == 0 and "rolled back" in out
    assert _run(capsys, "check", base)[0] == 0


def test_a_pending_journal_makes_read_only_commands_point_at_recover(tmp_path, capsys):
    p = _img(tmp_path)
    f = ImageFile(str(p), writable=True)
    tx = journal.Transaction(f, "resize")
    tx.begin()
    f.close()
    status, _, err = _run(capsys, "info", p)
    assert status == 1 and "vdisk recover" in err
