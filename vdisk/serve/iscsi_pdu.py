"""iSCSI (RFC 7143) PDU codec and the target side of one connection, sans-IO.

:class:`PduReader` turns a byte stream into :class:`Pdu` objects; :class:`TargetConnection` consumes
PDUs and answers with PDU bytes to send, or with a :class:`ScsiTask` whose CDB (and complete
data-out) must be executed; the caller runs it and hands the :class:`~vdisk.devices.scsi.ScsiResult`
back to :meth:`TargetConnection.complete`. Sockets, threads and the event loop live in
:mod:`vdisk.serve.iscsi`.

The subset: one connection per session, CHAP or no authentication (:mod:`.iscsi_auth`), no
digests, ErrorRecoveryLevel 0, InitialR2T=Yes with ImmediateData=Yes, one outstanding R2T,
in-order data; discovery sessions answer ``SendTargets``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from ..devices.scsi_sense import ABORTED_COMMAND, CHECK_CONDITION, TASK_SET_FULL, fixed_sense
from .iscsi_auth import AuthPolicy, LoginAuthenticator, is_security_key

ASC_DATA_PHASE_ERROR = (0x4B, 0x00)

# -- opcodes ------------------------------------------------------------------------------------
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK = 0x10
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_REJECT = 0x3F

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF

# Reject reasons
REJECT_PROTOCOL_ERROR = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_INVALID_PDU_FIELD = 0x09

# Our declarations / limits
TARGET_MAX_RECV_DSL = 262144
TARGET_MAX_BURST = 1 << 20
TARGET_FIRST_BURST = 262144
MAX_ACCEPTED_DSL = TARGET_MAX_RECV_DSL   # what we declared: a longer data segment is a violation
MAX_EDTL = 64 << 20               # bounds one command's data-out buffer
CMD_WINDOW = 32
MAX_LOGIN_PDUS = 16               # a login that has not ended after this many requests never will
# Data-out memory: writes whose data is still arriving, per connection and for the whole target.
# A write that would exceed either gets TASK SET FULL (the initiator retries later), so what the
# target holds never depends on what initiators announce.
MAX_PENDING_WRITES = 16
MAX_CONNECTION_DATA_OUT = 64 << 20
MAX_TARGET_DATA_OUT = 256 << 20
MAX_RESIDUAL = 0xFFFFFFFF         # the residual count is 32 bits; larger ones saturate


class ProtocolError(Exception):
    """The initiator broke the protocol in a way that ends the connection."""


class DataOutBudget:
    """Bytes of data-out that may be reserved at once, shared by the connections of a target.

    A write reserves what it will solicit before its first R2T and gives it back when it
    completes or is aborted; buffers grow only as data arrives, so they never exceed this.
    """

    def __init__(self, limit: int = MAX_TARGET_DATA_OUT):
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass
class Pdu:
    """One PDU: the 48-byte basic header segment, additional header segments and data."""
    bhs: bytes
    ahs: bytes = b""
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def itt(self) -> int:
        return struct.unpack_from(">I", self.bhs, 16)[0]

    @property
    def lun(self) -> int:
        return decode_lun(self.bhs[8:16])

    def u32(self, offset: int) -> int:
        return struct.unpack_from(">I", self.bhs, offset)[0]


def pad4(n: int) -> int:
    return (-n) & 3


def encode_pdu(bhs: bytearray, data: bytes = b"") -> bytes:
    """Header + data + padding; fills the DataSegmentLength field."""
    n = len(data)
    bhs[5:8] = n.to_bytes(3, "big")
    return bytes(bhs) + bytes(data) + b"\x00" * pad4(n) if n else bytes(bhs)


def decode_lun(raw: bytes) -> int:
    """Single-level LUN: peripheral (00b) or flat (01b) addressing."""
    method = raw[0] >> 6
    if method in (0, 1):
        return ((raw[0] & 0x3F) << 8) | raw[1]
    return 0xFFFF  # unsupported addressing: no such LUN


def encode_lun(lun: int) -> bytes:
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


class PduReader:
    """Incremental PDU parser: feed bytes, iterate complete PDUs."""

    def __init__(self, max_dsl: int = MAX_ACCEPTED_DSL):
        self._buf = bytearray()
        self._max_dsl = max_dsl

    def feed(self, data: bytes) -> Iterator[Pdu]:
        self._buf += data
        while True:
            pdu = self._next()
            if pdu is None:
                return
            yield pdu

    @staticmethod
    def lengths(bhs: bytes) -> tuple[int, int]:
        """(AHS bytes, padded data bytes) following this header."""
        return bhs[4] * 4, int.from_bytes(bhs[5:8], "big")

    def _next(self) -> Optional[Pdu]:
        if len(self._buf) < BHS_LEN:
            return None
        ahs_len, dsl = self.lengths(self._buf)
        if dsl > self._max_dsl:
            raise ProtocolError(f"data segment of {dsl} bytes is larger than we accept")
        total = BHS_LEN + ahs_len + dsl + pad4(dsl)
        if len(self._buf) < total:
            return None
        raw = bytes(self._buf[:total])
        del self._buf[:total]
        return Pdu(raw[:BHS_LEN], raw[BHS_LEN:BHS_LEN + ahs_len],
                   raw[BHS_LEN + ahs_len:BHS_LEN + ahs_len + dsl])


# -- text keys ----------------------------------------------------------------------------------
def parse_text(data: bytes) -> list[tuple[str, str]]:
    """``key=value`` pairs separated by NUL bytes (RFC 7143 §6.1)."""
    pairs = []
    for item in data.split(b"\x00"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise ProtocolError(f"text item without '=': {item[:64]!r}")
        pairs.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return pairs


def build_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode("utf-8") + b"\x00" for k, v in pairs)


@dataclass
class SessionParams:
    """Operational parameters after negotiation (RFC 7143 §13 defaults)."""
    max_recv_dsl_initiator: int = 8192     # what the initiator accepts from us
    max_burst: int = 262144
    first_burst: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    session_type: str = "Normal"
    initiator_name: str = ""
    target_name: str = ""


def _number(value: str) -> int:
    return int(value, 0) if value.lower().startswith("0x") else int(value)


def negotiate(pairs: list[tuple[str, str]], params: SessionParams) -> list[tuple[str, str]]:
    """Answer the initiator's operational login keys and record the outcome in ``params``.

    AuthMethod and CHAP_* belong to :class:`~vdisk.serve.iscsi_auth.LoginAuthenticator`."""
    answers: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in ("InitiatorName", "InitiatorAlias", "TargetName", "SessionType"):
            if key == "InitiatorName":
                params.initiator_name = value
            elif key == "TargetName":
                params.target_name = value
            elif key == "SessionType":
                params.session_type = value
            continue                                   # declarative: no answer
        if key in ("HeaderDigest", "DataDigest"):
            answers.append((key, "None" if "None" in value.split(",") else "Reject"))
        elif key == "MaxRecvDataSegmentLength":
            try:
                params.max_recv_dsl_initiator = max(512, min(_number(value), 1 << 24))
            except ValueError:
                answers.append((key, "Reject"))
        elif key in ("MaxBurstLength", "FirstBurstLength"):
            try:
                ours = TARGET_MAX_BURST if key == "MaxBurstLength" else TARGET_FIRST_BURST
                agreed = max(512, min(_number(value), ours))
            except ValueError:
                answers.append((key, "Reject"))
                continue
            if key == "MaxBurstLength":
                params.max_burst = agreed
            else:
                params.first_burst = agreed
            answers.append((key, str(agreed)))
        elif key == "InitialR2T":
            answers.append((key, "Yes"))                # OR function: we require R2T
        elif key == "ImmediateData":
            params.immediate_data = value == "Yes"      # AND function
            answers.append((key, "Yes" if params.immediate_data else "No"))
        elif key in ("DataPDUInOrder", "DataSequenceInOrder"):
            answers.append((key, "Yes"))
        elif key in ("MaxConnections", "MaxOutstandingR2T"):
            answers.append((key, "1"))
        elif key == "ErrorRecoveryLevel":
            answers.append((key, "0"))
        elif key == "DefaultTime2Wait":
            answers.append((key, "2"))
        elif key == "DefaultTime2Retain":
            answers.append((key, "0"))
        elif key in ("IFMarker", "OFMarker"):
            answers.append((key, "No"))
        elif key in ("IFMarkInt", "OFMarkInt"):
            answers.append((key, "Irrelevant"))
        else:
            answers.append((key, "NotUnderstood"))
    return answers


# -- the connection state machine ------------------------------------------------------------
@dataclass
class ScsiTask:
    """A SCSI command whose data-out is complete and that is ready to execute."""
    itt: int
    lun: int
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    data_out: Optional[bytes]
    cmdsn: int = 0
    # transfer bookkeeping (writes)
    buffer: Optional[bytearray] = None
    wanted: int = 0
    received: int = 0
    r2tsn: int = 0
    ttt: int = RESERVED_TAG
    burst_end: int = 0
    next_datasn: int = 0
    exec_cdb: Optional[bytes] = None   # the CDB to run, when the transfer had to be clipped
    reserved: int = 0                  # bytes of the data-out budget this task holds


Action = Union[bytes, ScsiTask]


@dataclass(frozen=True)
class LoginResult:
    """How a login ended, for the log: never holds a secret."""
    accepted: bool
    reason: str                        # why it was refused ("" when accepted)
    initiator: str
    chap_user: Optional[str]
    session_type: str
    mutual: bool
    abandoned: bool = False            # the initiator left (or timed out) before it ended

LOGIN_STAGE_SECURITY, LOGIN_STAGE_OPERATIONAL, LOGIN_STAGE_FULL = 0, 1, 3


class TargetConnection:
    """Target side of one iSCSI connection (= one session) for a single-LU target.

    ``data_out_length(cdb)`` (optional) tells how much data-out a command needs, so that we
    solicit no more than that and can report residuals exactly; ``clip_transfer(cdb, nbytes)``
    (optional) shortens a write whose expected data transfer length is smaller than its CDB
    asks for, so that only what was sent gets written (the iSCSI overflow rule, RFC 7143
    §11.4.5.1); ``refuse_before_data(lun, cdb)`` (optional) returns the result of a command
    that fails whatever data comes (an object with ``status``, ``data_in``, ``sense``), so that
    its data is never solicited; ``on_reset()`` is called for LOGICAL UNIT RESET and target
    resets. ``budget`` is the target-wide :class:`DataOutBudget` (default: one of its own);
    ``auth`` the :class:`~vdisk.serve.iscsi_auth.AuthPolicy` a login must satisfy (default: no
    authentication, any initiator).
    """

    def __init__(self, target_name: str, portal: str, *,
                 data_out_length: Optional[Callable[[bytes], Optional[int]]] = None,
                 clip_transfer: Optional[Callable[[bytes, int], Optional[bytes]]] = None,
                 refuse_before_data: Optional[Callable[[int, bytes], Optional[object]]] = None,
                 on_reset: Optional[Callable[[], None]] = None, tsih: int = 1,
                 budget: Optional[DataOutBudget] = None, auth: Optional[AuthPolicy] = None):
        self.target_name = target_name
        self.portal = portal
        self.params = SessionParams()
        self.full_feature = False
        self.closed = False            # set once a logout response (or fatal reject) is queued
        self.login_stage = LOGIN_STAGE_SECURITY
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self._tsih = tsih
        self._tasks: dict[int, ScsiTask] = {}        # ITT -> task waiting for data-out
        self._next_ttt = 1
        self._data_out_length = data_out_length
        self._on_reset = on_reset
        self._clip_transfer = clip_transfer
        self._refuse_before_data = refuse_before_data
        self._budget = budget if budget is not None else DataOutBudget()
        self._reserved = 0                           # this connection's share of the budget
        self._login_seen = False
        self._login_pdus = 0
        self._auth = LoginAuthenticator(auth if auth is not None else AuthPolicy())
        self.login_result: Optional[LoginResult] = None   # set when the login ends, either way
        self._login_ended = False
        self._mrdsl_sent = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def max_cmd_sn(self) -> int:
        return (self.exp_cmd_sn + CMD_WINDOW - 1) & 0xFFFFFFFF

    def _seq(self, bhs: bytearray, *, advance_stat: bool) -> None:
        """Fill StatSN / ExpCmdSN / MaxCmdSN at bytes 24-35."""
        struct.pack_into(">III", bhs, 24, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn)
        if advance_stat:
            self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF

    def _header(self, opcode: int, flags: int, itt: int) -> bytearray:
        bhs = bytearray(BHS_LEN)
        bhs[0], bhs[1] = opcode, flags
        struct.pack_into(">I", bhs, 16, itt)
        return bhs

    def _command_sn(self, pdu: Pdu) -> bool:
        """Consume the CmdSN of a command; False if it lies outside the window (ignore it).

        One connection per session delivers commands in order, so a non-immediate command is
        in the window exactly when its CmdSN is ExpCmdSN (RFC 7143 §3.2.2.1: others are
        silently dropped).
        """
        if pdu.immediate:
            return True
        if pdu.u32(24) != self.exp_cmd_sn:
            return False
        self.exp_cmd_sn = (self.exp_cmd_sn + 1) & 0xFFFFFFFF
        return True

    def reject(self, pdu: Pdu, reason: int) -> bytes:
        bhs = self._header(OP_REJECT, 0x80, RESERVED_TAG)
        bhs[2] = reason
        self._seq(bhs, advance_stat=True)
        return encode_pdu(bhs, pdu.bhs)

    # -- input -------------------------------------------------------------------------------
    def receive(self, pdu: Pdu) -> list[Action]:
        """Consume one PDU; return the PDUs to send and the tasks now ready to run."""
        op = pdu.opcode
        if not self.full_feature:
            if op == OP_LOGIN_REQ:
                return [self._login(pdu)]
            raise ProtocolError(f"opcode {op:#x} before login completed")
        if op == OP_SCSI_CMD:
            return self._scsi_command(pdu)
        if op == OP_DATA_OUT:
            return self._data_out(pdu)
        if op == OP_NOP_OUT:
            return self._nop_out(pdu)
        if op == OP_TEXT_REQ:
            return [self._text(pdu)]
        if op == OP_TMF_REQ:
            return [self._task_management(pdu)]
        if op == OP_LOGOUT_REQ:
            return [self._logout(pdu)]
        if op == OP_LOGIN_REQ:
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        return [self.reject(pdu, REJECT_NOT_SUPPORTED)]

    # -- login ---------------------------------------------------------------------------------
    def _login_response(self, pdu: Pdu, flags: int, status: tuple[int, int], data: bytes,
                        tsih: int = 0) -> bytes:
        bhs = self._header(OP_LOGIN_RSP, flags, pdu.itt)
        bhs[2], bhs[3] = 0, 0                   # version max / active
        bhs[8:14] = pdu.bhs[8:14]
        struct.pack_into(">H", bhs, 14, tsih)
        self._seq(bhs, advance_stat=True)
        bhs[36], bhs[37] = status
        return encode_pdu(bhs, data)

    def unfinished_login(self, reason: str) -> Optional[LoginResult]:
        """For a connection that ends now: how its login was left, if it had begun and not ended."""
        if not self._login_seen or self.full_feature or self._login_ended:
            return None
        self._login_ended = True
        return LoginResult(False, reason, self.params.initiator_name, self._auth.user,
                           self.params.session_type, self._auth.mutual, abandoned=True)

    def _refuse_login(self, pdu: Pdu, status: tuple[int, int], reason: str) -> bytes:
        """A login response with an error status; the connection ends after it."""
        self.closed = True
        if not self._login_ended:
            self._login_ended = True
            self.login_result = LoginResult(False, reason, self.params.initiator_name,
                                            self._auth.user, self.params.session_type,
                                            self._auth.mutual)
        return self._login_response(pdu, 0, status, b"")

    def _login(self, pdu: Pdu) -> bytes:
        flags = pdu.flags
        transit, csg, nsg = bool(flags & 0x80), (flags >> 2) & 3, flags & 3
        first = not self._login_seen
        self._login_seen = True
        self._login_pdus += 1
        if first:
            self.stat_sn = pdu.u32(28)             # start StatSN at the initiator's ExpStatSN
        self.exp_cmd_sn = pdu.u32(24)              # login is immediate: CmdSN is not consumed
        if pdu.bhs[3] > 0:                         # VersionMin: we speak version 0 only
            return self._refuse_login(pdu, (0x02, 0x05), "unsupported iSCSI version")
        if self._login_pdus > MAX_LOGIN_PDUS:
            return self._refuse_login(pdu, (0x02, 0x00), "login does not end")
        if csg == 2 or (transit and nsg == 2) or csg < self.login_stage:
            return self._refuse_login(pdu, (0x02, 0x00), "invalid login stage")
        try:
            pairs = parse_text(pdu.data)
        except ProtocolError:
            return self._refuse_login(pdu, (0x02, 0x00), "malformed login keys")
        security = [(k, v) for k, v in pairs if is_security_key(k)]
        answers = negotiate([(k, v) for k, v in pairs if not is_security_key(k)], self.params)
        if first:
            if self.params.session_type == "Normal":
                if self.params.target_name != self.target_name:
                    return self._refuse_login(pdu, (0x02, 0x03), "no such target")
            elif self.params.session_type != "Discovery":
                return self._refuse_login(pdu, (0x02, 0x07), "unsupported session type")
            if not self.params.initiator_name:
                return self._refuse_login(pdu, (0x02, 0x07), "no InitiatorName")
            self._auth.check_initiator(self.params.initiator_name)
            answers.append(("TargetPortalGroupTag", "1"))
        if security:
            if csg != LOGIN_STAGE_SECURITY:
                return self._refuse_login(pdu, (0x02, 0x00), "security keys outside the security stage")
            answers += self._auth.receive(security)
        if self._auth.failure is None and not self._auth.complete and (
                csg != LOGIN_STAGE_SECURITY or (transit and not security)):
            # leaving (or never entering) the security stage before authenticating
            self._auth.fail("authentication skipped")
        if self._auth.failure is not None:
            status_class, detail, reason = self._auth.failure
            return self._refuse_login(pdu, (status_class, detail), reason)
        if csg == LOGIN_STAGE_OPERATIONAL and not self._mrdsl_sent:
            answers.append(("MaxRecvDataSegmentLength", str(TARGET_MAX_RECV_DSL)))
            self._mrdsl_sent = True
        out_flags = (csg << 2)
        tsih = 0
        if transit and nsg > csg and self._auth.complete:
            out_flags |= 0x80 | nsg
            self.login_stage = nsg
            if nsg == LOGIN_STAGE_FULL:
                tsih = self._tsih
        resp = self._login_response(pdu, out_flags, (0, 0), build_text(answers), tsih)
        if out_flags & 0x80 and nsg == LOGIN_STAGE_FULL:
            self.full_feature = True
            self._login_ended = True
            self.login_result = LoginResult(True, "", self.params.initiator_name, self._auth.user,
                                            self.params.session_type, self._auth.mutual)
        return resp

    # -- SCSI commands ------------------------------------------------------------------------
    def _scsi_command(self, pdu: Pdu) -> list[Action]:
        if self.params.session_type != "Normal":
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        if not self._command_sn(pdu):
            return []
        flags = pdu.flags
        edtl = pdu.u32(20)
        cdb = pdu.bhs[32:48]
        if pdu.ahs:                                  # extended CDB AHS (type 1): CDB > 16 bytes
            ahs_len, ahs_type = struct.unpack_from(">HB", pdu.ahs, 0)
            if ahs_type == 1:
                cdb = cdb + pdu.ahs[4:4 + ahs_len - 1]
        task = ScsiTask(itt=pdu.itt, lun=pdu.lun, cdb=cdb, edtl=edtl,
                        read=bool(flags & 0x40), write=bool(flags & 0x20), data_out=None,
                        cmdsn=pdu.u32(24))
        if not task.write:
            return [task]
        if edtl > MAX_EDTL:
            return [self.reject(pdu, REJECT_INVALID_PDU_FIELD)]
        wanted = edtl
        if self._data_out_length is not None:
            need = self._data_out_length(cdb)
            if need is not None:
                wanted = min(edtl, need)
                if edtl < need and self._clip_transfer is not None:
                    task.exec_cdb = self._clip_transfer(cdb, edtl)
        task.wanted = wanted
        immediate = pdu.data[:wanted]
        if len(immediate) >= wanted:
            task.data_out = immediate
            return [task]
        if self._refuse_before_data is not None:
            res = self._refuse_before_data(task.lun, task.exec_cdb or cdb)
            if res is not None:                      # fails whatever comes: do not ask for it
                return self.complete(task, res.status, res.data_in, res.sense)
        if task.itt in self._tasks:                  # ITT still in use by an unfinished write
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        if not self._reserve(task):
            return self.complete(task, TASK_SET_FULL, b"", b"")
        task.buffer = bytearray(immediate)           # grows as the data arrives
        task.received = len(immediate)
        self._tasks[task.itt] = task
        return [self._r2t(task)]

    def _reserve(self, task: ScsiTask) -> bool:
        """Reserve the data-out a write will solicit, within this connection's and the target's
        budget; False when it does not fit (the command then gets TASK SET FULL)."""
        if len(self._tasks) >= MAX_PENDING_WRITES:
            return False
        if self._reserved + task.wanted > MAX_CONNECTION_DATA_OUT:
            return False
        if not self._budget.take(task.wanted):
            return False
        task.reserved = task.wanted
        self._reserved += task.wanted
        return True

    def _release(self, task: ScsiTask) -> None:
        if task.reserved:
            self._budget.give(task.reserved)
            self._reserved -= task.reserved
            task.reserved = 0
        task.buffer = None

    def _drop_tasks(self) -> None:
        for task in self._tasks.values():
            self._release(task)
        self._tasks.clear()

    def release(self) -> None:
        """The connection is gone: give back everything its unfinished writes reserved."""
        self._drop_tasks()
        self.closed = True

    def _r2t(self, task: ScsiTask) -> bytes:
        length = min(task.wanted - task.received, self.params.max_burst)
        task.ttt = self._next_ttt
        self._next_ttt = (self._next_ttt % 0xFFFFFFFE) + 1
        task.burst_end = task.received + length
        task.next_datasn = 0                           # DataSN restarts with every R2T
        bhs = self._header(OP_R2T, 0x80, task.itt)
        bhs[8:16] = encode_lun(task.lun)
        struct.pack_into(">I", bhs, 20, task.ttt)
        self._seq(bhs, advance_stat=False)
        struct.pack_into(">III", bhs, 36, task.r2tsn, task.received, length)
        task.r2tsn += 1
        return encode_pdu(bhs)

    def _data_out(self, pdu: Pdu) -> list[Action]:
        task = self._tasks.get(pdu.itt)
        if task is None or pdu.u32(20) != task.ttt:
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        offset = pdu.u32(40)
        end = offset + len(pdu.data)
        if pdu.u32(36) != task.next_datasn:
            # ErrorRecoveryLevel 0 cannot ask for the data again: fail this command only
            del self._tasks[task.itt]
            return self.complete(task, CHECK_CONDITION, b"",
                                 fixed_sense(ABORTED_COMMAND, *ASC_DATA_PHASE_ERROR))
        task.next_datasn += 1
        if offset != task.received or end > task.burst_end:   # DataPDUInOrder=Yes
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        task.buffer += pdu.data
        task.received = end
        if not pdu.flags & 0x80:
            return []
        if task.received < task.burst_end:           # F bit before the burst was complete
            return [self.reject(pdu, REJECT_PROTOCOL_ERROR)]
        if task.received < task.wanted:
            return [self._r2t(task)]
        del self._tasks[task.itt]
        task.data_out = task.buffer                  # the reservation ends in complete()
        task.buffer = None
        return [task]

    def complete(self, task: ScsiTask, status: int, data_in: bytes, sense: bytes) -> list[bytes]:
        """PDUs that report a finished task: Data-In (status may ride on the last) or a response."""
        self._release(task)
        task.data_out = None
        out: list[bytes] = []
        lun = encode_lun(task.lun)
        residual_flags, residual = 0, 0
        if task.read or not task.write:
            produced = len(data_in)
            if produced > task.edtl:
                data_in = data_in[:task.edtl]
                residual_flags, residual = 0x04, produced - task.edtl   # overflow
            elif produced < task.edtl:
                residual_flags, residual = 0x02, task.edtl - produced   # underflow
        if task.write:
            need = self._data_out_length(task.cdb) if self._data_out_length else None
            if need is not None and need != task.edtl:
                if need > task.edtl:
                    residual_flags, residual = 0x04, need - task.edtl
                else:
                    residual_flags, residual = 0x02, task.edtl - need
        residual = min(residual, MAX_RESIDUAL)
        data_sn = 0
        if data_in and status == 0:
            mrdsl = self.params.max_recv_dsl_initiator
            burst = self.params.max_burst
            total = len(data_in)
            view = memoryview(data_in)
            offset = 0
            while offset < total:
                chunk = min(mrdsl, total - offset, burst - offset % burst)
                last = offset + chunk >= total
                flags = 0
                if last or (offset + chunk) % burst == 0:
                    flags |= 0x80                     # F: end of a Data-In sequence
                bhs = self._header(OP_DATA_IN, flags, task.itt)
                bhs[8:16] = lun
                struct.pack_into(">I", bhs, 20, RESERVED_TAG)
                if last:
                    bhs[1] |= 0x01 | residual_flags   # S: the status rides on the last PDU
                    bhs[3] = status
                    self._seq(bhs, advance_stat=True)
                    struct.pack_into(">I", bhs, 44, residual)
                else:
                    struct.pack_into(">III", bhs, 24, 0, self.exp_cmd_sn, self.max_cmd_sn)
                struct.pack_into(">II", bhs, 36, data_sn, offset)
                out.append(encode_pdu(bhs, view[offset:offset + chunk]))
                data_sn += 1
                offset += chunk
            return out
        bhs = self._header(OP_SCSI_RSP, 0x80 | residual_flags, task.itt)
        bhs[2], bhs[3] = 0x00, status
        self._seq(bhs, advance_stat=True)
        struct.pack_into(">I", bhs, 36, task.r2tsn)   # ExpDataSN: R2Ts sent for a write
        struct.pack_into(">I", bhs, 44, residual)
        payload = struct.pack(">H", len(sense)) + sense if sense else b""
        out.append(encode_pdu(bhs, payload))
        return out

    # -- the rest -----------------------------------------------------------------------------
    def _nop_out(self, pdu: Pdu) -> list[Action]:
        if pdu.itt != RESERVED_TAG and not self._command_sn(pdu):
            return []
        if pdu.itt == RESERVED_TAG:
            return []                                  # a reply to a NOP-In of ours, or a ping without answer
        bhs = self._header(OP_NOP_IN, 0x80, pdu.itt)
        bhs[8:16] = pdu.bhs[8:16]
        struct.pack_into(">I", bhs, 20, RESERVED_TAG)
        self._seq(bhs, advance_stat=True)
        return [encode_pdu(bhs, pdu.data[:self.params.max_recv_dsl_initiator])]

    def _text(self, pdu: Pdu) -> bytes:
        self._command_sn(pdu)
        try:
            pairs = parse_text(pdu.data)
        except ProtocolError:
            return self.reject(pdu, REJECT_PROTOCOL_ERROR)
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                if value in ("All", self.target_name, ""):
                    answers += [("TargetName", self.target_name), ("TargetAddress", f"{self.portal},1")]
            else:
                answers.append((key, "NotUnderstood"))
        bhs = self._header(OP_TEXT_RSP, 0x80, pdu.itt)
        struct.pack_into(">I", bhs, 20, RESERVED_TAG)
        self._seq(bhs, advance_stat=True)
        return encode_pdu(bhs, build_text(answers))

    def _task_management(self, pdu: Pdu) -> bytes:
        self._command_sn(pdu)
        function = pdu.flags & 0x7F
        response = 0x00                                # function complete
        if function == 1:                              # ABORT TASK
            # Commands run to completion before the next PDU is read, so the referenced task
            # is either still waiting for data-out (abort it: it gets no response) or done.
            task = self._tasks.pop(pdu.u32(20), None)
            if task is None:
                response = 0x01                        # task does not exist (any more)
            else:
                self._release(task)
        elif function in (2, 3):                       # ABORT TASK SET, CLEAR TASK SET
            self._drop_tasks()
        elif function in (5, 6, 7):                    # LOGICAL UNIT RESET, TARGET WARM/COLD RESET
            self._drop_tasks()
            if self._on_reset is not None:
                self._on_reset()
        elif function == 4:                            # CLEAR ACA: no ACA here
            response = 0x05
        else:
            response = 0x05                            # not supported (TASK REASSIGN, ...)
        bhs = self._header(OP_TMF_RSP, 0x80, pdu.itt)
        bhs[2] = response
        self._seq(bhs, advance_stat=True)
        return encode_pdu(bhs)

    def _logout(self, pdu: Pdu) -> bytes:
        self._command_sn(pdu)
        bhs = self._header(OP_LOGOUT_RSP, 0x80, pdu.itt)
        bhs[2] = 0x00                                  # connection or session closed successfully
        self._seq(bhs, advance_stat=True)
        self.closed = True
        self._drop_tasks()
        return encode_pdu(bhs)
