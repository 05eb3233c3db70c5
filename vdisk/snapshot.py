"""Snapshot trees with differencing images (the VirtualBox / Hyper-V model).

``IMAGE`` always names the current state. Taking a snapshot moves the current file into the
folder ``IMAGE.snapshots/`` (as ``<id>.<ext>``, frozen from then on) and creates a new, empty
differencing image at ``IMAGE`` on top of it. Reverting replaces ``IMAGE`` with a new empty child
of the chosen snapshot, so the tree forks when you revert and write. Deleting a snapshot merges
its data into its single dependent (a snapshot or the current state) and removes its file.

The tree lives in ``IMAGE.snapshots/tree.json``::

    {"format": "vdisk-snapshot-tree", "version": 1, "image": "disk.vhd",
     "current": "<id of the snapshot the current state grows from, or null>",
     "snapshots": [{"id", "name", "description", "created", "file", "parent"}, ...],   # oldest first
     "pending": null | {"op": "take" | "revert" | "delete", ...}}

It is replaced atomically (write new, fsync, rename, fsync folder). Each operation records what
it is about to do in ``pending`` first; every later operation on the tree finishes an interrupted
one before anything else. The merges themselves (:mod:`vdisk.ops.commit`, :mod:`vdisk.ops.relink`) run
as journaled transactions.

Parents: a VHD child finds its parent by its relative locator (rewritten with
:func:`vdisk.ops.relink.relink` whenever a file moves); a VDI child by UUID, for which
:func:`vdisk.open` also searches ``IMAGE.snapshots/`` and IMAGE's folder when that folder exists.
"""
from __future__ import annotations

import json
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass
from typing import Optional

from . import journal
from vdisk.formats import registry
from .errors import UnsupportedError, VDiskError
from .io import ImageFile
from .io import replace_file, sync_dir
from .sidecars import SNAPSHOTS
from .shadow.catalog import utc_now

SUFFIX = SNAPSHOTS
TREE = "tree.json"
FORMAT = "vdisk-snapshot-tree"
VERSION = 1
COMPARE_CHUNK = 4 << 20


@dataclass
class Snapshot:
    """One node of the tree: a frozen image file in ``IMAGE.snapshots/``."""
    id: str
    name: str
    created: str
    file: str
    parent: Optional[str]
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tree:
    image: str
    current: Optional[str]
    snapshots: list[Snapshot]
    pending: Optional[dict] = None

    def get(self, sid: str) -> Snapshot:
        for s in self.snapshots:
            if s.id == sid:
                return s
        raise VDiskError(f"snapshot tree of {self.image}: no snapshot {sid}")

    def children(self, sid: str) -> list[Snapshot]:
        return [s for s in self.snapshots if s.parent == sid]


def snapshot_dir(image: str) -> str:
    """The folder that holds an image's frozen snapshots and tree.json."""
    return os.fspath(image) + SUFFIX


def search_paths(image: str) -> tuple[str, ...]:
    """Where the parents of the images of a tree are found (for ``parent_search``)."""
    return (snapshot_dir(image), os.path.dirname(os.path.abspath(image)))


# -- persistence -------------------------------------------------------------------------------------
def _load(image: str) -> Tree:
    path = os.path.join(snapshot_dir(image), TREE)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        return Tree(os.path.basename(image), None, [])
    except (OSError, ValueError) as exc:
        raise VDiskError(f"{path}: cannot read the snapshot tree: {exc}") from None
    try:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError("not a vdisk snapshot tree (version 1)")
        return Tree(d["image"], d.get("current"), [Snapshot(**s) for s in d["snapshots"]], d.get("pending"))
    except (KeyError, TypeError, ValueError) as exc:
        raise VDiskError(f"{path}: damaged snapshot tree: {exc}") from None


def _save(image: str, tree: Tree) -> None:
    folder = snapshot_dir(image)
    if not os.path.isdir(folder):
        os.mkdir(folder)
        sync_dir(os.path.dirname(os.path.abspath(folder)))
    path = os.path.join(folder, TREE)
    d = {"format": FORMAT, "version": VERSION, "image": tree.image, "current": tree.current,
         "snapshots": [s.to_dict() for s in tree.snapshots], "pending": tree.pending}
    replace_file(path, (json.dumps(d, indent=2) + "\n").encode())


def _file(image: str, node: Snapshot) -> str:
    return os.path.join(snapshot_dir(image), node.file)


def _not_in_use(image: str) -> None:
    """Refuse to change a tree while any process has the current state open (LockError)."""
    if os.path.exists(image):
        ImageFile(image, writable=True).close()


def _open(path: str, mode: str = "r"):
    import vdisk
    return vdisk.open(path, mode, parent_search=search_paths_for_file(path))


def search_paths_for_file(path: str) -> tuple[str, ...]:
    """Search folders for any file of a tree: the snapshots folder and the image's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder.endswith(SUFFIX):
        return (folder, os.path.dirname(folder))
    return (os.path.abspath(path) + SUFFIX, folder)


def _parent_path(path: str) -> Optional[str]:
    """The resolved parent file of a differencing image, or None for a base image."""
    with _open(path) as d:
        return d.chain[1].path if len(d.chain) > 1 else None


def _recover_journals(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p) and journal.pending(p):
            journal.recover(p)


def _refuse_shadows(image: str) -> None:
    from .shadow import has_shadows, list_shadows
    if has_shadows(image) and list_shadows(image):
        raise UnsupportedError(f"{image}: has shadow copies; delete them before changing its snapshot tree "
                               f"('vdisk shadow delete {image} --all')")


def _resolve(tree: Tree, ref: str) -> Snapshot:
    hits = [s for s in tree.snapshots if s.id == ref or s.name == ref]
    if not hits:
        hits = [s for s in tree.snapshots if ref and s.id.startswith(ref)]
    if not hits:
        raise VDiskError(f"{tree.image}: no snapshot named {ref!r}")
    if len(hits) > 1:
        raise VDiskError(f"{tree.image}: snapshot {ref!r} is ambiguous; use its id")
    return hits[0]


def _begin(image: str) -> Tree:
    image = os.fspath(image)
    if not os.path.exists(image) and not os.path.isdir(snapshot_dir(image)):
        raise VDiskError(f"{image}: no such file")
    tree = _load(image)
    if tree.pending is not None:
        _finish(image, tree)
    _remove_orphans(image, tree)
    return tree


def _remove_orphans(image: str, tree: Tree) -> None:
    """Drop frozen files no snapshot names (left by an interrupted delete)."""
    folder = snapshot_dir(image)
    if not os.path.isdir(folder):
        return
    known = {s.file for s in tree.snapshots}
    for name in os.listdir(folder):
        if name.endswith((".vhd", ".vdi")) and name not in known and not journal.pending(os.path.join(folder, name)):
            _unlink(os.path.join(folder, name))


# -- the operations ----------------------------------------------------------------------------------
def take(image, *, name: Optional[str] = None, description: str = "") -> Snapshot:
    """Freeze the current state of *image* as a new snapshot; *image* continues as its child."""
    image = os.fspath(image)
    _not_in_use(image)
    tree = _begin(image)
    _refuse_shadows(image)
    from .probe import probe
    fmt = probe(image)
    if not registry.driver(fmt).has_parents:
        raise UnsupportedError(f"{image}: a {fmt} image cannot have differencing children; convert it first")
    name = name or f"Snapshot {len(tree.snapshots) + 1}"
    if any(s.name == name for s in tree.snapshots):
        raise VDiskError(f"{image}: there is already a snapshot named {name!r}")
    sid = str(uuidlib.uuid4())
    node = Snapshot(sid, name, utc_now(), f"{sid}.{fmt}", tree.current, description)
    tree.pending = {"op": "take", "snapshot": node.to_dict(), "format": fmt}
    _save(image, tree)
    _finish(image, tree)
    return node


def revert(image, ref: str, *, force: bool = False) -> Snapshot:
    """Make *image* a new empty child of snapshot *ref*; its current changes need *force*."""
    image = os.fspath(image)
    _not_in_use(image)
    tree = _begin(image)
    _refuse_shadows(image)
    node = _resolve(tree, ref)
    if not force and os.path.exists(image) and _has_changes(image, tree):
        raise VDiskError(f"{image}: the current state has changes that are in no snapshot; "
                         f"revert --force discards them")
    tree.pending = {"op": "revert", "id": node.id, "replacing": _uuid_of(image)}
    _save(image, tree)
    _finish(image, tree)
    return node


def delete(image, ref: str) -> Snapshot:
    """Delete snapshot *ref*, merging its data into its only dependent (snapshot or current state)."""
    image = os.fspath(image)
    _not_in_use(image)
    tree = _begin(image)
    _refuse_shadows(image)
    node = _resolve(tree, ref)
    dependents = [c.id for c in tree.children(node.id)] + (["current"] if tree.current == node.id else [])
    if len(dependents) > 1:
        raise UnsupportedError(f"{image}: snapshot {node.name!r} has {len(dependents)} dependents "
                               f"({', '.join(dependents)}); only a snapshot with at most one can be deleted")
    tree.pending = {"op": "delete", "id": node.id, "dependent": dependents[0] if dependents else None}
    _save(image, tree)
    _finish(image, tree)
    return node


def snapshot_list(image) -> tuple[list[Snapshot], Optional[str]]:
    """The snapshots (oldest first) and the id of the one the current state grows from."""
    image = os.fspath(image)
    tree = _load(image)
    if tree.pending is not None:
        _not_in_use(image)
        tree = _begin(image)
    return tree.snapshots, tree.current


def _has_changes(image: str, tree: Tree) -> bool:
    """Would reverting lose data: does the current state differ from the snapshot it grows from?"""
    if tree.current is None:
        return True
    frozen = _file(image, tree.get(tree.current))
    with _open(image) as d, _open(frozen) as base:
        for e in d.extents():
            if e.layer != 0:
                continue
            for pos in range(e.offset, e.offset + e.length, COMPARE_CHUNK):
                n = min(COMPARE_CHUNK, e.offset + e.length - pos)
                if d.pread(n, pos) != base.pread(n, pos):
                    return True
    return False


# -- doing (and redoing) a pending operation ----------------------------------------------------------
def _finish(image: str, tree: Tree) -> None:
    """Carry out tree.pending; every step can be repeated after an interruption."""
    op = tree.pending["op"]
    if op == "take":
        _do_take(image, tree)
    elif op == "revert":
        _do_revert(image, tree)
    elif op == "delete":
        _do_delete(image, tree)
    else:
        raise VDiskError(f"{image}: unknown pending snapshot operation {op!r}")
    tree.pending = None
    _save(image, tree)


def _is_child_of(path: str, parent: str) -> bool:
    try:
        p = _parent_path(path)
    except VDiskError:
        return False
    return p is not None and os.path.realpath(p) == os.path.realpath(parent)


def _new_child(image: str, parent: str, fmt: str) -> None:
    """Atomically make *image* a new empty differencing image of *parent*."""
    import vdisk
    tmp = image + ".vdisk-new"
    if os.path.exists(tmp):
        os.unlink(tmp)
    vdisk.create(tmp, format=fmt, parent=parent).close()
    os.replace(tmp, image)
    sync_dir(os.path.dirname(os.path.abspath(image)))


def _fix_links(path: str, **kw) -> None:
    """Point a moved (or changed) differencing image at its parent again (journaled)."""
    from vdisk.ops.relink import relink
    relink(path, search=search_paths_for_file(path), **kw)


def _do_take(image: str, tree: Tree) -> None:
    node = Snapshot(**tree.pending["snapshot"])
    fmt = tree.pending["format"]
    frozen = _file(image, node)
    _recover_journals(image, frozen)
    if not os.path.exists(frozen):
        if not os.path.exists(image):
            raise VDiskError(f"{image}: missing, and no snapshot {node.id} was taken")
        if not os.path.isdir(snapshot_dir(image)):
            os.mkdir(snapshot_dir(image))
        os.rename(image, frozen)
        sync_dir(snapshot_dir(image))
        sync_dir(os.path.dirname(os.path.abspath(image)))
    from .probe import open_layer
    layer = open_layer(frozen, lock=False)
    differencing = layer.is_differencing
    layer.close()
    if differencing and registry.driver(fmt).links_by_path:
        _fix_links(frozen, allow_parent_modified=True)          # its relative locator moved with it
    if not (os.path.exists(image) and _is_child_of(image, frozen)):
        _new_child(image, frozen, fmt)
    if all(s.id != node.id for s in tree.snapshots):
        tree.snapshots.append(node)
    tree.current = node.id


def _uuid_of(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    from .probe import open_layer
    layer = open_layer(path, lock=False)
    try:
        return str(layer.uuid)
    finally:
        layer.close()


def _do_revert(image: str, tree: Tree) -> None:
    node = tree.get(tree.pending["id"])
    fmt = os.path.splitext(node.file)[1].lstrip(".")
    _recover_journals(image)
    # The file being replaced is still there: replace it (a finished revert left a new file).
    if not os.path.exists(image) or _uuid_of(image) == tree.pending["replacing"]:
        _new_child(image, _file(image, node), fmt)
    tree.current = node.id


def _dependents_of(image: str, tree: Tree, sid: str) -> list[str]:
    """Files whose parent is snapshot *sid*: its child snapshots and, if it is current, IMAGE."""
    out = [_file(image, c) for c in tree.children(sid)]
    if tree.current == sid:
        out.append(image)
    return out


def _do_delete(image: str, tree: Tree) -> None:
    from vdisk.ops.commit import commit
    from vdisk.ops.relink import rebase
    pend = tree.pending
    if all(s.id != pend["id"] for s in tree.snapshots):
        return                                        # finished before an interruption
    node = tree.get(pend["id"])
    frozen = _file(image, node)
    dep_id = pend["dependent"]
    dep = None if dep_id in (None, "current") else tree.get(dep_id)
    dep_path = image if dep_id == "current" else (_file(image, dep) if dep else None)
    grand = _dependents_of(image, tree, dep.id) if dep else []
    _recover_journals(*(p for p in (frozen, dep_path, *grand) if p))
    if dep_path is None:                              # nothing depends on it: drop the file
        tree.snapshots.remove(node)
        _save(image, tree)
        _unlink(frozen)
        return
    if "mode" not in pend:
        below = _parent_path(frozen)
        pend.update(mode="pull" if below is not None else "base", below=below)
        _save(image, tree)
    if pend["mode"] == "pull":
        # Copy the snapshot's data into its dependent, which then skips it (journaled rebase).
        rebase(dep_path, pend["below"], search=search_paths_for_file(dep_path))
        for g in grand:                               # the dependent changed: re-record the links
            _fix_links(g, allow_parent_modified=True)
        if dep is not None:
            dep.parent = node.parent
        else:
            tree.current = node.parent
        tree.snapshots.remove(node)
        _save(image, tree)
        _unlink(frozen)
        return
    # The snapshot is the base of the chain: merge the dependent into it (journaled commit) and
    # let the base take the dependent's place.
    if os.path.exists(frozen) and os.path.exists(dep_path) and _is_child_of(dep_path, frozen):
        commit(dep_path, parent_search=search_paths_for_file(dep_path))
    if dep is None:
        if os.path.exists(frozen):
            os.replace(frozen, image)                 # IMAGE had no dependents: nothing links to it
            sync_dir(os.path.dirname(os.path.abspath(image)))
            sync_dir(snapshot_dir(image))
        tree.current = None
        tree.snapshots.remove(node)
        _save(image, tree)
        return
    for g in grand:
        rebase(g, frozen, search=search_paths_for_file(g))
    dep.file, dep.parent = node.file, None
    tree.snapshots.remove(node)
    _save(image, tree)
    _unlink(dep_path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    sync_dir(os.path.dirname(os.path.abspath(path)))
