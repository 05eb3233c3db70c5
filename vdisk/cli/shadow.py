"""`vdisk shadow ...` (VSS-style shadow copies) and `vdisk snapshot ...` (snapshot trees).

Scripting contract: ``shadow create`` prints the new id as its last line; ``shadow list --json``
is a JSON array of objects with ``id``, ``created`` (ISO 8601 UTC) and ``description`` (oldest
first); ``shadow diff --json`` is a JSON array of ``{"offset", "length"}`` in ascending order.
"""
from __future__ import annotations

from .common import FORMATS, add_open_options, add_progress_option, emit_json, parse_size, progress_for, table
from vdisk.errors import VDiskError


def _open(args, mode: str):
    from vdisk.shadow import open_shadowed
    return open_shadowed(args.image, mode, format=getattr(args, "format", None),
                         parent_search=getattr(args, "parent_search", None) or (),
                         size_policy=getattr(args, "size_policy", "current"))


# -- shadow ---------------------------------------------------------------------------------------
def cmd_shadow_create(args) -> int:
    with _open(args, "r+") as d:
        info = d.create_shadow(args.description or "")
    print(info.id)
    return 0


def cmd_shadow_list(args) -> int:
    with _open(args, "r") as d:
        infos = d.shadows
        cat = d.shadow_set.catalog
        used = d.shadow_set.diff_area_bytes()
    if args.json:
        emit_json([i.to_dict() for i in infos])
        return 0
    if not infos:
        print(f"{args.image}: no shadow copies")
        return 0
    for i in infos:
        state = "valid" if i.valid else f"INVALID: {i.invalid_reason}"
        print(f"{i.id}  {i.created}  {i.blocks} blocks  {state}  {i.description}")
    limit = "unbounded" if cat.max_diff_bytes is None else f"{cat.max_diff_bytes} bytes"
    print(f"diff area: {used} bytes used, maximum {limit}; {len(infos)} of at most {cat.max_shadows} shadows")
    return 0


def cmd_shadow_delete(args) -> int:
    with _open(args, "r+") as d:
        if args.all:
            n = d.delete_all_shadows()
            print(f"deleted {n} shadow(s)")
        elif args.oldest:
            sid = d.delete_oldest_shadow()
            if sid is None:
                raise VDiskError(f"{args.image}: has no shadow copies")
            print(f"deleted {sid}")
        else:
            sid = d.shadow_set.resolve_id(args.id).id
            d.delete_shadow(sid)
            print(f"deleted {sid}")
    return 0


def cmd_shadow_storage(args) -> int:
    with _open(args, "r+" if args.max_size is not None or args.max_shadows is not None else "r") as d:
        if args.max_size is not None or args.max_shadows is not None:
            size = -1 if args.max_size is None else (None if args.max_size.lower() == "unbounded"
                                                     else parse_size(args.max_size))
            d.set_shadow_limits(max_shadows=args.max_shadows, max_diff_bytes=size)
        cat = d.shadow_set.catalog
        out = {"used_bytes": d.shadow_set.diff_area_bytes(), "max_bytes": cat.max_diff_bytes,
               "max_shadows": cat.max_shadows, "shadows": len(cat.shadows), "block_size": cat.block_size}
    if args.json:
        emit_json(out)
    else:
        print(table([(k, "unbounded" if v is None else v) for k, v in out.items()]))
    return 0


def cmd_shadow_export(args) -> int:
    from vdisk.shadow import export_shadow
    bar = progress_for(args, "export")
    try:
        result = export_shadow(args.image, args.id, args.dst, format=args.output_format, subtype=args.subtype,
                               force=args.force, progress=bar)
    finally:
        bar.finish()
    print(f"exported shadow {args.id} of {args.image} to {result.path} ({result.format} {result.subtype})")
    return 0


def cmd_shadow_diff(args) -> int:
    with _open(args, "r") as d:
        ranges = d.diff(args.id, args.other)
    if args.json:
        emit_json([{"offset": o, "length": n} for o, n in ranges])
    else:
        for o, n in ranges:
            print(f"{o:>14}  {n:>12}")
        print(f"{len(ranges)} changed range(s), {sum(n for _, n in ranges)} bytes")
    return 0


# -- snapshot ---------------------------------------------------------------------------------------
def cmd_snapshot_take(args) -> int:
    from vdisk.snapshot import take
    node = take(args.image, name=args.name, description=args.description or "")
    print(f"took snapshot {node.name} ({node.id}) of {args.image}")
    print(node.id)
    return 0


def cmd_snapshot_list(args) -> int:
    from vdisk.snapshot import snapshot_list
    nodes, current = snapshot_list(args.image)
    if args.json:
        emit_json([dict(n.to_dict(), current=(n.id == current)) for n in nodes])
        return 0
    if not nodes:
        print(f"{args.image}: no snapshots")
        return 0
    children: dict = {}
    for n in nodes:
        children.setdefault(n.parent, []).append(n)

    def show(parent, depth: int) -> None:
        for n in children.get(parent, []):
            mark = "  <- current state" if n.id == current else ""
            print(f"{'  ' * depth}{n.name}  {n.id}  {n.created}{mark}")
            show(n.id, depth + 1)

    show(None, 0)
    if current is None:
        print("(the current state grows from no snapshot)")
    return 0


def cmd_snapshot_revert(args) -> int:
    from vdisk.snapshot import revert
    node = revert(args.image, args.snapshot, force=args.force)
    print(f"{args.image} now continues from snapshot {node.name} ({node.id})")
    return 0


def cmd_snapshot_delete(args) -> int:
    from vdisk.snapshot import delete
    node = delete(args.image, args.snapshot)
    print(f"deleted snapshot {node.name} ({node.id}) of {args.image}")
    return 0


def register(subparsers) -> None:
    """Add the ``shadow`` and ``snapshot`` commands to the vdisk command line."""
    sh = subparsers.add_parser("shadow", help="VSS-style shadow copies: read-only point-in-time views")
    verbs = sh.add_subparsers(dest="shadow_command", metavar="VERB", parser_class=type(sh))
    verbs.required = True

    p = verbs.add_parser("create", help="make a shadow copy (prints its id as the last line)")
    p.add_argument("image")
    p.add_argument("--description", default="")
    add_open_options(p)
    p.set_defaults(func=cmd_shadow_create)

    p = verbs.add_parser("list", help="list shadow copies, oldest first")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    add_open_options(p)
    p.set_defaults(func=cmd_shadow_list)

    p = verbs.add_parser("delete", help="delete shadow copies (others keep their content)")
    p.add_argument("image")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the shadow's id (or a unique prefix)")
    which.add_argument("--oldest", action="store_true")
    which.add_argument("--all", action="store_true")
    add_open_options(p)
    p.set_defaults(func=cmd_shadow_delete)

    p = verbs.add_parser("storage", help="show or set the diff-area limits")
    p.add_argument("image")
    p.add_argument("--max-size", metavar="SIZE", help="diff-area maximum (e.g. 10G) or 'unbounded'; "
                                                      "oldest shadows are deleted to fit")
    p.add_argument("--max-shadows", type=int, metavar="N", help="at most N shadows (1..512, default 64)")
    p.add_argument("--json", action="store_true")
    add_open_options(p)
    p.set_defaults(func=cmd_shadow_storage)

    p = verbs.add_parser("export", help="write a shadow copy as a standalone image")
    p.add_argument("image")
    p.add_argument("id")
    p.add_argument("dst")
    p.add_argument("-O", "--output-format", choices=FORMATS,
                   help="output format (default: from DST's name)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"))
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    add_progress_option(p)
    p.set_defaults(func=cmd_shadow_export)

    p = verbs.add_parser("diff", help="byte ranges changed between a shadow and another one or the live image")
    p.add_argument("image")
    p.add_argument("id")
    p.add_argument("other", nargs="?", default="live", help="a second shadow id, or 'live' (default)")
    p.add_argument("--json", action="store_true")
    add_open_options(p)
    p.set_defaults(func=cmd_shadow_diff)

    sn = subparsers.add_parser("snapshot", help="snapshot trees with differencing images (VirtualBox/Hyper-V model)")
    verbs = sn.add_subparsers(dest="snapshot_command", metavar="VERB", parser_class=type(sn))
    verbs.required = True

    p = verbs.add_parser("take", help="freeze the current state; IMAGE continues as a new child")
    p.add_argument("image")
    p.add_argument("--name")
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_snapshot_take)

    p = verbs.add_parser("list", help="show the snapshot tree")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_snapshot_list)

    p = verbs.add_parser("revert", help="make IMAGE continue from snapshot N (discards the current state)")
    p.add_argument("image")
    p.add_argument("snapshot", help="snapshot name or id")
    p.add_argument("--force", action="store_true", help="discard changes made since the last snapshot")
    p.set_defaults(func=cmd_snapshot_revert)

    p = verbs.add_parser("delete", help="delete snapshot N, merging its data into its child")
    p.add_argument("image")
    p.add_argument("snapshot", help="snapshot name or id")
    p.set_defaults(func=cmd_snapshot_delete)

