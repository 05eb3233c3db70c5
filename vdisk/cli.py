"""The `vdisk` command line: a thin shell over library calls.

Commands here: ``info``, ``create``, ``convert``, ``map``, ``measure``, ``compare``. More come from optional
modules, each a small file exposing ``register(subparsers)`` that adds its subcommands:

- ``vdisk.cli_io``     mount, umount, serve nbd, serve iscsi
- ``vdisk.cli_maint``  check, compact, commit, resize, rebase, relink, recover (when present)
- ``vdisk.cli_shadow`` shadow, snapshot (when present)
- ``vdisk.cli_backup`` backup, restore, verify (when present)

A module that is absent is skipped; one that fails to import is reported as a warning and
skipped, so the other commands keep working. A subcommand is registered like this::

    from vdisk.cli import add_open_options, emit_json, open_image, parse_size, progress_for

    def register(subparsers):
        p = subparsers.add_parser("check", help="check an image")
        p.add_argument("image")
        add_open_options(p)                   # -f FMT, --parent-search DIR, --size-policy
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=run_check)        # run_check(args) -> exit status (int)

Handlers raise :class:`vdisk.VDiskError` (or OSError / ValueError) for anything the user got
wrong; :func:`main` turns it into one line ``vdisk: error: <what>`` on stderr and exit status 1
(or ``args.error_status`` when a handler sets another, as ``compare`` does with 2). Ctrl-C exits
with 130, SIGTERM with 143, and never with a traceback. A handler whose status is special sets
``error_status`` with ``set_defaults``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
from fractions import Fraction
from typing import Optional, Sequence

from . import VDiskError
from .progress import ProgressBar, human_bytes

OPTIONAL_MODULES = ("vdisk.cli_io", "vdisk.cli_maint", "vdisk.cli_shadow", "vdisk.cli_backup")
DEFAULT_SIZE = 127 << 30          # Virtual Server 2005 R2 SP1 and Hyper-V default for a new disk

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


# -- plumbing other CLI modules reuse -----------------------------------------------------------
def parse_size(text: str) -> int:
    """'10G', '512M', '4096', '1.5T', '64KiB', '4096B' -> bytes (binary units). ValueError if bad."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 512M, 10G, 1.5T, 64KiB)")
    value = Fraction(m.group(1)) * (1 << (10 * _UNITS[m.group(2).upper()]))
    if value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def emit_json(obj) -> None:
    """Print *obj* as indented JSON on stdout (UUIDs and paths as strings)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def emit_json_array(items) -> None:
    """Print an iterable as a JSON array on stdout as it is consumed, one item per line, so
    memory stays flat however many items there are."""
    out = sys.stdout
    encode = json.JSONEncoder(default=str).encode
    sep = "[\n  "
    for item in items:
        out.write(sep)
        out.write(encode(item))
        sep = ",\n  "
    out.write("[]\n" if sep.startswith("[") else "\n]\n")


def add_open_options(parser: argparse.ArgumentParser, *, format_flag: str = "-f") -> None:
    """The options every command that opens an image takes: forced format, parent search, size policy."""
    parser.add_argument(format_flag, "--format", dest="format", choices=("vhd", "vdi", "raw", "vhdx"),
                        help="input format (default: probed from the file's signature)")
    parser.add_argument("--parent-search", metavar="DIR", action="append", default=[],
                        help="also look for parent images in DIR (repeatable)")
    parser.add_argument("--size-policy", choices=("current", "chs"), default="current",
                        help="VHD virtual size: footer current_size (default) or the CHS geometry")


def open_image(args: argparse.Namespace, path: str, mode: str = "r", *, format: Optional[str] = None):
    """vdisk.open with the options of :func:`add_open_options`."""
    import vdisk
    return vdisk.open(path, mode, format=format if format is not None else getattr(args, "format", None),
                      parent_search=getattr(args, "parent_search", None) or (),
                      size_policy=getattr(args, "size_policy", "current"))


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")


def progress_for(args: argparse.Namespace, label: str) -> ProgressBar:
    """A progress bar honouring --progress/--no-progress (default: on when stderr is a terminal)."""
    return ProgressBar(label, enabled=getattr(args, "progress", None))


def table(rows: Sequence[tuple[str, object]]) -> str:
    """Two aligned columns, skipping rows whose value is None."""
    rows = [(k, v) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _sized(n: Optional[int]) -> Optional[str]:
    return None if n is None else f"{human_bytes(n)} ({n} bytes)"


# -- qemu-img spellings ------------------------------------------------------------------------
# What qemu-img users type, accepted beside vdisk's own options (and shown in --help). They are
# added to every command by _add_qemu_spellings once all commands are registered, so commands of
# the optional modules get them too.
#: qemu-img's format names that mean one of ours.
FORMAT_ALIASES = {"vpc": "vhd"}
_FORMATS = {"vhd", "vdi", "raw"}


def format_name(text: str) -> str:
    """A format as typed (vhd, vdi, raw, or qemu-img's vpc) -> vdisk's name."""
    name = text.strip().lower()
    return FORMAT_ALIASES.get(name, name)


class _OutputAction(argparse.Action):
    """qemu-img's ``--output=json|human``: the same switch as ``--json``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values == "json")


#: ``-o`` keys: qemu-img's vpc ``subformat``, vdi ``static``, and a block size.
CREATE_OPTIONS = ("subformat=fixed|dynamic", "static=on|off", "block_size=SIZE")


class _CreateOptionsAction(argparse.Action):
    """qemu-img's ``-o key=value,...`` for create/convert: sets --subtype and --block-size."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in filter(None, (part.strip() for part in str(values).split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip().lower().replace("-", "_"), value.strip()
            if key == "subformat" and value.lower() in ("fixed", "dynamic"):
                namespace.subtype = value.lower()
            elif key == "static" and value.lower() in ("on", "off"):
                namespace.subtype = "fixed" if value.lower() == "on" else "dynamic"
            elif key in ("block_size", "blocksize") and sep:
                try:
                    namespace.block_size = parse_size(value)
                except ValueError as exc:
                    parser.error(f"-o {item}: {exc}")
            else:
                parser.error(f"-o {item!r}: unknown option (accepted: {', '.join(CREATE_OPTIONS)})")


def add_create_options_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", metavar="OPTIONS", action=_CreateOptionsAction, default=argparse.SUPPRESS,
                        help="qemu-img spelling: -o subformat=fixed|dynamic,block_size=SIZE "
                             "(also static=on|off) sets --subtype and --block-size")


def _subparsers_of(parser: argparse.ArgumentParser):
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield child


def _add_qemu_spellings(parser: argparse.ArgumentParser) -> None:
    """Give every command (recursively) the qemu-img spellings of the options it has."""
    options = parser._option_string_actions
    for action in list(parser._actions):
        if action.choices is not None and set(action.choices) >= _FORMATS and action.option_strings:
            action.type = format_name             # `vpc` becomes `vhd` before choices are checked
            action.metavar = "{" + ",".join(action.choices) + ",vpc}"
            if action.help and "vpc" not in action.help:
                action.help += "; vpc is qemu-img's name for vhd"
    json_action = options.get("--json")
    if json_action is not None and "--output" not in options:
        parser.add_argument("--output", choices=("human", "json"), dest=json_action.dest,
                            action=_OutputAction, default=argparse.SUPPRESS,
                            help="qemu-img spelling: --output=json is --json")
    progress = options.get("--progress")
    if progress is not None and "-p" not in options:
        parser.add_argument("-p", dest=progress.dest, action="store_const", const=True,
                            default=argparse.SUPPRESS, help="qemu-img spelling of --progress")
    for child in _subparsers_of(parser):
        _add_qemu_spellings(child)


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .info import info_for_path
    info = info_for_path(args.image, format=args.format, parent_search=args.parent_search,
                         size_policy=args.size_policy)
    if args.json:
        emit_json(info)
        return 0
    geo = info["geometry"]
    rows = [
        ("image", info["path"]),
        ("format", f"{info['format']} ({info['subtype']})"),
        ("virtual size", _sized(info["virtual_size"])),
        ("CHS size", _sized(info["chs_size"])),
        ("block size", _sized(info["block_size"])),
        ("file size", _sized(info["file_size"])),
        ("disk usage", _sized(info["disk_usage"])),
        ("allocated", _sized(info["allocated_bytes"])),
        ("zero blocks", _sized(info["zero_bytes"]) if info["zero_bytes"] else None),
        ("unallocated", _sized(info["unallocated_bytes"])),
        ("uuid", info["uuid"]),
        ("parent uuid", info["parent_uuid"]),
        ("creator", repr(info["creator"]) if info["creator"] else None),
        ("geometry", f"{geo['cylinders']}/{geo['heads']}/{geo['sectors_per_track']} (C/H/S)" if geo else None),
        ("allocation", _density_row(args) if sys.stdout.isatty() else None),
    ]
    print(table(rows))
    chain = info["chain"]
    if len(chain) > 1 or info["parent_error"]:
        print("chain:")
        for i, layer in enumerate(chain):
            print(f"  [{i}] {layer['path']}  {layer['format']} {layer['subtype']}  ({layer['found_by']})")
        if info["parent_error"]:
            print(f"  parent missing: {info['parent_error']}")
    if args.chain:
        for i, layer in enumerate(chain):
            print(f"layer [{i}] {layer['path']}:")
            details = dict(layer["details"], allocated_blocks=layer["allocated_blocks"])
            for line in table(sorted(details.items())).splitlines():
                print("  " + line)
    return 0


def _density_row(args) -> Optional[str]:
    """`info` on a terminal: one line of how densely each stretch of the disk holds data."""
    from .svgmap import allocation_cells, density_strip
    try:
        with open_image(args, args.image) as d:
            cells = allocation_cells(d, max_cells=64)
    except VDiskError:                     # e.g. a missing parent: info still describes the image
        return None
    if not cells.count:
        return None
    return f"|{density_strip(cells)}| {human_bytes(cells.cell_bytes)} per character, blank: no data"


# -- create -------------------------------------------------------------------------------------
def cmd_create(args) -> int:
    import vdisk
    from .convert import format_from_name
    fmt = args.format
    if fmt is None and args.parent is not None:
        from .probe import probe
        if not os.path.exists(args.parent):
            raise VDiskError(f"{args.parent}: no such file")
        fmt = probe(args.parent)
    if fmt is None:
        fmt = format_from_name(args.image) if args.image.lower().endswith((".vdi", ".raw", ".img", ".vhdx", ".avhdx")) \
            else "vhd"
    size = args.size
    if size is None and args.parent is None:
        size = DEFAULT_SIZE
    if os.path.lexists(args.image):
        raise VDiskError(f"{args.image}: already exists")
    subtype = args.subtype or ("raw" if fmt == "raw" else "dynamic")
    sectors = {}
    if args.logical_sector_size is not None or args.physical_sector_size is not None:
        if fmt != "vhdx":
            raise VDiskError(f"{args.image}: --logical-sector-size and --physical-sector-size apply to VHDX only")
        sectors = dict(logical_sector_size=args.logical_sector_size or 512,
                       physical_sector_size=args.physical_sector_size)
    with vdisk.create(args.image, size, format=fmt, subtype=subtype, parent=args.parent,
                      block_size=args.block_size, size_policy=args.size_policy, **sectors) as d:
        result = {"path": d.path, "format": d.format, "subtype": d.subtype, "virtual_size": d.size,
                  "block_size": d.block_size, "uuid": None if d.uuid is None else str(d.uuid),
                  "parent": args.parent}
    if args.json:
        emit_json(result)
    else:
        kind = result["format"] if result["subtype"] == "raw" else f"{result['format']} {result['subtype']}"
        print(f"created {result['path']}: {kind}, "
              f"{human_bytes(result['virtual_size'])} ({result['virtual_size']} bytes)")
    return 0


# -- convert ------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .convert import convert
    bar = progress_for(args, "convert")
    with open_image(args, args.src) as src:
        try:
            result = convert(src, args.dst, args.output_format, args.subtype, block_size=args.block_size,
                             target=args.target, zero_detect=args.zero_detect, progress=bar,
                             force=args.force, durable=args.sync)
        finally:
            bar.finish()
    if args.json:
        emit_json({"path": result.path, "format": result.format, "subtype": result.subtype,
                   "virtual_size": result.size, "bytes_read": result.bytes_read,
                   "bytes_written": result.bytes_written})
    return 0


# -- map ----------------------------------------------------------------------------------------
def cmd_map(args) -> int:
    if getattr(args, "svg", None):
        return _map_svg(args)
    from .info import iter_map
    with open_image(args, args.image) as d:           # runs are written as they are found
        if args.json:
            emit_json_array(iter_map(d))
            return 0
        print(f"{'start':>18} {'length':>18}  {'kind':<11} {'layer':>5} {'offset':>18}  file")
        for r in iter_map(d):
            layer = "-" if r["layer"] is None else str(r["layer"])
            off = "-" if r["offset"] is None else f"{r['offset']:#x}"
            print(f"{r['start']:#18x} {r['length']:#18x}  {r['kind']:<11} {layer:>5} {off:>18}  {r['file'] or '-'}")
    return 0


def _map_svg(args) -> int:
    """`vdisk map IMAGE --svg FILE`: the allocation drawn as a grid (vdisk.svgmap)."""
    from .svgmap import write_svg_map
    with open_image(args, args.image) as d:
        cells = write_svg_map(d, args.svg, max_cells=args.cells)
    print(f"wrote {args.svg}: {cells.count} cells of {human_bytes(cells.cell_bytes)}", file=sys.stderr)
    return 0


# -- measure ------------------------------------------------------------------------------------
def cmd_measure(args) -> int:
    from .measure import measure
    if (args.image is None) == (args.size is None):
        raise VDiskError("measure: give an IMAGE or --size N (one of them)")
    options = dict(format=args.output_format or ("raw" if args.target is None else None),
                   subtype=args.subtype, block_size=args.block_size, target=args.target)
    if args.image is None:
        result = measure(size=args.size, **options)
    else:
        with open_image(args, args.image) as src:
            result = measure(src, **options)
    if args.json:
        emit_json(result.as_dict())
    else:                                  # qemu-img measure's two lines
        print(f"required size: {result.required}")
        print(f"fully allocated size: {result.fully_allocated}")
    return 0


# -- compare ------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from .compare import compare
    bar = progress_for(args, "compare")
    with open_image(args, args.a) as a, open_image(args, args.b, format=args.format_b) as b:
        try:
            result = compare(a, b, strict=args.strict, progress=bar)
        finally:
            bar.finish()
    if args.json:
        emit_json(result.as_dict())
    else:
        print(result.reason[0].upper() + result.reason[1:] + ".")
    return 0 if result.identical else 1


# -- parser and main ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'vdisk: error: <what>' (exit 2), no usage dump."""

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"vdisk: error: {message}{hint}\n")


#: Commands defined in this module; running one of them needs none of the optional modules.
CORE_COMMANDS = frozenset({"info", "create", "convert", "map", "measure", "compare"})


def build_parser(load_optional: bool = True) -> argparse.ArgumentParser:
    """The argument parser; *load_optional* adds the commands of OPTIONAL_MODULES too."""
    parser = _Parser(prog="vdisk", description="Virtual disk images: VHD, VDI and raw.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="describe an image (format, sizes, allocation, parent chain)")
    p.add_argument("image")
    add_open_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (see docs/cli.md)")
    p.add_argument("--chain", "--backing-chain", action="store_true",
                   help="also list every layer's format details (--backing-chain: qemu-img's spelling)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="create a new image (base or differencing)")
    p.add_argument("image")
    p.add_argument("size", nargs="?", type=_size_arg,
                   help="virtual size, e.g. 10G, 512M, 4096 (default 127G; a differencing image "
                        "takes its parent's)")
    p.add_argument("-f", "--format", choices=("vhd", "vdi", "raw", "vhdx"),
                   help="format (default: from the name: .vdi, .vhdx/.avhdx, .raw/.img, else vhd; a parent's format)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"))
    p.add_argument("--parent", metavar="P", help="make a differencing image on top of P")
    p.add_argument("--block-size", type=_size_arg, metavar="N", help="allocation unit (dynamic images)")
    p.add_argument("--size-policy", choices=("exact", "chs"), default="exact",
                   help="VHD: keep the size exact (default) or round it up to whole CHS geometry")
    p.add_argument("--logical-sector-size", type=int, choices=(512, 4096),
                   help="VHDX: the sector the disk presents (default 512)")
    p.add_argument("--physical-sector-size", type=int, choices=(512, 4096),
                   help="VHDX: the physical sector it reports (default 4096, as Hyper-V)")
    add_create_options_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("convert", help="convert an image (or a flattened chain) to any format")
    p.add_argument("src")
    p.add_argument("dst")
    add_open_options(p)
    p.add_argument("-O", "--output-format", choices=("vhd", "vdi", "raw", "vhdx"),
                   help="output format (default: from DST's name: .vhd, .vdi, else raw)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"), help="output subtype (default dynamic)")
    p.add_argument("--block-size", type=_size_arg, metavar="N", help="output allocation unit")
    add_create_options_option(p)
    p.add_argument("--target", choices=("azure", "hyper-v", "virtualbox"),
                   help="azure: fixed VHD, whole MiB; hyper-v: dynamic VHD; virtualbox: dynamic VDI")
    p.add_argument("--no-zero-detect", dest="zero_detect", action="store_false",
                   help="copy allocated zero blocks too")
    add_progress_option(p)
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not fsync DST before naming it (faster; a power cut soon after may damage it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("map", help="list data / zero / unallocated runs and where they are stored")
    p.add_argument("image")
    add_open_options(p)
    p.add_argument("--svg", metavar="FILE", help="draw the allocation (by kind, layer, partition) as an SVG picture")
    p.add_argument("--cells", type=int, default=512, metavar="N", help="with --svg: at most N cells (default 512)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("measure", help="file size a convert (of IMAGE) or a create (of --size N) would produce")
    p.add_argument("image", nargs="?", help="the image to convert (or give --size)")
    p.add_argument("--size", type=_size_arg, metavar="N", help="measure a new empty image of N bytes")
    add_open_options(p)
    p.add_argument("-O", "--output-format", choices=("vhd", "vdi", "raw"), help="output format (default raw)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"), help="output subtype (default dynamic)")
    p.add_argument("--block-size", type=_size_arg, metavar="N", help="output allocation unit")
    add_create_options_option(p)
    p.add_argument("--target", choices=("azure", "hyper-v", "virtualbox"), help="as for convert")
    p.add_argument("--json", action="store_true", help='{"required", "fully-allocated", format, subtype, ...}')
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("compare", help="compare the contents of two images (exit 0 same, 1 different, 2 error)")
    p.add_argument("a")
    p.add_argument("b")
    add_open_options(p)
    p.add_argument("-F", dest="format_b", choices=("vhd", "vdi", "raw", "vhdx"), help="format of B (default: probed)")
    p.add_argument("-s", "--strict", action="store_true", help="images of different sizes differ")
    add_progress_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare, error_status=2)

    for name in OPTIONAL_MODULES if load_optional else ():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            print(f"vdisk: warning: cannot load {name}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:            # a broken add-on must not take the other commands down
            print(f"vdisk: warning: cannot load {name}: {exc}", file=sys.stderr)
            continue
        try:
            module.register(sub)
        except Exception as exc:
            print(f"vdisk: warning: cannot load {name}: register() failed: {exc}", file=sys.stderr)
    _add_qemu_spellings(parser)
    return parser


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _show_library_warnings() -> None:
    """Print what the library logs as warnings, once each, as `vdisk: warning: <what>` on stderr."""
    logger = logging.getLogger("vdisk")
    if not any(getattr(h, "_vdisk_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vdisk: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._vdisk_cli = True
        logger.addHandler(handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    # numpy's OpenBLAS starts a spinning thread per core when numpy is imported (lazily, by the
    # command that needs it). vdisk never multiplies matrices, and those threads would take CPU
    # from the copy on a small machine.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)     # clean up temporary files like Ctrl-C does
    except ValueError:                                 # not the main thread (embedded use)
        pass
    args = None
    _show_library_warnings()
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        command = next((w for w in words if not w.startswith("-")), None)
        parser = build_parser(load_optional=command not in CORE_COMMANDS)
        try:
            args = parser.parse_args(words)
        except SystemExit as exc:           # usage error (2) or --help / --version (0)
            return exc.code if isinstance(exc.code, int) else 2
        status = args.func(args)
        sys.stdout.flush()
        return int(status or 0)
    except KeyboardInterrupt:
        print("vdisk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `vdisk map | head`): not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except (VDiskError, OSError, ValueError) as exc:
        print(f"vdisk: error: {_message(exc)}", file=sys.stderr)
        return getattr(args, "error_status", 1) if args is not None else 1


def run() -> None:
    """Console-script entry point: main(), then exit at once.

    Everything is closed and flushed when main() returns, so the interpreter's clean-up (tearing
    down every module, numpy's included) would only add tens of milliseconds to each command.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        return f"{where}: {exc.strerror}" if where else exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())          # one line, whatever the exception carried


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
