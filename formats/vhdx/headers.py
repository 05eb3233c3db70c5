"""The two VHDX headers: which one is current, and the update that rewrites both (VHDX.md §3, A5.1)."""
from __future__ import annotations

from typing import Optional

from vdisk.errors import FormatError, UnsupportedError
from vdisk.io import ImageFile
from .crc32c import crc_ok, with_crc
from .structs import HEADER_FIELD_OFFSETS, HEADER_OFFSETS, HEADER_SIG, HEADER_SIZE, MiB, Header


def _parse(raw: bytes) -> Optional[dict]:
    """The header's fields if its signature and CRC-32C are right, else None."""
    if len(raw) < HEADER_SIZE or raw[:4] != HEADER_SIG or not crc_ok(raw[:HEADER_SIZE]):
        return None
    return {k: v for k, v in Header.parse(raw[:HEADER_SIZE]).items() if not k.startswith("_")}


class HeaderPair:
    """Both header slots of an open file; ``current`` is the valid one with the larger sequence number."""

    def __init__(self, path: str, raws: list[bytes]):
        self.path = path
        self.slots = [_parse(r) for r in raws]
        self.problems = [None if h is not None else
                         ("bad signature" if raws[i][:4] != HEADER_SIG else "checksum mismatch")
                         for i, h in enumerate(self.slots)]
        valid = [i for i, h in enumerate(self.slots) if h is not None]
        if not valid:
            raise FormatError(path, "header", None, HEADER_OFFSETS[0],
                              f"neither header is valid (1: {self.problems[0]}, 2: {self.problems[1]})")
        if len(valid) == 2 and self.slots[0]["sequence_number"] == self.slots[1]["sequence_number"]:
            if raws[0][:HEADER_SIZE] != raws[1][:HEADER_SIZE]:
                raise FormatError(path, "header", "sequence_number", HEADER_OFFSETS[0] + 8,
                                  f"both headers carry sequence number {self.slots[0]['sequence_number']} "
                                  f"but differ: no current header")
            self.index = 1
        else:
            self.index = max(valid, key=lambda i: self.slots[i]["sequence_number"])

    @property
    def current(self) -> dict:
        return self.slots[self.index]

    def validate(self, file_size: int) -> None:
        h, at = self.current, HEADER_OFFSETS[self.index]

        def bad(field: str, problem: str, cls=FormatError):
            if cls is FormatError:
                return FormatError(self.path, f"header {self.index + 1}", field, at + HEADER_FIELD_OFFSETS[field],
                                   problem)
            return cls(f"{self.path}: header {self.index + 1}: {problem}")

        if h["version"] != 1:
            raise bad("version", f"version {h['version']} is not 1 (VHDX 2)", UnsupportedError)
        log_in_use = h["log_guid"] != bytes(16)
        if h["log_version"] != 0 and log_in_use:
            raise bad("log_version", f"log version {h['log_version']} is not 0", UnsupportedError)
        off, length = h["log_offset"], h["log_length"]
        if length % MiB:
            raise bad("log_length", f"log length {length:#x} is not a multiple of 1 MiB")
        if length and (off % MiB or off < MiB):
            raise bad("log_offset", f"log offset {off:#x} is not a multiple of 1 MiB past the header section")
        if length and off + length > file_size:
            raise bad("log_offset", f"the log ({length} bytes at {off:#x}) lies past the end of the "
                                    f"{file_size}-byte file")
        if log_in_use and not length:
            raise bad("log_length", "the header names a log but gives it no length")

    def update(self, file: ImageFile, **changes) -> None:
        """Write the header with *changes* into the non-current slot, flush, and again into the
        other slot, flush (A5.1): a cut at any point leaves one valid header, old or new."""
        for _ in range(2):
            new = dict(self.current)
            new.update(changes)
            new["sequence_number"] = self.current["sequence_number"] + 1
            new["checksum"] = 0
            raw = with_crc(Header.build(new))
            other = 1 - self.index
            file.pwrite(raw, HEADER_OFFSETS[other])
            file.sync()
            new["checksum"] = int.from_bytes(raw[4:8], "little")
            self.slots[other] = new
            self.problems[other] = None
            self.index = other
