"""Judges first: a missing judge (tool, module, /dev/fuse) is found before any fixture or vdisk
code runs; it skips the test, or fails it when VDISK_REQUIRE_JUDGES=1 (as .ci/run sets)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

INNER = '''
import pytest
import vdisk.mount
from vdisk.errors import VDiskError

from conftest import need, need_module


def no_fuse():
    raise VDiskError("/dev/fuse is missing (simulated)")


vdisk.mount.check_fuse = no_fuse


@pytest.fixture
def image(tmp_path_factory):
    open(FIXTURE_RAN, "a").write("ran\\n")         # the vdisk side a missing judge must not reach
    return tmp_path_factory.mktemp("x")


@pytest.mark.judges("vdisk-no-such-judge")
def test_marked_tool(image):
    pass


@pytest.mark.judges(modules=("vdisk_no_such_binding",))
def test_marked_module(image):
    pass


@pytest.mark.judges(check=lambda: "the qemu driver is missing (simulated)")
def test_marked_check(image):
    pass


@pytest.mark.needs_fuse
def test_marked_fuse(image):
    pass


def test_called_tool():
    need("vdisk-no-such-judge")


def test_called_module():
    need_module("vdisk_no_such_binding")


def test_present_judge_runs():
    need("sh")
'''


@pytest.fixture
def inner(tmp_path):
    folder = tmp_path / "inner"
    folder.mkdir()
    shutil.copy(HERE / "conftest.py", folder / "conftest.py")
    ran = tmp_path / "fixture-ran"
    (folder / "test_inner.py").write_text(f"FIXTURE_RAN = {str(ran)!r}\n" + INNER)
    return folder, ran


def run_inner(folder, require: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VDISK_REQUIRE_JUDGES"}
    if require:
        env["VDISK_REQUIRE_JUDGES"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_judge_skips_the_test_before_its_fixtures_run(inner):
    folder, ran = inner
    r = run_inner(folder, require=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 skipped" in r.stdout and "1 passed" in r.stdout, r.stdout
    assert not ran.exists(), "a fixture ran before the judge check"


def test_with_judges_required_a_missing_judge_fails_before_its_fixtures_run(inner):
    folder, ran = inner
    r = run_inner(folder, require=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skipped" not in r.stdout and "1 passed" in r.stdout, r.stdout
    for what in ("missing tools: vdisk-no-such-judge", "missing module vdisk_no_such_binding",
                 "the qemu driver is missing (simulated)", "FUSE unavailable: /dev/fuse is missing (simulated)"):
        assert f"judge missing (VDISK_REQUIRE_JUDGES=1): {what}" in r.stdout, (what, r.stdout)
    assert r.stdout.count("judge missing (VDISK_REQUIRE_JUDGES=1)") >= 6
    assert not ran.exists(), "a fixture ran before the judge check"


def test_ci_requires_the_judges_and_still_runs_make_test():
    text = (HERE.parent / ".ci" / "run").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines.index("export VDISK_REQUIRE_JUDGES=1") < lines.index("make test")
