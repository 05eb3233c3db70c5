"""The one list of format drivers, and recognition by the best probe score.

Importing this module loads no driver: the CLI builds its option choices from :data:`NAMES`
without paying for numpy and construct; a driver is imported on first use.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .base import Layer
    from .driver import Driver

#: format name -> module whose ``DRIVER`` serves it (the order users see in choices).
_MODULES = {"raw": "vdisk.formats.raw", "vhd": "vdisk.formats.vhd", "vdi": "vdisk.formats.vdi",
            "vhdx": "vdisk.formats.vhdx"}
NAMES: tuple[str, ...] = tuple(_MODULES)
#: ``--target`` names: the format and subtype each platform imports natively (docs/cli.md)
TARGETS = {
    "azure": ("vhd", "fixed"),          # fixed VHD, whole MiB, exact size
    "hyper-v": ("vhd", "dynamic"),      # dynamic VHD, exact size (creator 'win '): every Hyper-V
    "hyper-v-vhdx": ("vhdx", "dynamic"),  # Hyper-V's own default since Windows Server 2012
    "virtualbox": ("vdi", "dynamic"),
}
_loaded: dict[str, "Driver"] = {}


def driver(name: str) -> "Driver":
    """The driver of format *name*; ValueError for a name no driver has."""
    d = _loaded.get(name)
    if d is None:
        module = _MODULES.get(name)
        if module is None:
            raise ValueError(f"unknown format {name!r} (choose from {', '.join(NAMES)})")
        d = _loaded[name] = importlib.import_module(module).DRIVER
    return d


def drivers() -> list["Driver"]:
    """Every driver, in probing order (see Driver.probe_rank)."""
    return sorted((driver(n) for n in NAMES), key=lambda d: d.probe_rank)


def driver_for(layer: "Layer") -> "Driver":
    """The driver that opened *layer*."""
    return driver(layer.format)


def by_name(path: str) -> Optional["Driver"]:
    """The driver whose file-name ending *path* has (``disk.vhd`` -> VHD), or None."""
    name = os.fspath(path).lower()
    for d in drivers():
        if d.extensions and name.endswith(d.extensions):
            return d
    return None


def format_from_name(path: str, default: str = "raw") -> str:
    """The format a new file's name implies: its driver's, else *default*."""
    d = by_name(path)
    return d.name if d is not None else default
