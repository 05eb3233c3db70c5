"""`vdisk shadow ...` and `vdisk snapshot ...`: the scripting contract and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

import vdisk
from vdisk.cli import main

MiB = 1 << 20
from conftest import FAST_TMP


@pytest.fixture
def image():
    folder = tempfile.mkdtemp(prefix="vdisk-cli-", dir=FAST_TMP)
    path = os.path.join(folder, "disk.vhd")
    with vdisk.create(path, 4 * MiB, format="vhd") as d:
        d.pwrite(b"\x01" * MiB, 0)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_create_prints_the_id_last_and_list_json_is_oldest_first(capsys, image):
    ids = []
    for text in ("first", "second"):
        status, out, _ = run(capsys, "shadow", "create", image, "--description", text)
        assert status == 0
        ids.append(out.strip().splitlines()[-1])
    status, out, _ = run(capsys, "shadow", "list", image, "--json")
    listed = json.loads(out)
    assert [s["id"] for s in listed] == ids
    assert [s["description"] for s in listed] == ["first", "second"]
    for s in listed:
        assert s["created"].endswith("Z") and "T" in s["created"]


def test_diff_json_lists_ascending_ranges(capsys, image):
    _, out, _ = run(capsys, "shadow", "create", image)
    sid = out.split()[-1]
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"\x02" * 512, 3 * MiB)
        d.pwrite(b"\x02" * 1024, 4096)
    status, out, _ = run(capsys, "shadow", "diff", image, sid, "--json")
    assert status == 0
    assert json.loads(out) == [{"offset": 4096, "length": 1024}, {"offset": 3 * MiB, "length": 512}]
    _, out2, _ = run(capsys, "shadow", "diff", image, sid, "live", "--json")
    assert out2 == out


def test_delete_oldest_all_and_by_id(capsys, image):
    ids = [run(capsys, "shadow", "create", image)[1].split()[-1] for _ in range(4)]
    assert run(capsys, "shadow", "delete", image, "--oldest")[0] == 0
    assert run(capsys, "shadow", "delete", image, "--id", ids[2][:8])[0] == 0
    listed = json.loads(run(capsys, "shadow", "list", image, "--json")[1])
    assert [s["id"] for s in listed] == [ids[1], ids[3]]
    assert run(capsys, "shadow", "delete", image, "--all")[0] == 0
    assert json.loads(run(capsys, "shadow", "list", image, "--json")[1]) == []


def test_export_writes_the_shadow_as_an_image(capsys, image):
    sid = run(capsys, "shadow", "create", image)[1].split()[-1]
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"\x09" * MiB, 0)
    dst = image + ".exported.raw"
    status, _, err = run(capsys, "shadow", "export", image, sid, dst, "-O", "raw")
    assert status == 0, err
    with open(dst, "rb") as f:
        assert f.read(MiB) == b"\x01" * MiB
    status, _, err = run(capsys, "shadow", "export", image, sid, dst, "-O", "raw")
    assert status == 1 and "already exists" in err


def test_storage_sets_the_limits(capsys, image):
    status, out, _ = run(capsys, "shadow", "storage", image, "--max-size", "1M", "--max-shadows", "3", "--json")
    assert status == 0
    assert json.loads(out)["max_bytes"] == MiB and json.loads(out)["max_shadows"] == 3
    out = run(capsys, "shadow", "storage", image, "--max-size", "unbounded", "--json")[1]
    assert json.loads(out)["max_bytes"] is None


@pytest.mark.parametrize("argv, message", [
    (["shadow", "delete", "{img}", "--id", "feedface"], "no shadow"),
    (["shadow", "diff", "{img}", "nope"], "no shadow"),
    (["shadow", "list", "{img}.missing"], "no such file"),
    (["snapshot", "revert", "{img}", "nope"], "no snapshot named"),
])
def test_bad_input_is_one_line_error(capsys, image, argv, message):
    status, _, err = run(capsys, *[a.format(img=image) for a in argv])
    assert status == 1
    assert err.startswith("vdisk: error: ") and message in err and "Traceback" not in err


def test_snapshot_verbs(capsys, image):
    status, out, _ = run(capsys, "snapshot", "take", image, "--name", "clean")
    assert status == 0
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"\x05" * 4096, 0)
    status, _, err = run(capsys, "snapshot", "revert", image, "clean")
    assert status == 1 and "--force" in err
    assert run(capsys, "snapshot", "revert", image, "clean", "--force")[0] == 0
    tree = json.loads(run(capsys, "snapshot", "list", image, "--json")[1])
    assert [(n["name"], n["current"]) for n in tree] == [("clean", True)]
    assert run(capsys, "snapshot", "delete", image, "clean")[0] == 0
    assert json.loads(run(capsys, "snapshot", "list", image, "--json")[1]) == []
    with vdisk.open(image) as d:
        assert d.pread(MiB, 0) == b"\x01" * MiB and len(d.chain) == 1
