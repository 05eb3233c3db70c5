"""Putting backups in order: a full backup and the incrementals that build on it, by identity.

Every incremental names the backup it builds on by its ``backup_id`` (never by file name). The
files given are ordered by those links; a parent that was not given is looked for among the files
in the child's folder. A missing parent, a file that belongs to another chain, or a link whose
identities disagree (another image, another size, another shadow) is an error naming the files.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from vdisk.errors import FormatError, ParentError, VDiskError
from .container import FRAME_HEAD, MAX_HEADER, Header, decode_header, is_backup_head
from .reader import BackupFile


def read_header(path: str) -> Optional[Header]:
    """The header of a backup file, or None when *path* is not one (only the header is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not is_backup_head(head):
                return None
            _, n = FRAME_HEAD.unpack_from(head)
            if n > MAX_HEADER:
                return None
            f.seek(FRAME_HEAD.size)
            return decode_header(path, f.read(n))
    except (OSError, FormatError):
        return None


def find_backup(folder: str, *, backup_id: Optional[str] = None, shadow_id: Optional[str] = None) -> Optional[str]:
    """A file in *folder* whose header has this backup id (or, newest first, this source shadow)."""
    found: list[tuple[str, str]] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".vdisk-tmp") or not os.path.isfile(path):
            continue
        h = read_header(path)
        if h is None:
            continue
        if backup_id is not None and h.backup_id == backup_id:
            return path
        if shadow_id is not None and h.shadow.get("id") == shadow_id:
            found.append((h.created, path))
    return max(found)[1] if found else None


def _describe(h: Header) -> str:
    return f"backup {h.backup_id} ({h.kind}, shadow {h.shadow.get('id')}, taken {h.created})"


def check_link(child: BackupFile, parent: BackupFile) -> None:
    """Refuse an incremental whose recorded base is not *parent* (identities, size, shadow)."""
    c, p = child.header, parent.header
    if c.parent != p.backup_id:
        raise ParentError(f"{child.path}: builds on backup {c.parent}, not on {parent.path} ({p.backup_id})")
    if c.base_shadow != p.shadow.get("id"):
        raise ParentError(f"{child.path}: builds on shadow {c.base_shadow}, but {parent.path} was taken from "
                          f"shadow {p.shadow.get('id')}")
    if c.virtual_size != p.virtual_size or c.image.get("uuid") != p.image.get("uuid"):
        raise ParentError(f"{child.path}: is a backup of another image than {parent.path} "
                          f"({c.virtual_size} vs {p.virtual_size} bytes, uuid {c.image.get('uuid')} vs "
                          f"{p.image.get('uuid')})")


def open_chain(paths: Sequence, *, search: bool = True) -> list[BackupFile]:
    """Open backup files and order them full first; missing parents are looked up in the folder
    of their child when *search*. Raises :class:`ParentError` naming a missing or foreign link."""
    if not paths:
        raise VDiskError("no backup given")
    opened: list[BackupFile] = []
    try:
        by_id: dict[str, BackupFile] = {}
        for p in paths:
            bf = BackupFile(p)
            opened.append(bf)
            other = by_id.get(bf.header.backup_id)
            if other is not None:
                raise VDiskError(f"{bf.path}: is the same backup as {other.path} ({bf.header.backup_id})")
            by_id[bf.header.backup_id] = bf
        named = {bf.header.parent for bf in opened}
        tips = [bf for bf in opened if bf.header.backup_id not in named]
        if not tips:
            raise ParentError(f"{opened[0].path}: the given backups build on each other in a loop")
        tip = max(tips, key=lambda bf: (bf.header.kind == "incremental", bf.header.created))
        chain = [tip]
        while chain[-1].header.kind == "incremental":
            child = chain[-1]
            pid = child.header.parent
            parent = by_id.get(pid)
            if parent is None:
                folder = os.path.dirname(os.path.abspath(child.path))
                found = find_backup(folder, backup_id=pid) if search else None
                if found is None:
                    where = f"not given and not found in {folder}" if search else "not given"
                    given = [bf for bf in opened if bf not in chain]
                    extra = f"; {given[0].path} is {_describe(given[0].header)}" if given else ""
                    raise ParentError(f"{child.path}: its parent backup {pid} (taken from shadow "
                                      f"{child.header.base_shadow}) is missing: {where}{extra}")
                parent = BackupFile(found)
                opened.append(parent)
                by_id[parent.header.backup_id] = parent
            if any(c.header.backup_id == parent.header.backup_id for c in chain):
                raise ParentError(f"{child.path}: the chain of backups loops back to {parent.path}")
            check_link(child, parent)
            chain.append(parent)
        for bf in opened:
            if bf not in chain:
                raise ParentError(f"{bf.path}: is not part of the chain of {tip.path} "
                                  f"({_describe(bf.header)}; {tip.path} builds on "
                                  f"{' <- '.join(c.header.backup_id for c in chain[1:]) or 'nothing'})")
        chain.reverse()
        return chain
    except BaseException:
        for bf in opened:
            bf.close()
        raise
