"""Consistency check and repair of images (``vdisk check [--repair]``).

The core's open refuses many corruptions, so each format driver's ``check`` parses its files
itself, leniently, and reports every problem it finds (formats/*/check.py, in the vocabulary of
formats/findings.py). Exit codes follow qemu-img: 0 clean, 1 the check could not run,
2 corruption found, 3 only leaks found. ``repair=True`` fixes what is safely fixable inside one
journaled transaction and reports what it did; the exit code then describes the repaired image.
Tables are bounded by the format and the file (vdisk.limits) before they are read, and examined
with numpy, a chunk at a time where the check allows it.
"""
from __future__ import annotations

import os
from typing import Sequence

from vdisk import journal
from vdisk.errors import VDiskError
from vdisk.io import ImageFile
from vdisk.formats import registry
from vdisk.formats.findings import (CHECK_CHUNK, EXAMPLES, EXIT_CLEAN, EXIT_CORRUPT, EXIT_FAILED, EXIT_LEAKS,
                                    CheckReport, Finding, Findings, RepairPlan)

__all__ = ["check", "CheckReport", "Finding", "Findings", "RepairPlan", "EXAMPLES", "CHECK_CHUNK",
           "EXIT_CLEAN", "EXIT_FAILED", "EXIT_CORRUPT", "EXIT_LEAKS"]


def _check_parent_identity(path: str, report: CheckReport) -> None:
    """Find the parent the way the core does (locators / UUID scan) and verify its identity."""
    from vdisk.chain import find_parent
    from vdisk.probe import open_layer
    try:
        layer = open_layer(path, lock=False)
    except VDiskError:
        return                                   # the structural findings already explain why
    try:
        parent, _ = find_parent(layer, parent_search=report._search, vbox_registry=report._registry)
        parent.close()
    except VDiskError as exc:
        report.findings.append(Finding("parent", "corruption", f"parent: {exc}"))
    finally:
        layer.close()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _analyse(path: str, report: CheckReport, plan: RepairPlan) -> None:
    from vdisk.probe import probe_file
    try:
        file = ImageFile(path, lock=False)
    except VDiskError as exc:
        report.error = str(exc)
        return
    try:
        try:
            kind = probe_file(file)
        except VDiskError as exc:                # a damaged VHD or VDI, not taken for raw
            report.error = str(exc)
            return
        report.format = kind
        registry.driver(kind).check(file, report, plan)
    finally:
        file.close()


def check(path: str, repair: bool = False, *, parent_search: Sequence[str] = (),
          vbox_registry=None) -> CheckReport:
    """Check one image file (and its link to its parent); with *repair*, fix what is safely fixable."""
    path = os.fspath(path)
    report = _new_report(path, parent_search, vbox_registry)
    if not os.path.exists(path):
        report.error = f"{path}: no such file"
        return report
    if os.path.isdir(path):
        report.error = f"{path}: is a directory"
        return report
    if journal.pending(path):
        if not repair:
            report.findings.append(Finding("journal-pending", "corruption",
                                           f"an interrupted in-place operation is pending; run 'vdisk recover {path}'",
                                           fixable=True))
            return report
        try:
            report.repairs.append(str(journal.recover(path)))
        except VDiskError as exc:
            report.error = str(exc)
            return report
    plan = RepairPlan()
    _analyse(path, report, plan)
    if plan.check_parent:
        _check_parent_identity(path, report)
    if not repair or report.error is not None or not any(f.fixable for f in report.findings):
        return report
    before = report
    try:
        done = _repair(path, before, plan)
    except VDiskError as exc:
        before.error = f"repair failed: {exc}"
        return before
    after = _new_report(path, parent_search, vbox_registry)
    after.repairs = before.repairs + done
    after.repaired_kinds = sorted({f.kind for f in before.findings if f.fixable})
    plan = RepairPlan()
    _analyse(path, after, plan)
    if plan.check_parent:
        _check_parent_identity(path, after)
    return after


def _new_report(path, parent_search, vbox_registry) -> CheckReport:
    report = CheckReport(path)
    report._search = tuple(parent_search)
    report._registry = vbox_registry
    return report


def _repair(path: str, report: CheckReport, plan: RepairPlan) -> list[str]:
    own = registry.driver(report.format).repair(path, {f.kind for f in report.findings if f.fixable})
    if own is not None:
        return own
    file = ImageFile(path, writable=True)
    try:
        if plan.final_size is not None and plan.final_size > file.size() + len(plan.trailer or b""):
            # A repair cuts or puts back a trailer (a VHD footer); more growth means a layout
            # claim the file does not back. Refuse before anything is written.
            raise VDiskError(f"{path}: the repair would grow the file from {file.size()} to {plan.final_size} bytes")
        with journal.Transaction(file, "repair") as tx:
            if plan.writes:
                tx.write_many(plan.writes)
            redo = []
            final = plan.final_size
            if plan.trailer is not None and final is not None:
                at = plan.trailer_at if plan.trailer_at is not None else final - len(plan.trailer)
                redo.append((at, plan.trailer))
            tx.commit(final_size=final, redo=redo)
    finally:
        file.close()
    kinds = {f.kind for f in report.findings if f.fixable}
    messages = registry.driver(report.format).repair_messages
    return [messages[kind] for kind in sorted(kinds) if kind in messages]
