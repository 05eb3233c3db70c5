"""A virtual SCSI direct-access disk (SBC-3 / SPC-4 subset), sans-IO.

    from vdisk.devices.scsi import ScsiDisk
    lu = ScsiDisk(vdisk.open("disk.vhd", "r+"))
    res = lu.execute(bytes.fromhex("88 00 0000000000000000 00000008 00 00"))   # READ(16)
    res.status, res.data_in, res.sense

``execute`` takes a CDB and the data-out buffer, and returns the SCSI status, the data-in (already
cut to the CDB's allocation length) and fixed-format sense data. It does no transport work: the
caller (a VMM's virtual HBA, or :mod:`vdisk.serve.iscsi`) moves the bytes and reports residuals.

Checks follow the order in ``spec/BLOCK-BACKENDS.md`` §1.2: opcode, CDB fields, write protect,
LBA range (``lba + n <= capacity`` in Python integers, so nothing overflows), then the transfer.
Logical blocks are the disk's ``logical_sector_size`` (512, or 4096 for an image made so); a
trailing partial block of a raw file is not exposed. The disk is used only through the
:class:`vdisk.blockdev.BlockDevice` protocol.
"""
from __future__ import annotations

import logging
import struct
import threading
from typing import Callable, Optional

import numpy as np

from ..blockdev import ExtentKind
from ..errors import ReadOnlyError, VDiskError
from . import scsi_pages as pages
from .scsi_sense import (ASC_CAPACITY_CHANGED, ASC_INTERNAL_FAILURE, ASC_INVALID_FIELD_IN_CDB,
                         ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_LUN_NOT_SUPPORTED,
                         ASC_MISCOMPARE_VERIFY, ASC_PARAM_LIST_LENGTH, ASC_POWER_ON_RESET,
                         ASC_SAVING_NOT_SUPPORTED, ASC_UNRECOVERED_READ, ASC_WRITE_ERROR,
                         ASC_WRITE_PROTECTED, CHECK_CONDITION, DATA_PROTECT, GOOD, HARDWARE_ERROR,
                         ILLEGAL_REQUEST, MEDIUM_ERROR, MISCOMPARE, UNIT_ATTENTION, ScsiResult,
                         SenseError, decode_sense, descriptor_sense, fixed_sense, illegal_field,
                         illegal_param)
from .scsi_sense import ASC_MEDIUM_NOT_PRESENT, NOT_READY

__all__ = ["ScsiDisk", "ScsiResult", "SenseError", "BLOCK_SIZE", "cdb_length"]

_log = logging.getLogger("vdisk.scsi")

BLOCK_SIZE = pages.BLOCK
_SHIFT = 9

# Counts of 512-byte blocks; a LU with larger logical blocks keeps the same bytes (see ScsiDisk).
MAX_TRANSFER_BLOCKS = 65536          # 32 MiB per READ/WRITE: bounds one command's memory
MIN_OPTIMAL_TRANSFER_BLOCKS = 2048   # 1 MiB: Linux sizes its requests by this (io_opt)
MAX_UNMAP_DESCRIPTORS = 255
MAX_UNMAP_BLOCKS = 0xFFFFFFFF
MAX_WRITE_SAME_BLOCKS = 0x400000     # 2 GiB per WRITE SAME
MAX_COMPARE_AND_WRITE_BLOCKS = 255
_CHUNK_BLOCKS = 2048                 # 1 MiB pieces for VERIFY and patterned WRITE SAME
_LBA_STATUS_SPAN = 1 << 30           # GET LBA STATUS looks at most 1 GiB ahead
MAX_PHYSICAL_BLOCK = 32 << 10        # largest logical or physical block a LU reports

_GROUP_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}

_EMPTY = b""
_NO_UNIT_ATTENTION = frozenset((0x12, 0xA0, 0x03))   # INQUIRY, REPORT LUNS, REQUEST SENSE
_GOOD_EMPTY = ScsiResult(GOOD, b"", b"")
# commands whose data-out grows with their transfer length (see refuse_before_data)
_BULK_DATA_OUT = frozenset((0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x2F, 0xAF, 0x8F))


class _AwaitingData(Exception):
    """Raised where a command first needs its data-out, when it is checked before the data."""


_AWAITING_DATA = object()           # the data_out of a command checked before its data arrives


# (flags, LBA, transfer length) of the 10/12/16-byte READ/WRITE/VERIFY layouts, in one unpack
_CDB10 = struct.Struct(">xBIxH")
_CDB12 = struct.Struct(">xBII")
_CDB16 = struct.Struct(">xBQI")


def cdb_length(opcode: int) -> Optional[int]:
    """CDB length implied by the opcode's group code, or None for variable/vendor groups."""
    return _GROUP_LENGTH.get(opcode >> 5)


def _u16(b, o: int) -> int:
    return (b[o] << 8) | b[o + 1]


def _u32(b, o: int) -> int:
    return struct.unpack_from(">I", b, o)[0]


def _u64(b, o: int) -> int:
    return struct.unpack_from(">Q", b, o)[0]


class ScsiDisk:
    """One SCSI logical unit backed by a :class:`vdisk.blockdev.BlockDevice` (a :class:`vdisk.Disk`).

    Its logical blocks are the disk's ``logical_sector_size`` (512, or 4096 for an image made
    so); ``physical_block_size`` (default: the logical size) is reported as logical blocks per
    physical block. Bounds that protect memory (one command's transfer, WRITE SAME) are in bytes,
    so a 4096-byte LU advertises an eighth of the blocks a 512-byte one does.
    """

    def __init__(self, disk, *, read_only: Optional[bool] = None, vendor: str = "VDISK",
                 product: Optional[str] = None, serial: Optional[str] = None,
                 revision: str = "0001", physical_block_size: Optional[int] = None):
        self.disk = disk
        name = getattr(disk, "path", None) or "the image"
        sector = int(disk.logical_sector_size)
        if sector < BLOCK_SIZE or sector & (sector - 1) or sector > MAX_PHYSICAL_BLOCK:
            raise VDiskError(f"{name}: logical sectors of {sector} bytes are not a SCSI block size")
        self.logical_block_size = sector
        self._shift = shift = sector.bit_length() - 1
        if physical_block_size is None:
            physical_block_size = sector
        exponent = (physical_block_size >> shift).bit_length() - 1
        if physical_block_size < sector or physical_block_size != sector << exponent \
                or physical_block_size > MAX_PHYSICAL_BLOCK:
            raise ValueError(f"physical_block_size must be {sector} (the logical block) times a power of two, "
                             "at most 32 KiB")
        self.physical_exponent = exponent   # READ CAPACITY(16): logical blocks per physical
        self.max_transfer = (MAX_TRANSFER_BLOCKS << _SHIFT) >> shift
        self._chunk = (_CHUNK_BLOCKS << _SHIFT) >> shift
        self._max_write_same = (MAX_WRITE_SAME_BLOCKS << _SHIFT) >> shift
        self.read_only = bool(disk.read_only) if read_only is None else bool(read_only)
        self.blocks = int(disk.size) >> shift
        if self.blocks == 0:
            raise VDiskError(f"{name}: {int(disk.size)} bytes is less than one {sector}-byte "
                             "logical block; a SCSI disk needs at least one")
        uuid = disk.uuid
        unique = pages.unique_id_for(uuid.bytes if uuid is not None else None,
                                     str(getattr(disk, "path", "") or id(disk)))
        if product is None:
            fmt = str(getattr(disk, "format", "") or "raw").upper()
            product = f"{fmt} disk"
        if serial is None:
            serial = unique.hex()[:20].upper()
        self.identity = pages.Identity(vendor, product, revision, serial, unique)
        granularity = int(disk.block_size or 0) >> shift
        if granularity <= 0 or granularity & (granularity - 1) or granularity > 1 << 20:
            granularity = 1
        # the image block size (whole blocks allocate and copy at once), at least 1 MiB, at most
        # one command: a guest that splits its I/O below this wastes round trips
        optimal = min(max(granularity, (MIN_OPTIMAL_TRANSFER_BLOCKS << _SHIFT) >> shift), self.max_transfer)
        self.limits = pages.Limits(
            granularity=1 << exponent,
            max_transfer=self.max_transfer, optimal_transfer=optimal,
            max_unmap_lba_count=MAX_UNMAP_BLOCKS, max_unmap_descriptors=MAX_UNMAP_DESCRIPTORS,
            unmap_granularity=granularity, max_write_same=self._max_write_same,
            max_compare_and_write=MAX_COMPARE_AND_WRITE_BLOCKS)
        self.geometry = pages.chs_geometry(self.blocks, getattr(disk, "geometry", None))
        self.write_cache = True      # mode page 8 WCE; off => every write is flushed before GOOD
        self._handlers: dict[int, Callable] = {
            0x00: self._test_unit_ready,
            0x03: self._request_sense,      # called with the nexus instead (see execute)
            0x08: self._read6, 0x28: self._read10, 0xA8: self._read12, 0x88: self._read16,
            0x0A: self._write6, 0x2A: self._write10, 0xAA: self._write12, 0x8A: self._write16,
            0x2E: self._write_verify10, 0xAE: self._write_verify12, 0x8E: self._write_verify16,
            0x2F: self._verify10, 0xAF: self._verify12, 0x8F: self._verify16,
            0x12: self._inquiry,
            0x15: self._mode_select6, 0x55: self._mode_select10,
            0x1A: self._mode_sense6, 0x5A: self._mode_sense10,
            0x1B: self._start_stop_unit,
            0x25: self._read_capacity10,
            0x9E: self._service_action_in16,
            0x35: self._sync_cache10, 0x91: self._sync_cache16,
            0x41: self._write_same10, 0x93: self._write_same16,
            0x42: self._unmap,
            0xA0: self._report_luns,
            0x34: self._prefetch10, 0x90: self._prefetch16,
            0x89: self._compare_and_write,
            0xA3: self._maintenance_in,
        }
        self._nexuses: set = set()
        self._pending_ua: dict = {}           # nexus -> sense bytes of a pending UNIT ATTENTION
        self._atomic = threading.RLock()  # writers hold it: COMPARE AND WRITE is atomic against them

    # -- entry points ------------------------------------------------------------------------
    def execute(self, cdb: bytes, data_out: Optional[bytes] = None, *, nexus=0) -> ScsiResult:
        """Run one command; never raises for anything an initiator can send.

        ``nexus`` names the initiator (I_T nexus) for unit attentions; a VMM with one virtual
        HBA leaves it at 0, the iSCSI target passes one value per session.
        """
        if nexus not in self._nexuses:
            self._nexuses.add(nexus)
        if not cdb:
            return ScsiResult(CHECK_CONDITION, _EMPTY, fixed_sense(ILLEGAL_REQUEST, *ASC_INVALID_OPCODE))
        op = cdb[0]
        if self._pending_ua and nexus in self._pending_ua and op not in _NO_UNIT_ATTENTION:
            return ScsiResult(CHECK_CONDITION, _EMPTY, self._pending_ua.pop(nexus))
        try:
            handler = self._handlers.get(op)
            if handler is None:
                raise SenseError(ILLEGAL_REQUEST, ASC_INVALID_OPCODE, field=0)
            if len(cdb) < _GROUP_LENGTH[op >> 5]:
                raise SenseError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
            if op == 0x03:
                return ScsiResult(GOOD, self._request_sense(cdb, nexus), _EMPTY)
            data = handler(cdb, data_out)
            return ScsiResult(GOOD, data, _EMPTY) if data else _GOOD_EMPTY
        except SenseError as exc:
            return ScsiResult(CHECK_CONDITION, _EMPTY, exc.sense())
        except _AwaitingData:
            return None                            # refuse_before_data: every check passed
        except Exception:                          # a bug must not take the HBA down with it
            _log.exception("SCSI command %s failed inside the device", bytes(cdb[:16]).hex())
            return ScsiResult(CHECK_CONDITION, _EMPTY, fixed_sense(HARDWARE_ERROR, *ASC_INTERNAL_FAILURE))

    def execute_lun(self, lun: int, cdb: bytes, data_out: Optional[bytes] = None, *,
                    nexus=0) -> ScsiResult:
        """Like :meth:`execute` for a target whose only logical unit is LUN 0.

        INQUIRY to another LUN reports "no device here" (peripheral 0x7F), REPORT LUNS works on
        any LUN, and everything else gets LOGICAL UNIT NOT SUPPORTED.
        """
        if lun == 0:
            return self.execute(cdb, data_out, nexus=nexus)
        op = cdb[0] if cdb else None
        if op == 0xA0:
            return self.execute(cdb, data_out, nexus=nexus)
        if op == 0x12:
            res = self.execute(cdb, data_out, nexus=nexus)
            if res.status == GOOD and res.data_in:
                return ScsiResult(GOOD, b"\x7f" + res.data_in[1:], _EMPTY)
            return res
        return ScsiResult(CHECK_CONDITION, _EMPTY, fixed_sense(ILLEGAL_REQUEST, *ASC_LUN_NOT_SUPPORTED))

    def refuse_before_data(self, lun: int, cdb: bytes, *, nexus=0) -> Optional[ScsiResult]:
        """The result of a data-out command that fails whatever data comes; None if it may go on.

        A transport calls this before it collects the data of a WRITE, WRITE AND VERIFY or
        VERIFY with BYTCHK: a write to a write-protected LU, outside the disk, or longer than one
        command may move fails here with the sense :meth:`execute_lun` would give, so no buffer
        is filled for it. A pending unit attention is reported (and consumed) as by a command.
        No I/O is done.
        """
        if not cdb or cdb[0] not in _BULK_DATA_OUT or not self.data_out_length(cdb):
            return None
        return self.execute_lun(lun, cdb, _AWAITING_DATA, nexus=nexus)

    def clip_transfer(self, cdb: bytes, nbytes: int) -> Optional[bytes]:
        """The write CDB with its transfer length cut to the whole blocks in ``nbytes``.

        For transports whose initiator announced less data than the CDB asks for (iSCSI
        overflow): only what arrives is written. None when the command cannot be shortened.
        """
        if not cdb:
            return None
        op, blocks = cdb[0], nbytes >> self._shift
        out = bytearray(cdb)
        if op in (0x2A, 0x2E):
            struct.pack_into(">H", out, 7, min(blocks, 0xFFFF))
        elif op in (0xAA, 0xAE):
            struct.pack_into(">I", out, 6, blocks)
        elif op in (0x8A, 0x8E):
            struct.pack_into(">I", out, 10, blocks)
        elif op == 0x0A and 0 < blocks < 256:          # WRITE(6): 0 would mean 256
            out[4] = blocks
        else:
            return None
        return bytes(out)

    # -- unit attentions ---------------------------------------------------------------------
    def unit_attention(self, asc_ascq: tuple[int, int] = ASC_POWER_ON_RESET, *, nexus=None) -> None:
        """Queue a UNIT ATTENTION for one initiator, or (``nexus=None``) for every known one.

        It is reported once, on the next command other than INQUIRY, REPORT LUNS and REQUEST
        SENSE (which returns it as its data). Use it after a reset (29/00) or when the image was
        resized under a running guest (2A/09, see :meth:`capacity_changed`).
        """
        sense = fixed_sense(UNIT_ATTENTION, *asc_ascq)
        for n in (self._nexuses if nexus is None else (nexus,)):
            self._pending_ua[n] = sense

    def reset(self) -> None:
        """LOGICAL UNIT RESET: mode pages back to defaults, a unit attention for everyone."""
        self.write_cache = True
        self.unit_attention(ASC_POWER_ON_RESET)

    def capacity_changed(self) -> None:
        """Re-read the disk size and tell every initiator (CAPACITY DATA HAS CHANGED)."""
        self.blocks = int(self.disk.size) >> self._shift
        self.unit_attention(ASC_CAPACITY_CHANGED)

    def forget_nexus(self, nexus) -> None:
        """The initiator went away (logout, connection loss): drop its pending state."""
        self._nexuses.discard(nexus)
        self._pending_ua.pop(nexus, None)

    def data_out_length(self, cdb: bytes) -> Optional[int]:
        """Bytes of data-out the command expects (for transports computing residuals), if known."""
        if not cdb:
            return None
        op = cdb[0]
        try:
            if op in (0x0A,):
                return (cdb[4] or 256) << self._shift
            if op in (0x2A, 0x2E):
                return _u16(cdb, 7) << self._shift
            if op in (0xAA, 0xAE):
                return _u32(cdb, 6) << self._shift
            if op in (0x8A, 0x8E):
                return _u32(cdb, 10) << self._shift
            if op in (0x2F, 0xAF, 0x8F):
                bytchk = (cdb[1] >> 1) & 3
                n = _u16(cdb, 7) if op == 0x2F else _u32(cdb, 6 if op == 0xAF else 10)
                return {0: 0, 1: n << self._shift, 3: self.logical_block_size}.get(bytchk, 0)
            if op in (0x41, 0x93, 0x89):
                return None                       # exactly-sized: the device checks the length
            if op in (0x15,):
                return cdb[4]
            if op in (0x55, 0x42):
                return _u16(cdb, 7)
        except (IndexError, struct.error):
            return None
        return 0

    # -- shared checks -----------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED)

    def _check_range(self, lba: int, n: int) -> None:
        if lba + n > self.blocks:
            raise SenseError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, info=lba)

    def _read_blocks(self, lba: int, n: int) -> bytes:
        try:
            buf = bytearray(n << self._shift)
            self.disk.readinto(buf, lba << self._shift)
            return bytes(buf)
        except (VDiskError, OSError):
            raise SenseError(MEDIUM_ERROR, ASC_UNRECOVERED_READ,
                             info=self._first_bad_block(lba, n)) from None

    def _first_bad_block(self, lba: int, n: int) -> int:
        """After a failed read, find the first block that fails on its own (error path only)."""
        for block in range(lba, lba + min(n, self.max_transfer)):
            try:
                self.disk.readinto(bytearray(self.logical_block_size), block << self._shift)
            except (VDiskError, OSError):
                return block
        return lba

    def _write_blocks(self, lba: int, data, fua: bool) -> None:
        try:
            self.disk.pwrite(data, lba << self._shift)
            if fua or not self.write_cache:
                self.disk.flush()
        except ReadOnlyError:
            raise SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED) from None
        except (VDiskError, OSError):
            raise SenseError(MEDIUM_ERROR, ASC_WRITE_ERROR, info=lba) from None

    def _flush(self) -> None:
        try:
            self.disk.flush()
        except (VDiskError, OSError):
            raise SenseError(MEDIUM_ERROR, ASC_WRITE_ERROR) from None

    @staticmethod
    def _data(data_out: Optional[bytes], need: int, length_field: int) -> memoryview:
        """The first ``need`` bytes of data-out; a short buffer is a CDB/transfer mismatch."""
        if data_out is _AWAITING_DATA:
            raise _AwaitingData
        view = memoryview(data_out if data_out is not None else _EMPTY)
        if len(view) < need:
            raise illegal_field(length_field)
        return view[:need] if len(view) != need else view

    # -- READ / WRITE ------------------------------------------------------------------------
    def _read(self, lba: int, n: int, flags: int) -> bytes:
        if flags & 0xE0:
            raise illegal_field(1, 7)             # RDPROTECT: no protection information
        if lba + n > self.blocks:
            raise SenseError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, info=lba)
        if n == 0:
            return _EMPTY
        if n > self.max_transfer:
            raise illegal_field(2)
        return self._read_blocks(lba, n)

    def _read6(self, cdb, data_out):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._read(lba, cdb[4] or 256, 0)

    def _read10(self, cdb, data_out):
        flags, lba, n = _CDB10.unpack_from(cdb)
        return self._read(lba, n, flags)

    def _read12(self, cdb, data_out):
        flags, lba, n = _CDB12.unpack_from(cdb)
        return self._read(lba, n, flags)

    def _read16(self, cdb, data_out):
        flags, lba, n = _CDB16.unpack_from(cdb)
        return self._read(lba, n, flags)

    def _write(self, lba: int, n: int, flags: int, data_out, length_field: int, *,
               verify: bool = False) -> bytes:
        if flags & 0xE0:
            raise illegal_field(1, 7)             # WRPROTECT
        self._check_writable()
        self._check_range(lba, n)
        if n == 0:
            return _EMPTY
        if n > self.max_transfer:
            raise illegal_field(length_field)
        data = self._data(data_out, n << self._shift, length_field)
        with self._atomic:
            self._write_blocks(lba, data, fua=bool(flags & 0x08))
            if verify and flags & 0x02:           # WRITE AND VERIFY with BYTCHK: read back
                self._compare(lba, n, data, single=False)
        return _EMPTY

    def _write6(self, cdb, data_out):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._write(lba, cdb[4] or 256, 0, data_out, 4)

    def _write10(self, cdb, data_out):
        return self._write(_u32(cdb, 2), _u16(cdb, 7), cdb[1], data_out, 7)

    def _write12(self, cdb, data_out):
        return self._write(_u32(cdb, 2), _u32(cdb, 6), cdb[1], data_out, 6)

    def _write16(self, cdb, data_out):
        return self._write(_u64(cdb, 2), _u32(cdb, 10), cdb[1], data_out, 10)

    def _write_verify10(self, cdb, data_out):
        return self._write(_u32(cdb, 2), _u16(cdb, 7), cdb[1] & ~0x08, data_out, 7, verify=True)

    def _write_verify12(self, cdb, data_out):
        return self._write(_u32(cdb, 2), _u32(cdb, 6), cdb[1] & ~0x08, data_out, 6, verify=True)

    def _write_verify16(self, cdb, data_out):
        return self._write(_u64(cdb, 2), _u32(cdb, 10), cdb[1] & ~0x08, data_out, 10, verify=True)

    # -- VERIFY ------------------------------------------------------------------------------
    def _verify(self, lba: int, n: int, flags: int, data_out, length_field: int) -> bytes:
        if flags & 0xE0:
            raise illegal_field(1, 7)             # VRPROTECT
        bytchk = (flags >> 1) & 3
        if bytchk == 2:
            raise illegal_field(1, 2)
        self._check_range(lba, n)
        if n == 0:
            return _EMPTY
        if bytchk == 0:                           # medium verification: every block readable
            for start in range(lba, lba + n, self._chunk):
                self._read_blocks(start, min(self._chunk, lba + n - start))
            return _EMPTY
        if n > self.max_transfer:
            raise illegal_field(length_field)
        single = bytchk == 3
        data = self._data(data_out, self.logical_block_size if single else n << self._shift, length_field)
        self._compare(lba, n, data, single=single)
        return _EMPTY

    def _compare(self, lba: int, n: int, expected: memoryview, *, single: bool) -> None:
        for start in range(lba, lba + n, self._chunk):
            count = min(self._chunk, lba + n - start)
            actual = self._read_blocks(start, count)
            base = (start - lba) << self._shift
            want = bytes(expected) * count if single else expected[base:base + (count << self._shift)]
            if actual != want:
                diff = np.frombuffer(actual, np.uint8) != np.frombuffer(want, np.uint8)
                raise SenseError(MISCOMPARE, ASC_MISCOMPARE_VERIFY, info=base + int(diff.argmax()))

    def _verify10(self, cdb, data_out):
        return self._verify(_u32(cdb, 2), _u16(cdb, 7), cdb[1], data_out, 7)

    def _verify12(self, cdb, data_out):
        return self._verify(_u32(cdb, 2), _u32(cdb, 6), cdb[1], data_out, 6)

    def _verify16(self, cdb, data_out):
        return self._verify(_u64(cdb, 2), _u32(cdb, 10), cdb[1], data_out, 10)

    def _compare_and_write(self, cdb, data_out):
        flags, lba, n = cdb[1], _u64(cdb, 2), cdb[13]
        if flags & 0xE0:
            raise illegal_field(1, 7)             # WRPROTECT
        self._check_writable()
        self._check_range(lba, n)
        if n == 0 or n > MAX_COMPARE_AND_WRITE_BLOCKS:
            # SBC allows 0 as a no-op, but initiators (libiscsi among them) put 256 into this
            # one-byte field and get 0: refuse rather than report a compare that never happened
            raise illegal_field(13)
        data = memoryview(data_out if data_out is not None else _EMPTY)
        if len(data) != (n << self._shift) * 2:            # verify half + write half, exactly
            raise illegal_field(13)
        with self._atomic:
            self._compare(lba, n, data[:n << self._shift], single=False)
            self._write_blocks(lba, data[n << self._shift:], fua=bool(flags & 0x08))
        return _EMPTY

    # -- cache ------------------------------------------------------------------------------
    def _sync_cache(self, lba: int, n: int) -> bytes:
        if lba > self.blocks or (n and lba + n > self.blocks):
            raise SenseError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, info=lba)
        self._flush()
        return _EMPTY

    def _prefetch10(self, cdb, data_out):
        self._check_range(_u32(cdb, 2), _u16(cdb, 7))
        return _EMPTY                             # no cache of our own to warm: GOOD

    def _prefetch16(self, cdb, data_out):
        self._check_range(_u64(cdb, 2), _u32(cdb, 10))
        return _EMPTY

    def _sync_cache10(self, cdb, data_out):
        return self._sync_cache(_u32(cdb, 2), _u16(cdb, 7))

    def _sync_cache16(self, cdb, data_out):
        return self._sync_cache(_u64(cdb, 2), _u32(cdb, 10))

    # -- thin provisioning --------------------------------------------------------------------
    def _deallocate(self, lba: int, n: int) -> None:
        try:
            with self._atomic:
                self.disk.discard(lba << self._shift, n << self._shift)
        except ReadOnlyError:
            raise SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED) from None
        except (VDiskError, OSError):
            raise SenseError(MEDIUM_ERROR, ASC_WRITE_ERROR, info=lba) from None

    def _write_same(self, cdb, data_out, lba: int, n: int, length_field: int, ndob: bool) -> bytes:
        flags = cdb[1]
        if flags & 0xE0:
            raise illegal_field(1, 7)             # WRPROTECT
        if flags & 0x10:
            raise illegal_field(1, 4)             # ANCHOR: ANC_SUP=0
        if flags & 0x04:
            raise illegal_field(1, 2)             # PBDATA
        if flags & 0x02:
            raise illegal_field(1, 1)             # LBDATA
        self._check_writable()
        self._check_range(lba, n)
        if n == 0:                                # WSNZ=1 in the block limits page
            raise illegal_field(length_field)
        if n > self._max_write_same:
            raise illegal_field(length_field)
        if ndob:
            if data_out:
                raise illegal_field(1, 0)
            block = bytes(self.logical_block_size)
        else:
            if data_out is None or len(data_out) != self.logical_block_size:
                raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
            block = bytes(data_out)
        if not any(block):
            try:
                if flags & 0x08:                  # UNMAP: may deallocate (LBPRZ: reads zeros)
                    self._deallocate(lba, n)
                else:
                    with self._atomic:
                        self.disk.write_zeroes(lba << self._shift, n << self._shift)
                if not self.write_cache:
                    self.disk.flush()
            except ReadOnlyError:
                raise SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED) from None
            except (VDiskError, OSError):
                raise SenseError(MEDIUM_ERROR, ASC_WRITE_ERROR, info=lba) from None
            return _EMPTY
        chunk = memoryview(block * min(n, self._chunk))
        with self._atomic:
            for start in range(lba, lba + n, self._chunk):
                count = min(self._chunk, lba + n - start)
                self._write_blocks(start, chunk[:count << self._shift], fua=False)
        if not self.write_cache:
            self._flush()
        return _EMPTY

    def _write_same10(self, cdb, data_out):
        return self._write_same(cdb, data_out, _u32(cdb, 2), _u16(cdb, 7), 7, ndob=False)

    def _write_same16(self, cdb, data_out):
        return self._write_same(cdb, data_out, _u64(cdb, 2), _u32(cdb, 10), 10,
                                ndob=bool(cdb[1] & 0x01))

    def _unmap(self, cdb, data_out):
        if cdb[1] & 0x01:
            raise illegal_field(1, 0)             # ANCHOR: ANC_SUP=0
        plen = _u16(cdb, 7)
        self._check_writable()
        if plen == 0:
            return _EMPTY
        if plen < 8:
            raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
        param = bytes(data_out or _EMPTY)[:plen]
        if len(param) < 8:
            raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
        data_len, desc_len = _u16(param, 0), _u16(param, 2)
        if desc_len % 16 or data_len < desc_len + 6 or 8 + desc_len > len(param):
            raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
        count = desc_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise illegal_param(2)
        ranges = []
        total = 0
        for i in range(count):
            lba, n = struct.unpack_from(">QI", param, 8 + 16 * i)
            if n > MAX_UNMAP_BLOCKS:
                raise illegal_param(8 + 16 * i + 8)
            self._check_range(lba, n)
            total += n
            if n:
                ranges.append((lba, n))
        if total > MAX_UNMAP_BLOCKS:
            raise illegal_param(8)
        for lba, n in ranges:                     # validated all before changing anything
            self._deallocate(lba, n)
        if ranges and not self.write_cache:
            self._flush()
        return _EMPTY

    def _get_lba_status(self, cdb) -> bytes:
        lba, alloc = _u64(cdb, 2), _u32(cdb, 10)
        if lba >= self.blocks:
            raise SenseError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, info=lba)
        if alloc == 0:
            return _EMPTY
        max_desc = max(1, (alloc - 8) // 16)
        span = min((self.blocks - lba) << self._shift, _LBA_STATUS_SPAN)
        runs: list[list[int]] = []                # [start_block, end_block, status]
        try:
            extents = self.disk.extents(lba << self._shift, span)
        except (VDiskError, OSError):
            raise SenseError(MEDIUM_ERROR, ASC_UNRECOVERED_READ, info=lba) from None
        for ext in extents:
            mapped = ext.kind == ExtentKind.DATA
            start = max(lba, ext.offset >> self._shift)
            end = (ext.offset + ext.length + self.logical_block_size - 1) >> self._shift
            status = 0 if mapped else 1           # 0 mapped, 1 deallocated
            if runs and start < runs[-1][1]:      # a block shared by two extents is mapped if
                if mapped and runs[-1][2] != 0:   # any of its bytes is
                    runs[-1][1] = start
                    if runs[-1][1] <= runs[-1][0]:
                        runs.pop()
                else:
                    start = runs[-1][1]
            if end <= start:
                continue
            if runs and runs[-1][2] == status and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                if len(runs) == max_desc:
                    break
                runs.append([start, end, status])
        body = b"".join(struct.pack(">QIB3x", s, e - s, st) for s, e, st in runs[:max_desc])
        return (struct.pack(">I4x", len(body) + 4) + body)[:alloc]

    # -- information ---------------------------------------------------------------------------
    def _test_unit_ready(self, cdb, data_out):
        return _EMPTY

    def _request_sense(self, cdb, nexus) -> bytes:
        if cdb[1] & 0xFE:
            raise illegal_field(1)
        alloc = cdb[4]
        pending = self._pending_ua.pop(nexus, None)
        key, asc, ascq = decode_sense(pending) if pending else (0, 0, 0)
        if cdb[1] & 0x01:                         # DESC: descriptor format
            return descriptor_sense(key, asc, ascq)[:alloc]
        return fixed_sense(key, asc, ascq)[:alloc]

    def _inquiry(self, cdb, data_out):
        evpd, page, alloc = cdb[1], cdb[2], _u16(cdb, 3)
        if evpd & 0xFE:
            raise illegal_field(1, 1)             # CMDDT (obsolete) and reserved bits
        if not evpd & 0x01:
            if page:
                raise illegal_field(2)
            return pages.standard_inquiry(self.identity)[:alloc]
        data = pages.vpd_page(page, self.identity, self.limits)
        if data is None:
            raise illegal_field(2)
        return data[:alloc]

    def _last_block(self) -> int:
        """LBA of the last block; a disk shrunk to nothing under us reports no medium."""
        if self.blocks <= 0:
            raise SenseError(NOT_READY, ASC_MEDIUM_NOT_PRESENT)
        return self.blocks - 1

    def _read_capacity10(self, cdb, data_out):
        if not cdb[8] & 0x01 and _u32(cdb, 2):
            raise illegal_field(2)                # LBA without PMI
        last = self._last_block()
        return struct.pack(">II", last if last < 0xFFFFFFFF else 0xFFFFFFFF, self.logical_block_size)

    def _service_action_in16(self, cdb, data_out):
        sa = cdb[1] & 0x1F
        if sa == 0x10:
            alloc = _u32(cdb, 10)
            data = struct.pack(">QIBB", self._last_block(), self.logical_block_size, 0, self.physical_exponent)
            data += bytes((0xC0, 0x00)) + bytes(16)   # LBPME | LBPRZ, lowest aligned LBA 0
            return data[:alloc]
        if sa == 0x12:
            return self._get_lba_status(cdb)
        raise illegal_field(1, 4)

    def _maintenance_in(self, cdb, data_out):
        if cdb[1] & 0x1F != 0x0C:
            raise illegal_field(1, 4)             # only REPORT SUPPORTED OPERATION CODES
        rctd, options, op, sa = bool(cdb[2] & 0x80), cdb[2] & 0x07, cdb[3], _u16(cdb, 4)
        alloc = _u32(cdb, 6)
        if options == 0:
            return pages.all_commands(rctd)[:alloc]
        has_sa = op in pages.OPCODES_WITH_SERVICE_ACTIONS
        if options == 1:
            if has_sa:
                raise illegal_field(3)
            return pages.one_command(op, None, rctd)[:alloc]
        if options == 2:
            if not has_sa and (op, None) in pages.COMMAND_USAGE:
                raise illegal_field(3)
            return pages.one_command(op, sa, rctd)[:alloc]
        if options == 3:
            return pages.one_command(op, sa if has_sa else None, rctd)[:alloc]
        raise illegal_field(2, 2)

    def _report_luns(self, cdb, data_out):
        if cdb[2] not in (0x00, 0x01, 0x02):
            raise illegal_field(2)
        alloc = _u32(cdb, 6)
        if alloc < 16:
            raise illegal_field(6)
        return (struct.pack(">I4x", 8) + bytes(8))[:alloc]

    def _start_stop_unit(self, cdb, data_out):
        power, start, loej = cdb[4] >> 4, cdb[4] & 0x01, cdb[4] & 0x02
        if power not in (0, 1, 2, 3, 7, 0xA, 0xB):
            raise illegal_field(4, 7)
        if power == 0 and loej and not start:     # eject: a fixed disk has no medium to eject
            raise illegal_field(4, 1)
        if power == 0 and not start and not cdb[4] & 0x04:
            self._flush()                         # stop: make everything durable first
        return _EMPTY

    # -- mode pages --------------------------------------------------------------------------
    def _mode_data(self, pc: int, page: int, subpage: int, field: int) -> bytes:
        if pc == 3:
            raise SenseError(ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED, field=2, bit=7)
        if page == 0x3F:
            if subpage not in (0x00, 0xFF):
                raise illegal_field(3)
            codes = pages.MODE_PAGE_ORDER
        else:
            if subpage != 0 or page not in pages.MODE_PAGE_ORDER:
                raise illegal_field(field if page not in pages.MODE_PAGE_ORDER else 3)
            codes = (page,)
        return b"".join(pages.mode_page(c, wce=self.write_cache, geometry=self.geometry)[pc]
                        for c in codes)

    def _device_specific(self) -> int:
        return (0x80 if self.read_only else 0) | 0x10   # WP, DPOFUA

    def _block_descriptor(self, long_lba: bool) -> bytes:
        if long_lba:
            return struct.pack(">Q4xI", self.blocks, self.logical_block_size)
        return struct.pack(">II", min(self.blocks, 0xFFFFFFFF), self.logical_block_size & 0xFFFFFF)

    def _mode_sense6(self, cdb, data_out):
        dbd, pc, page = cdb[1] & 0x08, cdb[2] >> 6, cdb[2] & 0x3F
        body = self._mode_data(pc, page, cdb[3], 2)
        desc = b"" if dbd else self._block_descriptor(False)
        header = bytes((3 + len(desc) + len(body), 0, self._device_specific(), len(desc)))
        data = header + desc + body
        if len(data) > 256:
            raise illegal_field(2)
        return data[:cdb[4]]

    def _mode_sense10(self, cdb, data_out):
        dbd, llbaa, pc, page = cdb[1] & 0x08, cdb[1] & 0x10, cdb[2] >> 6, cdb[2] & 0x3F
        body = self._mode_data(pc, page, cdb[3], 2)
        desc = b"" if dbd else self._block_descriptor(bool(llbaa))
        header = struct.pack(">HBBBBH", 6 + len(desc) + len(body), 0, self._device_specific(),
                             0x01 if desc and llbaa else 0, 0, len(desc))
        return (header + desc + body)[:_u16(cdb, 7)]

    def _mode_select(self, cdb, data_out, plen: int, header_len: int) -> bytes:
        if not cdb[1] & 0x10:
            raise illegal_field(1, 4)             # PF must be set: we only speak SPC pages
        if cdb[1] & 0x01:
            raise illegal_field(1, 0)             # SP: nothing can be saved
        if plen == 0:
            return _EMPTY
        param = bytes(data_out or _EMPTY)[:plen]
        if len(param) < plen or plen < header_len:
            raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
        if header_len == 4:
            desc_len = param[3]
            long_lba = False
        else:
            desc_len = _u16(param, 6)
            long_lba = bool(param[4] & 0x01)
        if desc_len not in (0, 16 if long_lba else 8):
            raise illegal_param(3 if header_len == 4 else 6)
        if header_len + desc_len > plen:
            raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
        if desc_len:
            desc = param[header_len:header_len + desc_len]
            length = int.from_bytes(desc[-3:], "big")
            if length not in (0, self.logical_block_size):
                raise illegal_param(header_len + desc_len - 3)
        pos = header_len + desc_len
        new_wce = self.write_cache
        while pos < plen:
            if pos + 2 > plen:
                raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
            code, length = param[pos] & 0x3F, param[pos + 1]
            if param[pos] & 0x40 or code not in pages.MODE_PAGE_ORDER:
                raise illegal_param(pos)          # subpage format or unknown page
            current, mask, _default = pages.mode_page(code, wce=self.write_cache,
                                                      geometry=self.geometry)
            if length != current[1]:
                raise illegal_param(pos + 1)
            if pos + 2 + length > plen:
                raise SenseError(ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH, in_cdb=False)
            page = param[pos:pos + 2 + length]
            for i in range(2, len(page)):
                if (page[i] ^ current[i]) & ~mask[i] & 0xFF:
                    raise illegal_param(pos + i)
            if code == 0x08:
                new_wce = bool(page[2] & 0x04)
            pos += 2 + length
        if self.write_cache and not new_wce:
            self._flush()                         # switching to write-through: drain the cache
        self.write_cache = new_wce
        return _EMPTY

    def _mode_select6(self, cdb, data_out):
        return self._mode_select(cdb, data_out, cdb[4], 4)

    def _mode_select10(self, cdb, data_out):
        return self._mode_select(cdb, data_out, _u16(cdb, 7), 8)

