"""What a check finds and what a repair would write: the vocabulary the format drivers' checks
(``formats/*/check.py``) and ``vdisk check`` share.

Findings are summarised by kind: ``report.findings`` holds one :class:`Finding` per kind, with
how many times it was found and the first :data:`EXAMPLES` messages, so a crafted table of a
million bad entries costs ten messages, not a million. A check adds a finding with
``report.findings.append(Finding(...))`` (once per problem, or once per batch with ``count``
and ``examples`` from vectorized code); the grouping happens there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from vdisk import limits
from vdisk.io import ImageFile

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3
#: Messages kept per kind of finding; the others are only counted.
EXAMPLES = 10
#: Table entries examined at a time (the temporaries of a check stay at a few MiB).
CHECK_CHUNK = 1 << 18


@dataclass
class Finding:
    """A kind of problem: *kind* is a stable identifier, *severity* 'corruption' or 'leak',
    *count* how many times it was found, *examples* the first instances (at most EXAMPLES).
    A single problem's *message* is its only example; a batch found at once (:meth:`many`)
    has a *message* about all of them and short examples."""
    kind: str
    severity: str
    message: str
    fixable: bool = False
    count: int = 1
    examples: list = field(default_factory=list)

    def __post_init__(self):
        self.examples = list(self.examples[:EXAMPLES]) if self.examples else [self.message]

    @classmethod
    def many(cls, kind: str, severity: str, count: int, message: str, examples: Sequence[str],
             fixable: bool = False) -> "Finding":
        """*count* problems of one kind found at once, e.g. by numpy over a table."""
        return cls(kind, severity, message, fixable, count, list(examples))

    def text(self) -> str:
        """One line: a single problem's message, or the kind, its count and the first examples."""
        if self.count == 1 and self.examples == [self.message]:
            return self.message
        about = "" if self.examples[:1] == [self.message] else f", {self.message}"
        which = f"first {len(self.examples)}: " if len(self.examples) < self.count else ""
        return f"{self.kind}: {self.count} found{about} ({which}{'; '.join(self.examples)})"


class Findings(list):
    """A report's findings, one :class:`Finding` per kind: appending a kind already present adds
    to its count and, while there is room, to its examples."""

    def append(self, finding: Finding) -> None:
        for known in self:
            if known.kind == finding.kind:
                known.count += finding.count
                known.examples.extend(finding.examples[:EXAMPLES - len(known.examples)])
                known.fixable = known.fixable or finding.fixable
                return
        super().append(finding)

    def extend(self, findings) -> None:
        for finding in findings:
            self.append(finding)


def examples_of(describe, *columns) -> list[str]:
    """Messages for the first EXAMPLES rows of parallel numpy columns."""
    return [describe(*row) for row in zip(*(c[:EXAMPLES].tolist() for c in columns))]


def table_chunks(file: ImageFile, offset: int, entries: int, dtype: str):
    """(first index, int64 piece) of a u32 table, CHECK_CHUNK entries at a time."""
    for first, chunk in limits.iter_table(file.pread, offset, entries, dtype):
        for i in range(0, len(chunk), CHECK_CHUNK):
            yield first + i, chunk[i:i + CHECK_CHUNK]


def first_rows(mask: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """The first EXAMPLES rows of *columns* where *mask* is set (without copying the rest)."""
    rows = np.flatnonzero(mask)[:EXAMPLES]
    return [c[rows] for c in columns]


@dataclass
class CheckReport:
    path: str
    format: Optional[str] = None
    subtype: Optional[str] = None
    findings: Findings = field(default_factory=Findings)   # one entry per kind (see Finding)
    repairs: list = field(default_factory=list)     # what --repair did, one sentence each
    repaired_kinds: list = field(default_factory=list)
    error: Optional[str] = None                     # why the check could not run
    leaked_bytes: int = 0
    allocated_blocks: int = 0

    @property
    def corruptions(self) -> list:
        return [f for f in self.findings if f.severity == "corruption"]

    @property
    def leaks(self) -> list:
        return [f for f in self.findings if f.severity == "leak"]

    @property
    def clean(self) -> bool:
        return self.error is None and not self.findings

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_FAILED
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["findings"] = [asdict(f) for f in self.findings]
        d["exit_code"] = self.exit_code
        d["clean"] = self.clean
        return d

    def summary(self) -> str:
        lines = [f"{f.severity}: {f.text()}" for f in self.findings]
        lines += [f"repaired: {r}" for r in self.repairs]
        if self.error:
            lines.append(f"check failed: {self.error}")
        elif not self.findings:
            lines.append(f"{self.path}: no errors found ({self.format} {self.subtype}, "
                         f"{self.allocated_blocks} allocated blocks)")
        else:
            corrupt, leaks = (sum(f.count for f in group) for group in (self.corruptions, self.leaks))
            lines.append(f"{self.path}: {corrupt} corruption(s), {leaks} leak(s)"
                         + (f", {self.leaked_bytes} bytes leaked" if self.leaked_bytes else ""))
        return "\n".join(lines)


class RepairPlan:
    """The writes that would repair what was found, and the file size afterwards."""

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []
        self.final_size: Optional[int] = None
        #: what must follow the data (a VHD footer), and where; None: at final_size - its length
        self.trailer: Optional[bytes] = None
        self.trailer_at: Optional[int] = None
        #: the structure is sound enough to look for the parent and verify its identity
        self.check_parent = False


