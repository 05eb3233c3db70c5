"""A virtual ATA/IDE hard disk: a register-level device model over a :class:`vdisk.Disk`.

Sans-IO: the device never touches a port, an interrupt controller or guest memory. A virtual
machine monitor forwards the guest's accesses to the command block registers
(:meth:`AtaDisk.write_register` / :meth:`AtaDisk.read_register`, the data port through
:meth:`AtaDisk.read_data` / :meth:`AtaDisk.write_data` and their bulk forms), the Device Control
register (:meth:`AtaDisk.write_control`, :meth:`AtaDisk.read_alt_status`), looks at
:attr:`AtaDisk.irq` (or passes ``irq_callback``), and moves DMA data with
:meth:`AtaDisk.dma_in` / :meth:`AtaDisk.dma_out` when :attr:`AtaDisk.dma_request` says so.

:meth:`AtaDisk.execute` runs one command given at task-file level on top of that same register
interface, so both paths share every rule. Facts: ``BLOCK-BACKENDS.md`` §2 (ATA8-ACS register model,
QEMU ``hw/ide/core.c`` behaviour where the standard leaves room).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from ..errors import ReadOnlyError, VDiskError
from vdisk.units import SECTOR
from .ata_identify import (DSM_MAX_BLOCKS, LBA28_LIMIT, MAX_MULTIPLE, MODE_LIMITS, MWDMA, PIO,
                           SWDMA, UDMA, Geometry, IdentifyState, build_identify, default_firmware,
                           default_model, default_serial, image_geometry)

__all__ = [
    "AtaDisk", "AtaResult", "DmaRequest", "chs_address",
    "REG_DATA", "REG_ERROR", "REG_FEATURES", "REG_COUNT", "REG_LBA_LOW", "REG_LBA_MID", "REG_LBA_HIGH",
    "REG_DEVICE", "REG_STATUS", "REG_COMMAND",
    "BSY", "DRDY", "DF", "DSC", "DRQ", "ERR", "ICRC", "UNC", "IDNF", "ABRT",
    "CTL_HOB", "CTL_SRST", "CTL_NIEN", "DMA_IN", "DMA_OUT",
]

# command block register offsets (0x1F0 + n on the primary channel)
REG_DATA = 0
REG_ERROR = REG_FEATURES = 1
REG_COUNT = 2
REG_LBA_LOW = 3      # sector number in CHS mode
REG_LBA_MID = 4      # cylinder low
REG_LBA_HIGH = 5     # cylinder high
REG_DEVICE = 6       # bit6 LBA, bit4 DEV, bits3-0 head / LBA[27:24]
REG_STATUS = REG_COMMAND = 7

# status register
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# error register
ICRC, UNC, IDNF, ABRT = 0x80, 0x40, 0x10, 0x04
# device control register
CTL_HOB, CTL_SRST, CTL_NIEN = 0x80, 0x04, 0x02

DEV_LBA = 0x40
DEV_DEV = 0x10

DMA_IN = "in"        # device -> memory (READ DMA)
DMA_OUT = "out"      # memory -> device (WRITE DMA, DATA SET MANAGEMENT)

_OK = DRDY | DSC                 # 0x50
_FAIL = DRDY | DSC | ERR         # 0x51
_CHUNK = 256                     # sectors per backing-disk request in DMA and VERIFY
_IO_ERRORS = (OSError, VDiskError)


class DmaRequest(NamedTuple):
    """A DMA transfer the device waits for: ``direction`` DMA_IN/DMA_OUT, ``remaining`` bytes."""
    direction: str
    remaining: int


@dataclass(frozen=True)
class AtaResult:
    """Outcome of :meth:`AtaDisk.execute`: Status and Error registers and the data read.

    ``lba`` and ``count`` are the output task file (LBA registers packed like the input ``lba``:
    48 bits for EXT commands, else ``Device[3:0]<<24 | High<<16 | Mid<<8 | Low``); they do not take
    part in comparisons.
    """
    status: int
    error: int
    data_in: bytes = b""
    lba: int = field(default=0, compare=False)
    count: int = field(default=0, compare=False)

    @property
    def ok(self) -> bool:
        return not self.status & (ERR | DF)


def chs_address(cylinder: int, head: int, sector: int) -> int:
    """Pack a CHS address the way :meth:`AtaDisk.execute` takes ``lba`` when Device bit 6 is 0."""
    if not (0 <= cylinder <= 0xFFFF and 0 <= head <= 0xF and 0 <= sector <= 0xFF):
        raise ValueError(f"CHS address {cylinder}/{head}/{sector} does not fit the task file")
    return (head << 24) | (cylinder << 8) | sector


class _Fail(Exception):
    """Internal: end the current command with an error (and optionally a failing LBA)."""

    def __init__(self, error: int, lba: Optional[int] = None, status: int = _FAIL):
        super().__init__(error)
        self.error, self.lba, self.status = error, lba, status


class _Xfer:
    """The data phase of the command in progress."""
    __slots__ = ("kind", "lba", "remaining", "block", "mode", "flush", "buf", "pos", "acc", "bad_lba",
                 "dsm_bytes")

    def __init__(self, kind: str, lba: int = 0, remaining: int = 0, block: int = 1, mode: str = "lba28",
                 flush: bool = False):
        self.kind = kind            # "pio_in", "pio_in_buf", "pio_out", "dma_in", "dma_out", "dsm"
        self.lba = lba              # next sector to move
        self.remaining = remaining  # sectors not yet moved to/from the disk
        self.block = block          # sectors per DRQ block (PIO)
        self.mode = mode            # "lba48", "lba28" or "chs": how to write the LBA registers back
        self.flush = flush          # FUA or write cache off: flush before reporting success
        self.buf = b""              # PIO / DMA-in: data waiting for the host
        self.pos = 0
        self.acc = bytearray()      # PIO-out / DMA-out: data received from the host
        self.bad_lba: Optional[int] = None
        self.dsm_bytes = 0


# opcode -> (name, handler method name, 48-bit)
_COMMANDS = {
    0x06: ("DATA SET MANAGEMENT", "_cmd_dsm", True),
    0x10: ("RECALIBRATE", "_cmd_nop", False),
    0x20: ("READ SECTORS", "_cmd_read_pio", False),
    0x21: ("READ SECTORS (no retry)", "_cmd_read_pio", False),
    0x24: ("READ SECTORS EXT", "_cmd_read_pio", True),
    0x25: ("READ DMA EXT", "_cmd_read_dma", True),
    0x27: ("READ NATIVE MAX ADDRESS EXT", "_cmd_read_native_max", True),
    0x29: ("READ MULTIPLE EXT", "_cmd_read_multiple", True),
    0x30: ("WRITE SECTORS", "_cmd_write_pio", False),
    0x31: ("WRITE SECTORS (no retry)", "_cmd_write_pio", False),
    0x34: ("WRITE SECTORS EXT", "_cmd_write_pio", True),
    0x35: ("WRITE DMA EXT", "_cmd_write_dma", True),
    0x39: ("WRITE MULTIPLE EXT", "_cmd_write_multiple", True),
    0x3D: ("WRITE DMA FUA EXT", "_cmd_write_dma", True),
    0x40: ("READ VERIFY SECTORS", "_cmd_verify", False),
    0x41: ("READ VERIFY SECTORS (no retry)", "_cmd_verify", False),
    0x42: ("READ VERIFY SECTORS EXT", "_cmd_verify", True),
    0x70: ("SEEK", "_cmd_seek", False),
    0x90: ("EXECUTE DEVICE DIAGNOSTIC", "_cmd_diagnostic", False),
    0x91: ("INITIALIZE DEVICE PARAMETERS", "_cmd_init_params", False),
    0x94: ("STANDBY IMMEDIATE (old)", "_cmd_standby", False),
    0x95: ("IDLE IMMEDIATE (old)", "_cmd_idle", False),
    0x96: ("STANDBY (old)", "_cmd_standby", False),
    0x97: ("IDLE (old)", "_cmd_idle", False),
    0x98: ("CHECK POWER MODE (old)", "_cmd_check_power", False),
    0x99: ("SLEEP (old)", "_cmd_standby", False),
    0xC4: ("READ MULTIPLE", "_cmd_read_multiple", False),
    0xC5: ("WRITE MULTIPLE", "_cmd_write_multiple", False),
    0xC6: ("SET MULTIPLE MODE", "_cmd_set_multiple", False),
    0xC8: ("READ DMA", "_cmd_read_dma", False),
    0xC9: ("READ DMA (no retry)", "_cmd_read_dma", False),
    0xCA: ("WRITE DMA", "_cmd_write_dma", False),
    0xCB: ("WRITE DMA (no retry)", "_cmd_write_dma", False),
    0xCE: ("WRITE MULTIPLE FUA EXT", "_cmd_write_multiple", True),
    0xE0: ("STANDBY IMMEDIATE", "_cmd_standby", False),
    0xE1: ("IDLE IMMEDIATE", "_cmd_idle", False),
    0xE2: ("STANDBY", "_cmd_standby", False),
    0xE3: ("IDLE", "_cmd_idle", False),
    0xE5: ("CHECK POWER MODE", "_cmd_check_power", False),
    0xE6: ("SLEEP", "_cmd_standby", False),
    0xE7: ("FLUSH CACHE", "_cmd_flush", False),
    0xEA: ("FLUSH CACHE EXT", "_cmd_flush", True),
    0xEC: ("IDENTIFY DEVICE", "_cmd_identify", False),
    0xEF: ("SET FEATURES", "_cmd_set_features", False),
    0xF8: ("READ NATIVE MAX ADDRESS", "_cmd_read_native_max", False),
}
_FUA_COMMANDS = {0x3D, 0xCE}
_WRITE_COMMANDS = {0x30, 0x31, 0x34, 0x35, 0x39, 0x3D, 0xC5, 0xCA, 0xCB, 0xCE}
_PIO_WRITE_COMMANDS = {0x30, 0x31, 0x34, 0x39, 0xC5, 0xCE}

SUPPORTED_COMMANDS = {op: name for op, (name, _, _) in _COMMANDS.items()}


class AtaDisk:
    """An ATA hard disk (ATA8-ACS, PIO + bus-master DMA, LBA28/LBA48/CHS) backed by ``disk``.

    ``disk`` is a :class:`vdisk.blockdev.BlockDevice` (a :class:`vdisk.Disk`, a shadow view, ...),
    used through that protocol only; ``geometry`` and ``path`` are used when present. ``read_only``
    defaults to the disk's own. ``unit`` is the device number on its channel (0 = master,
    1 = slave): the device executes commands only while the Device register selects it.
    ``trim_zeroes`` (word 69 bit 5) says that TRIMmed sectors read back as zeros; it defaults to
    True (a discard leaves zeros, by the protocol).

    Logical sectors are 512 bytes. A disk with larger logical sectors (a VHDX made with 4096) is
    refused with :class:`vdisk.VDiskError`: ATA8-ACS long logical sectors (IDENTIFY word 106
    bit 12, words 117-118) change every transfer and few guests or firmwares drive them, and
    presenting such a disk as 512-byte sectors would show a 4Kn guest's partition table at the
    wrong LBAs. Export it as a SCSI disk instead (:class:`vdisk.devices.scsi.ScsiDisk`).
    """

    def __init__(self, disk, *, read_only: Optional[bool] = None, model: Optional[str] = None,
                 serial: Optional[str] = None, firmware: Optional[str] = None, unit: int = 0,
                 max_multiple: int = MAX_MULTIPLE, write_cache: bool = True, trim: Optional[bool] = None,
                 trim_zeroes: Optional[bool] = None, rotation_rate: int = 1, physical_block_size: int = SECTOR,
                 irq_callback: Optional[Callable[[bool], None]] = None):
        if unit not in (0, 1):
            raise ValueError("unit must be 0 (master) or 1 (slave)")
        if max_multiple not in (0, 1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError("max_multiple must be 0 or a power of two up to 128")
        if physical_block_size < SECTOR or physical_block_size & (physical_block_size - 1):
            raise ValueError("physical_block_size must be a power of two >= 512")
        if int(disk.logical_sector_size) != SECTOR:
            name = getattr(disk, "path", None) or "the image"
            raise VDiskError(f"{name}: has {int(disk.logical_sector_size)}-byte logical sectors; an ATA disk "
                             f"has {SECTOR}-byte sectors (export it as a SCSI disk instead)")
        self.disk = disk
        self.read_only = bool(disk.read_only) if read_only is None else bool(read_only)
        self.unit = unit
        self.irq_callback = irq_callback
        self.total_sectors = int(disk.size) // SECTOR
        if trim is None:
            trim = True
        if trim_zeroes is None:
            trim_zeroes = True
        geometry = image_geometry(disk, self.total_sectors)
        self._power_on = IdentifyState(
            total_sectors=self.total_sectors,
            default_geometry=geometry,
            current_geometry=geometry,
            serial=serial if serial is not None else default_serial(disk),
            model=model if model is not None else default_model(disk),
            firmware=firmware if firmware is not None else default_firmware(),
            max_multiple=max_multiple,
            multiple=max_multiple,
            write_cache=bool(write_cache),
            trim=bool(trim),
            trim_zeroes=bool(trim_zeroes),
            dsm_max_blocks=DSM_MAX_BLOCKS,
            rotation_rate=rotation_rate,
            physical_exponent=(physical_block_size // SECTOR).bit_length() - 1,
        )
        self._irq_level = False
        self.hardware_reset()

    # ------------------------------------------------------------------------------------------
    # reset and state
    def hardware_reset(self) -> None:
        """Power-on / hardware reset: registers, settings (multiple, cache, geometry) to defaults."""
        p = self._power_on
        self._ident = dataclasses.replace(p)
        self._feature = self._hob_feature = 0
        self._count = self._hob_count = 0
        self._lba_low = self._hob_lba_low = 0
        self._lba_mid = self._hob_lba_mid = 0
        self._lba_high = self._hob_lba_high = 0
        self._device = 0xA0
        self._control = 0
        self._error = 0x01
        self._status = _OK
        self._xfer: Optional[_Xfer] = None
        self._standby = False
        self._revert_defaults = False
        self._dirty_lba: Optional[int] = None
        self._intrq = False
        self._set_signature()
        self._update_irq()

    def _set_signature(self) -> None:
        """ATA device signature: Count 01h, LBA 000001h, Device 00h (DEV kept, obsolete bits read 1)."""
        self._count, self._lba_low, self._lba_mid, self._lba_high = 1, 1, 0, 0
        self._device &= DEV_DEV

    @property
    def selected(self) -> bool:
        """True while the Device register's DEV bit addresses this device."""
        return ((self._device >> 4) & 1) == self.unit

    @property
    def irq(self) -> bool:
        """Level of INTRQ as seen by the interrupt controller (pending and nIEN clear)."""
        return self._irq_level

    @property
    def status(self) -> int:
        """The Status register without the side effect of clearing a pending interrupt."""
        return self.read_alt_status()

    @property
    def error(self) -> int:
        return self._error

    @property
    def identify_state(self) -> IdentifyState:
        return self._ident

    @property
    def geometry(self) -> Geometry:
        """The current CHS translation (IDENTIFY words 54-56)."""
        return self._ident.current_geometry

    @property
    def multiple(self) -> int:
        return self._ident.multiple

    @property
    def write_cache(self) -> bool:
        return self._ident.write_cache

    @property
    def dma_request(self) -> Optional[DmaRequest]:
        """The DMA transfer the device waits for, or None."""
        x = self._xfer
        if x is None:
            return None
        if x.kind == "dma_in":
            return DmaRequest(DMA_IN, x.remaining * SECTOR + len(x.buf) - x.pos)
        if x.kind == "dma_out":
            return DmaRequest(DMA_OUT, x.remaining * SECTOR - len(x.acc))
        if x.kind == "dsm":
            return DmaRequest(DMA_OUT, x.dsm_bytes - len(x.acc))
        return None

    @property
    def pio_remaining(self) -> int:
        """Bytes left in the current PIO DRQ block (0 when no PIO data phase is active)."""
        x = self._xfer
        if x is None or not (self._status & DRQ):
            return 0
        if x.kind in ("pio_in", "pio_in_buf"):
            return len(x.buf) - x.pos
        if x.kind == "pio_out":
            return min(x.remaining, x.block) * SECTOR - len(x.acc)
        return 0

    def identify(self) -> bytes:
        """The 512-byte IDENTIFY DEVICE block as the device would return it now."""
        return build_identify(self._ident)

    # ------------------------------------------------------------------------------------------
    # interrupts
    def _update_irq(self) -> None:
        level = self._intrq and not (self._control & CTL_NIEN)
        if level != self._irq_level:
            self._irq_level = level
            if self.irq_callback is not None:
                self.irq_callback(level)

    def _raise_irq(self) -> None:
        self._intrq = True
        self._update_irq()

    def _clear_irq(self) -> None:
        self._intrq = False
        self._update_irq()

    # ------------------------------------------------------------------------------------------
    # register interface
    def write_register(self, reg: int, value: int) -> None:
        """A guest write to command block register ``reg`` (1-7; 0 is the data port, 16 bits)."""
        if reg == REG_DATA:
            self.write_data(value)
            return
        value &= 0xFF
        if reg == REG_COMMAND:
            self._command(value)
            return
        if not 1 <= reg <= 6:
            raise ValueError(f"no ATA command block register {reg}")
        if self._status & (BSY | DRQ):
            return                      # ignored while a command owns the task file
        self._control &= ~CTL_HOB       # any command block write clears HOB
        if reg == REG_FEATURES:
            self._hob_feature, self._feature = self._feature, value
        elif reg == REG_COUNT:
            self._hob_count, self._count = self._count, value
        elif reg == REG_LBA_LOW:
            self._hob_lba_low, self._lba_low = self._lba_low, value
        elif reg == REG_LBA_MID:
            self._hob_lba_mid, self._lba_mid = self._lba_mid, value
        elif reg == REG_LBA_HIGH:
            self._hob_lba_high, self._lba_high = self._lba_high, value
        else:
            self._device = value

    def read_register(self, reg: int) -> int:
        """A guest read of command block register ``reg``; reading Status clears INTRQ."""
        if reg == REG_DATA:
            return self.read_data()
        if not 1 <= reg <= 7:
            raise ValueError(f"no ATA command block register {reg}")
        hob = bool(self._control & CTL_HOB)
        if reg == REG_STATUS:
            value = self.read_alt_status()
            if self.selected:
                self._clear_irq()
            return value
        if reg == REG_ERROR:
            if not self.selected:
                return 0
            return self._hob_feature if hob else self._error
        if reg == REG_COUNT:
            return self._hob_count if hob else self._count
        if reg == REG_LBA_LOW:
            return self._hob_lba_low if hob else self._lba_low
        if reg == REG_LBA_MID:
            return self._hob_lba_mid if hob else self._lba_mid
        if reg == REG_LBA_HIGH:
            return self._hob_lba_high if hob else self._lba_high
        return self._device | 0xA0

    def read_alt_status(self) -> int:
        """Alternate Status (control block): Status without clearing INTRQ."""
        if not self.selected:
            return 0
        if self._control & CTL_SRST:
            return BSY
        return self._status

    def write_control(self, value: int) -> None:
        """Device Control: bit 7 HOB, bit 2 SRST (reset on its falling edge), bit 1 nIEN."""
        value &= 0xFF
        old = self._control
        if value & CTL_SRST and not old & CTL_SRST:
            self._xfer = None
            self._status = BSY | DSC
            self._error = 0x01
            self._intrq = False
        elif old & CTL_SRST and not value & CTL_SRST:
            self._xfer = None
            self._status = _OK
            self._error = 0x01
            self._standby = False
            self._set_signature()
            if self._revert_defaults:
                self._ident.multiple = self._power_on.multiple
                self._ident.write_cache = self._power_on.write_cache
                self._ident.look_ahead = self._power_on.look_ahead
                self._ident.current_geometry = self._power_on.current_geometry
                self._ident.xfer_mode = self._power_on.xfer_mode
        self._control = value
        self._update_irq()

    # -- data port -----------------------------------------------------------------------------
    def read_data(self) -> int:
        """One 16-bit read of the data port (0 when no PIO data-in block is waiting)."""
        x = self._xfer
        if x is None or not (self._status & DRQ) or x.kind not in ("pio_in", "pio_in_buf") or not self.selected:
            return 0
        buf, pos = x.buf, x.pos
        value = buf[pos] | (buf[pos + 1] << 8)
        x.pos = pos + 2
        if x.pos >= len(buf):
            self._pio_in_block_done()
        return value

    def read_data32(self) -> int:
        low = self.read_data()
        return low | (self.read_data() << 16)

    def read_data_bytes(self, length: int) -> bytes:
        """``length`` bytes from the data port (a REP INSW); words with no data behind them read 0."""
        if length < 0 or length % 2:
            raise ValueError("PIO transfers move whole 16-bit words")
        out = bytearray()
        while len(out) < length:
            x = self._xfer
            if x is None or not (self._status & DRQ) or x.kind not in ("pio_in", "pio_in_buf") or not self.selected:
                out += bytes(length - len(out))
                break
            take = min(length - len(out), len(x.buf) - x.pos)
            out += x.buf[x.pos:x.pos + take]
            x.pos += take
            if x.pos >= len(x.buf):
                self._pio_in_block_done()
        return bytes(out)

    def write_data(self, value: int) -> None:
        """One 16-bit write to the data port (ignored unless a PIO data-out block is open)."""
        self.write_data_bytes((value & 0xFFFF).to_bytes(2, "little"))

    def write_data32(self, value: int) -> None:
        self.write_data_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_data_bytes(self, data) -> int:
        """Bytes written to the data port (a REP OUTSW); returns how many the device took."""
        view = memoryview(data).cast("B")
        if len(view) % 2:
            raise ValueError("PIO transfers move whole 16-bit words")
        taken = 0
        while taken < len(view):
            x = self._xfer
            if x is None or not (self._status & DRQ) or x.kind != "pio_out" or not self.selected:
                break
            need = min(x.remaining, x.block) * SECTOR - len(x.acc)
            take = min(need, len(view) - taken)
            x.acc += view[taken:taken + take]
            taken += take
            if take == need:
                self._pio_out_block_done()
        return taken

    # -- DMA -----------------------------------------------------------------------------------
    def dma_in(self, max_bytes: Optional[int] = None) -> bytes:
        """Device-to-memory DMA: up to ``max_bytes`` (default: all that is left) of the transfer.

        Call repeatedly (one call per PRD entry, say) until :attr:`dma_request` is None. A read
        error ends the transfer early: the bytes before the failing sector are returned and the
        command completes with UNC and the failing LBA.
        """
        x = self._xfer
        if x is None or x.kind != "dma_in":
            return b""
        if max_bytes is None:
            max_bytes = x.remaining * SECTOR + len(x.buf) - x.pos
        out = bytearray()
        while len(out) < max_bytes:
            if x.pos >= len(x.buf):
                if x.remaining == 0:
                    break
                n = min(x.remaining, _CHUNK, -(-(max_bytes - len(out)) // SECTOR))
                data, bad = self._read(x.lba, n)
                x.buf, x.pos = data, 0
                moved = len(data) // SECTOR
                x.lba += moved
                x.remaining -= moved
                self._set_lba(x.lba, x.mode)
                self._set_count(x.remaining, x.mode)
                if bad is not None:
                    x.bad_lba = bad
                    x.remaining = 0
                if not data:
                    break
            take = min(max_bytes - len(out), len(x.buf) - x.pos)
            out += x.buf[x.pos:x.pos + take]
            x.pos += take
        if x.remaining == 0 and x.pos >= len(x.buf):
            if x.bad_lba is not None:
                self._finish_error(UNC, x.bad_lba, x.mode)
            else:
                self._finish_ok()
        return bytes(out)

    def dma_out(self, data) -> int:
        """Memory-to-device DMA: hand the device the next bytes; returns how many it took.

        Whole sectors are written as they arrive; the command completes (interrupt, status) when
        the last one is in. Bytes beyond the transfer are not taken.
        """
        x = self._xfer
        if x is None or x.kind not in ("dma_out", "dsm"):
            return 0
        view = memoryview(data).cast("B")
        if x.kind == "dsm":
            take = min(len(view), x.dsm_bytes - len(x.acc))
            x.acc += view[:take]
            if len(x.acc) == x.dsm_bytes:
                self._run(lambda: self._dsm_apply(bytes(x.acc)), mode="lba48")
            return take
        take = min(len(view), x.remaining * SECTOR - len(x.acc))
        x.acc += view[:take]
        whole = len(x.acc) // SECTOR
        if whole:
            chunk = bytes(x.acc[:whole * SECTOR])
            del x.acc[:whole * SECTOR]
            start = x.lba

            def write():
                self._write(start, chunk)
                x.lba += whole
                x.remaining -= whole
                self._set_lba(x.lba, x.mode)
                self._set_count(x.remaining, x.mode)
                if x.remaining == 0:
                    if x.flush:
                        self._flush()
                    self._finish_ok()
            self._run(write, mode=x.mode)
        return take

    def dma_abort(self) -> None:
        """The bus master stopped before the transfer ended: abort the command (ABRT)."""
        if self.dma_request is not None:
            self._finish_error(ABRT)

    # ------------------------------------------------------------------------------------------
    # task-file-level convenience
    def execute(self, command: int, *, features: int = 0, count: int = 0, lba: int = 0, device: int = 0x40,
                data_out: Optional[bytes] = None) -> AtaResult:
        """Run one command through the register interface and return Status, Error and data.

        For 48-bit (EXT) commands ``features``/``count`` are 16 bits and ``lba`` 48 bits; otherwise
        they are 8 bits and ``lba`` 28 bits, whose top nibble is OR-ed into Device[3:0]. With Device
        bit 6 clear (CHS addressing) ``lba`` carries the raw registers, see :func:`chs_address` (the
        head may also be given in ``device``). The DEV bit is set to this device's ``unit``.
        ``data_out`` is the data for write commands and the range list for DATA SET MANAGEMENT.
        """
        if self._xfer is not None or self._status & (BSY | DRQ) or self._control & CTL_SRST:
            raise RuntimeError("a command is in progress on the register interface")
        entry = _COMMANDS.get(command & 0xFF)
        ext = bool(entry and entry[2])
        if ext:
            if not (0 <= features <= 0xFFFF and 0 <= count <= 0xFFFF and 0 <= lba < 1 << 48):
                raise ValueError("EXT command fields out of range (16-bit features/count, 48-bit LBA)")
        elif not (0 <= features <= 0xFF and 0 <= count <= 0xFF and 0 <= lba < 1 << 28):
            raise ValueError("28-bit command fields out of range (8-bit features/count, 28-bit LBA)")
        need_out = self._expected_out(command, count, features, ext)
        if need_out:
            if data_out is None or len(data_out) < need_out:
                have = 0 if data_out is None else len(data_out)
                raise ValueError(f"command {command:#04x} needs {need_out} bytes of data_out, got {have}")
        dev = (device & 0xEF) | (self.unit << 4)
        if ext:
            for reg, value in ((REG_FEATURES, features), (REG_COUNT, count), (REG_LBA_LOW, lba >> 24),
                               (REG_LBA_MID, lba >> 32), (REG_LBA_HIGH, lba >> 40)):
                self.write_register(reg, value >> 8 if reg in (REG_FEATURES, REG_COUNT) else value)
        else:
            dev |= (lba >> 24) & 0x0F
        self.write_register(REG_DEVICE, dev)
        self.write_register(REG_FEATURES, features)
        self.write_register(REG_COUNT, count)
        self.write_register(REG_LBA_LOW, lba)
        self.write_register(REG_LBA_MID, lba >> 8)
        self.write_register(REG_LBA_HIGH, lba >> 16)
        self.write_register(REG_COMMAND, command)

        data_in = bytearray()
        out = memoryview(data_out).cast("B") if data_out is not None else memoryview(b"")
        pos = 0
        while True:
            x = self._xfer
            if x is None:
                break
            if x.kind in ("pio_in", "pio_in_buf") and self._status & DRQ:
                data_in += self.read_data_bytes(len(x.buf) - x.pos)
            elif x.kind == "pio_out" and self._status & DRQ:
                n = self.pio_remaining
                if pos + n > len(out):
                    raise AssertionError("data_out length was checked")  # pragma: no cover
                pos += self.write_data_bytes(out[pos:pos + n])
            elif x.kind == "dma_in":
                data_in += self.dma_in()
            elif x.kind in ("dma_out", "dsm"):
                pos += self.dma_out(out[pos:])
            else:                                           # pragma: no cover
                raise AssertionError(f"unexpected transfer state {x.kind}")
        status = self.read_register(REG_STATUS)
        if ext:
            out_lba = ((self._hob_lba_high << 40) | (self._hob_lba_mid << 32) | (self._hob_lba_low << 24)
                       | (self._lba_high << 16) | (self._lba_mid << 8) | self._lba_low)
            out_count = (self._hob_count << 8) | self._count
        else:
            out_lba = ((self._device & 0x0F) << 24) | (self._lba_high << 16) | (self._lba_mid << 8) | self._lba_low
            out_count = self._count
        return AtaResult(status, self._error, bytes(data_in), out_lba, out_count)

    def _expected_out(self, command: int, count: int, features: int, ext: bool) -> int:
        if command == 0x06:
            return count * SECTOR if (features & 1) else 0
        if command in _WRITE_COMMANDS:
            n = count or (65536 if ext else 256)
            return n * SECTOR
        return 0

    # ------------------------------------------------------------------------------------------
    # command dispatch
    def _command(self, cmd: int) -> None:
        if self._control & CTL_SRST or self._status & (BSY | DRQ) or self._xfer is not None:
            return
        if not self.selected:
            return
        self._clear_irq()
        self._error = 0
        self._status = _OK
        entry = _COMMANDS.get(cmd)
        if entry is None:
            self._finish_error(ABRT)
            return
        _, handler, ext = entry
        self._run(lambda: getattr(self, handler)(cmd, ext), mode="lba48" if ext else None)

    def _run(self, fn, mode: Optional[str] = None) -> None:
        """Run a command step; a _Fail ends the command with its error."""
        try:
            fn()
        except _Fail as fail:
            self._finish_error(fail.error, fail.lba, mode, fail.status)

    def _finish_ok(self, irq: bool = True) -> None:
        self._xfer = None
        self._status = _OK
        self._error = 0
        if irq:
            self._raise_irq()

    def _finish_error(self, error: int, lba: Optional[int] = None, mode: Optional[str] = None,
                      status: int = _FAIL) -> None:
        self._xfer = None
        self._status = status
        self._error = error
        if lba is not None:
            self._set_lba(lba, mode or self._addr_mode(False))
        self._raise_irq()

    # -- addressing ----------------------------------------------------------------------------
    def _addr_mode(self, ext: bool) -> str:
        if ext:
            return "lba48"
        return "lba28" if self._device & DEV_LBA else "chs"

    def _decode(self, ext: bool, single: bool = False):
        """(lba, sectors, mode) of the command in the task file; range-checked (IDNF)."""
        if ext:
            lba = ((self._hob_lba_high << 40) | (self._hob_lba_mid << 32) | (self._hob_lba_low << 24)
                   | (self._lba_high << 16) | (self._lba_mid << 8) | self._lba_low)
            count = ((self._hob_count << 8) | self._count) or 65536
            mode, limit = "lba48", self.total_sectors
        else:
            count = self._count or 256
            if self._device & DEV_LBA:
                lba = ((self._device & 0x0F) << 24) | (self._lba_high << 16) | (self._lba_mid << 8) | self._lba_low
                mode, limit = "lba28", min(self.total_sectors, LBA28_LIMIT)
            else:
                geo = self._ident.current_geometry
                found = geo.to_lba((self._lba_high << 8) | self._lba_mid, self._device & 0x0F, self._lba_low)
                if found is None:
                    raise _Fail(IDNF)
                lba = found
                mode, limit = "chs", min(self.total_sectors, geo.capacity)
        if single:
            count = 1
        if lba + count > limit:
            raise _Fail(IDNF, lba if lba >= limit else limit)
        return lba, count, mode

    def _set_lba(self, lba: int, mode: str) -> None:
        if mode == "chs":
            geo = self._ident.current_geometry
            if geo.heads and geo.sectors:
                cyl, head, sector = geo.to_chs(lba)
                self._lba_low = sector & 0xFF
                self._lba_mid = cyl & 0xFF
                self._lba_high = (cyl >> 8) & 0xFF
                self._device = (self._device & 0xF0) | (head & 0x0F)
            return
        self._lba_low = lba & 0xFF
        self._lba_mid = (lba >> 8) & 0xFF
        self._lba_high = (lba >> 16) & 0xFF
        if mode == "lba48":
            self._hob_lba_low = (lba >> 24) & 0xFF
            self._hob_lba_mid = (lba >> 32) & 0xFF
            self._hob_lba_high = (lba >> 40) & 0xFF
        else:
            self._device = (self._device & 0xF0) | ((lba >> 24) & 0x0F)

    def _set_count(self, count: int, mode: str) -> None:
        self._count = count & 0xFF
        if mode == "lba48":
            self._hob_count = (count >> 8) & 0xFF

    # -- backing-disk access -------------------------------------------------------------------
    def _read(self, lba: int, n: int):
        """(data, bad_lba): the sectors read, cut before the first failing one (bad_lba) if any."""
        self._standby = False
        data = bytearray(n * SECTOR)
        try:
            self.disk.readinto(data, lba * SECTOR)
            return bytes(data), None
        except _IO_ERRORS:
            pass
        one = memoryview(data)
        for i in range(n):            # sector by sector, to find the first failing one
            try:
                self.disk.readinto(one[i * SECTOR:(i + 1) * SECTOR], (lba + i) * SECTOR)
            except _IO_ERRORS:
                return bytes(data[:i * SECTOR]), lba + i
        return bytes(data), None

    def _write(self, lba: int, data: bytes) -> None:
        self._standby = False
        try:
            self.disk.pwrite(data, lba * SECTOR)
        except ReadOnlyError:
            raise _Fail(ABRT) from None
        except _IO_ERRORS:
            # Find the first sector that fails (rewriting the ones before it is harmless).
            bad = lba
            for i in range(len(data) // SECTOR):
                try:
                    self.disk.pwrite(data[i * SECTOR:(i + 1) * SECTOR], (lba + i) * SECTOR)
                except ReadOnlyError:
                    raise _Fail(ABRT) from None
                except _IO_ERRORS:
                    bad = lba + i
                    break
            raise _Fail(UNC, bad) from None
        if self._dirty_lba is None or lba < self._dirty_lba:
            self._dirty_lba = lba

    def _flush(self) -> None:
        try:
            self.disk.flush()
        except _IO_ERRORS:
            raise _Fail(UNC, self._dirty_lba or 0) from None
        self._dirty_lba = None

    # ------------------------------------------------------------------------------------------
    # commands
    def _cmd_nop(self, cmd: int, ext: bool) -> None:
        self._finish_ok()

    def _cmd_identify(self, cmd: int, ext: bool) -> None:
        x = _Xfer("pio_in_buf")
        x.buf = self.identify()
        self._xfer = x
        self._status = _OK | DRQ
        self._raise_irq()

    def _pio_block_size(self, cmd: int) -> int:
        if cmd in (0xC4, 0x29, 0xC5, 0x39, 0xCE):
            if not self._ident.multiple:
                raise _Fail(ABRT)
            return self._ident.multiple
        return 1

    def _cmd_read_pio(self, cmd: int, ext: bool) -> None:
        self._start_pio_in(self._pio_block_size(cmd), ext)

    _cmd_read_multiple = _cmd_read_pio

    def _start_pio_in(self, block: int, ext: bool) -> None:
        lba, count, mode = self._decode(ext)
        self._xfer = _Xfer("pio_in", lba, count, block, mode)
        self._pio_in_next()

    def _pio_in_next(self) -> None:
        x = self._xfer
        n = min(x.remaining, x.block)
        data, bad = self._read(x.lba, n)
        if bad is not None:
            self._finish_error(UNC, bad, x.mode)
            return
        x.lba += n
        x.remaining -= n
        self._set_lba(x.lba, x.mode)
        self._set_count(x.remaining, x.mode)
        x.buf, x.pos = data, 0
        self._status = _OK | DRQ
        self._raise_irq()

    def _pio_in_block_done(self) -> None:
        x = self._xfer
        if x.kind == "pio_in" and x.remaining:
            self._pio_in_next()
        else:
            self._xfer = None
            self._status = _OK           # data-in ends without an interrupt

    def _cmd_write_pio(self, cmd: int, ext: bool) -> None:
        block = self._pio_block_size(cmd)
        if self.read_only:
            raise _Fail(ABRT)
        lba, count, mode = self._decode(ext)
        flush = cmd in _FUA_COMMANDS or not self._ident.write_cache
        self._xfer = _Xfer("pio_out", lba, count, block, mode, flush)
        self._status = _OK | DRQ         # first DRQ block: no interrupt

    _cmd_write_multiple = _cmd_write_pio

    def _pio_out_block_done(self) -> None:
        x = self._xfer
        data = bytes(x.acc)
        x.acc = bytearray()
        n = len(data) // SECTOR

        def step():
            self._write(x.lba, data)
            x.lba += n
            x.remaining -= n
            self._set_lba(x.lba, x.mode)
            self._set_count(x.remaining, x.mode)
            if x.remaining:
                self._status = _OK | DRQ
                self._raise_irq()
            else:
                if x.flush:
                    self._flush()
                self._finish_ok()
        self._run(step, mode=x.mode)

    def _cmd_read_dma(self, cmd: int, ext: bool) -> None:
        lba, count, mode = self._decode(ext)
        self._xfer = _Xfer("dma_in", lba, count, count, mode)
        self._status = _OK | DRQ

    def _cmd_write_dma(self, cmd: int, ext: bool) -> None:
        if self.read_only:
            raise _Fail(ABRT)
        lba, count, mode = self._decode(ext)
        flush = cmd in _FUA_COMMANDS or not self._ident.write_cache
        self._xfer = _Xfer("dma_out", lba, count, count, mode, flush)
        self._status = _OK | DRQ

    def _cmd_verify(self, cmd: int, ext: bool) -> None:
        lba, count, mode = self._decode(ext)
        while count:
            n = min(count, _CHUNK)
            _, bad = self._read(lba, n)
            if bad is not None:
                raise _Fail(UNC, bad)
            lba += n
            count -= n
        self._finish_ok()

    def _cmd_seek(self, cmd: int, ext: bool) -> None:
        self._decode(ext, single=True)
        self._standby = False
        self._finish_ok()

    def _cmd_flush(self, cmd: int, ext: bool) -> None:
        self._flush()
        self._finish_ok()

    def _cmd_diagnostic(self, cmd: int, ext: bool) -> None:
        self._set_signature()
        self._status = _OK
        self._error = 0x01               # device 0 passed; not an error (ERR stays clear)
        self._raise_irq()

    def _cmd_init_params(self, cmd: int, ext: bool) -> None:
        sectors = self._count
        heads = (self._device & 0x0F) + 1
        if sectors == 0:
            raise _Fail(ABRT)
        cylinders = min(0xFFFF, self._ident.default_geometry.capacity // (heads * sectors))
        if cylinders == 0:
            raise _Fail(ABRT)
        self._ident.current_geometry = Geometry(cylinders, heads, sectors)
        self._finish_ok()

    def _cmd_standby(self, cmd: int, ext: bool) -> None:
        self._standby = True
        self._finish_ok()

    def _cmd_idle(self, cmd: int, ext: bool) -> None:
        self._standby = False
        self._finish_ok()

    def _cmd_check_power(self, cmd: int, ext: bool) -> None:
        self._count = 0x00 if self._standby else 0xFF
        self._finish_ok()

    def _cmd_set_multiple(self, cmd: int, ext: bool) -> None:
        n = self._count
        if n and (n > self._ident.max_multiple or n & (n - 1)):
            raise _Fail(ABRT)
        self._ident.multiple = n
        self._finish_ok()

    def _cmd_read_native_max(self, cmd: int, ext: bool) -> None:
        if self.total_sectors == 0:
            raise _Fail(ABRT)
        mode = self._addr_mode(ext)
        if mode == "lba48":
            last = self.total_sectors - 1
        elif mode == "lba28":
            last = min(self.total_sectors, LBA28_LIMIT) - 1
        else:
            geo = self._ident.current_geometry
            last = min(self.total_sectors, geo.capacity) - 1
            if last < 0:
                raise _Fail(ABRT)
        self._set_lba(last, mode)
        self._finish_ok()

    def _cmd_set_features(self, cmd: int, ext: bool) -> None:
        sub = self._feature
        if sub == 0x02:
            self._ident.write_cache = True
        elif sub == 0x82:
            self._ident.write_cache = False
            self._flush()
        elif sub == 0x03:
            kind = {0x00: PIO, 0x01: PIO, 0x02: SWDMA, 0x04: MWDMA, 0x08: UDMA}.get(self._count >> 3)
            n = self._count & 0x07
            if kind is None or n > MODE_LIMITS[kind] or (self._count >> 3 == 0 and n > 1):
                raise _Fail(ABRT)
            self._ident.xfer_mode = (kind, n)
        elif sub == 0xAA:
            self._ident.look_ahead = True
        elif sub == 0x55:
            self._ident.look_ahead = False
        elif sub == 0x66:
            self._revert_defaults = False
        elif sub == 0xCC:
            self._revert_defaults = True
        elif sub in (0x05, 0x85, 0x42, 0xC2):
            pass                          # power management / acoustics: nothing to manage
        else:
            raise _Fail(ABRT)
        self._finish_ok()

    def _cmd_dsm(self, cmd: int, ext: bool) -> None:
        features = (self._hob_feature << 8) | self._feature
        blocks = (self._hob_count << 8) | self._count
        if not (features & 1) or not self._ident.trim or blocks == 0 or blocks > self._ident.dsm_max_blocks:
            raise _Fail(ABRT)
        if self.read_only:
            raise _Fail(ABRT)
        x = _Xfer("dsm", mode="lba48")
        x.dsm_bytes = blocks * SECTOR
        self._xfer = x
        self._status = _OK | DRQ

    def _dsm_apply(self, ranges: bytes) -> None:
        total = self.total_sectors
        runs = []
        for i in range(0, len(ranges), 8):
            entry = int.from_bytes(ranges[i:i + 8], "little")
            lba, n = entry & 0xFFFFFFFFFFFF, entry >> 48
            if n == 0:
                continue
            if lba + n > total:
                raise _Fail(ABRT)
            if runs and runs[-1][0] + runs[-1][1] == lba:
                runs[-1][1] += n
            else:
                runs.append([lba, n])
        for lba, n in runs:
            try:
                self.disk.discard(lba * SECTOR, n * SECTOR)
            except ReadOnlyError:
                raise _Fail(ABRT) from None
            except _IO_ERRORS:
                raise _Fail(UNC, lba) from None
            if self._dirty_lba is None or lba < self._dirty_lba:
                self._dirty_lba = lba
        self._finish_ok()
