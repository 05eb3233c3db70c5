"""The `vdisk` command line: commands, JSON output, exit codes and one-line errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import types

import pytest

import vdisk
from vdisk.cli import build_parser, main, parse_size
from vdisk.ops.info import CHAIN_KEYS, INFO_KEYS, MAP_KEYS
from vdisk.progress import ProgressBar, human_bytes

from conftest import cannot_here, interrupt

MiB = 1 << 20


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def vdisk_proc(*argv, **kw) -> subprocess.CompletedProcess:
    """The real console entry point in a child process."""
    return subprocess.run([sys.executable, "-m", "vdisk.cli", *map(str, argv)], capture_output=True,
                          text=True, **kw)


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vdisk: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], err


@pytest.fixture
def small_vhd(tmp_path):
    path = tmp_path / "small.vhd"
    with vdisk.create(path, 3 * MiB + 512, format="vhd", subtype="dynamic") as d:
        d.pwrite(random.Random(3).randbytes(70_000), 1000)
    return path


# -- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("512M", 512 * MiB), ("10G", 10 << 30), ("1.5T", 3 << 39), ("64KiB", 64 << 10),
    ("4096B", 4096), ("2g", 2 << 30), ("1.5MB", 3 << 19), (" 7 K ", 7 << 10), ("0.5k", 512),
])
def test_sizes_take_binary_units_with_optional_ib_or_b(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "10X", "-1G", "1.3K", "G", "1e3", "10 GiBs", "0x100"])
def test_bad_size_strings_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


# -- one-line errors ----------------------------------------------------------------------------
def test_missing_file_is_one_line_and_exit_1(capsys, tmp_path):
    status, out, err = run(capsys, "info", tmp_path / "nope.vhd")
    assert status == 1 and out == ""
    assert_one_line_error(err, "nope.vhd", "no such file")


def test_wrong_forced_format_is_one_line(capsys, small_vhd):
    status, _, err = run(capsys, "info", "-f", "vdi", small_vhd)
    assert status == 1
    assert_one_line_error(err, "small.vhd", "signature")


def test_garbage_forced_as_vhd_is_one_line(capsys, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x42" * 4096)
    status, _, err = run(capsys, "convert", "-f", "vhd", junk, tmp_path / "out.raw")
    assert status == 1
    assert_one_line_error(err, "junk.bin")
    assert not (tmp_path / "out.raw").exists()


def test_bad_size_string_is_one_line_and_exit_2(capsys, tmp_path):
    status, _, err = run(capsys, "create", tmp_path / "x.vhd", "10X")
    assert status == 2
    assert_one_line_error(err, "10X")
    assert not (tmp_path / "x.vhd").exists()


def test_size_not_whole_sectors_for_a_vhd_is_one_line(capsys, tmp_path):
    status, _, err = run(capsys, "create", tmp_path / "x.vhd", "1000")
    assert status == 1
    assert_one_line_error(err, "512")


def test_unwritable_destination_is_one_line(capsys, small_vhd):
    status, _, err = run(capsys, "convert", small_vhd, "/sys/vdisk-test-out.raw")
    assert status == 1
    assert_one_line_error(err, "/sys/vdisk-test-out.raw")


def test_destination_in_a_missing_folder_is_one_line(capsys, small_vhd, tmp_path):
    status, _, err = run(capsys, "convert", small_vhd, tmp_path / "no" / "such" / "out.vdi")
    assert status == 1
    assert_one_line_error(err, "no such directory")


def test_existing_destination_needs_force(capsys, small_vhd, tmp_path):
    dst = tmp_path / "out.vdi"
    dst.write_bytes(b"keep me")
    status, _, err = run(capsys, "convert", small_vhd, dst)
    assert status == 1
    assert_one_line_error(err, "already exists", "--force")
    assert dst.read_bytes() == b"keep me"
    status, _, _ = run(capsys, "convert", "--force", small_vhd, dst)
    assert status == 0
    with vdisk.open(small_vhd) as a, vdisk.open(dst) as b:
        assert a.pread(a.size, 0) == b.pread(b.size, 0)


def test_unknown_command_and_missing_arguments_are_one_line_usage_errors(capsys):
    for argv in (["frobnicate"], ["info"], ["convert", "only-one"], []):
        status, _, err = run(capsys, *argv)
        assert status == 2
        assert_one_line_error(err)


def test_errors_in_a_child_process_have_no_traceback(tmp_path):
    for argv, status in ((["info", tmp_path / "missing.vdi"], 1), (["create", tmp_path / "a.vhd", "5Q"], 2),
                         (["compare", tmp_path / "a", tmp_path / "b"], 2)):
        r = vdisk_proc(*argv)
        assert r.returncode == status
        assert_one_line_error(r.stderr)


# -- info ---------------------------------------------------------------------------------------
def test_info_json_has_the_documented_keys(capsys, small_vhd):
    status, out, _ = run(capsys, "info", "--json", small_vhd)
    assert status == 0
    info = json.loads(out)
    assert list(info) == list(INFO_KEYS)
    assert info["format"] == "vhd" and info["subtype"] == "dynamic"
    assert info["virtual_size"] == 3 * MiB + 512
    assert info["allocated_bytes"] + info["zero_bytes"] + info["unallocated_bytes"] == info["virtual_size"]
    assert info["allocated_bytes"] == 2 * MiB                       # one 2 MiB block holds the data
    assert info["creator"] == "win " and info["chs_size"] is not None
    assert all(list(layer) == list(CHAIN_KEYS) + ["details"] for layer in info["chain"])


def test_info_human_output_is_an_aligned_table(capsys, small_vhd):
    status, out, _ = run(capsys, "info", small_vhd)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["image", str(small_vhd)]
    assert any(line.startswith("virtual size") and "3146240 bytes" in line for line in lines)
    value_columns = {len(line) - len(line[len(line.split("  ")[0]):].lstrip()) for line in lines}
    assert len(value_columns) == 1


def test_info_shows_the_chain_and_how_each_parent_was_found(capsys, tmp_path):
    base = tmp_path / "base.vdi"
    vdisk.create(base, 2 * MiB, format="vdi").close()
    vdisk.create(tmp_path / "child.vdi", format="vdi", parent=base).close()
    status, out, _ = run(capsys, "info", "--json", tmp_path / "child.vdi")
    info = json.loads(out)
    assert [c["found_by"] for c in info["chain"]] == ["opened", f"UUID scan of {tmp_path}"]
    assert info["parent_uuid"] == info["chain"][1]["uuid"]
    status, out, _ = run(capsys, "info", "--chain", tmp_path / "child.vdi")
    assert "UUID scan" in out and "layer [1]" in out and "uuid_linkage" in out


def test_info_with_a_missing_parent_reports_it_instead_of_failing(capsys, tmp_path):
    base = tmp_path / "base.vhd"
    vdisk.create(base, 2 * MiB, format="vhd").close()
    vdisk.create(tmp_path / "child.vhd", parent=base).close()
    base.unlink()
    status, out, _ = run(capsys, "info", "--json", tmp_path / "child.vhd")
    assert status == 0
    info = json.loads(out)
    assert info["chain_complete"] is False and "not found" in info["parent_error"]
    status, out, _ = run(capsys, "info", tmp_path / "child.vhd")
    assert "parent missing" in out


def test_parent_search_finds_a_moved_parent(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = tmp_path / "a" / "base.vhd"
    vdisk.create(base, 2 * MiB, format="vhd").close()
    vdisk.create(tmp_path / "b" / "child.vhd", parent=base).close()
    os.rename(base, tmp_path / "moved-base.vhd")
    os.mkdir(tmp_path / "store")
    os.rename(tmp_path / "moved-base.vhd", tmp_path / "store" / "base.vhd")
    status, _, err = run(capsys, "map", tmp_path / "b" / "child.vhd")
    assert status == 1 and "not found" in err
    status, out, _ = run(capsys, "info", "--json", "--parent-search", tmp_path / "store", tmp_path / "b" / "child.vhd")
    assert json.loads(out)["chain"][1]["found_by"] == f"search folder {tmp_path / 'store'}"


def test_size_policy_chs_shows_the_geometry_size(capsys, tmp_path):
    path = tmp_path / "odd.vhd"
    vdisk.create(path, 5 * MiB, format="vhd").close()          # 5 MiB is not CHS-exact
    _, out, _ = run(capsys, "info", "--json", path)
    info = json.loads(out)
    _, out, _ = run(capsys, "info", "--json", "--size-policy", "chs", path)
    assert json.loads(out)["virtual_size"] == info["chs_size"] < 5 * MiB


# -- create -------------------------------------------------------------------------------------
def test_create_without_size_makes_127_gib(capsys, tmp_path):
    status, out, _ = run(capsys, "create", "--json", tmp_path / "big.vhd")
    assert status == 0
    assert json.loads(out)["virtual_size"] == 127 << 30
    assert os.path.getsize(tmp_path / "big.vhd") < MiB


def test_create_differencing_takes_the_parent_size_and_format(capsys, tmp_path):
    run(capsys, "create", tmp_path / "base.vdi", "3M")
    status, out, _ = run(capsys, "create", "--json", tmp_path / "child.vdi", "--parent", tmp_path / "base.vdi")
    assert status == 0
    made = json.loads(out)
    assert (made["format"], made["subtype"], made["virtual_size"]) == ("vdi", "differencing", 3 * MiB)


@pytest.mark.parametrize("argv, expect", [
    (["-f", "vdi", "--subtype", "fixed"], ("vdi", "fixed")),
    (["--subtype", "fixed"], ("vhd", "fixed")),
    (["-f", "raw"], ("raw", "raw")),
    (["--block-size", "512K"], ("vhd", "dynamic")),
])
def test_create_formats_and_subtypes(capsys, tmp_path, argv, expect):
    path = tmp_path / "img"
    status, _, err = run(capsys, "create", path, "4M", *argv)
    assert status == 0, err
    with vdisk.open(path) as d:
        assert (d.format, d.subtype, d.size) == (*expect, 4 * MiB)
        if "--block-size" in argv:
            assert d.block_size == 512 << 10


def test_create_size_policy_chs_rounds_up_to_geometry(capsys, tmp_path):
    run(capsys, "create", tmp_path / "c.vhd", "5M", "--size-policy", "chs")
    with vdisk.open(tmp_path / "c.vhd") as d:
        c, h, s = d.geometry
        assert d.size == c * h * s * 512 >= 5 * MiB


def test_create_refuses_an_existing_file(capsys, small_vhd):
    before = small_vhd.read_bytes()
    status, _, err = run(capsys, "create", small_vhd, "1M")
    assert status == 1
    assert_one_line_error(err, "already exists")
    assert small_vhd.read_bytes() == before


# -- convert ------------------------------------------------------------------------------------
def test_convert_json_reports_what_was_made(capsys, small_vhd, tmp_path):
    status, out, err = run(capsys, "convert", "--json", "-O", "vdi", small_vhd, tmp_path / "o.img")
    assert status == 0 and err == ""
    made = json.loads(out)
    assert (made["format"], made["subtype"], made["virtual_size"]) == ("vdi", "dynamic", 3 * MiB + 512)
    assert made["bytes_written"] == 18 * 4096                    # the 4 KiB granules holding the data


def test_convert_progress_is_drawn_only_when_asked_or_on_a_terminal(capsys, small_vhd, tmp_path):
    status, out, err = run(capsys, "convert", small_vhd, tmp_path / "a.raw")
    assert status == 0 and err == "" and out == ""            # stderr is not a terminal here
    status, out, err = run(capsys, "convert", "--progress", small_vhd, tmp_path / "b.raw")
    assert status == 0 and out == ""
    assert "100.0%" in err and "ETA" in err and err.endswith("\n")
    status, _, err = run(capsys, "convert", "--no-progress", small_vhd, tmp_path / "c.raw")
    assert err == ""


def test_progress_line_shows_bytes_rate_and_eta():
    class Tty:
        def __init__(self):
            self.text = ""
        def isatty(self):
            return True
        def write(self, s):
            self.text += s
        def flush(self):
            pass
    stream = Tty()
    bar = ProgressBar("copy", stream=stream)
    assert bar.enabled
    bar.start -= 2.0                                          # two seconds in
    bar(512 * MiB, 2048 * MiB)
    line = bar.line(now=bar.start + 2.0)
    assert "copy [" in line and "25.0%" in line and "512.0 MiB/2.0 GiB" in line
    assert "256.0 MiB/s" in line and "ETA 00:06" in line
    bar.finish()
    assert stream.text.startswith("\r") and stream.text.endswith("\n")
    quiet = ProgressBar("copy", stream=types.SimpleNamespace(isatty=lambda: False))
    assert not quiet.enabled
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


# -- map ----------------------------------------------------------------------------------------
def test_map_json_covers_the_disk_and_names_the_layers(capsys, tmp_path):
    base = tmp_path / "base.vhd"
    with vdisk.create(base, 6 * MiB, format="vhd", block_size=MiB) as d:
        d.pwrite(b"\x11" * MiB, 0)
    with vdisk.create(tmp_path / "top.vhd", parent=base) as d:
        d.pwrite(b"\x22" * 4096, 3 * MiB)
    status, out, _ = run(capsys, "map", "--json", tmp_path / "top.vhd")
    assert status == 0
    runs = json.loads(out)
    assert all(list(r) == list(MAP_KEYS) for r in runs)
    pos = 0
    for r in runs:
        assert r["start"] == pos
        pos += r["length"]
    assert pos == 6 * MiB
    data = [(r["start"], r["length"], r["layer"], os.path.basename(r["file"])) for r in runs if r["kind"] == "data"]
    assert data == [(0, MiB, 1, "base.vhd"), (3 * MiB, 4096, 0, "top.vhd")]
    assert all(r["offset"] is None for r in runs if r["kind"] != "data")


def test_map_human_output_has_one_line_per_run(capsys, small_vhd):
    status, out, _ = run(capsys, "map", small_vhd)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["start", "length", "kind", "layer"]
    assert [line.split()[2] for line in lines[1:]] == ["data", "unallocated"]


# -- compare ------------------------------------------------------------------------------------
def test_compare_exit_codes_are_0_same_1_different_2_error(capsys, small_vhd, tmp_path):
    run(capsys, "convert", small_vhd, tmp_path / "same.vdi")
    status, out, _ = run(capsys, "compare", small_vhd, tmp_path / "same.vdi")
    assert status == 0 and "identical" in out
    with vdisk.open(tmp_path / "same.vdi", "r+") as d:
        d.pwrite(b"!", 12345)
    status, out, _ = run(capsys, "compare", "--json", small_vhd, tmp_path / "same.vdi")
    assert status == 1
    assert json.loads(out)["offset"] == 12345
    status, _, err = run(capsys, "compare", small_vhd, tmp_path / "missing.vdi")
    assert status == 2
    assert_one_line_error(err, "missing.vdi")


# -- command modules ----------------------------------------------------------------------------
def test_every_command_module_registers_its_commands():
    from vdisk.cli.main import COMMAND_MODULES
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    expected = {"image": {"info", "create", "convert", "map", "measure", "compare"},
                "io": {"mount", "umount", "serve"},
                "maint": {"check", "compact", "commit", "resize", "rebase", "relink", "recover"},
                "shadow": {"shadow", "snapshot"},
                "backup": {"backup", "restore", "verify"}}
    assert [m.__name__.rsplit(".", 1)[1] for m in COMMAND_MODULES] == list(expected)
    for names in expected.values():
        assert names <= set(commands)


def test_help_and_usage_errors_load_no_library_code():
    # Startup stays instant: the command modules import the library inside their handlers.
    code = ("import sys\nfrom vdisk.cli import main\n"
            "assert main(['--help']) == 0 and main(['convert']) == 2\n"
            "heavy = sorted(m for m in sys.modules if m in ('numpy', 'construct', 'vdisk.disk', 'vdisk.formats.base'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# -- mount / serve wiring -----------------------------------------------------------------------
def test_umount_of_something_not_mounted_is_one_line(capsys, tmp_path):
    status, _, err = run(capsys, "umount", tmp_path)
    assert status == 1
    assert_one_line_error(err, str(tmp_path))


def test_mount_onto_a_missing_mountpoint_is_one_line(capsys, small_vhd, tmp_path):
    status, _, err = run(capsys, "mount", small_vhd, tmp_path / "nowhere")
    assert status == 1
    assert_one_line_error(err, "nowhere")


@pytest.mark.judges("qemu-img")
def test_serve_nbd_exports_the_image(tmp_path, small_vhd):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "serve", "nbd", str(small_vhd), "--port", str(port),
                             "--name", "disk"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"nbd://127.0.0.1:{port}/disk" in line, line
        r = subprocess.run(["qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}/disk"],
                           capture_output=True, text=True, timeout=30)
        assert json.loads(r.stdout)["virtual-size"] == 3 * MiB + 512
    finally:
        interrupt(proc)
    assert proc.returncode in (0, 130)


def test_serve_with_a_mismatched_name_count_is_one_line(capsys, small_vhd):
    status, _, err = run(capsys, "serve", "nbd", small_vhd, small_vhd, "--name", "one", "--port", "0")
    assert status == 1
    assert_one_line_error(err, "--name")


def test_convert_errors_name_the_destination_not_the_temporary_file(capsys, tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    status, _, err = run(capsys, "convert", empty, tmp_path / "e.vhd")
    assert status == 1
    assert_one_line_error(err, "empty")
    huge = tmp_path / "huge.raw"
    vdisk.create(huge, 3 << 40, format="raw").close()                 # sparse: costs nothing
    status, _, err = run(capsys, "convert", huge, tmp_path / "huge.vhd")
    assert status == 1
    assert_one_line_error(err, "huge.vhd", "2040 GiB")
    assert "vdisk-tmp" not in err
    assert sorted(os.listdir(tmp_path)) == ["empty.raw", "huge.raw"]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a destination that runs out of space (skipped where mounting is not allowed)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        cannot_here("tmpfs-mount", r.stderr.strip())
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("name", ["out.raw", "out.vhd", "out.vdi"])
def test_disk_full_is_one_line_and_leaves_nothing(capsys, tmp_path, full_disk, name):
    src = tmp_path / "random.raw"
    src.write_bytes(random.Random(4).randbytes(4 * MiB))
    status, _, err = run(capsys, "convert", src, full_disk / name)
    assert status == 1
    assert_one_line_error(err, name)
    assert "no space left on device" in err.lower() and "vdisk-tmp" not in err
    assert os.listdir(full_disk) == []
