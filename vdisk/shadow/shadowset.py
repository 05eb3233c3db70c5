"""The shadows of one image: catalog, stores, limits, validity and the copy-on-write rule.

Shadows S_1 (oldest) .. S_n (newest) each own a store {block -> preserved content}
(BLOCK-BACKENDS.md §4.2):

* a live change to block b copies b's current content into store_n first, unless store_n has it;
* S_i reads b from the first of store_i .. store_n holding it, else from the live image;
* deleting S_i moves every block of store_i that store_{i-1} lacks into store_{i-1}, then drops
  store_i (for the oldest shadow: just drops it). Each move is idempotent (it adds to store_{i-1}
  exactly what S_{i-1} already reads through store_i), so an interruption at any point leaves every
  view intact and the deletion can simply be repeated.
"""
from __future__ import annotations

import os
import threading
import uuid as uuidlib
from dataclasses import dataclass
from typing import Callable, Optional

from vdisk.errors import ReadOnlyError, VDiskError
from vdisk.io import sync_dir
from . import catalog as cat
from .store import ShadowStore

MOVE_BATCH = 64          # blocks read per append while moving a deleted shadow's blocks


@dataclass(frozen=True)
class ShadowInfo:
    """What `vdisk shadow list` reports about one shadow."""
    id: str
    created: str
    description: str
    valid: bool
    invalid_reason: Optional[str]
    blocks: int                 # preserved blocks in its own store
    store_bytes: int            # bytes its store occupies in the diff area

    def to_dict(self) -> dict:
        return {"id": self.id, "created": self.created, "description": self.description,
                "valid": self.valid, "invalid_reason": self.invalid_reason,
                "preserved_blocks": self.blocks, "store_bytes": self.store_bytes}


class ShadowSet:
    """Everything persistent about an image's shadows; all mutation happens under :attr:`lock`."""

    def __init__(self, image_path: str, writable: bool, fingerprint_now: Callable[[], dict]):
        self.image_path = image_path
        self.folder = cat.store_dir(image_path)
        self.writable = writable
        self.lock = threading.RLock()
        self.stores: dict[str, ShadowStore] = {}        # valid shadows only
        self.notes: list[str] = []
        self._session_open = False
        #: (newest store's index, block size) while re-writes of preserved blocks need no work
        self.fast: Optional[tuple] = None
        loaded = cat.load(self.folder) if os.path.isdir(self.folder) else None
        self.catalog = loaded or cat.Catalog()
        self._persisted = loaded is not None
        try:
            self._check_fingerprint(fingerprint_now)
            for rec in self.catalog.shadows:
                if rec.valid:
                    self._open_store(rec)
            if writable and self._persisted:
                self._remove_orphans()
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _open_store(self, rec: cat.ShadowRecord) -> None:
        path = os.path.join(self.folder, rec.store)
        try:
            self.stores[rec.id] = ShadowStore.open(path, self.catalog.block_size, rec.uuid,
                                                   synced=rec.synced, writable=self.writable)
        except VDiskError as exc:
            self._invalidate([rec], f"its diff-area store is unusable: {exc}")

    def _check_fingerprint(self, fingerprint_now: Callable[[], dict]) -> None:
        c = self.catalog
        if not any(r.valid for r in c.shadows):
            return
        if c.session is not None:
            # A vdisk writer changed the image and did not close (it crashed, or it is still
            # running when we only read): its copy-on-write records are durable, so trust them.
            if self.writable:
                self.notes.append("the previous vdisk write session did not close cleanly; shadows were kept")
            return
        now = fingerprint_now()
        if c.fingerprint is not None and now != c.fingerprint:
            why = cat.describe_change(c.fingerprint, now)
            self._invalidate([r for r in c.shadows if r.valid],
                             f"the image was changed outside vdisk ({why}); detected {cat.utc_now()}")
            if self.writable:
                c.fingerprint = now
                self._save()

    def _invalidate(self, records: list, reason: str) -> None:
        for rec in records:
            rec.valid = False
            rec.invalid_reason = reason
            store = self.stores.pop(rec.id, None)
            if store is not None:
                store.close()
        self._refresh_fast()
        if records:
            self.notes.append(f"{len(records)} shadow(s) are invalid: {reason}")

    def _remove_orphans(self) -> None:
        """Drop what an interrupted create or delete left behind (files no catalog entry names)."""
        known = {r.store for r in self.catalog.shadows} | {cat.CATALOG}
        for name in os.listdir(self.folder):
            if name not in known and (name.endswith(".store") or name == cat.CATALOG + ".tmp"):
                os.unlink(os.path.join(self.folder, name))

    def _save(self) -> None:
        for rec in self.catalog.shadows:
            store = self.stores.get(rec.id)
            if store is not None:
                rec.synced = store.end       # every append was fsync'd before it returned
        if not os.path.isdir(self.folder):
            os.mkdir(self.folder)
            sync_dir(os.path.dirname(os.path.abspath(self.folder)))
        cat.save(self.folder, self.catalog)
        self._persisted = True

    # -- queries -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.catalog.block_size

    def infos(self) -> list[ShadowInfo]:
        out = []
        for rec in self.catalog.shadows:
            store = self.stores.get(rec.id)
            if store is not None:
                blocks, nbytes = len(store), store.nbytes
            else:
                blocks, nbytes = 0, self._file_bytes(rec)
            out.append(ShadowInfo(rec.id, rec.created, rec.description, rec.valid, rec.invalid_reason,
                                  blocks, nbytes))
        return out

    def _file_bytes(self, rec: cat.ShadowRecord) -> int:
        try:
            return os.stat(os.path.join(self.folder, rec.store)).st_size
        except OSError:
            return 0

    def diff_area_bytes(self) -> int:
        return sum(self.stores[r.id].nbytes if r.id in self.stores else self._file_bytes(r)
                   for r in self.catalog.shadows)

    def resolve_id(self, ident: str) -> cat.ShadowRecord:
        """A shadow by its id or an unambiguous prefix of it."""
        ident = str(ident).strip().strip("{}").lower()
        hits = [r for r in self.catalog.shadows if r.id == ident]
        if not hits and ident:
            hits = [r for r in self.catalog.shadows if r.id.startswith(ident)]
        if not hits:
            raise VDiskError(f"{self.image_path}: no shadow {ident!r}")
        if len(hits) > 1:
            raise VDiskError(f"{self.image_path}: shadow id {ident!r} is ambiguous")
        return hits[0]

    def chain_from(self, shadow_id: str) -> list[ShadowStore]:
        """Stores a view of *shadow_id* consults, in order: its own, then every newer one."""
        with self.lock:
            ids = [r.id for r in self.catalog.shadows]
            if shadow_id not in ids:
                raise VDiskError(f"{self.image_path}: shadow {shadow_id} was deleted")
            rec = self.catalog.shadows[ids.index(shadow_id)]
            if not rec.valid:
                raise VDiskError(f"{self.image_path}: shadow {shadow_id} is invalid: {rec.invalid_reason}")
            return [self.stores[i] for i in ids[ids.index(shadow_id):] if i in self.stores]

    def _refresh_fast(self) -> None:
        """Recompute :attr:`fast` after anything that changes the newest store or the session."""
        store = self.newest_store()
        self.fast = (store.entries, self.catalog.block_size) \
            if store is not None and self._session_open and self.writable else None

    def newest_store(self) -> Optional[ShadowStore]:
        recs = self.catalog.shadows
        if recs and recs[-1].valid:
            return self.stores.get(recs[-1].id)
        return None

    # -- changes -------------------------------------------------------------------------------
    def _need_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{self.image_path}: opened read-only; shadows cannot be changed")

    @property
    def session_open(self) -> bool:
        return self._session_open

    def begin_session(self) -> None:
        """Before the first live change of a session: mark that a vdisk writer is at work."""
        if not self._session_open and self.newest_store() is not None:
            self.catalog.session = {"pid": os.getpid(), "started": cat.utc_now()}
            self._save()
            self._session_open = True
            self._refresh_fast()

    def end_session(self, fingerprint: dict) -> None:
        """After the image is flushed and closed: remember what it looks like now."""
        if self._persisted and self.catalog.shadows:
            self.catalog.fingerprint = fingerprint
            self.catalog.session = None
            self._save()
        self._session_open = False
        self._refresh_fast()

    def create(self, description: str, fingerprint: dict) -> ShadowInfo:
        """Append a new, empty store; the live image must have been flushed by the caller."""
        self._need_writable()
        with self.lock:
            while len(self.catalog.shadows) >= self.catalog.max_shadows:
                self.delete(self.catalog.shadows[0].id)
            if not os.path.isdir(self.folder):
                self._save()
            sid = str(uuidlib.uuid4())
            rec = cat.ShadowRecord(id=sid, created=cat.utc_now(), description=description, store=f"{sid}.store")
            store = ShadowStore.create(os.path.join(self.folder, rec.store), self.block_size, rec.uuid)
            self.stores[sid] = store
            self.catalog.shadows.append(rec)
            self.catalog.fingerprint = fingerprint
            self.catalog.session = {"pid": os.getpid(), "started": cat.utc_now()}
            self._session_open = True
            try:
                self._save()
            except BaseException:
                self.catalog.shadows.pop()
                self.stores.pop(sid).close()
                raise
            finally:
                self._refresh_fast()
            return self.infos()[-1]

    def delete(self, shadow_id: str) -> None:
        """Delete one shadow, keeping every other shadow's view intact."""
        self._need_writable()
        with self.lock:
            ids = [r.id for r in self.catalog.shadows]
            i = ids.index(shadow_id)
            rec = self.catalog.shadows[i]
            store = self.stores.get(shadow_id)
            prev = self.catalog.shadows[i - 1] if i > 0 else None
            if store is not None and prev is not None and prev.id in self.stores:
                self._move(store, self.stores[prev.id])
            self.catalog.shadows.pop(i)
            try:
                self._save()
            except BaseException:
                self.catalog.shadows.insert(i, rec)
                raise
            finally:
                self._refresh_fast()
            self.stores.pop(shadow_id, None)
            if store is not None:
                store.unlink()
            else:
                try:
                    os.unlink(os.path.join(self.folder, rec.store))
                except FileNotFoundError:
                    pass

    def _move(self, src: ShadowStore, dst: ShadowStore) -> None:
        todo = sorted(b for b in src.blocks() if b not in dst)
        for k in range(0, len(todo), MOVE_BATCH):
            items = []
            for b in todo[k:k + MOVE_BATCH]:
                e = src.entries[b]
                items.append((b, e.length, None if e.kind != 1 else src.read_block(b)))
            dst.append(items)

    def set_limits(self, max_shadows: Optional[int] = None, max_diff_bytes: Optional[int] = -1) -> None:
        """Change the limits (max_diff_bytes None = unbounded; -1 = leave as is); may delete oldest."""
        self._need_writable()
        with self.lock:
            if max_shadows is not None:
                if not 1 <= max_shadows <= cat.HARD_MAX_SHADOWS:
                    raise VDiskError(f"the shadow limit must be between 1 and {cat.HARD_MAX_SHADOWS}")
                self.catalog.max_shadows = max_shadows
                while len(self.catalog.shadows) > max_shadows:
                    self.delete(self.catalog.shadows[0].id)
            if max_diff_bytes != -1:
                if max_diff_bytes is not None and max_diff_bytes < 0:
                    raise VDiskError("the diff-area maximum must not be negative")
                self.catalog.max_diff_bytes = max_diff_bytes
                self.make_room(0)
            self._save()

    def make_room(self, extra: int) -> None:
        """Delete oldest shadows until *extra* more bytes fit under the diff-area maximum."""
        limit = self.catalog.max_diff_bytes
        if limit is None:
            return
        while self.catalog.shadows and self.diff_area_bytes() + extra > limit:
            self.delete(self.catalog.shadows[0].id)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        self.fast = None
