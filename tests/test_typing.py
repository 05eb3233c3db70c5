"""The public API is typed: examples/typed_api.py passes `mypy --strict`, and the same checker
rejects misuse (so the types are really seen, not Any), and the example runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vdisk

from conftest import ROOT

EXAMPLE = ROOT / "examples" / "typed_api.py"
#: Where each package of the distribution lives in the checkout (pyproject's package-dir).
PACKAGE_DIRS = {"vdisk": ROOT / "vdisk", "formats": ROOT / "formats", "mount": ROOT / "mount"}


def installed_layout(where: Path) -> Path:
    """The package tree as an install lays it out (vdisk/formats, vdisk/mount), made of symlinks.

    The editable install maps vdisk.formats to formats/ with an import hook that mypy cannot
    follow, so mypy is shown the layout a wheel installs instead.
    """
    pkg = where / "vdisk"
    pkg.mkdir(parents=True)
    for entry in PACKAGE_DIRS["vdisk"].iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "formats").symlink_to(PACKAGE_DIRS["formats"])
    (pkg / "mount").symlink_to(PACKAGE_DIRS["mount"])
    return where


def mypy_strict(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "mypy.ini"
    # vdisk's own modules are analysed for their types but not judged here (only the example is).
    config.write_text("[mypy]\nstrict = True\n[mypy-vdisk.*]\nfollow_imports = silent\n")
    env = dict(os.environ, MYPYPATH=str(installed_layout(tmp_path / "site")))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config),
                           "--cache-dir", str(tmp_path / "cache"), *map(str, files)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.fixture(scope="module", autouse=True)
def have_mypy():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, "mypy is part of the test extra: pip install -e '.[test]'"


def test_the_package_ships_py_typed():
    assert (ROOT / "vdisk" / "py.typed").is_file()
    assert 'package-data' in (ROOT / "pyproject.toml").read_text() and "py.typed" in (ROOT / "pyproject.toml").read_text()


def test_the_example_passes_mypy_strict(tmp_path):
    proc = mypy_strict(tmp_path, EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found in 1 source file" in proc.stdout


def test_mypy_sees_the_real_types(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text("import vdisk\n"
                      "with vdisk.open('disk.vhd') as d:\n"
                      "    size: str = d.size\n"
                      "    d.pread('512', 0)\n"
                      "    kinds: list[int] = [e.kind.name for e in d.extents()]\n")
    proc = mypy_strict(tmp_path, misuse)
    assert proc.returncode == 1
    assert 'misuse.py:3: error: Incompatible types in assignment (expression has type "int"' in proc.stdout
    assert 'misuse.py:4: error: Argument 1 to "pread" of "Disk" has incompatible type "str"' in proc.stdout
    assert "misuse.py:5: error: List comprehension has incompatible type List[str]" in proc.stdout \
        or "misuse.py:5: error: List comprehension has incompatible type list[str]" in proc.stdout


def test_the_example_runs(tmp_path):
    image = tmp_path / "disk.vdi"
    with vdisk.create(image, 3 << 20, format="vdi") as d:
        d.pwrite(b"\x55\xaa", 510)
        d.pwrite(b"data" * 1000, 1 << 20)
        want = d.pread(d.size, 0)
    out = tmp_path / "copy.raw"
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(image), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "vdi dynamic, 3145728 bytes, 2097152 stored; boot signature present" in proc.stdout
    assert out.read_bytes() == want
