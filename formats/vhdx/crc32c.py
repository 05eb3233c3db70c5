"""CRC-32C (Castagnoli), as every VHDX checksum uses it (VHDX.md A1).

Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF. Small inputs go through
a 256-entry table byte by byte; large ones (region tables, log entries) are cut into lanes whose
CRCs numpy advances together, then joined with a precomputed "append n zero bytes" operator.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _make_table()
_NP_TABLE = np.array(TABLE, dtype=np.uint32)
_SMALL = 8192           # below this, the plain loop is quicker than setting up lanes
_LANE = 4096            # bytes per lane, at most


def _raw(crc: int, data) -> int:
    """Advance the register *crc* over *data* (no initial value, no final XOR)."""
    t = TABLE
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@lru_cache(maxsize=8)
def _shift_tables(nbytes: int) -> np.ndarray:
    """Four 256-entry tables whose XOR maps a register to the register after *nbytes* zero bytes
    (the operation is linear over GF(2), so it splits by byte of the register)."""
    basis = np.array([1 << i for i in range(32)], dtype=np.uint32)
    regs = basis.copy()
    for _ in range(nbytes):
        regs = _NP_TABLE[regs & 0xFF] ^ (regs >> 8)
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)        # (value, bit)
    return np.stack([np.bitwise_xor.reduce(np.where(bits, regs[8 * k:8 * k + 8], 0).astype(np.uint32), axis=1)
                     for k in range(4)])


def _shift(tables: np.ndarray, reg: int) -> int:
    return int(tables[0, reg & 0xFF] ^ tables[1, (reg >> 8) & 0xFF] ^ tables[2, (reg >> 16) & 0xFF]
               ^ tables[3, reg >> 24])


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of *data* (bytes-like), continuing from a previous result *crc* (0 to start)."""
    view = memoryview(data).cast("B")
    reg = crc ^ 0xFFFFFFFF
    n = len(view)
    if n < _SMALL:
        return _raw(reg, view) ^ 0xFFFFFFFF
    lane = _LANE
    while lane > 64 and n // lane < 256:        # about 256 lanes: the numpy steps are the cost
        lane //= 2
    lanes = n // lane
    body = np.frombuffer(view[: lanes * lane], dtype=np.uint8).reshape(lanes, lane)
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = reg
    for j in range(lane):
        regs = _NP_TABLE[(regs ^ body[:, j]) & 0xFF] ^ (regs >> 8)
    tables = _shift_tables(lane)
    # register(A || B) = shift(register(A), len(B)) ^ register_from_zero(B)
    acc = int(regs[0])
    for r in regs[1:].tolist():
        acc = _shift(tables, acc) ^ r
    acc = _raw(acc, view[lanes * lane:])
    return acc ^ 0xFFFFFFFF


def with_crc(raw: bytes, at: int = 4) -> bytes:
    """*raw* with its 4-byte little-endian checksum field at *at* set to the CRC-32C of the
    structure taken with that field zero."""
    buf = bytearray(raw)
    buf[at:at + 4] = bytes(4)
    buf[at:at + 4] = crc32c(buf).to_bytes(4, "little")
    return bytes(buf)


def crc_ok(raw, at: int = 4) -> bool:
    """Whether the checksum field at *at* matches the structure's CRC-32C."""
    buf = bytearray(raw)
    stored = int.from_bytes(buf[at:at + 4], "little")
    buf[at:at + 4] = bytes(4)
    return crc32c(buf) == stored
