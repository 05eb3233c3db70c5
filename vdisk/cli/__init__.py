"""The `vdisk` command line: a thin shell over library calls.

One module per group of commands, each exposing ``register(subparsers)``:

- ``vdisk.cli.image``   info, create, convert, map, measure, compare
- ``vdisk.cli.io``      mount, umount, serve nbd, serve iscsi
- ``vdisk.cli.maint``   check, compact, commit, resize, rebase, relink, recover
- ``vdisk.cli.shadow``  shadow, snapshot
- ``vdisk.cli.backup``  backup, restore, verify

``vdisk.cli.common`` holds what they share; ``vdisk.cli.main`` builds the parser from all of them
and runs it. A command is registered like this::

    from vdisk.cli.common import add_open_options, emit_json, open_image, parse_size, progress_for

    def register(subparsers):
        p = subparsers.add_parser("check", help="check an image")
        p.add_argument("image")
        add_open_options(p)                   # -f FMT, --parent-search DIR, --size-policy
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=run_check)        # run_check(args) -> exit status (int)

Handlers raise :class:`vdisk.VDiskError` (or OSError / ValueError) for anything the user got
wrong; :func:`main` turns it into one line ``vdisk: error: <what>`` on stderr and exit status 1
(or ``args.error_status`` when a handler sets another, as ``compare`` does with 2). Ctrl-C exits
with 130, SIGTERM with 143, and never with a traceback. Library modules are imported inside the
handlers, so `vdisk --help` and argument errors never load numpy or a format driver.
"""
from .common import (add_open_options, add_progress_option, emit_json, emit_json_array, open_image,
                     parse_size, progress_for, table)
from .main import build_parser, main, run

__all__ = ["main", "run", "build_parser", "parse_size", "add_open_options", "add_progress_option",
           "emit_json", "emit_json_array", "open_image", "progress_for", "table"]
