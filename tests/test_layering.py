"""The house's layering, read from the source: no import cycles in the package, and the core
imports none of what is built on it (shadows, snapshots, backups, servers, devices, the CLI, the
whole-image operations).

The import graph is built from the AST of every module under vdisk/, formats/ (vdisk.formats)
and mount/ (vdisk.mount): every ``import`` and ``from ... import`` anywhere in a module (inside
functions too: a deferred import is still a dependency), relative imports resolved, except those
under ``if TYPE_CHECKING:`` (never run). ``from pkg import name`` depends on ``pkg.name`` when
that is a module, else on ``pkg``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

#: Where each top-level package of the distribution lives (pyproject's package-dir).
PACKAGE_DIRS = {"vdisk": ROOT / "vdisk", "vdisk.formats": ROOT / "formats", "vdisk.mount": ROOT / "mount"}

CORE = ["vdisk.disk", "vdisk.engine", "vdisk.chain", "vdisk.io", "vdisk.journal", "vdisk.errors",
        "vdisk.blockdev", "vdisk.probe"]
#: What the core must not import (a module or anything inside a package of that name).
ABOVE_THE_CORE = ["vdisk.shadow", "vdisk.snapshot", "vdisk.backup", "vdisk.serve", "vdisk.devices",
                  "vdisk.openers", "vdisk.cli", "vdisk.ops", "vdisk.fsaware", "vdisk.mount"]


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the distribution."""
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "vdisk" and parts and parts[0] in ("formats", "mount"):
                continue                 # an installed layout's symlinks, if any: the dirs above
            mods[".".join([pkg, *parts])] = path
    return mods


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of a module, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            for target in targets:
                while target and target not in mods:      # `import vdisk.x.y` where y is a name
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for every strongly connected group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, set(g), g[0]) for g in sorted(groups)]


def _cycle_through(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """The shortest import path from *start* back to itself inside its group."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle group but no path returns to it")


def reaches(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module *start* imports, directly or not, with the import path that gets there."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths


GRAPH = import_graph()


def test_the_graph_sees_the_package():
    assert {"vdisk.disk", "vdisk.formats.vhd", "vdisk.mount.fs", "vdisk.shadow.filter"} <= set(GRAPH)
    assert "vdisk.engine" in GRAPH["vdisk.disk"]                       # `from .engine import Engine`
    assert "vdisk.formats.base" in GRAPH["vdisk.formats.vhd"] or "vdisk.formats.base" in \
        reaches(GRAPH, "vdisk.formats.vhd")
    assert "vdisk.shadow" in GRAPH["vdisk.openers"]                    # a deferred import counts
    assert "vdisk.disk" not in GRAPH["vdisk"]                          # TYPE_CHECKING imports do not


def test_cycle_finder_reports_a_cycle_and_its_path():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(g) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_built_on_it(core):
    assert core in GRAPH, f"{core} is no module any more: update CORE"
    bad = {m: path for m, path in reaches(GRAPH, core).items()
           if any(m == above or m.startswith(above + ".") for above in ABOVE_THE_CORE)}
    assert not bad, f"{core} imports what is built on it:\n" + \
        "\n".join(" -> ".join(path) for path in bad.values())
