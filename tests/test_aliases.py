"""qemu-img's spellings are accepted beside vdisk's own, shown in --help, and mean the same thing."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

import vdisk
from vdisk.cli import build_parser, main


MiB = 1 << 20


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def info_json(capsys, path) -> dict:
    status, out, _ = run(capsys, "info", path, "--json")
    assert status == 0
    return json.loads(out)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.vhd"
    with vdisk.create(path, 6 * MiB, format="vhd", subtype="dynamic") as d:
        d.pwrite(random.Random(17).randbytes(300_000), 2 * MiB - 4096)
    return path


def all_parsers(parser, name="vdisk"):
    """(command name, parser) for every command and sub-command of the CLI."""
    yield name, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


# -- --output=json|human ------------------------------------------------------------------------
def test_output_json_prints_what_json_prints(capsys, image):
    _, with_json, _ = run(capsys, "info", image, "--json")
    status, with_output, _ = run(capsys, "info", image, "--output=json")
    assert status == 0
    assert json.loads(with_output) == json.loads(with_json)


def test_output_human_prints_the_table(capsys, image):
    _, plain, _ = run(capsys, "info", image)
    status, human, _ = run(capsys, "info", image, "--output", "human")
    assert status == 0 and human == plain
    assert "virtual size" in human


def test_every_command_with_json_also_takes_output():
    for name, parser in all_parsers(build_parser()):
        options = parser._option_string_actions
        if "--json" in options:
            assert "--output" in options, name
            assert "--output=json is --json" in parser.format_help().replace("\n", " ").replace("  ", " "), name


# -- -p -----------------------------------------------------------------------------------------
def test_p_draws_the_progress_bar_like_progress(tmp_path, image):
    """stderr is a pipe here, so the bar is off unless asked for."""
    def convert(*extra):
        dst = tmp_path / f"out{len(os.listdir(tmp_path))}.img"
        proc = subprocess.run([sys.executable, "-m", "vdisk", "convert", str(image), str(dst), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    assert "convert [" not in convert()
    assert "convert [" in convert("--progress")
    assert "convert [" in convert("-p")


def test_every_command_with_progress_also_takes_p():
    for name, parser in all_parsers(build_parser()):
        options = parser._option_string_actions
        if "--progress" in options:
            assert options["-p"].dest == options["--progress"].dest, name


# -- vpc ----------------------------------------------------------------------------------------
@pytest.mark.judges("qemu-img")
def test_O_vpc_writes_a_vhd_that_qemu_img_reads_as_vpc(capsys, tmp_path, image):
    dst = tmp_path / "out.img"                 # the name alone would mean raw
    status, _, err = run(capsys, "convert", image, dst, "-O", "vpc")
    assert status == 0, err
    facts = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dst)],
                                      capture_output=True, text=True, check=True).stdout)
    assert facts["format"] == "vpc" and facts["virtual-size"] == 6 * MiB


def test_f_vpc_forces_the_vhd_reader(capsys, image):
    _, plain, _ = run(capsys, "info", image, "--json")
    status, forced, _ = run(capsys, "info", image, "-f", "vpc", "--json")
    assert status == 0 and json.loads(forced) == json.loads(plain)


def test_create_f_vpc_makes_a_vhd(capsys, tmp_path):
    status, _, _ = run(capsys, "create", tmp_path / "new.img", "1M", "-f", "vpc")
    assert status == 0
    assert info_json(capsys, tmp_path / "new.img")["format"] == "vhd"


def test_every_format_choice_also_takes_vpc_and_says_so():
    for name, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if action.choices is not None and {"vhd", "vdi", "raw"} == set(action.choices):
                assert "vpc" in action.metavar, (name, action.option_strings)
                assert action.type("vpc") == "vhd"


# -- -o subformat=...,block_size=... -----------------------------------------------------------
def test_create_o_subformat_fixed(capsys, tmp_path):
    status, _, _ = run(capsys, "create", tmp_path / "f.vhd", "4M", "-o", "subformat=fixed")
    assert status == 0
    facts = info_json(capsys, tmp_path / "f.vhd")
    assert facts["subtype"] == "fixed" and facts["file_size"] == 4 * MiB + 512


def test_create_o_block_size_is_block_size(capsys, tmp_path):
    run(capsys, "create", tmp_path / "own.vdi", "8M", "--subtype", "dynamic", "--block-size", "256K")
    status, _, _ = run(capsys, "create", tmp_path / "qemu.vdi", "8M", "-o", "subformat=dynamic,block_size=256K")
    assert status == 0
    own, qemu = info_json(capsys, tmp_path / "own.vdi"), info_json(capsys, tmp_path / "qemu.vdi")
    for key in ("format", "subtype", "block_size", "file_size", "virtual_size"):
        assert own[key] == qemu[key], key
    assert qemu["block_size"] == 256 << 10


def test_create_o_static_on_is_qemu_vdi_fixed(capsys, tmp_path):
    status, _, _ = run(capsys, "create", tmp_path / "s.vdi", "2M", "-o", "static=on")
    assert status == 0
    assert info_json(capsys, tmp_path / "s.vdi")["subtype"] == "fixed"


def test_convert_o_sets_subtype_and_block_size(capsys, tmp_path, image):
    dst = tmp_path / "out.vdi"
    status, _, err = run(capsys, "convert", image, dst, "-o", "subformat=dynamic,block_size=512K")
    assert status == 0, err
    facts = info_json(capsys, dst)
    assert (facts["subtype"], facts["block_size"]) == ("dynamic", 512 << 10)
    status, _, err = run(capsys, "convert", image, tmp_path / "fixed.vhd", "-o", "subformat=fixed")
    assert status == 0, err
    assert info_json(capsys, tmp_path / "fixed.vhd")["subtype"] == "fixed"


@pytest.mark.parametrize("bad", ["cluster_size=64K", "subformat=sparse", "block_size=huge", "static=maybe"])
def test_o_with_an_unknown_option_is_a_one_line_usage_error(capsys, tmp_path, bad):
    status, out, err = run(capsys, "create", tmp_path / "x.vhd", "1M", "-o", bad)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: -o"), err
    assert not (tmp_path / "x.vhd").exists()


# -- --backing-chain ----------------------------------------------------------------------------
def test_backing_chain_is_chain(capsys, tmp_path, image):
    child = tmp_path / "child.vhd"
    vdisk.create(child, parent=image).close()
    _, chain, _ = run(capsys, "info", child, "--chain")
    status, backing, _ = run(capsys, "info", child, "--backing-chain")
    assert status == 0 and backing == chain
    assert f"layer [1] {image}" in backing


# -- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, alias", [
    ("info", "--output"), ("info", "--backing-chain"), ("info", "vpc"), ("convert", "-p"),
    ("convert", "-o OPTIONS"), ("convert", "vpc"), ("create", "-o OPTIONS"), ("create", "vpc"),
])
def test_help_shows_the_alias(command, alias):
    proc = subprocess.run([sys.executable, "-m", "vdisk", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and alias in proc.stdout


# -- python -m vdisk ----------------------------------------------------------------------------
def test_python_m_vdisk_runs_the_command_line(image):
    proc = subprocess.run([sys.executable, "-m", "vdisk", "info", str(image), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["virtual_size"] == 6 * MiB
    bad = subprocess.run([sys.executable, "-m", "vdisk", "info", str(image) + ".missing"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("vdisk: error: ")
    usage = subprocess.run([sys.executable, "-m", "vdisk", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: vdisk ")
