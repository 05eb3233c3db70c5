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
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

from . import journal
from .engine import Engine, ExtentKind
from .errors import ParentError, UnsupportedError, VDiskError
from .probe import open_layer
from vdisk.formats.base import SECTOR
from vdisk.formats.vdi_structs import PRE_HEADER_SIZE
from vdisk.formats.vhd import parent_id_bytes
from vdisk.formats.vhd_structs import (FOOTER_COOKIE, HEADER_CHECKSUM_OFFSET, PLAT_MAC, PLAT_MACX,
                                       PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R, VHD_EPOCH, DynamicHeader,
                                       with_checksum)

CHUNK = 4 << 20
RELATIVE = {PLAT_W2RU, PLAT_WI2R}
ABSOLUTE = {PLAT_W2KU, PLAT_WI2K}
CODE_NAMES = {PLAT_W2RU: "W2ru", PLAT_W2KU: "W2ku", PLAT_WI2R: "Wi2r", PLAT_WI2K: "Wi2k", PLAT_MACX: "MacX",
              PLAT_MAC: "Mac "}


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
    if layer.format == "vdi":
        return layer.header["uuid_create"]
    return parent_id_bytes(layer)


def _file_identity(path: str, fmt: str) -> Optional[bytes]:
    """Cheap identity of a candidate file without opening it fully."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            if fmt == "vdi":
                if len(head) >= 0x198 and int.from_bytes(head[0x40:0x44], "little") == 0xBEDA107F:
                    return head[0x188:0x198]
                return None
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512))
            tail = f.read(512)
    except OSError:
        return None
    for raw in (tail, head):
        if raw[:8] == FOOTER_COOKIE:
            return raw[68:84]
    return None


def find_parent_by_identity(child, search: Sequence[str]) -> tuple[str, str]:
    """(path, how) of the file whose identity the child records; ParentError lists what was tried."""
    from .chain import find_parent
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
    exts = ("*.vdi",) if child.format == "vdi" else ("*.vhd", "*.avhd", "*.VHD")
    for d in [here, *search]:
        for ext in exts:
            for cand in sorted(glob.glob(os.path.join(glob.escape(d), ext))):
                if os.path.realpath(cand) == os.path.realpath(child.path):
                    continue
                if _file_identity(cand, child.format) == want:
                    return cand, f"identity scan of {d}"
    raise ParentError(f"{child.path}: no file with the parent's identity found; " + "; ".join(tried))


# ---------------------------------------------------------------------------------------------
# VHD link rewriting
# ---------------------------------------------------------------------------------------------
def _relative(parent_path: str, child_path: str) -> str:
    rel = os.path.relpath(os.path.abspath(parent_path), os.path.dirname(os.path.abspath(child_path)))
    win = rel.replace("/", "\\")
    return win if win.startswith("..") else ".\\" + win


def _blob(code: int, parent_path: str, child_path: str) -> bytes:
    absolute = os.path.abspath(parent_path)
    if code == PLAT_W2RU:
        return _relative(parent_path, child_path).encode("utf-16-le")
    if code == PLAT_W2KU:
        return absolute.replace("/", "\\").encode("utf-16-le")
    if code == PLAT_WI2R:
        return _relative(parent_path, child_path).encode("latin-1", "replace")
    if code == PLAT_WI2K:
        return absolute.replace("/", "\\").encode("latin-1", "replace")
    if code == PLAT_MACX:
        return ("file://" + quote(absolute)).encode("utf-8")
    raise ValueError(code)


def _decode(code: int, data: bytes) -> str:
    enc = "utf-16-le" if code in (PLAT_W2RU, PLAT_W2KU) else "utf-8" if code == PLAT_MACX else "latin-1"
    return data.decode(enc, "replace").rstrip("\0")


def vhd_link_writes(layer, parent_path: str, parent_layer) -> tuple[list[tuple[int, bytes]], int, list[str]]:
    """Writes that make the VHD *layer* name *parent_path*: (writes, new end of data, changes).

    Locator data that no longer fits its reserved space moves to the end of the data area,
    which then grows (the caller moves the footer there).
    """
    file = layer.file
    h = dict(DynamicHeader.parse(layer.header_raw))
    h.pop("_io", None)
    locs = [{k: v for k, v in loc.items() if k != "_io"} for loc in h["parent_locators"]]
    changes, writes = [], []
    end = layer.footer_offset
    room = {e.index: e.end - e.start for e in layer.locator_extents()}
    if not any(loc["platform_code"] in RELATIVE | ABSOLUTE | {PLAT_MACX} for loc in locs):
        free = [i for i, loc in enumerate(locs) if not loc["platform_code"]]
        for code, i in zip((PLAT_W2RU, PLAT_W2KU), free):
            locs[i].update(platform_code=code, platform_data_space=0, platform_data_length=0, platform_data_offset=0)
    for i, loc in enumerate(locs):
        code = loc["platform_code"]
        if not code:
            continue
        if code == PLAT_MAC:
            changes.append(f"drop stale Mac alias locator {i}")
            locs[i] = dict(platform_code=0, platform_data_space=0, platform_data_length=0, reserved=0,
                           platform_data_offset=0)
            continue
        if code not in CODE_NAMES:
            continue
        blob = _blob(code, parent_path, layer.path)
        old = b""
        if loc["platform_data_length"] and loc["platform_data_offset"] + loc["platform_data_length"] <= file.size():
            old = file.pread(loc["platform_data_length"], loc["platform_data_offset"])
        if old == blob:
            continue
        # The room the file really has there, not what the entry claims (a claim of 0xFFFFFFFF
        # bytes would let a longer path overwrite the block after it).
        space = room.get(i, 0)
        if loc["platform_data_offset"] and len(blob) <= space and space >= SECTOR:
            at = loc["platform_data_offset"]
            writes.append((at, blob + bytes(min(space, -(-len(blob) // SECTOR) * SECTOR) - len(blob))))
        else:
            at = end
            space = max(1024, -(-len(blob) // SECTOR) * SECTOR)
            writes.append((at, blob.ljust(space, b"\0")))
            end += space
        changes.append(f"rewrite {CODE_NAMES[code]} locator {i}: {_decode(code, old)!r} -> {_decode(code, blob)!r}")
        loc.update(platform_data_offset=at, platform_data_space=space, platform_data_length=len(blob))
    name = os.path.basename(parent_path).encode("utf-16-be")[:512].ljust(512, b"\0")
    if name != h["parent_unicode_name"]:
        changes.append(f"set parent name to {os.path.basename(parent_path)!r}")
    pid = parent_id_bytes(parent_layer)
    if pid != h["parent_unique_id"]:
        changes.append(f"set parent id to {uuidlib.UUID(bytes=pid)} (was {uuidlib.UUID(bytes=h['parent_unique_id'])})")
    stamp = max(0, int(os.stat(parent_path).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF
    if stamp != h["parent_timestamp"] and changes:
        changes.append("record the parent's timestamp")
    h.update(parent_unicode_name=name, parent_unique_id=pid, parent_locators=locs, checksum=0,
             parent_timestamp=stamp if changes else h["parent_timestamp"])
    header = with_checksum(DynamicHeader.build(h), HEADER_CHECKSUM_OFFSET)
    if header != layer.header_raw:
        writes.append((layer.header_offset, header))
    return writes, end, changes


def vdi_link_writes(layer, parent_layer) -> tuple[list[tuple[int, bytes]], list[str]]:
    changes = []
    h = dict(layer.header)
    if h["uuid_linkage"] != parent_layer.header["uuid_create"]:
        changes.append(f"set linkage UUID to {uuidlib.UUID(bytes_le=parent_layer.header['uuid_create'])}")
    if h.get("uuid_parent_modify") != parent_layer.header["uuid_modify"]:
        changes.append(f"set parent modification UUID to {uuidlib.UUID(bytes_le=parent_layer.header['uuid_modify'])}")
    if not changes:
        return [], []
    layer.header.update(uuid_linkage=parent_layer.header["uuid_create"],
                        uuid_parent_modify=parent_layer.header["uuid_modify"])
    return [(PRE_HEADER_SIZE, layer.header_bytes())], changes


def link_transaction_writes(tx, layer, parent_path: str, parent_layer) -> list[str]:
    """Inside *tx*: rewrite *layer*'s link to the parent at *parent_path*; returns the changes."""
    if layer.format == "vhd":
        writes, end, changes = vhd_link_writes(layer, parent_path, parent_layer)
        tx.write_many(writes)
        if end != layer.footer_offset:
            tx.write(end, layer.footer_raw)
            layer.footer_offset = end
        return changes
    writes, changes = vdi_link_writes(layer, parent_layer)
    tx.write_many(writes)
    return changes


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
    if layer.format == "vhdx":
        raise UnsupportedError(f"{layer.path}: vdisk cannot rewrite the parent link of a VHDX image yet")
    if not layer.is_differencing:
        raise UnsupportedError(f"{layer.path}: not a differencing image; it has no parent link")


def _link(child, ppath: str, how: str, dry_run: bool, allow_modified: bool) -> RelinkReport:
    report = RelinkReport(child.path, child.format, ppath, how, dry_run=dry_run)
    parent = open_layer(ppath)
    try:
        if child.format == "vdi":
            mod = child.header.get("uuid_parent_modify", bytes(16))
            if mod not in (bytes(16), parent.header["uuid_modify"]) and not allow_modified:
                raise ParentError(f"{child.path}: parent {ppath} was modified after this image was made; "
                                  f"pass --allow-parent-modified to accept it as it is now")
        if dry_run:
            if child.format == "vhd":
                report.changes = vhd_link_writes(child, ppath, parent)[2]
            else:
                h = dict(child.header)
                report.changes = vdi_link_writes(child, parent)[1]
                child.header.update(h)
            return report
        with journal.Transaction(child.file, "relink") as tx:
            report.changes = link_transaction_writes(tx, child, ppath, parent)
            tx.commit()
    finally:
        parent.close()
    return report


def _digest(path: str, search) -> Optional[str]:
    from .layout import path_digest
    try:
        return path_digest(path, parent_search=tuple(search))
    except VDiskError:
        return None            # the chain was broken before: nothing to compare


def _verify_after(path: str, ppath: str, before: Optional[str], search=()) -> bool:
    import vdisk
    from .layout import content_digest
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
    from .chain import open_chain
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
            if child.format == "vhd":
                report.changes += vhd_link_writes(child, new_parent, new_layers[0])[2]
            else:
                saved = dict(child.header)
                report.changes += vdi_link_writes(child, new_layers[0])[1]
                child.header.update(saved)
            return report
        if verify and old_view is not None:
            report.view_digest = _engine_digest(old_view, child.size)
        real = child.file
        with journal.Transaction(real, "rebase") as tx:
            child.file = tx.wrap(real)
            try:
                writer = Engine([child] + new_layers)
                for b in blocks:
                    # Whole blocks: a VDI block is copied up whole, so write it whole, read first.
                    start = b * bs
                    data = old_view.read(start, min(bs, child.size - start))
                    if np.frombuffer(data, dtype=np.uint8).any():
                        writer.write(data, start)
                    else:
                        writer.write_zeroes(start, len(data))
                writer.flush()
                child.file = real
                report.changes = ([f"copied {len(blocks)} blocks where the parents differ"] if blocks else [])
                report.changes += link_transaction_writes(tx, child, new_parent, new_layers[0])
                tx.commit()
            finally:
                child.file = real
    finally:
        for layer in (old_layers or []) + new_layers:
            layer.close()
    return report


def _engine_digest(engine: Engine, size: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for pos in range(0, size, CHUNK):
        h.update(engine.read(pos, min(CHUNK, size - pos)))
    return h.hexdigest()


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
