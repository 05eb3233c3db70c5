"""vdisk's public API in a typed program: describe an image and copy it out through the io stack.

    python examples/typed_api.py IMAGE COPY.raw

Checked with ``mypy --strict`` (tests/test_typing.py): the package ships ``py.typed``, so a type
checker sees Disk, Extent and ExtentKind as they are.
"""
from __future__ import annotations

import io
import shutil
import sys

import vdisk


def stored_bytes(disk: vdisk.Disk) -> int:
    """Bytes of the virtual disk held by some layer of its chain."""
    return sum(e.length for e in disk.extents() if e.kind == vdisk.ExtentKind.DATA)


def describe(path: str) -> str:
    with vdisk.open(path) as d:
        layers = ", ".join(info.path for info in d.chain)
        boot: bytes = d.pread(512, 0)
        signed = boot[510:512] == b"\x55\xaa"
        return (f"{d.path}: {d.format} {d.subtype}, {d.size} bytes, {stored_bytes(d)} stored; "
                f"boot signature {'present' if signed else 'absent'}; chain: {layers}")


def copy_out(path: str, dst: str) -> int:
    """Write the whole virtual disk to *dst* as raw bytes; returns how many."""
    with vdisk.open(path) as d, open(dst, "wb") as out:
        shutil.copyfileobj(io.BufferedReader(d.as_file(), buffer_size=1 << 20), out, 1 << 20)
        return out.tell()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        print(describe(argv[0]))
        print(f"copied {copy_out(argv[0], argv[1])} bytes to {argv[1]}")
    except vdisk.VDiskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
