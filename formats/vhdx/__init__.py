"""Microsoft VHDX: fixed, dynamic and differencing images (spec digest VHDX.md).

``open_vhdx`` opens one file (replaying its log: in place when writable, in memory when not),
``create_vhdx`` makes a new one, ``peek_identity`` reads the DataWriteGuid a child links to.
"""
from .open import is_vhdx, open_vhdx, peek_identity
from .create import create_vhdx

__all__ = ["is_vhdx", "open_vhdx", "peek_identity", "create_vhdx"]
