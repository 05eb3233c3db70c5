"""VHDX as an output chosen by platform (`--target hyper-v-vhdx`) and predicted by `vdisk measure`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import vdisk

MiB = 1 << 20


def vd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.vhd"
    with vdisk.create(path, 96 * MiB, format="vhd") as d:
        for i, at in enumerate((0, 33 * MiB, 95 * MiB)):
            d.pwrite(bytes([i + 1]) * MiB, at)
    return path


@pytest.mark.judges("qemu-img")
def test_target_hyper_v_vhdx_is_a_dynamic_vhdx_qemu_reads_identically(source, tmp_path):
    dst = tmp_path / "hv.vhdx"
    res = vd("convert", "--target", "hyper-v-vhdx", "--json", source, dst)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["format"], out["subtype"]) == ("vhdx", "dynamic")
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "vhdx", str(source), str(dst)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_target_hyper_v_still_means_a_dynamic_vhd(source, tmp_path):
    res = vd("convert", "--target", "hyper-v", "--json", source, tmp_path / "hv.vhd")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "vhd"


@pytest.mark.parametrize("subtype", ["dynamic", "fixed"])
def test_measure_predicts_the_vhdx_convert_writes(source, tmp_path, subtype):
    res = vd("measure", "--json", "-O", "vhdx", "--subtype", subtype, source)
    assert res.returncode == 0, res.stderr
    predicted = json.loads(res.stdout)["required"]
    dst = tmp_path / f"m-{subtype}.vhdx"
    assert vd("convert", "-O", "vhdx", "--subtype", subtype, source, dst).returncode == 0
    assert os.path.getsize(dst) == predicted
