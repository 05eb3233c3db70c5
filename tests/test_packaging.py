"""`pip install .` ships every package: formats/ and mount/ install as vdisk.formats and vdisk.mount."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT


def test_every_package_folder_is_listed_in_pyproject():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = conf["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            sub = ".".join(rel.parts)
            pkg = f"{name}.{sub}" if sub else name
            if not any(pkg.startswith(other + ".") or pkg == other for other in dirs if other != name and len(other) > len(name)):
                found.add(pkg)
    assert found <= listed, f"not installed: {sorted(found - listed)}"


def test_import_works_from_any_directory(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import vdisk, vdisk.formats.vhd, vdisk.mount; print(vdisk.__version__)"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
