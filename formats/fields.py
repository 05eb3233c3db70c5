"""Where each field of a construct declaration lies, computed from the declaration itself."""
from __future__ import annotations

from construct import Struct


def field_offsets(struct: Struct) -> dict[str, int]:
    """Byte offset of every named field of a fixed-size Struct, in declaration order."""
    offsets, at = {}, 0
    for sub in struct.subcons:
        if sub.name:
            offsets[sub.name] = at
        at += sub.sizeof()
    return offsets
