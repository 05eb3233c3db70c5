"""A picture of a virtual disk's allocation: an SVG grid, and a one-line text strip.

    with vdisk.open("disk.vhd") as d:
        cells = allocation_cells(d, max_cells=512)    # bytes of each kind and layer per cell
        svg = render_svg(d, cells)                    # str: the document `vdisk map --svg` writes
        print(density_strip(allocation_cells(d, max_cells=64)))

The disk is cut into equal cells (a power of two bytes, at least a sector; the last may be
shorter). Each cell is a column stacked from the bottom by what it holds: data of each chain
layer (top image first, one colour per layer), VDI zero blocks, unallocated space, in proportion
to their bytes. Partition boundaries come from the partition table (vdisk.mount.partitions).
Every cell and segment carries its exact byte counts as ``data-*`` attributes, so the picture can
be checked against :meth:`Disk.extents`. The work grows with the number of extents plus the
number of cells, never with the virtual size, and the document with the number of cells.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from vdisk.disk import Disk
from vdisk.engine import ExtentKind
from vdisk.progress import human_bytes
from vdisk.ops.runs import iter_runs
from vdisk.units import SECTOR

#: Data colours by chain layer (0 = the top image), then repeated.
LAYER_COLOURS = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#718096")
ZERO_COLOUR = "#a0aec0"
UNALLOCATED_COLOUR = "#edf2f7"
PARTITION_COLOUR = "#e53e3e"
#: Characters of the text strip, by the share of the segment holding data (empty to full).
STRIP_LEVELS = " ▁▂▃▄▅▆▇█"


@dataclass
class Cells:
    """Per-cell byte counts. ``data[layer, i]`` data of *layer* in cell *i*; ``zero[i]``,
    ``unallocated[i]`` the rest. ``cell_bytes`` is each cell's length (the last may be shorter)."""
    size: int
    cell_bytes: int
    data: np.ndarray          # (layers, cells) int64
    zero: np.ndarray          # (cells,) int64
    unallocated: np.ndarray   # (cells,) int64

    @property
    def count(self) -> int:
        return len(self.zero)

    def start(self, i: int) -> int:
        return i * self.cell_bytes

    def length(self, i: int) -> int:
        return min(self.cell_bytes, self.size - i * self.cell_bytes)


def cell_size_for(size: int, max_cells: int) -> int:
    """The smallest power of two (at least a sector) that cuts *size* into at most *max_cells*."""
    if max_cells < 1:
        raise ValueError("max_cells must be at least 1")
    need = max(SECTOR, -(-size // max_cells))
    return 1 << (need - 1).bit_length()


def _add(counts: np.ndarray, start: int, end: int, cell: int) -> None:
    """Add the bytes of [start, end) to the cells they fall in (whole cells as one slice)."""
    first, last = start // cell, (end - 1) // cell
    if first == last:
        counts[first] += end - start
        return
    counts[first] += (first + 1) * cell - start
    counts[first + 1:last] += cell
    counts[last] += end - last * cell


def allocation_cells(disk: Disk, max_cells: int = 512) -> Cells:
    """What each cell of the virtual disk holds, from one pass over the disk's runs."""
    size = disk.size
    cell = cell_size_for(size, max_cells)
    n = max(1, -(-size // cell)) if size else 0
    layers = max(1, len(disk.chain))
    data = np.zeros((layers, n), dtype=np.int64)
    zero = np.zeros(n, dtype=np.int64)
    unallocated = np.zeros(n, dtype=np.int64)
    for start, length, kind, level, _ in iter_runs(disk):      # a window of runs at a time
        if kind == ExtentKind.DATA:
            target = data[level]
        elif kind == ExtentKind.ZERO:
            target = zero
        else:
            target = unallocated
        _add(target, start, start + length, cell)
    return Cells(size, cell, data, zero, unallocated)


def density_strip(cells: Cells) -> str:
    """One character per cell: how much of it holds data (any layer), from ' ' to '█'."""
    if not cells.count:
        return ""
    stored = cells.data.sum(axis=0)
    lengths = np.minimum(cells.cell_bytes, cells.size - np.arange(cells.count, dtype=np.int64) * cells.cell_bytes)
    top = len(STRIP_LEVELS) - 1
    # Any data at all shows at least the lowest bar; only a full cell is a full block.
    levels = np.where(stored == 0, 0, np.clip(np.ceil(stored * top / lengths), 1, top)).astype(int)
    levels[(stored > 0) & (stored < lengths) & (levels == top)] = top - 1
    return "".join(STRIP_LEVELS[v] for v in levels)


# -- SVG ----------------------------------------------------------------------------------------
COLUMNS = 64
CELL_W, CELL_H, GAP = 16, 16, 2
ROW_GAP = 11                          # room above each row for partition labels
MARGIN, HEADER_H, LINE_H = 16, 50, 18


def _attrs(**kw) -> str:
    return " ".join(f"{k.replace('_', '-')}={quoteattr(str(v))}" for k, v in kw.items())


def _cell_x(cells: Cells, offset: int) -> tuple[float, int]:
    """(x, row) of a virtual byte offset on the grid."""
    k = min(offset // cells.cell_bytes, cells.count - 1) if cells.count else 0
    frac = (offset - k * cells.cell_bytes) / cells.cell_bytes
    return MARGIN + (k % COLUMNS) * (CELL_W + GAP) + frac * CELL_W, k // COLUMNS


def _partitions(disk: Disk) -> list:
    """The disk's partitions (MBR/GPT), or none when there is no readable table."""
    try:
        from vdisk.mount.partitions import read_partitions
    except ImportError:                  # vdisk.mount is part of the package; be safe anyway
        return []
    notes: list[str] = []
    return read_partitions(disk, warn=notes.append)


def render_svg(disk: Disk, cells: Cells, *, title: Optional[str] = None,
               partitions: Optional[Sequence] = None) -> str:
    """The SVG document for *cells* of *disk* (see the module docstring for what it shows)."""
    if partitions is None:
        partitions = _partitions(disk)
    rows = max(1, -(-cells.count // COLUMNS))
    grid_w = min(cells.count, COLUMNS) * (CELL_W + GAP) - GAP if cells.count else CELL_W
    grid_h = rows * (CELL_H + ROW_GAP)
    layer_names = [os.path.basename(layer.path) for layer in disk.chain]
    legend_items = [(LAYER_COLOURS[i % len(LAYER_COLOURS)], f"data in layer {i}: {name}", int(cells.data[i].sum()))
                    for i, name in enumerate(layer_names) if i < len(cells.data)]
    legend_items += [(ZERO_COLOUR, "zero blocks (read as zeros, no data stored)", int(cells.zero.sum())),
                     (UNALLOCATED_COLOUR, "unallocated (stored in no layer: reads as zeros)", int(cells.unallocated.sum()))]
    legend_y = MARGIN + HEADER_H + grid_h + 24
    parts_y = legend_y + len(legend_items) * LINE_H + 8
    height = parts_y + len(partitions) * LINE_H + MARGIN
    width = max(MARGIN * 2 + grid_w, 640)
    name = title or os.path.basename(disk.path)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" {_attrs(width=width, height=height)} '
           f'viewBox="0 0 {width} {height}">',
           f"<title>{escape(f'vdisk map of {name}')}</title>",
           "<style>text{font-family:DejaVu Sans,Arial,sans-serif;font-size:12px;fill:#1a202c}"
           ".h{font-size:15px;font-weight:bold}.cell rect{stroke:none}</style>",
           '<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text class="h" x="{MARGIN}" y="{MARGIN + 14}">{escape(name)}</text>',
           f'<text x="{MARGIN}" y="{MARGIN + 34}">{escape(_header(disk, cells))}</text>']
    out.append(f'<g id="cells" {_attrs(data_size=cells.size, data_cell_bytes=cells.cell_bytes, data_columns=COLUMNS)}>')
    top = MARGIN + HEADER_H
    for i in range(cells.count):
        x = MARGIN + (i % COLUMNS) * (CELL_W + GAP)
        y0 = top + (i // COLUMNS) * (CELL_H + ROW_GAP)
        length = cells.length(i)
        segments = [("data", layer, int(cells.data[layer, i]), LAYER_COLOURS[layer % len(LAYER_COLOURS)])
                    for layer in range(len(cells.data))]
        segments += [("zero", None, int(cells.zero[i]), ZERO_COLOUR),
                     ("unallocated", None, int(cells.unallocated[i]), UNALLOCATED_COLOUR)]
        tip = ", ".join(f"{human_bytes(n)} {kind}" + (f" (layer {layer})" if layer is not None else "")
                        for kind, layer, n, _ in segments if n)
        out.append(f'<g class="cell" {_attrs(data_index=i, data_start=cells.start(i), data_length=length)}>'
                   f"<title>{escape(f'{cells.start(i):#x} +{human_bytes(length)}: {tip}')}</title>")
        bottom = y0 + CELL_H
        for kind, layer, n, colour in segments:          # stacked from the bottom
            if not n:
                continue
            h = CELL_H * n / length
            bottom -= h
            extra = {} if layer is None else {"data_layer": layer}
            out.append(f'<rect class="seg" {_attrs(data_kind=kind, data_bytes=n, **extra)} x="{x}" '
                       f'y="{bottom:.3f}" width="{CELL_W}" height="{h:.3f}" fill="{colour}"/>')
        out.append("</g>")
    out.append("</g>")
    out.append('<g id="partitions">')
    for p in partitions:
        marks = []
        for edge in (p.start, p.end):
            x, row = _cell_x(cells, min(edge, cells.size))
            y = top + row * (CELL_H + ROW_GAP)
            marks.append(f'<line x1="{x:.2f}" y1="{y - ROW_GAP + 1}" x2="{x:.2f}" y2="{y + CELL_H + 2}" '
                         f'stroke="{PARTITION_COLOUR}" stroke-width="2"/>')
        sx, srow = _cell_x(cells, p.start)
        label = f"p{p.index}"
        out.append(f'<g class="partition" {_attrs(data_index=p.index, data_start=p.start, data_end=p.end, data_type=p.type)}>'
                   + "".join(marks)
                   + f'<text x="{sx + 3:.2f}" y="{top + srow * (CELL_H + ROW_GAP) - 2}" '
                     f'style="font-size:9px;font-weight:bold;fill:{PARTITION_COLOUR}">{label}</text></g>')
    out.append("</g>")
    out.append('<g id="legend">')
    for j, (colour, text, n) in enumerate(legend_items):
        y = legend_y + j * LINE_H
        out.append(f'<rect x="{MARGIN}" y="{y - 11}" width="14" height="14" fill="{colour}" stroke="#4a5568" '
                   f'stroke-width="0.5"/><text x="{MARGIN + 22}" y="{y}">{escape(f"{text} — {human_bytes(n)}")}</text>')
    for j, p in enumerate(partitions):
        y = parts_y + j * LINE_H
        text = (f"p{p.index}  {p.start:#x}–{p.end:#x}  {human_bytes(p.length)}  {p.type_name}"
                + (f" '{p.name}'" if p.name else ""))
        out.append(f'<line x1="{MARGIN + 6}" y1="{y - 12}" x2="{MARGIN + 6}" y2="{y + 3}" stroke="{PARTITION_COLOUR}" '
                   f'stroke-width="2"/><text x="{MARGIN + 22}" y="{y}">{escape(text)}</text>')
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def _header(disk: Disk, cells: Cells) -> str:
    layers = len(disk.chain)
    chain = f", chain of {layers} layers" if layers > 1 else ""
    return (f"{disk.format} {disk.subtype}, {human_bytes(disk.size)} ({disk.size} bytes){chain}; "
            f"each cell {human_bytes(cells.cell_bytes)}, filled from the bottom by what it holds")


def write_svg_map(disk: Disk, path: str, *, max_cells: int = 512) -> Cells:
    """Write the SVG picture of *disk* to *path*; returns the cells it shows."""
    cells = allocation_cells(disk, max_cells)
    text = render_svg(disk, cells)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return cells
