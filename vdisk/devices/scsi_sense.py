"""SCSI status codes, sense keys and sense-data builders (SPC-4 fixed and descriptor formats).

A command handler that fails raises :class:`SenseError`; :class:`vdisk.devices.scsi.ScsiDisk`
turns it into CHECK CONDITION with the sense bytes built here.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

# -- status ------------------------------------------------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40

# -- sense keys --------------------------------------------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# -- (ASC, ASCQ) pairs used by the disk ---------------------------------------------------------
ASC_NO_ADDITIONAL = (0x00, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LUN_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAM = (0x26, 0x00)
ASC_PARAM_LIST_LENGTH = (0x1A, 0x00)
ASC_SAVING_NOT_SUPPORTED = (0x39, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOCATION_FAILED = (0x27, 0x07)
ASC_UNRECOVERED_READ = (0x11, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_MISCOMPARE_VERIFY = (0x1D, 0x00)
ASC_INTERNAL_FAILURE = (0x44, 0x00)
ASC_POWER_ON_RESET = (0x29, 0x00)
ASC_CAPACITY_CHANGED = (0x2A, 0x09)
ASC_MEDIUM_NOT_PRESENT = (0x3A, 0x00)

FIXED_SENSE_LEN = 18


class SenseError(Exception):
    """A command failed with CHECK CONDITION and this sense data.

    ``field``/``bit`` locate the offending byte (and bit) of the CDB (``in_cdb=True``) or of the
    parameter list; ``info`` fills the INFORMATION field (failing LBA or miscompare offset).
    """

    def __init__(self, key: int, asc_ascq: tuple[int, int], *, info: Optional[int] = None,
                 field: Optional[int] = None, bit: Optional[int] = None, in_cdb: bool = True):
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.info = info
        self.field = field
        self.bit = bit
        self.in_cdb = in_cdb
        super().__init__(f"sense {key:x}/{self.asc:02x}/{self.ascq:02x}")

    def sense(self, descriptor: bool = False) -> bytes:
        builder = descriptor_sense if descriptor else fixed_sense
        return builder(self.key, self.asc, self.ascq, info=self.info, field=self.field,
                       bit=self.bit, in_cdb=self.in_cdb)


def illegal_field(field: int, bit: Optional[int] = None) -> SenseError:
    """INVALID FIELD IN CDB pointing at CDB byte ``field`` (and ``bit``)."""
    return SenseError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field=field, bit=bit)


def illegal_param(field: int, bit: Optional[int] = None) -> SenseError:
    """INVALID FIELD IN PARAMETER LIST pointing at parameter byte ``field``."""
    return SenseError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAM, field=field, bit=bit,
                      in_cdb=False)


def _sense_key_specific(field: Optional[int], bit: Optional[int], in_cdb: bool) -> bytes:
    if field is None:
        return b"\x00\x00\x00"
    b0 = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        b0 |= 0x08 | (bit & 7)
    return struct.pack(">BH", b0, field & 0xFFFF)


def fixed_sense(key: int, asc: int, ascq: int, *, info: Optional[int] = None,
                field: Optional[int] = None, bit: Optional[int] = None, in_cdb: bool = True) -> bytes:
    """18-byte fixed-format sense (response code 0x70, VALID when INFORMATION is set)."""
    b0 = 0x70
    information = 0
    if info is not None:
        b0 |= 0x80
        information = info & 0xFFFFFFFF  # fixed format carries only 32 bits
    return (struct.pack(">BBBIB", b0, 0, key & 0xF, information, 10) + b"\x00\x00\x00\x00"
            + bytes((asc, ascq, 0)) + _sense_key_specific(field, bit, in_cdb))


def descriptor_sense(key: int, asc: int, ascq: int, *, info: Optional[int] = None,
                     field: Optional[int] = None, bit: Optional[int] = None,
                     in_cdb: bool = True) -> bytes:
    """Descriptor-format sense (0x72) with information and sense-key-specific descriptors."""
    descriptors = b""
    if info is not None:
        descriptors += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, info & 0xFFFFFFFFFFFFFFFF)
    if field is not None:
        descriptors += struct.pack(">BBBB", 0x02, 0x06, 0, 0) + _sense_key_specific(field, bit, in_cdb) + b"\x00"
    return bytes((0x72, key & 0xF, asc, ascq, 0, 0, 0, len(descriptors))) + descriptors


class ScsiResult(NamedTuple):
    """What a command produced: SCSI status, data for the initiator, and sense bytes (or b"")."""
    status: int
    data_in: bytes
    sense: bytes

    @property
    def ok(self) -> bool:
        return self.status == GOOD


def decode_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) from fixed or descriptor sense bytes; (0, 0, 0) if empty."""
    if not sense:
        return (0, 0, 0)
    code = sense[0] & 0x7F
    if code in (0x72, 0x73):
        return (sense[1] & 0xF, sense[2], sense[3])
    return (sense[2] & 0xF, sense[12], sense[13])
