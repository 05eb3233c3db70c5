"""The shadow catalog (``IMAGE.vdisk-shadows/catalog.json``) and the live image's fingerprint.

The catalog is small JSON rewritten whole on every change: written to ``catalog.json.tmp``,
fsync'd, renamed over ``catalog.json``, then the folder is fsync'd. A reader therefore sees either
the old or the new catalog, never a mix.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Optional

from vdisk.errors import VDiskError
from vdisk.io import replace_file
from vdisk.sidecars import SHADOWS

SUFFIX = SHADOWS
CATALOG = "catalog.json"
FORMAT = "vdisk-shadows"
VERSION = 1
DEFAULT_BLOCK_SIZE = 64 << 10
DEFAULT_MAX_SHADOWS = 64
HARD_MAX_SHADOWS = 512          # VSS's MaxShadowCopies ceiling


def store_dir(image_path: str) -> str:
    """The diff-area folder that belongs to an image."""
    return os.fspath(image_path) + SUFFIX


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class ShadowRecord:
    """One shadow as the catalog stores it (oldest first in the catalog)."""
    id: str
    created: str
    description: str = ""
    store: str = ""
    synced: int = 0                 # store bytes known to be on stable storage
    valid: bool = True
    invalid_reason: Optional[str] = None

    @property
    def uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(self.id)


@dataclass
class Catalog:
    block_size: int = DEFAULT_BLOCK_SIZE
    max_shadows: int = DEFAULT_MAX_SHADOWS
    max_diff_bytes: Optional[int] = None
    fingerprint: Optional[dict] = None
    session: Optional[dict] = None   # set while a vdisk writer has changed the image and not closed
    shadows: list[ShadowRecord] = field(default_factory=list)

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Catalog":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise ValueError("not a vdisk shadow catalog (version 1)")
            shadows = [ShadowRecord(**s) for s in d["shadows"]]
            cat = cls(block_size=int(d["block_size"]), max_shadows=int(d["max_shadows"]),
                      max_diff_bytes=d.get("max_diff_bytes"),
                      fingerprint=d.get("fingerprint"), session=d.get("session"), shadows=shadows)
        except (ValueError, KeyError, TypeError) as exc:
            raise VDiskError(f"{where}: damaged shadow catalog: {exc}") from None
        if cat.block_size < 512 or cat.block_size & (cat.block_size - 1):
            raise VDiskError(f"{where}: damaged shadow catalog: block_size {cat.block_size}")
        return cat


def load(folder: str) -> Optional[Catalog]:
    path = os.path.join(folder, CATALOG)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise VDiskError(f"{path}: cannot read shadow catalog: {exc.strerror}") from None
    return Catalog.from_json(text, path)


def save(folder: str, catalog: Catalog) -> None:
    """Atomically replace the catalog: write new, fsync, rename, fsync the folder."""
    replace_file(os.path.join(folder, CATALOG), catalog.to_json().encode())


def fingerprint(disk, *, reopen: bool = False) -> dict:
    """What the image chain looks like now: every file's size and mtime, the top block map's hash.

    vdisk records this whenever a write session ends; a mismatch on the next open means something
    else changed the image and the shadows no longer describe it. With *reopen* the top image is
    opened afresh (after the disk was closed), so the block map is exactly what the next open will
    compute — for raw and fixed images it is derived from the file's holes, not stored.
    """
    files = []
    for layer in disk.layers:
        st = os.stat(layer.path)
        files.append({"path": os.path.basename(layer.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    top = disk.layers[0]
    if reopen:
        from vdisk.probe import open_layer
        top = open_layer(top.path, fmt=top.format, lock=False)
    try:
        h = hashlib.sha256(top.block_map.tobytes())
        header = getattr(top, "header", None)
        if isinstance(header, dict) and "uuid_modify" in header:
            h.update(bytes(header["uuid_modify"]))
        uuid = str(top.uuid) if top.uuid else None
    finally:
        if reopen:
            top.close()
    return {"files": files, "top_uuid": uuid, "top_map_sha256": h.hexdigest()}


def describe_change(old: dict, new: dict) -> str:
    """A short human explanation of why two fingerprints differ."""
    of, nf = old.get("files", []), new.get("files", [])
    if old.get("top_uuid") != new.get("top_uuid"):
        return "the image file was replaced (its UUID changed)"
    if [f["path"] for f in of] != [f["path"] for f in nf]:
        return "the image chain changed"
    for a, b in zip(of, nf):
        if a["size"] != b["size"]:
            return f"{b['path']} changed size ({a['size']} -> {b['size']} bytes)"
        if a["mtime_ns"] != b["mtime_ns"]:
            return f"{b['path']} was modified"
    return "the image's block map changed"
