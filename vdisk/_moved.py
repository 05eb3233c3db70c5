"""Old module names that keep working for one release after the operations moved to vdisk.ops.

``import vdisk.check`` gives the very module ``vdisk.ops.check`` (same object, so patching one
patches the other), with a DeprecationWarning naming the new place.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {f"vdisk.{name}": f"vdisk.ops.{name}" for name in (
    "check", "commit", "compact", "compare", "convert", "info", "layout", "measure", "relink",
    "resize", "svgmap", "runs")}
MOVED.update({"vdisk.formats.vhd_structs": "vdisk.formats.vhd.structs",
              "vdisk.formats.vdi_structs": "vdisk.formats.vdi.structs",
              "vdisk.cli_io": "vdisk.cli.io", "vdisk.cli_maint": "vdisk.cli.maint",
              "vdisk.cli_shadow": "vdisk.cli.shadow", "vdisk.cli_backup": "vdisk.cli.backup"})


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        sys.modules[module.__spec__.name] = module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the names in MOVED to the modules that now hold them."""

    def find_spec(self, fullname, path, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}", DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
