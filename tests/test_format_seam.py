"""The format seam: everything vdisk knows about a format lives in its driver under formats/.

Generic code (the core, operations, devices, servers, shadows, backups, the mount and the CLI)
asks the driver registry; it never compares a format's name, nor imports a format's module.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

from vdisk.formats import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERIC = sorted(p for d in ("vdisk", "mount") for p in (ROOT / d).rglob("*.py"))
#: the format names no generic code may test for
NAMES = {n for n in registry.NAMES if n != "raw"} | {"vhdx"}
#: modules of formats/ generic code may import: the seam itself, not a driver
SEAM = {"registry", "base", "driver", "maintenance", "findings", "fields"}
#: the one place that may spell old module names: aliases kept for one release
ALIASES = ROOT / "vdisk" / "_moved.py"


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "mount":
        parts[0:1] = ["vdisk", "mount"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, module: str = ""):
    tree = ast.parse(path.read_text(), str(path))
    module = module or _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _name_tests(path: pathlib.Path):
    """(line, text) of every comparison against a format name, and every dict keyed by one."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            for c in [node.left, *node.comparators]:
                if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                    consts += [e for e in c.elts if isinstance(e, ast.Constant)]
            if any(c.value in NAMES for c in consts):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value in NAMES for k in node.keys):
                yield node.lineno, ast.unparse(node)[:80]


def test_the_generic_code_is_the_files_this_test_walks():
    assert len(GENERIC) > 50
    assert not any("formats" in p.relative_to(ROOT).parts for p in GENERIC)


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_generic_module_compares_a_format_name(path):
    assert list(_name_tests(path)) == []


@pytest.mark.parametrize("path", [p for p in GENERIC if p != ALIASES], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_generic_module_imports_a_format_driver(path):
    bad = [(line, name) for line, name in _imports(path)
           if name.split(".")[:2] == ["vdisk", "formats"] and len(name.split(".")) > 2
           and name.split(".")[2] not in SEAM]
    assert bad == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    # The walker itself: a comparison, a keyed dict and a driver import are all found.
    probe = tmp_path / "probe.py"
    probe.write_text('import vdisk.formats.vhd.image\nfrom vdisk.formats import vdi\n'
                     'def f(layer):\n    return layer.format == "vhd" or {"vdi": 1}\n')
    assert [line for line, _ in _name_tests(probe)] == [4, 4]
    names = [name for _, name in _imports(probe, "vdisk.probe")]
    assert "vdisk.formats.vhd.image" in names and "vdisk.formats.vdi" in names


def test_every_registered_format_has_a_driver_answering_for_it():
    for name in registry.NAMES:
        driver = registry.driver(name)
        assert driver.name == name
        assert registry.by_name(f"disk{driver.extensions[0]}") is driver if driver.extensions else True
