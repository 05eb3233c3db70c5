"""What a format driver answers for the generic code, in the spirit of QEMU's BlockDriver.

One :class:`Driver` per format (``formats/raw.py``, ``formats/vhd/``, ``formats/vdi/``) holds
everything the engine, the chain, the operations and the CLI need to know about that format:
how to recognise, open and create its files, how a child names its parent and where to look for
it, and (through the maintenance methods) its metadata layout, table encoding, link and resize
writes and its own check findings. Generic code asks ``driver_for(layer)`` — never a format name.
"""
from __future__ import annotations

import importlib
import os
import uuid as uuidlib
from typing import Callable, Iterable, Optional, Sequence, TYPE_CHECKING

from vdisk.errors import UnsupportedError, VDiskError

if TYPE_CHECKING:
    from vdisk.io import ImageFile
    from .base import Layer
    from .findings import CheckReport, RepairPlan
    from .maintenance import LinkPlan, ResizePlan, SparseLayout


#: (format, device, inode, size, mtime) -> identity of headers already peeked at; bounded.
_PEEKED: dict[tuple, Optional[bytes]] = {}
_PEEKED_MAX = 4096


class Driver:
    """Base class: the answers a format without that feature gives."""

    #: the format's name as users type it (``-f``, ``format=``)
    name: str = ""
    #: file-name endings that mean this format (lower case, the first is the canonical one)
    extensions: tuple[str, ...] = ()
    #: subtypes `create` and `convert` can make
    subtypes: tuple[str, ...] = ("fixed", "dynamic")
    #: the allocation unit of a new dynamic image
    default_block_size: Optional[int] = None
    #: whether a differencing image of this format can be made and followed
    has_parents: bool = True
    #: a child names its parent by path too (VHD locators): moving it means rewriting the link
    links_by_path: bool = False
    #: vdisk can rewrite a child's parent link in place (relink, rebase, commit into an ancestor)
    rewrites_links: bool = False
    #: vdisk can rearrange this format's blocks in place through a SparseLayout (compact, commit)
    rearranges_blocks: bool = False
    #: the driver empties a committed child by its own means (:meth:`empty_child`)
    empties_children: bool = False
    #: virtual sizes are whole multiples of this many bytes
    size_granule: int = 512
    #: who is asked first when probing (ties, and which damaged format a remnant means): a
    #: signature at a fixed offset in the head outranks a trailer that guest data could mimic
    probe_rank: int = 5

    # -- recognition --------------------------------------------------------------------------
    def probe(self, head: bytes, tail: bytes, size: int) -> int:
        """How sure this driver is the file is its format (0: not at all, 100: its signature)."""
        return 0

    def remnant(self, head: bytes) -> Optional[str]:
        """A sign in the first KiB that the file was this format, damaged; None if none."""
        return None

    def refusal(self, path: str, head: bytes, size: int, signs: Sequence[str], hint: str) -> Exception:
        """The FormatError for a file that shows *signs* of this format but is not a valid one."""
        from vdisk.errors import FormatError
        return FormatError(path, "file", "signature", 0,
                           f"{' and '.join(signs)}, but no {self.name} signature: a damaged {self.name.upper()}, {hint}")

    def named(self, path: str) -> bool:
        return os.fspath(path).lower().endswith(self.extensions) if self.extensions else False

    # -- files --------------------------------------------------------------------------------
    def open(self, file: "ImageFile", *, writable: bool, size_policy: str = "current") -> "Layer":
        raise UnsupportedError(f"{file.path}: vdisk cannot open {self.name} images")

    #: keyword options of `vdisk.create` only this format takes (e.g. VHDX sector sizes)
    create_options: tuple[str, ...] = ()

    def create(self, file: "ImageFile", size: int, subtype: str, *, block_size: Optional[int],
               size_policy: str, parent: Optional["Layer"], parent_path: Optional[str],
               **options) -> "Layer":
        raise UnsupportedError(f"{file.path}: vdisk cannot create {self.name} images")

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        """Bytes of the file `create`/`convert` would write, with *blocks_stored* blocks of data."""
        return size

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: "Layer") -> bytes:
        """What a child of *layer* stores to name it as its parent."""
        return layer.uuid.bytes if layer.uuid is not None else b""

    def identity_from(self, head: bytes, tail: bytes) -> Optional[bytes]:
        """:meth:`identity` from a file's first and last 512 bytes alone, or None if they do not
        hold one of this format's."""
        return None

    def peek_identity(self, path: str) -> Optional[bytes]:
        """:meth:`identity` of the file at *path* from its first and last bytes only, or None."""
        from vdisk.io import ImageFile
        try:
            f = ImageFile(path, lock=False)
        except (OSError, ValueError, VDiskError):
            return None
        try:
            size = f.size()
            head = f.pread(512, 0)
            tail = f.pread(512, max(0, size - 512))
        except (OSError, VDiskError):
            return None
        finally:
            f.close()
        return self.identity_from(head, tail)

    def cached_peek_identity(self, path: str) -> Optional[bytes]:
        """:meth:`peek_identity`, remembered per (device, inode, size, mtime): a folder scan at
        every level of a deep chain reads each candidate's header once."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (self.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _PEEKED:
            if len(_PEEKED) >= _PEEKED_MAX:
                _PEEKED.clear()
            _PEEKED[key] = self.peek_identity(path)
        return _PEEKED[key]

    def parent_uuid(self, child: "Layer") -> Optional[uuidlib.UUID]:
        """The parent identity *child* records, as a UUID for messages and `info`."""
        return None if child.parent_id is None else uuidlib.UUID(bytes=child.parent_id)

    def parent_candidates(self, child: "Layer", search: Sequence[str],
                          registries: Sequence[str]) -> Iterable[tuple[str, str]]:
        """(path, how it was found) of each file that may be *child*'s parent, best first."""
        return ()

    def hint_candidates(self, child: "Layer", search: Sequence[str]) -> Iterable[tuple[str, str]]:
        """Candidates from the paths a child stores (Layer.parent_hints): relative ones (from
        the child's folder), then absolute ones, then the stored file name beside the child and
        in each search folder. What VHD and VHDX locators give."""
        here = os.path.dirname(os.path.abspath(child.path))
        names = []
        for hint in child.parent_hints:
            if hint.kind == "relative":
                yield os.path.normpath(os.path.join(here, hint.path)), f"relative locator '{hint.path}'"
            elif hint.kind == "absolute":
                yield hint.path, f"absolute locator '{hint.path}'"
            names.append(os.path.basename(hint.path))
        for hint in child.parent_hints:
            if hint.kind == "name":
                yield os.path.join(here, hint.path), "parent name beside the child"
        for d in search:
            for name in dict.fromkeys(names):
                yield os.path.join(d, name), f"search folder {d}"

    def matches_parent(self, child: "Layer", parent: "Layer") -> bool:
        """Whether *parent* has the identity *child* records for its parent."""
        return self.identity(parent) == child.parent_id

    def accept_parent(self, child: "Layer", parent: "Layer", allow_modified: bool) -> None:
        """Raise ParentError if *parent* (whose identity matched) must not be used under *child*."""

    # -- engine capabilities ------------------------------------------------------------------
    def copies_whole_blocks_up(self, layer: "Layer") -> bool:
        """A partial write to a block the child lacks must copy the whole block from the parent
        first (formats with neither a sector bitmap nor per-sector presence: VDI)."""
        return False

    # -- maintenance ---------------------------------------------------------------------------
    def sparse_layout(self, layer: "Layer") -> "SparseLayout":
        """The file layout compact/commit/resize rearrange; UnsupportedError where there is none."""
        raise UnsupportedError(f"{layer.path}: vdisk cannot rearrange the blocks of {layer.format} "
                               f"{layer.subtype} images in place yet")

    def compact_own(self, layer: "Layer", *, dry_run: bool, free, progress=None,
                    below_zero: Optional[Callable[[int], bool]] = None) -> Optional[tuple[int, int, int, int]]:
        """A format that compacts by its own means (not through a SparseLayout and the journal)
        does it here: (blocks given up, blocks moved, file size before, after). None: the
        generic way. *free*: blocks the guest's filesystems do not use, or None. *below_zero(b)*,
        for a child: whether its parents read zeros under block *b*."""
        return None

    def empty_child(self, layer: "Layer", parent_path: Optional[str], parent: Optional["Layer"]) -> None:
        """A format that empties a committed child by its own means (every block given up, the
        file cut, and, with *parent_path*, the link rewritten to *parent*) does it here."""
        raise UnsupportedError(f"{layer.path}: vdisk cannot empty a {layer.format} child in place")

    def resize_plan(self, layer: "Layer", new_size: int) -> "ResizePlan":
        """The writes that give *layer* the virtual size *new_size* (checked against the format's
        limits; shrinking only once the caller made sure nothing stored lies past the end)."""
        raise UnsupportedError(f"{layer.path}: vdisk cannot resize {layer.format} images")

    def link_writes(self, layer: "Layer", parent_path: str, parent: "Layer", *, apply: bool,
                    end: Optional[int] = None) -> "LinkPlan":
        """The writes that make differencing *layer* name *parent* (found at *parent_path*).
        *apply*: also update the open layer to match (for the journal to write). *end*: where
        the layer's data ends if not where the layer says (relocated link data goes there)."""
        raise UnsupportedError(f"{layer.path}: {layer.format} images have no parent link")

    def link_state(self, layer: "Layer") -> object:
        """What must survive writes to *layer* for its children's links to stay valid."""
        return None

    def restore_link_state(self, layer: "Layer", state: object) -> None:
        """Put back what :meth:`link_state` saved, before the layer's metadata is written."""

    #: the module with ``check(file, report, plan)`` and ``REPAIRS`` (what `check --repair` says
    #: it did, per kind of finding), loaded when asked for: opening an image needs neither
    check_module: Optional[str] = None

    @property
    def repair_messages(self) -> dict[str, str]:
        return importlib.import_module(self.check_module).REPAIRS if self.check_module else {}

    def check(self, file: "ImageFile", report: "CheckReport", plan: "RepairPlan") -> None:
        """Add every finding about *file* to *report*; what a repair would write to *plan*."""
        if self.check_module:
            importlib.import_module(self.check_module).check(file, report, plan)

    def repair(self, path: str, kinds: set) -> Optional[list]:
        """A format that repairs by its own means (not through a RepairPlan) does it here and
        says what it did; None: apply the plan the check made, in one journal transaction."""
        return None

    # -- info ---------------------------------------------------------------------------------
    def chs_size(self, layer: "Layer") -> Optional[int]:
        """C*H*S bytes when a format's geometry makes another size visible to some tools."""
        return None
