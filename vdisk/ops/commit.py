"""Merging a differencing image into its parent or a further ancestor (``vdisk commit``).

Two journaled transactions, each on one file, so that every interruption leaves a valid chain:

1. **into the ancestor**: everything the child shows from the layers above the ancestor is
   written into it (the format code allocates and maps as usual; every write is journaled, so a
   crash rolls the ancestor back). The ancestor keeps its identity (and a VDI its modification
   UUID), so the child's link stays valid. After this step the child still reads the same: its
   own blocks hide data that the ancestor now holds too.
2. **the child**: its blocks are dropped and — when committing past the direct parent — its
   link is rewritten to the ancestor. The child is now an empty overlay of the ancestor and reads
   exactly as before. Intermediate images (``into`` a grandparent) are no longer part of the
   child's chain; their own content, seen through the changed ancestor, is not preserved.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from vdisk import journal
from vdisk.chain import open_chain
from vdisk.engine import Engine, ExtentKind
from vdisk.errors import UnsupportedError, VDiskError
from vdisk.ops.layout import SparseFile
from vdisk.ops.digest import content_digest
from vdisk.probe import open_layer
from vdisk.formats.base import ABSENT
from vdisk.formats.registry import driver_for

CHUNK = 8 << 20
Progress = Optional[Callable[[int, int], None]]


@dataclass
class CommitReport:
    path: str
    into: str
    format: str
    copied_bytes: int = 0
    dropped_intermediates: list = field(default_factory=list)
    child_size_before: int = 0
    child_size_after: int = 0
    verified: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.path}: committed {self.copied_bytes} bytes into {self.into}; the child is now an empty "
             f"overlay ({self.child_size_before} -> {self.child_size_after} bytes)")
        if self.dropped_intermediates:
            s += "; no longer in the chain: " + ", ".join(self.dropped_intermediates)
        return s


def commit(path: str, *, into: Optional[str] = None, verify: bool = False, parent_search: Sequence[str] = (),
           vbox_registry=None, progress: Progress = None) -> CommitReport:
    """Merge the differencing image *path* into its parent, or into the ancestor *into*."""
    import vdisk
    path = os.fspath(path)
    search = tuple(parent_search)
    with vdisk.open(path, parent_search=search, vbox_registry=vbox_registry) as d:
        chain = [info.path for info in d.chain]
        if len(chain) < 2:
            raise UnsupportedError(f"{path}: not a differencing image; there is nothing to commit")
        driver = driver_for(d.layers[0])
        if not ((driver.rearranges_blocks or driver.empties_children) and driver.rewrites_links):
            raise UnsupportedError(f"{path}: vdisk cannot commit {d.format} images yet (it empties the child "
                                   f"in place); 'vdisk convert' flattens the chain into a new image")
        before = content_digest(d) if verify else None
        size, fmt = d.size, d.format
    if into is None:
        t = 1
    else:
        real = os.path.realpath(into)
        matches = [i for i, p in enumerate(chain) if i > 0 and os.path.realpath(p) == real]
        if not matches:
            raise VDiskError(f"{into} is not an ancestor of {path} (chain: {' -> '.join(chain)})")
        t = matches[0]
    target = chain[t]
    report = CommitReport(path, target, fmt, child_size_before=os.path.getsize(path),
                          dropped_intermediates=chain[1:t])
    # Search the target's folder too, so the chain below it resolves the same way.
    report.copied_bytes = _merge_into(chain, t, size, search, vbox_registry, progress)
    _empty_child(path, target, t > 1, search)
    report.child_size_after = os.path.getsize(path)
    if verify:
        with vdisk.open(path, parent_search=search, vbox_registry=vbox_registry) as d:
            after = content_digest(d)
        if after != before:
            raise VDiskError(f"{path}: VERIFY FAILED: virtual content changed by the commit")
        report.verified = True
    return report


def _merge_into(chain: list[str], t: int, size: int, search, registry, progress: Progress) -> int:
    """Step 1: write what layers 0..t-1 show into chain[t], journaled."""
    target_layers, _ = open_chain(chain[t], writable=True, parent_search=search, vbox_registry=registry,
                                  allow_parent_modified=True)
    upper = []
    try:
        for p in chain[:t]:
            upper.append(open_layer(p, lock=False))
        view = Engine(upper + target_layers)
        top = target_layers[0]
        if top.size < size:
            # Any format: the child's data past the parent's end has nowhere to go.
            raise UnsupportedError(f"{chain[t]}: the parent ({top.size} bytes) is smaller than {chain[0]} "
                                   f"({size} bytes); grow it first with 'vdisk resize'")
        real = top.file
        driver = driver_for(top)
        link_state = driver.link_state(top)
        copied = 0
        with journal.Transaction(real, "commit") as tx:
            with real.journaled(tx):
                writer = Engine(target_layers)
                # A flat target (raw, fixed) would punch holes for zeros, bypassing the journal:
                # write the zeros instead.
                flat = top.flat

                def zeroes(pos: int, m: int) -> None:
                    if flat:
                        writer.write(bytes(m), pos)
                    else:
                        writer.write_zeroes(pos, m)
                runs = [(o, n, k) for o, n, k, level, _ in _resolve_chunks(view, size) if 0 <= level < t]
                total = sum(n for _, n, _ in runs) or 1
                for off, n, kind in runs:
                    for pos in range(off, off + n, CHUNK):
                        m = min(CHUNK, off + n - pos)
                        if kind == ExtentKind.DATA:
                            data = view.read(pos, m)
                            if np.frombuffer(data, dtype=np.uint8).any():
                                writer.write(data, pos)
                            else:
                                zeroes(pos, m)
                        else:
                            zeroes(pos, m)
                        copied += m
                        if progress:
                            progress(copied, total)
                # What names the ancestor to its child stays as it was, so the link stays valid.
                driver.restore_link_state(top, link_state)
                writer.flush()
            tx.commit()
        return copied
    finally:
        for layer in upper + target_layers:
            layer.close()


def _resolve_chunks(engine: Engine, size: int, step: int = 1 << 30):
    for start in range(0, size, step):
        yield from engine.resolve(start, min(step, size - start))


def _empty_child(path: str, target: str, relink: bool, search) -> None:
    """Step 2: drop every block of the child (and point it at *target*), journaled."""
    child = open_layer(path, writable=True)
    try:
        driver = driver_for(child)
        if driver.empties_children:
            parent = open_layer(target) if relink else None
            try:
                driver.empty_child(child, target if relink else None, parent)
            finally:
                if parent is not None:
                    parent.close()
            return
        sf = SparseFile(child)
        new_map = np.full(len(child.block_map), ABSENT, dtype=np.int64)
        with journal.Transaction(child.file, "commit") as tx:
            tx.write_many(sf.table_writes(child.block_map, new_map) + sf.count_writes(0))
            end = sf.meta_end
            if relink:
                parent = open_layer(target)
                try:
                    plan = driver_for(child).link_writes(child, target, parent, apply=True, end=end)
                    tx.write_many(plan.writes)
                    end = plan.end if plan.end is not None else end
                finally:
                    parent.close()
            tx.commit(final_size=sf.final_size(end), redo=[(end, sf.trailer)] if sf.trailer else [])
    finally:
        child.close()
