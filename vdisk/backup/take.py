"""Taking a backup of an image's shadow: full, or incremental through the shadows' CBT.

A full backup streams the whole content of one shadow. An incremental one stores only what
``ShadowedDisk.diff(base, shadow)`` reports as changed since *base*, the shadow its parent backup
was taken from, and records that parent by identity. Both can take the shadow first and drop
older shadows afterwards, in the same open of the image.
"""
from __future__ import annotations

import datetime
import os
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from vdisk.errors import VDiskError
from .chain import find_backup, read_header
from .container import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, Header
from .pipeline import bytes_covered, changed_pieces, full_pieces, store
from .reader import BackupFile, is_backup
from .writer import BackupWriter, check_level

Progress = Callable[[int, int], None]


@dataclass
class BackupResult:
    """What one backup stored (the ``--json`` summary of ``vdisk backup``)."""
    path: str
    backup_id: str
    kind: str
    parent: Optional[str]
    shadow: str
    base_shadow: Optional[str]
    virtual_size: int
    bytes_read: int              # bytes of the shadow read (chunks with data, or changed ranges)
    bytes_stored: int            # size of the backup file
    changed_bytes: int           # bytes the backup covers (the disk for a full one)
    entries: int
    seconds: float
    created_shadow: bool = False
    deleted_shadows: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Bytes read per byte stored (compression and hole ratio)."""
        return self.bytes_read / self.bytes_stored if self.bytes_stored else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), ratio=round(self.ratio, 3))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_chunk_size(chunk: int) -> int:
    if not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
        raise ValueError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, not {chunk}")
    return chunk


def _resolve_since(d, since: str, out: str) -> tuple[str, str]:
    """(parent backup id, base shadow id) for --since BACKUP_FILE or --since SHADOW_ID."""
    ss = d.shadow_set
    if os.path.isfile(since):
        if not is_backup(since):
            raise VDiskError(f"{since}: is not a vdisk backup")
        with BackupFile(since) as bf:
            h = bf.header
        if h.virtual_size != d.size:
            raise VDiskError(f"{since}: is a backup of a {h.virtual_size}-byte disk, {d.path} has {d.size} bytes")
        base = h.shadow.get("id")
        if base not in [r.id for r in ss.catalog.shadows]:
            raise VDiskError(f"{since}: was taken from shadow {base}, which {d.path} no longer has "
                             f"(deleted); an incremental backup needs it: take a full backup")
        return h.backup_id, base
    base = ss.resolve_id(since).id
    folder = os.path.dirname(os.path.abspath(out))
    found = find_backup(folder, shadow_id=base)
    if found is None:
        raise VDiskError(f"{d.path}: no backup of shadow {base} in {folder} to build on (give --since BACKUP_FILE)")
    h = read_header(found)
    return h.backup_id, base


def backup(image, out, *, shadow: Optional[str] = None, new_shadow: bool = False, since: Optional[str] = None,
           level: int = 3, threads: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK,
           keep_shadows: Optional[int] = None, description: str = "", force: bool = False,
           progress: Optional[Progress] = None, open_options: Optional[dict] = None) -> BackupResult:
    """Back up one shadow of *image* (a path, or an open :class:`vdisk.shadow.ShadowedDisk`) to *out*.

    *shadow*: the shadow's id (or prefix); *new_shadow*: take a new one first (the default when
    neither is given). *since*: a previous backup file, or the id of the shadow it was taken
    from, makes the backup incremental. *keep_shadows*: afterwards delete the oldest shadows
    until at most that many remain (never the one just backed up).
    """
    from vdisk.shadow import ShadowedDisk, open_shadowed
    check_level(level)
    check_chunk_size(chunk_size)
    if shadow is not None and new_shadow:
        raise ValueError("give either a shadow id or new_shadow, not both")
    if keep_shadows is not None and keep_shadows < 1:
        raise ValueError(f"--keep-shadows must be at least 1, not {keep_shadows}")
    new_shadow = new_shadow or shadow is None
    threads = threads or min(4, os.cpu_count() or 1)
    out = os.fspath(out)
    if os.path.lexists(out) and not force and not os.path.isdir(out):
        raise VDiskError(f"{out}: already exists (use --force to overwrite)")
    owned = not isinstance(image, ShadowedDisk)
    writable = new_shadow or keep_shadows is not None
    d = open_shadowed(image, "r+" if writable else "r", **(open_options or {})) if owned else image
    try:
        # Everything that can be refused is checked before a shadow is taken.
        link = _resolve_since(d, since, out) if since is not None else None
        created = False
        if new_shadow:
            sid = d.create_shadow(description).id
            created = True
        else:
            sid = d.shadow_set.resolve_id(shadow).id
        try:
            result = _backup_shadow(d, sid, out, link=link, since=since, level=level, threads=threads,
                                    chunk=chunk_size, force=force, progress=progress)
        except BaseException:
            if created:                      # a failed backup leaves no shadow of its own behind
                try:
                    d.delete_shadow(sid)
                except (VDiskError, OSError):
                    pass
            raise
        result.created_shadow = created
        if keep_shadows is not None:
            while len(d.shadow_set.catalog.shadows) > keep_shadows:
                victim = next((r.id for r in d.shadow_set.catalog.shadows if r.id != sid), None)
                if victim is None:
                    break
                d.delete_shadow(victim)
                result.deleted_shadows.append(victim)
        return result
    finally:
        if owned:
            d.close()


def _backup_shadow(d, sid: str, out: str, *, link: Optional[tuple[str, str]], since: Optional[str], level: int,
                   threads: int, chunk: int, force: bool, progress: Optional[Progress]) -> BackupResult:
    t0 = time.perf_counter()
    ss = d.shadow_set
    rec = ss.resolve_id(sid)
    parent = base = None
    if link is not None:
        parent, base = link
        ids = [r.id for r in ss.catalog.shadows]
        if base == sid:
            raise VDiskError(f"{d.path}: shadow {sid} is the one {since} was taken from: nothing changed since")
        if ids.index(base) > ids.index(sid):
            raise VDiskError(f"{d.path}: shadow {base} ({since}) is newer than shadow {sid}")
    view = d.shadow_view(sid)
    header = Header(backup_id=str(uuidlib.uuid4()), kind="full" if parent is None else "incremental",
                    parent=parent, base_shadow=base,
                    shadow={"id": rec.id, "created": rec.created, "description": rec.description},
                    image={"name": os.path.basename(d.path), "format": d.format, "subtype": d.subtype,
                           "uuid": None if d.uuid is None else str(d.uuid)},
                    virtual_size=d.size, chunk_size=chunk, level=level, created=_now())
    if parent is None:
        pieces = full_pieces(view, chunk)
    else:
        pieces = changed_pieces(d.diff(base, sid), chunk, d.size)
    writer = BackupWriter(out, header, force=force)
    try:
        read = store(view, pieces, writer, threads=threads, level=level, chunk=chunk, progress=progress)
        stored = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return BackupResult(path=out, backup_id=header.backup_id, kind=header.kind, parent=parent, shadow=sid,
                        base_shadow=base, virtual_size=d.size, bytes_read=read, bytes_stored=stored,
                        changed_bytes=bytes_covered(pieces), entries=writer.entries,
                        seconds=round(time.perf_counter() - t0, 3))
