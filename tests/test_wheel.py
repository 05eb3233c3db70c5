"""A wheel built with `pip wheel .` installs into a fresh virtualenv and works outside the checkout:
the console script, `python -m vdisk`, every subpackage (formats, mount), and py.typed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT

pytestmark = pytest.mark.slow

#: What the build needs (pyproject's package-dir): copied so the build's build/ and egg-info
#: land in the copy, never in the checkout.
SOURCES = ("pyproject.toml", "README.md", "vdisk", "formats", "mount")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, wheel path): the wheel built from a clean copy, installed into a new venv."""
    where = tmp_path_factory.mktemp("wheel")
    src = where / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = where / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "."],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = dist.glob("vdisk-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                   check=True, capture_output=True)
    return venv, wheel


def outside(venv: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run a program of the venv from a folder far from the checkout, with nothing of it on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=venv, env=env)


def test_the_wheel_holds_every_package_and_py_typed(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("vdisk/__init__.py", "vdisk/__main__.py", "vdisk/py.typed", "vdisk/formats/vhd/image.py",
                   "vdisk/formats/vdi/check.py", "vdisk/formats/registry.py",
                   "vdisk/mount/partitions.py", "vdisk/serve/nbd.py", "vdisk/shadow/store.py",
                   "vdisk/devices/scsi.py", "vdisk/ops/measure.py", "vdisk/ops/svgmap.py",
                   "vdisk/cli/main.py", "vdisk/fsaware/ext.py"):
        assert member in names, member


def test_vdisk_help_and_info_run_from_the_fresh_venv(installed):
    venv, _ = installed
    where = outside(venv, "python", "-c", "import vdisk, vdisk.formats.vhd, vdisk.mount; print(vdisk.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv)), where.stdout      # the installed copy, not the checkout
    usage = outside(venv, "vdisk", "--help")
    assert usage.returncode == 0 and "measure" in usage.stdout and "convert" in usage.stdout, usage.stderr
    info = outside(venv, "vdisk", "info", str(FIXTURES / "dfvfs_ext2.vhd"), "--output=json")
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    assert (facts["format"], facts["subtype"], facts["virtual_size"]) == ("vhd", "dynamic", 4212736)
    module = outside(venv, "python", "-m", "vdisk", "info", str(FIXTURES / "rdisk_vhd_fixed_small.vhd"))
    assert module.returncode == 0 and "vhd (fixed)" in module.stdout, module.stderr
    # Optional command modules load in the installed copy too (no warning on stderr).
    check = outside(venv, "vdisk", "check", str(FIXTURES / "dfvfs_ext2.vhd"))
    assert check.returncode == 0 and check.stderr == "", check.stderr


def test_mypy_sees_the_installed_packages_types(installed, tmp_path):
    """mypy trusts an installed package's annotations only if it ships py.typed."""
    venv, _ = installed
    example = tmp_path / "typed_api.py"
    shutil.copy2(ROOT / "examples" / "typed_api.py", example)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(venv / "bin" / "python"),
                           "--cache-dir", str(tmp_path / "cache"), str(example)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    misuse = tmp_path / "misuse.py"
    misuse.write_text("import vdisk\nwith vdisk.open('x.vhd') as d:\n    d.pread('1', 0)\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(venv / "bin" / "python"),
                           "--cache-dir", str(tmp_path / "cache"), str(misuse)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert 'Argument 1 to "pread" of "Disk" has incompatible type "str"' in proc.stdout, proc.stdout
