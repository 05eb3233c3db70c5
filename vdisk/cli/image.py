"""The commands about one image as a whole: info, create, convert, map, measure, compare."""
from __future__ import annotations

import os
import sys
from typing import Optional

from vdisk.errors import VDiskError
from vdisk.formats.registry import TARGETS
from vdisk.progress import human_bytes
from .common import (FORMATS, DEFAULT_SIZE, add_create_options_option, add_open_options, add_progress_option,
                     emit_json, emit_json_array, open_image, progress_for, size_arg, sized, table)


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from vdisk.ops.info import info_for_path
    info = info_for_path(args.image, format=args.format, parent_search=args.parent_search,
                         size_policy=args.size_policy)
    if args.json:
        emit_json(info)
        return 0
    geo = info["geometry"]
    rows = [
        ("image", info["path"]),
        ("format", f"{info['format']} ({info['subtype']})"),
        ("virtual size", sized(info["virtual_size"])),
        ("CHS size", sized(info["chs_size"])),
        ("block size", sized(info["block_size"])),
        ("file size", sized(info["file_size"])),
        ("disk usage", sized(info["disk_usage"])),
        ("allocated", sized(info["allocated_bytes"])),
        ("zero blocks", sized(info["zero_bytes"]) if info["zero_bytes"] else None),
        ("unallocated", sized(info["unallocated_bytes"])),
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
    from vdisk.ops.svgmap import allocation_cells, density_strip
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
    from vdisk.disk import DEFAULT_FORMAT
    from vdisk.formats.registry import driver, format_from_name
    fmt = args.format
    if fmt is None and args.parent is not None:
        from vdisk.probe import probe
        if not os.path.exists(args.parent):
            raise VDiskError(f"{args.parent}: no such file")
        fmt = probe(args.parent)
    if fmt is None:
        fmt = format_from_name(args.image, default=DEFAULT_FORMAT)
    size = args.size
    if size is None and args.parent is None:
        size = DEFAULT_SIZE
    if os.path.lexists(args.image):
        raise VDiskError(f"{args.image}: already exists")
    subtype = args.subtype or ("raw" if fmt == "raw" else "dynamic")
    options = {name: getattr(args, name) for name in ("logical_sector_size", "physical_sector_size")
               if getattr(args, name, None) is not None}
    if options and not set(options) <= set(driver(fmt).create_options):
        flags = " and ".join("--" + n.replace("_", "-") for n in options)
        takers = [n.upper() for n in FORMATS if set(options) <= set(driver(n).create_options)]
        raise VDiskError(f"{args.image}: {flags} apply to {' and '.join(takers)} only (not {fmt.upper()})")
    with vdisk.create(args.image, size, format=fmt, subtype=subtype, parent=args.parent,
                      block_size=args.block_size, size_policy=args.size_policy, **options) as d:
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
    from vdisk.ops.convert import convert
    bar = progress_for(args, "convert")
    with open_image(args, args.src) as src:
        try:
            result = convert(src, args.dst, args.output_format, args.subtype, block_size=args.block_size,
                             target=args.target, zero_detect=args.zero_detect, progress=bar,
                             force=args.force, durable=args.sync, skip=_sparsify_hook(args))
        finally:
            bar.finish()
    if args.json:
        emit_json({"path": result.path, "format": result.format, "subtype": result.subtype,
                   "virtual_size": result.size, "bytes_read": result.bytes_read,
                   "bytes_written": result.bytes_written})
    return 0


def _sparsify_hook(args):
    if not getattr(args, "sparsify", False):
        return None
    from vdisk.fsaware import sparsify
    return sparsify(args.src)


# -- map ----------------------------------------------------------------------------------------
def cmd_map(args) -> int:
    if getattr(args, "svg", None):
        return _map_svg(args)
    from vdisk.ops.info import iter_map
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
    """`vdisk map IMAGE --svg FILE`: the allocation drawn as a grid (vdisk.ops.svgmap)."""
    from vdisk.ops.svgmap import write_svg_map
    with open_image(args, args.image) as d:
        cells = write_svg_map(d, args.svg, max_cells=args.cells)
    print(f"wrote {args.svg}: {cells.count} cells of {human_bytes(cells.cell_bytes)}", file=sys.stderr)
    return 0


# -- measure ------------------------------------------------------------------------------------
def cmd_measure(args) -> int:
    from vdisk.ops.measure import measure
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
    from vdisk.ops.compare import compare
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




def register(sub) -> None:
    """Add this module's commands to the `vdisk` parser."""
    p = sub.add_parser("info", help="describe an image (format, sizes, allocation, parent chain)")
    p.add_argument("image")
    add_open_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (see docs/cli.md)")
    p.add_argument("--chain", "--backing-chain", action="store_true",
                   help="also list every layer's format details (--backing-chain: qemu-img's spelling)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="create a new image (base or differencing)")
    p.add_argument("image")
    p.add_argument("size", nargs="?", type=size_arg,
                   help="virtual size, e.g. 10G, 512M, 4096 (default 127G; a differencing image "
                        "takes its parent's)")
    p.add_argument("-f", "--format", choices=FORMATS,
                   help="format (default: from the name: .vdi, .vhdx/.avhdx, .raw/.img, else vhd; a parent's format)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"))
    p.add_argument("--parent", metavar="P", help="make a differencing image on top of P")
    p.add_argument("--block-size", type=size_arg, metavar="N", help="allocation unit (dynamic images)")
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
    p.add_argument("-O", "--output-format", choices=FORMATS,
                   help="output format (default: from DST's name: .vhd, .vdi, else raw)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"), help="output subtype (default dynamic)")
    p.add_argument("--block-size", type=size_arg, metavar="N", help="output allocation unit")
    add_create_options_option(p)
    p.add_argument("--target", choices=tuple(TARGETS),
                   help="azure: fixed VHD, whole MiB; hyper-v: dynamic VHD; hyper-v-vhdx: dynamic VHDX; "
                        "virtualbox: dynamic VDI")
    p.add_argument("--no-zero-detect", dest="zero_detect", action="store_false",
                   help="copy allocated zero blocks too")
    p.add_argument("--sparsify", action="store_true",
                   help="skip what the guest's filesystems do not use (it reads as zeros in DST)")
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
    p.add_argument("--size", type=size_arg, metavar="N", help="measure a new empty image of N bytes")
    add_open_options(p)
    p.add_argument("-O", "--output-format", choices=FORMATS, help="output format (default raw)")
    p.add_argument("--subtype", choices=("fixed", "dynamic"), help="output subtype (default dynamic)")
    p.add_argument("--block-size", type=size_arg, metavar="N", help="output allocation unit")
    add_create_options_option(p)
    p.add_argument("--target", choices=tuple(TARGETS), help="as for convert")
    p.add_argument("--json", action="store_true", help='{"required", "fully-allocated", format, subtype, ...}')
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("compare", help="compare the contents of two images (exit 0 same, 1 different, 2 error)")
    p.add_argument("a")
    p.add_argument("b")
    add_open_options(p)
    p.add_argument("-F", dest="format_b", choices=FORMATS, help="format of B (default: probed)")
    p.add_argument("-s", "--strict", action="store_true", help="images of different sizes differ")
    add_progress_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare, error_status=2)

