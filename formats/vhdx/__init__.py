"""Microsoft VHDX: fixed, dynamic and differencing images (spec digest VHDX.md).

The package holds all of vdisk's VHDX knowledge: ``structs`` (the on-disk declarations),
``crc32c``, ``headers``, ``log`` (replay: in place when writable, in memory when not),
``metadata``, ``open``, ``layer`` (reads, and writes through the log), ``create``, ``check`` and
the driver below, which is what the generic code talks to.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterable, Optional, Sequence
import uuid as uuidlib

from vdisk.errors import FormatError
from vdisk.io import ImageFile
from ..base import Layer
from ..driver import Driver
from ..maintenance import LinkPlan, ResizePlan
from .create import DEFAULT_BLOCK_SIZE, create_vhdx, new_file_size
from .open import is_vhdx, open_vhdx, peek_identity

__all__ = ["DRIVER", "is_vhdx", "open_vhdx", "peek_identity", "create_vhdx"]


class VhdxDriver(Driver):
    name = "vhdx"
    extensions = (".vhdx", ".avhdx")
    default_block_size = DEFAULT_BLOCK_SIZE
    links_by_path = True
    rewrites_links = True
    empties_children = True
    probe_rank = 0                      # 'vhdxfile' at offset 0
    create_options = ("logical_sector_size", "physical_sector_size")

    def probe(self, head: bytes, tail: bytes, size: int) -> int:
        return 100 if is_vhdx(head) else 0

    def refusal(self, path: str, head: bytes, size: int, signs: Sequence[str], hint: str) -> Exception:
        return FormatError(path, "file type identifier", "signature", 0,
                           f"{' and '.join(signs)}, but the file does not start with 'vhdxfile' "
                           f"({bytes(head[:8])!r}): a damaged VHDX, {hint}")

    def open(self, file: ImageFile, *, writable: bool, size_policy: str = "current") -> Layer:
        return open_vhdx(file, strict=writable)

    def create(self, file: ImageFile, size: int, subtype: str, *, block_size: Optional[int],
               size_policy: str, parent: Optional[Layer], parent_path: Optional[str], **options) -> Layer:
        return create_vhdx(file, size, subtype, block_size=block_size,
                           logical_sector_size=options.get("logical_sector_size") or 512,
                           physical_sector_size=options.get("physical_sector_size"),
                           parent=parent, parent_path=parent_path)

    def new_file_size(self, size: int, subtype: str, block_size: Optional[int], blocks_stored: int) -> int:
        return new_file_size(size, subtype, block_size, blocks_stored)

    # -- parents ------------------------------------------------------------------------------
    def identity(self, layer: Layer) -> bytes:
        return layer.headers.current["data_write_guid"]

    def peek_identity(self, path: str) -> Optional[bytes]:
        return peek_identity(path)

    def parent_uuid(self, child: Layer) -> Optional[uuidlib.UUID]:
        return None if child.parent_id is None else uuidlib.UUID(bytes_le=child.parent_id)

    def matches_parent(self, child: Layer, parent: Layer) -> bool:
        """The parent is the file whose DataWriteGuid the child's parent_linkage (or a non-zero
        parent_linkage2) names (VHDX.md A7)."""
        from .metadata import linkage_bytes
        ident = self.identity(parent)
        if ident == child.parent_id:
            return True
        alt = linkage_bytes(child.md.locator.get("parent_linkage2"))
        return alt is not None and alt != bytes(16) and alt == ident

    def parent_candidates(self, child: Layer, search: Sequence[str],
                          registries: Sequence[str]) -> Iterable[tuple[str, str]]:
        """The locator's paths first; then, as Hyper-V files are often renamed, every .vhdx and
        .avhdx beside the child (and in the search folders) whose DataWriteGuid is the linkage."""
        yield from self.hint_candidates(child, search)
        here = os.path.dirname(os.path.abspath(child.path))
        for d in [here, *search]:
            for pattern in ("*.vhdx", "*.avhdx"):
                for p in sorted(glob.glob(os.path.join(glob.escape(d), pattern))):
                    if os.path.abspath(p) != os.path.abspath(child.path) and \
                            self.cached_peek_identity(p) == child.parent_id:
                        yield p, f"DataWriteGuid scan of {d}"

    def compact_own(self, layer: Layer, *, dry_run: bool, free, progress=None,
                    below_zero: Optional[Callable[[int], bool]] = None) -> Optional[tuple[int, int, int, int]]:
        """Through the file's own log (formats/vhdx/compact.py)."""
        from .compact import compact
        return compact(layer, dry_run=dry_run, free=free, progress=progress, below_zero=below_zero)

    def empty_child(self, layer: Layer, parent_path: Optional[str], parent: Optional[Layer]) -> None:
        """Through the file's own log (formats/vhdx/compact.py)."""
        from .compact import empty_child
        empty_child(layer, parent_path, parent)

    def resize_plan(self, layer: Layer, new_size: int) -> ResizePlan:
        """Through the file's own log (formats/vhdx/resize.py): nothing is left to journal."""
        from .resize import resize
        return resize(layer, new_size)

    def link_writes(self, layer: Layer, parent_path: str, parent: Layer, *, apply: bool,
                    end: Optional[int] = None) -> LinkPlan:
        """Through the file's own log (formats/vhdx/link.py): the plan carries no writes for the
        caller's journal, only what changed."""
        from .link import link_writes
        return link_writes(layer, parent_path, parent, apply)

    def link_state(self, layer: Layer) -> object:
        return bytes(layer.headers.current["data_write_guid"])

    def restore_link_state(self, layer: Layer, state: object) -> None:
        """Writes give the file a new DataWriteGuid (VHDX.md A5.2), which its children name as
        their parent: an operation that keeps what the image shows (rebase, commit) puts it back."""
        if layer.headers.current["data_write_guid"] != state:
            layer.headers.update(layer.raw, data_write_guid=state)
            layer.uuid = uuidlib.UUID(bytes_le=state)

    # -- check --------------------------------------------------------------------------------
    def check(self, file: ImageFile, report, plan) -> None:
        from ..findings import Finding
        from .check import check_vhdx
        result = check_vhdx(file)
        report.subtype = result.subtype
        report.allocated_blocks = result.allocated_blocks
        report.leaked_bytes = result.leaked_bytes
        for f in result.findings:
            report.findings.append(Finding(f.kind, f.severity, f.message, fixable=f.fixable))
        plan.check_parent = result.subtype == "differencing" and not result.findings

    def repair(self, path: str, kinds: set) -> Optional[list]:
        """VHDX repairs its own way: a read-write open replays the log, a header update rewrites
        the damaged slot, region table copy 2 replaces a damaged copy 1 (formats/vhdx/check.py)."""
        from .check import repair_vhdx
        return repair_vhdx(path, kinds)


DRIVER = VhdxDriver()
