"""CRC-32C as VHDX uses it: the standard check value, and the lane-parallel path equal to the
byte-by-byte definition for every length (lane boundaries, tails, continuation)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vdisk.formats.vhdx.crc32c import _raw, crc32c, crc_ok, with_crc


def reference(data: bytes) -> int:
    return _raw(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=300_000), st.integers(0, 300_000))
def test_every_length_and_split_matches_the_byte_loop(data, cut):
    cut = min(cut, len(data))
    assert crc32c(data) == reference(data)
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)


def test_checksum_field_helpers():
    raw = with_crc(b"head" + b"\x99" * 4 + bytes(4088))
    assert crc_ok(raw) and not crc_ok(raw[:100] + b"\x01" + raw[101:])


@pytest.mark.parametrize("n", [8191, 8192, 8193, 16384 + 63, 65535, 65536, 1 << 20, (1 << 20) + 4097])
def test_lane_path_at_its_boundaries(n):
    data = np.random.default_rng(n).bytes(n)
    assert crc32c(data) == reference(data)
