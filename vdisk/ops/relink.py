"""Repairing and changing the parent link of a differencing image (``vdisk relink`` / ``vdisk rebase``).

``relink``: find the parent by identity (VHD: the parent's footer id; VDI: its creation UUID) —
through the stored locators, the parent name, the search folders and a scan of every image in
them — and rewrite the link to where it was found: every VHD parent locator (relative and
absolute, in the encoding of its kind), the parent name and timestamp; a VDI stores no path, only
its parent's UUIDs, so relinking a VDI re-records the parent's modification UUID.

``rebase``: make another image the parent. When the new parent has the recorded identity this
is a relink; otherwise the ranges where the old and the new parent differ are first copied into
the child (so what the guest reads does not change), then the link is rewritten.
Everything is one journaled transaction; ``dry_run`` explains and writes nothing.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from vdisk import journal
from vdisk.engine import Engine, ExtentKind
from vdisk.errors import ParentError, UnsupportedError, VDiskError
from vdisk.probe import open_layer
from vdisk.formats.registry import driver_for
from vdisk.ops.digest import content_digest, path_digest

CHUNK = 4 << 20


@dataclass
class RelinkReport:
    path: str
    format: str
    parent: Optional[str] = None
    found_by: str = ""
    changes: list = field(default_factory=list)     # one sentence per rewritten field
    copied_bytes: int = 0                           # rebase onto different content
    dry_run: bool = False
    verified: Optional[bool] = None
    view_digest: Optional[str] = field(default=None, repr=False)   # content before a rebase

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("view_digest", None)
        return d

    def summary(self) -> str:
        head = f"{self.path}: parent {self.parent} ({self.found_by})"
        verb = "would " if self.dry_run else ""
        lines = [head] + [f"  {verb}{c}" for c in self.changes]
        if not self.changes:
            lines.append("  link already correct; nothing to rewrite")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Identities and the search for a parent
# ---------------------------------------------------------------------------------------------
def identity(layer) -> bytes:
    """What a child stores to name *layer* as its parent."""
    return driver_for(layer).identity(layer)


def find_parent_by_identity(child, search: Sequence[str]) -> tuple[str, str]:
    """(path, how) of the file whose identity the child records; ParentError lists what was tried."""
    from vdisk.chain import find_parent
    tried = []
    try:
        parent, how = find_parent(child, parent_search=search, allow_parent_modified=True)
        path = parent.path
        parent.close()
        return path, how
    except ParentError as exc:
        tried.append(str(exc))
    want = child.parent_id
    here = os.path.dirname(os.path.abspath(child.path))
    driver = driver_for(child)
    patterns = [f"*{e}" for e in driver.extensions] + [f"*{e.upper()}" for e in driver.extensions]
    for d in [here, *search]:
        for pattern in patterns:
            for cand in sorted(glob.glob(os.path.join(glob.escape(d), pattern))):
                if os.path.realpath(cand) == os.path.realpath(child.path):
                    continue
                if driver.peek_identity(cand) == want:
                    return cand, f"identity scan of {d}"
    raise ParentError(f"{child.path}: no file with the parent's identity found; " + "; ".join(tried))


def link_transaction_writes(tx, layer, parent_path: str, parent_layer, end: Optional[int] = None) -> list[str]:
    """Inside *tx*: rewrite *layer*'s link to the parent at *parent_path* (the driver's writes);
    returns the changes. *end*: where the data ends now, if not where the layer says."""
    plan = driver_for(layer).link_writes(layer, parent_path, parent_layer, apply=True, end=end)
    tx.write_many(plan.writes)
    return plan.changes


# ---------------------------------------------------------------------------------------------
# Public operations
# ---------------------------------------------------------------------------------------------
def relink(path: str, *, search: Sequence[str] = (), dry_run: bool = False, verify: bool = False,
           allow_parent_modified: bool = False) -> RelinkReport:
    """Find the parent of the differencing image *path* by identity and rewrite the link to it."""
    path = os.fspath(path)
    before = _digest(path, search) if verify and not dry_run else None
    child = open_layer(path, writable=not dry_run)
    try:
        _require_differencing(child)
        ppath, how = find_parent_by_identity(child, tuple(search))
        report = _link(child, ppath, how, dry_run, allow_parent_modified)
    finally:
        child.close()
    if verify and not dry_run:
        report.verified = _verify_after(path, report.parent, before, search)
    return report


def rebase(path: str, new_parent: str, *, search: Sequence[str] = (), dry_run: bool = False,
           verify: bool = False, unsafe: bool = False) -> RelinkReport:
    """Make *new_parent* the parent of *path*, keeping what the guest reads unless *unsafe*."""
    path, new_parent = os.fspath(path), os.fspath(new_parent)
    before = _digest(path, search) if verify and not dry_run else None
    child = open_layer(path, writable=not dry_run)
    try:
        _require_differencing(child)
        newp = open_layer(new_parent)
        try:
            if newp.format != child.format:
                raise UnsupportedError(f"{new_parent} is {newp.format}; a {child.format} image needs a {child.format} parent")
            if newp.size < child.size:
                raise UnsupportedError(f"{new_parent} ({newp.size} bytes) is smaller than {path} ({child.size} bytes)")
            same = identity(newp) == child.parent_id
        finally:
            newp.close()
        if same:
            report = _link(child, new_parent, "given explicitly (same identity)", dry_run, True)
        else:
            report = _rebase_content(child, new_parent, search, dry_run, verify, unsafe)
            if report.view_digest is not None:
                before = report.view_digest
            elif unsafe:
                before = None                  # an unsafe rebase changes the content on purpose
    finally:
        child.close()
    if verify and not dry_run:
        report.verified = _verify_after(path, new_parent, before, search)
    return report


def _require_differencing(layer) -> None:
    if not driver_for(layer).rewrites_links:
        raise UnsupportedError(f"{layer.path}: vdisk cannot rewrite the parent link of a {layer.format} image yet")
    if not layer.is_differencing:
        raise UnsupportedError(f"{layer.path}: not a differencing image; it has no parent link")


def _link(child, ppath: str, how: str, dry_run: bool, allow_modified: bool) -> RelinkReport:
    report = RelinkReport(child.path, child.format, ppath, how, dry_run=dry_run)
    parent = open_layer(ppath)
    try:
        driver = driver_for(child)
        try:
            driver.accept_parent(child, parent, allow_modified)
        except ParentError as exc:
            raise ParentError(f"{exc}; pass --allow-parent-modified to accept it as it is now") from None
        if dry_run:
            report.changes = driver.link_writes(child, ppath, parent, apply=False).changes
            return report
        with journal.Transaction(child.file, "relink") as tx:
            report.changes = link_transaction_writes(tx, child, ppath, parent)
            tx.commit()
    finally:
        parent.close()
    return report


def _digest(path: str, search) -> Optional[str]:
    try:
        return path_digest(path, parent_search=tuple(search))
    except VDiskError:
        return None            # the chain was broken before: nothing to compare


def _verify_after(path: str, ppath: str, before: Optional[str], search=()) -> bool:
    import vdisk
    # A VDI records no path: its parent is found by UUID, so search where it was found.
    with vdisk.open(path, parent_search=[os.path.dirname(os.path.abspath(ppath)), *search]) as d:
        if os.path.realpath(d.chain[1].path) != os.path.realpath(ppath):
            raise VDiskError(f"{path}: VERIFY FAILED: the chain resolves to {d.chain[1].path}, not {ppath}")
        after = content_digest(d)
    if before is not None and after != before:
        raise VDiskError(f"{path}: VERIFY FAILED: virtual content changed")
    return True


def _rebase_content(child, new_parent: str, search, dry_run: bool, verify: bool, unsafe: bool) -> RelinkReport:
    """Rebase onto different content: copy where old and new parent differ, then relink."""
    from vdisk.chain import open_chain
    report = RelinkReport(child.path, child.format, new_parent, "given explicitly", dry_run=dry_run)
    old_layers = None
    if not unsafe:
        try:
            ppath, _ = find_parent_by_identity(child, tuple(search))
            old_layers, _ = open_chain(ppath, writable=False, parent_search=tuple(search), allow_parent_modified=True)
        except VDiskError as exc:
            raise ParentError(f"{child.path}: the current parent is needed to keep the content while rebasing "
                              f"({exc}); pass --unsafe to only rewrite the link") from None
    new_layers, _ = open_chain(new_parent, writable=False, parent_search=tuple(search))
    try:
        old_view = Engine([child] + old_layers) if old_layers else None
        new_below = Engine(new_layers)
        bs = child.block_size
        blocks = _differences(old_view, new_below, child.size, bs) if old_view is not None else []
        report.copied_bytes = sum(min(bs, child.size - b * bs) for b in blocks)
        if dry_run:
            report.changes = ([f"copy {len(blocks)} blocks where the parents differ"] if blocks else [])
            report.changes += driver_for(child).link_writes(child, new_parent, new_layers[0], apply=False).changes
            return report
        if verify and old_view is not None:
            report.view_digest = content_digest(old_view)
        real = child.file
        driver = driver_for(child)
        # What the child shows stays the same: what its own children link to must stay too.
        link_state = driver.link_state(child)
        with journal.Transaction(real, "rebase") as tx:
            with real.journaled(tx):
                writer = Engine([child] + new_layers)
                for b in blocks:
                    # Whole blocks (formats without sector bitmaps copy a block up whole).
                    start = b * bs
                    data = old_view.read(start, min(bs, child.size - start))
                    if np.frombuffer(data, dtype=np.uint8).any():
                        writer.write(data, start)
                    else:
                        writer.write_zeroes(start, len(data))
                driver.restore_link_state(child, link_state)
                writer.flush()
            report.changes = ([f"copied {len(blocks)} blocks where the parents differ"] if blocks else [])
            report.changes += link_transaction_writes(tx, child, new_parent, new_layers[0])
            tx.commit()
    finally:
        for layer in (old_layers or []) + new_layers:
            layer.close()
    return report


def _differences(old_view: Engine, new_below: Engine, size: int, bs: int) -> list[int]:
    """Blocks where what the child shows from its old parent differs from the new parent."""
    out: list[int] = []
    for start in range(0, size, bs):
        n = min(bs, size - start)
        runs = [r for r in old_view.resolve(start, n) if r[3] != 0]
        if not runs:
            continue                           # the child's own data hides both parents here
        for voff, m, kind, level, _ in runs:
            a = old_view.read(voff, m, 1) if kind == ExtentKind.DATA else bytes(m)
            b = new_below.read(voff, min(m, max(0, new_below.size - voff))) if voff < new_below.size else b""
            if a != bytes(b).ljust(m, b"\0"):
                out.append(start // bs)
                break
    return out
