"""`vdisk check|compact|commit|resize|rebase|relink|recover`: in-place maintenance commands.

Each is a thin shell over the library call of the same name (vdisk.ops.check, vdisk.ops.compact, ...).
Every mutating command takes ``--verify``: the virtual content is hashed before and after where
the operation must not change it, and any difference fails loudly (exit 1).
``check`` exits 0 clean, 1 could not run, 2 corruption found, 3 only leaks found (qemu-img's
convention), after repair when ``--repair`` is given.
"""
from __future__ import annotations

from .common import add_progress_option, emit_json, parse_size, progress_for
from vdisk.errors import VDiskError

# Repairs that change what the guest reads (entries pointing at garbage are dropped).
CONTENT_REPAIRS = {"bat-range", "bat-overlap", "map-range", "map-overlap"}


def _search_option(p) -> None:
    p.add_argument("--parent-search", "--search", dest="search", metavar="DIR", action="append", default=[],
                   help="also look for parent images in DIR (repeatable)")


def _out(args, report) -> None:
    if args.json:
        emit_json(report.to_dict())
    else:
        print(report.summary())


# -- check ----------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    from vdisk.ops.check import check
    from vdisk.ops.digest import path_digest
    before = None
    if args.verify and args.repair:
        try:
            before = path_digest(args.image, parent_search=tuple(args.search))
        except VDiskError:
            before = None                      # unreadable before the repair: nothing to compare
    report = check(args.image, repair=args.repair, parent_search=tuple(args.search))
    _out(args, report)
    if before is not None and report.error is None and report.repairs:
        dropped = any(k in CONTENT_REPAIRS for k in getattr(report, "repaired_kinds", ()))
        after = path_digest(args.image, parent_search=tuple(args.search))
        if after != before and not dropped:
            raise VDiskError(f"{args.image}: VERIFY FAILED: the repair changed the virtual content")
    return report.exit_code


# -- compact --------------------------------------------------------------------------------------
def cmd_compact(args) -> int:
    from vdisk.ops.compact import compact
    if args.filesystem_aware:
        return _compact_fs(args)
    if args.force or args.punch:
        flag = "--force" if args.force else "--punch"
        raise VDiskError(f"{args.image}: {flag} applies only with --filesystem-aware")
    bar = progress_for(args, "compact")
    try:
        report = compact(args.image, dry_run=args.dry_run, to=args.to, verify=args.verify,
                         parent_search=tuple(args.search), progress=bar)
    finally:
        bar.finish()
    _out(args, report)
    return 0


def _compact_fs(args) -> int:
    from vdisk.fsaware import compact_fs
    if args.to or args.verify:
        raise VDiskError(f"{args.image}: --filesystem-aware compacts in place; it does not take "
                         f"{'--to' if args.to else '--verify'} (use 'vdisk convert --sparsify' for a copy)")
    bar = progress_for(args, "compact")
    try:
        report = compact_fs(args.image, dry_run=args.dry_run, parent_search=tuple(args.search), progress=bar,
                            force=args.force, punch=args.punch)
    finally:
        bar.finish()
    _out(args, report)
    return 0


# -- commit ---------------------------------------------------------------------------------------
def cmd_commit(args) -> int:
    from vdisk.ops.commit import commit
    bar = progress_for(args, "commit")
    try:
        report = commit(args.child, into=args.into, verify=args.verify, parent_search=tuple(args.search),
                        progress=bar)
    finally:
        bar.finish()
    _out(args, report)
    return 0


# -- resize ---------------------------------------------------------------------------------------
def _new_size(image: str, text: str) -> int:
    text = text.strip()
    if text[:1] in "+-":
        import vdisk
        with vdisk.open(image) as d:
            current = d.size
        delta = parse_size(text[1:])
        return current + delta if text[0] == "+" else current - delta
    return parse_size(text)


def cmd_resize(args) -> int:
    from vdisk.ops.resize import resize
    report = resize(args.image, _new_size(args.image, args.size), shrink=args.shrink, verify=args.verify)
    _out(args, report)
    return 0


# -- rebase / relink ------------------------------------------------------------------------------
def cmd_rebase(args) -> int:
    from vdisk.ops.relink import rebase
    report = rebase(args.child, args.parent, search=tuple(args.search), dry_run=args.dry_run,
                    verify=args.verify, unsafe=args.unsafe)
    _out(args, report)
    return 0


def cmd_relink(args) -> int:
    from vdisk.ops.relink import relink
    report = relink(args.child, search=tuple(args.search), dry_run=args.dry_run, verify=args.verify,
                    allow_parent_modified=args.allow_parent_modified)
    _out(args, report)
    return 0


# -- recover --------------------------------------------------------------------------------------
def cmd_recover(args) -> int:
    from vdisk import journal
    from vdisk.ops.check import check
    result = journal.recover(args.image)
    status = 0
    if args.verify:
        report = check(args.image)
        if report.exit_code not in (0, 3):
            raise VDiskError(f"{args.image}: VERIFY FAILED after recovery: {report.summary()}")
    if args.json:
        emit_json({"path": args.image, "action": result.action, "operation": result.operation,
                   "detail": result.detail})
    else:
        print(f"{args.image}: {result}")
    return status


def register(subparsers) -> None:
    """Add the maintenance subcommands to the `vdisk` parser."""
    p = subparsers.add_parser("check", help="check an image's structures (exit 0 clean, 1 failed, "
                                            "2 corruption, 3 leaks only)")
    p.add_argument("image")
    p.add_argument("--repair", action="store_true", help="fix what is safely fixable and say what was done")
    p.add_argument("--verify", action="store_true",
                   help="with --repair: fail if a repair that must not change the content did")
    _search_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("compact", help="give up zero blocks and shrink a dynamic/differencing image")
    p.add_argument("image")
    p.add_argument("--dry-run", action="store_true", help="report what would be reclaimed; write nothing")
    p.add_argument("--to", metavar="NEW", help="write a compacted copy to NEW instead of compacting in place")
    p.add_argument("--filesystem-aware", action="store_true",
                   help="also give up blocks the guest's filesystems (ext2/3/4, FAT, exFAT, NTFS, swap) do not use")
    p.add_argument("--force", action="store_true",
                   help="with --filesystem-aware: trust the bitmap of an NTFS volume marked dirty or hibernated")
    p.add_argument("--punch", action="store_true",
                   help="with --filesystem-aware: punch the free space out of the file instead of giving up and "
                        "moving blocks (nothing is rewritten; the file keeps its length, its storage shrinks; "
                        "raw and fixed images are always done this way)")
    p.add_argument("--verify", action="store_true", help="hash the content before and after; fail on any difference")
    _search_option(p)
    add_progress_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compact)

    p = subparsers.add_parser("commit", help="merge a differencing image into its parent (or --into an ancestor)")
    p.add_argument("child")
    p.add_argument("--into", metavar="ANCESTOR", help="an ancestor further down the chain")
    p.add_argument("--verify", action="store_true", help="hash the child's content before and after")
    _search_option(p)
    add_progress_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_commit)

    p = subparsers.add_parser("resize", help="change the virtual size (shrinking needs --shrink)")
    p.add_argument("image")
    p.add_argument("size", metavar="NEWSIZE", help="new size, e.g. 20G, or +5G / -1G relative to now")
    p.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    p.add_argument("--verify", action="store_true", help="check the kept content is unchanged and the rest zeros")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resize)

    p = subparsers.add_parser("rebase", help="make NEWPARENT the parent of a differencing image")
    p.add_argument("child")
    p.add_argument("--parent", required=True, metavar="NEWPARENT")
    p.add_argument("--unsafe", action="store_true",
                   help="only rewrite the link, even if the content seen through it changes")
    p.add_argument("--dry-run", action="store_true", help="explain what would be done; write nothing")
    p.add_argument("--verify", action="store_true", help="hash the content before and after")
    _search_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rebase)

    p = subparsers.add_parser("relink", help="find a moved parent by identity and rewrite the link to it")
    p.add_argument("child")
    p.add_argument("--dry-run", action="store_true", help="explain what would be rewritten; write nothing")
    p.add_argument("--allow-parent-modified", action="store_true",
                   help="VDI: accept a parent whose modification UUID changed")
    p.add_argument("--verify", action="store_true", help="hash the content before (if readable) and after")
    _search_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_relink)

    p = subparsers.add_parser("recover", help="complete or roll back an interrupted in-place operation")
    p.add_argument("image")
    p.add_argument("--verify", action="store_true", help="check the image afterwards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recover)
