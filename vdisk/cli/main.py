"""The `vdisk` parser and entry point: every command module registers its commands here."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from vdisk.errors import VDiskError
from . import backup, image, io, maint, shadow
from .common import _add_qemu_spellings

#: Each exposes ``register(subparsers)``; the order is the order of `vdisk --help`.
COMMAND_MODULES = (image, io, maint, shadow, backup)


# -- parser and main ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'vdisk: error: <what>' (exit 2), no usage dump."""

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"vdisk: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command."""
    parser = _Parser(prog="vdisk", description="Virtual disk images: VHD, VDI and raw.")
    from vdisk import __version__
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    for module in COMMAND_MODULES:
        module.register(sub)
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
        parser = build_parser()
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
