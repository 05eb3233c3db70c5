"""Plumbing every command module shares: sizes, JSON output, the open/progress options, and the
qemu-img spellings (``--output=json``, ``-p``, ``vpc``, ``-o key=value``)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from typing import Optional, Sequence

from vdisk.formats.registry import NAMES as FORMATS
from vdisk.progress import ProgressBar, human_bytes

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


def size_arg(text: str) -> int:
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
    parser.add_argument(format_flag, "--format", dest="format", choices=FORMATS,
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


def sized(n: Optional[int]) -> Optional[str]:
    return None if n is None else f"{human_bytes(n)} ({n} bytes)"


# -- qemu-img spellings ------------------------------------------------------------------------
# What qemu-img users type, accepted beside vdisk's own options (and shown in --help). They are
# added to every command by _add_qemu_spellings once all commands are registered, so commands of
# every command module get them too.
#: qemu-img's format names that mean one of ours.
FORMAT_ALIASES = {"vpc": "vhd"}
_FORMATS = set(FORMATS)


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
        if action.choices is not None and set(action.choices) == _FORMATS and action.option_strings:
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


