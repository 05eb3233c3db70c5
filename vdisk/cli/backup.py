"""`vdisk backup`, `vdisk restore`, `vdisk verify`: backups of shadow copies (docs/backup.md).

Scripting contract: ``backup`` prints the new backup's id as its last line (``--json``: one object,
see :class:`vdisk.backup.BackupResult`); ``restore --json`` and ``verify --json`` print one object
each. ``verify`` exits 1 when any file or the chain is damaged, after naming every problem.
"""
from __future__ import annotations

import sys

from .common import FORMATS, add_open_options, add_progress_option, emit_json, parse_size, progress_for
from vdisk.progress import human_bytes


def _chunk_size(text: str) -> int:
    import argparse
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_backup(args) -> int:
    from vdisk.backup import backup
    bar = progress_for(args, "backup")
    try:
        r = backup(args.image, args.output, shadow=args.shadow, new_shadow=args.new_shadow, since=args.since,
                   level=args.level, threads=args.threads, chunk_size=args.chunk_size,
                   keep_shadows=args.keep_shadows, description=args.description or "", force=args.force,
                   progress=bar, open_options={"format": args.format, "parent_search": args.parent_search or (),
                                               "size_policy": args.size_policy})
    finally:
        bar.finish()
    if args.json:
        emit_json(r.to_dict())
        return 0
    what = "full backup" if r.kind == "full" else f"incremental backup (since shadow {r.base_shadow})"
    print(f"{what} of shadow {r.shadow}{' (new)' if r.created_shadow else ''} of {args.image} -> {r.path}: "
          f"{human_bytes(r.changed_bytes)} covered, {human_bytes(r.bytes_read)} read, "
          f"{human_bytes(r.bytes_stored)} stored in {r.seconds:.2f} s")
    for sid in r.deleted_shadows:
        print(f"deleted shadow {sid}")
    print(r.backup_id)
    return 0


def cmd_restore(args) -> int:
    from vdisk.backup import restore
    bar = progress_for(args, "restore")
    try:
        r = restore(args.backups, args.output, format=args.output_format, subtype=args.subtype, force=args.force,
                    progress=bar)
    finally:
        bar.finish()
    if args.json:
        emit_json({"path": r.path, "format": r.format, "subtype": r.subtype, "virtual_size": r.virtual_size,
                   "backups": r.backups, "bytes_read": r.bytes_read, "bytes_written": r.bytes_written,
                   "seconds": r.seconds})
    else:
        print(f"restored {len(r.backups)} backup(s) into {r.path} ({r.format} {r.subtype}, "
              f"{human_bytes(r.virtual_size)})")
    return 0


def cmd_verify(args) -> int:
    from vdisk.backup import verify
    bar = progress_for(args, "verify")
    try:
        report = verify(args.backups, progress=bar)
    finally:
        bar.finish()
    if args.json:
        emit_json(report.to_dict())
    else:
        for f in report.files:
            if f.ok:
                print(f"{f.path}: ok ({f.kind} backup {f.backup_id}, {f.entries} entries, "
                      f"{human_bytes(f.bytes_checked)} checked)")
    errors = [f.error for f in report.files if f.error]
    if report.chain_error and report.chain_error not in errors:
        errors.append(report.chain_error)
    for e in errors:
        print(f"vdisk: error: {' '.join(e.split())}", file=sys.stderr)
    if not errors and not args.json:
        print(f"chain complete: {' <- '.join(report.chain)}")
    return 1 if errors else 0


def register(subparsers) -> None:
    """Add the ``backup``, ``restore`` and ``verify`` commands to the vdisk command line."""
    p = subparsers.add_parser("backup", help="back up a shadow copy of an image (full or incremental, zstd)")
    p.add_argument("image")
    # -o FILE as in qemu-img convert; the long form is --to because --output=json is the JSON switch.
    p.add_argument("-o", "--to", dest="output", required=True, metavar="FILE", help="the backup file to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shadow", metavar="ID", help="back up this existing shadow (id or unique prefix)")
    which.add_argument("--new-shadow", action="store_true",
                       help="take a new shadow and back it up (the default when --shadow is not given)")
    p.add_argument("--since", metavar="BACKUP_OR_SHADOW",
                   help="incremental: store only what changed since this backup file (or since the shadow a "
                        "backup in the output's folder was taken from)")
    p.add_argument("--level", type=int, default=3, help="zstd compression level, 1..22 (default 3)")
    p.add_argument("--threads", type=int, metavar="N", help="compression threads (default: cores, at most 4)")
    p.add_argument("--chunk-size", type=_chunk_size, default=4 << 20, metavar="SIZE",
                   help="bytes per zstd frame, a power of two from 64K to 16M (default 4M)")
    p.add_argument("--keep-shadows", type=int, metavar="N",
                   help="afterwards delete the oldest shadows until N remain (the backed-up one always stays)")
    p.add_argument("--description", default="", help="description of the new shadow")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--json", action="store_true")
    add_progress_option(p)
    add_open_options(p)
    p.set_defaults(func=cmd_backup)

    p = subparsers.add_parser("restore", help="write the disk of a backup chain (full + incrementals) as an image")
    p.add_argument("backups", nargs="+", metavar="BACKUP", help="backup files, any order; missing parents are "
                                                                 "looked for in their child's folder")
    p.add_argument("-o", "--to", dest="output", required=True, metavar="IMAGE", help="the image to write")
    p.add_argument("-O", "--output-format", choices=FORMATS,
                   help="output format (default: from IMAGE's name)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"))
    p.add_argument("--force", action="store_true", help="replace IMAGE if it exists")
    p.add_argument("--json", action="store_true")
    add_progress_option(p)
    p.set_defaults(func=cmd_restore)

    p = subparsers.add_parser("verify", help="check backups and their chain without writing anything")
    p.add_argument("backups", nargs="+", metavar="BACKUP")
    p.add_argument("--json", action="store_true")
    add_progress_option(p)
    p.set_defaults(func=cmd_verify)
