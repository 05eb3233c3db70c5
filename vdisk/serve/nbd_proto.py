"""The NBD protocol, sans-IO: handshake state machine, option haggling, request parsing, replies.

Nothing here touches a socket. :class:`ServerConnection` consumes the bytes a client sent
(:meth:`~ServerConnection.receive_data`) and yields events (:meth:`~ServerConnection.next_event`);
whatever the server must say back is collected for :meth:`~ServerConnection.data_to_send`.
Option haggling is answered entirely inside the state machine; in the transmission phase every
well-formed, in-range request comes out as a :class:`Request` and every malformed one is answered
with the protocol's error reply without ever reaching the disk.

:func:`handle_request` executes one :class:`Request` against a :class:`vdisk.Disk` (or anything
with the same methods) and returns the reply as a list of buffers. It blocks on disk I/O, so the
asyncio shell in :mod:`vdisk.serve.nbd` runs it in a thread pool.

TLS (``NBD_OPT_STARTTLS``) is decided here too, the bytes of it are not: with ``tls="on"`` or
``"require"`` an accepted STARTTLS yields :class:`StartTLS`; the shell sends the queued ACK,
runs the TLS handshake on its socket and calls :meth:`ServerConnection.tls_established`, after
which haggling starts afresh over the encrypted stream. Under ``"require"`` every option but
STARTTLS before that is refused with ``NBD_REP_ERR_TLS_REQD`` (``EXPORT_NAME``, which cannot be
refused, closes the connection), so nothing about the exports is told in the clear.

Output is bounded: once more than :data:`MAX_QUEUED_OUTPUT` bytes of replies are waiting,
:meth:`~ServerConnection.next_event` returns :data:`MUST_SEND` and parses nothing more until the
shell has sent them, so a client that pipelines options or bad requests and never reads the
answers cannot make the server queue more than that.

Facts: NBD ``doc/proto.md`` (fixed newstyle, INFO/GO, structured replies, block status) and the
digest in ``spec/BLOCK-BACKENDS.md`` section 3. All integers on the wire are big-endian.
"""
from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# -- magic numbers -----------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, u16) and client flags (u32) ----------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- options -----------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option reply types ------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# -- NBD_INFO types ----------------------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (u16) ------------------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- commands and command flags ----------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured reply chunks -------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# -- base:allocation ---------------------------------------------------------------------------
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1            # our context id for base:allocation after SET_META_CONTEXT

# -- error numbers (the protocol's own values, equal to Linux errno) ----------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- limits ------------------------------------------------------------------------------------
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024        # largest READ/WRITE we accept (advertised in BLOCK_SIZE)
MAX_OPTION_DATA = 64 * 1024           # larger option payloads are skipped and refused (TOO_BIG)
MAX_STRING = 4096                     # names, queries (proto.md: MUST be no longer than 4096)
MAX_QUEUED_OUTPUT = 256 * 1024        # replies queued before parsing pauses (MUST_SEND)
MAX_EXTENTS = 65536                   # block-status descriptors per reply ("may stop early")
HOLE_MIN = 64 * 1024                  # smaller holes inside a read are sent as data

_HDR_OPT = struct.Struct(">QII")          # IHAVEOPT, option, length
_HDR_OPT_REPLY = struct.Struct(">QIII")   # magic, option, type, length
_HDR_REQUEST = struct.Struct(">IHHQQI")   # magic, flags, type, cookie, offset, length
_HDR_SIMPLE = struct.Struct(">IIQ")       # magic, error, cookie
_HDR_CHUNK = struct.Struct(">IHHQI")      # magic, flags, type, cookie, length
_GREETING = struct.Struct(">QQH")


# ==============================================================================================
# Exports, events
# ==============================================================================================

@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about one export (no disk handle: the shell keeps that)."""

    name: str
    size: int
    readonly: bool = True
    description: str = ""
    multi_conn: bool = True

    def transmission_flags(self, structured: bool) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE
        if self.readonly:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO
        if structured:
            flags |= TF_SEND_DF
        if self.multi_conn:
            flags |= TF_CAN_MULTI_CONN
        return flags


@dataclass
class Request:
    """One well-formed, in-range transmission request, ready to execute."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: Optional[bytes]          # WRITE payload
    export: ExportInfo
    structured: bool               # structured replies negotiated
    meta_context_id: Optional[int]  # id of base:allocation when selected

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, str(self.command))


@dataclass
class ExportChosen:
    """Option haggling ended (GO or EXPORT_NAME): the transmission phase begins on this export."""

    export: ExportInfo
    structured: bool
    meta_context_id: Optional[int]


@dataclass
class Closed:
    """The connection is over. ``graceful``: client's ABORT/DISC (finish in-flight requests,
    send what is queued, then close). Otherwise a hard disconnect: ``reason`` says why."""

    reason: str
    graceful: bool


@dataclass
class StartTLS:
    """The client asked for TLS and it was granted: send what is queued (the ACK), then run the
    TLS handshake as the server and call :meth:`ServerConnection.tls_established` (or end the
    connection if it fails). ``early_data`` is anything the client sent after STARTTLS without
    waiting for the ACK: a protocol violation the shell should refuse, since those bytes belong
    to a handshake that had not begun."""

    early_data: bytes


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
#: Replies have piled up (more than MAX_QUEUED_OUTPUT): send them before asking for more events.
MUST_SEND = _Sentinel("MUST_SEND")

TLS_MODES = ("off", "on", "require")


# ==============================================================================================
# Reply encoding (pure functions; used by the state machine and by handle_request)
# ==============================================================================================

def encode_greeting() -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _HDR_OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return _HDR_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, chunk_type: int, length: int, done: bool) -> bytes:
    return _HDR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, chunk_type,
                           cookie, length)


def encode_none_chunk(cookie: int) -> bytes:
    return encode_chunk_header(cookie, REPLY_TYPE_NONE, 0, True)


def encode_error_chunk(cookie: int, error: int, message: str = "", done: bool = True,
                       offset: Optional[int] = None) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = struct.pack(">IH", error, len(msg)) + msg
    chunk_type = REPLY_TYPE_ERROR
    if offset is not None:
        payload += struct.pack(">Q", offset)
        chunk_type = REPLY_TYPE_ERROR_OFFSET
    return encode_chunk_header(cookie, chunk_type, len(payload), done) + payload


def encode_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return encode_chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, length)


def encode_block_status(cookie: int, context_id: int, descriptors: Sequence[Tuple[int, int]],
                        done: bool = True) -> bytes:
    n = len(descriptors)
    payload = bytearray(4 + 8 * n)
    struct.pack_into(">I", payload, 0, context_id)
    if n:
        struct.pack_into(">" + "II" * n, payload, 4, *(v for d in descriptors for v in d))
    return encode_chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), done) + bytes(payload)


def error_reply(req_cookie: int, structured: bool, error: int, message: str = "") -> bytes:
    """The reply for a failed request: an ERROR chunk when structured replies are on, else a
    simple reply carrying the error (never with data)."""
    if structured:
        return encode_error_chunk(req_cookie, error, message)
    return encode_simple_reply(req_cookie, error)


# ==============================================================================================
# The connection state machine
# ==============================================================================================

_S_CLIENT_FLAGS = "client-flags"
_S_OPTIONS = "options"
_S_TLS_HANDSHAKE = "tls-handshake"
_S_TRANSMISSION = "transmission"
_S_CLOSED = "closed"


class ServerConnection:
    """Server side of one NBD connection.

    ``exports`` is an ordered sequence of :class:`ExportInfo`; the first is the default export
    (the one an empty name selects). Usage::

        conn = ServerConnection(exports)
        send(conn.data_to_send())            # the greeting
        while True:
            conn.receive_data(recv())        # b"" = end of stream
            while (ev := conn.next_event()) is not NEED_DATA:
                ...                          # ExportChosen / Request / Closed
            send(conn.data_to_send())
    """

    def __init__(self, exports: Sequence[ExportInfo], *, shutting_down: bool = False,
                 tls: str = "off"):
        if not exports:
            raise ValueError("no exports")
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        self.tls = tls
        self.tls_active = False
        self.tls_refusals = 0                # options refused with TLS_REQD (for the log line)
        self.exports = list(exports)
        self._by_name = {e.name: e for e in self.exports}
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._out: List[bytes] = [encode_greeting()]
        self._queued = 0
        self.state = _S_CLIENT_FLAGS
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        self._meta_export: Optional[str] = None   # export the meta-context selection is for
        self._meta_selected = False
        self.export: Optional[ExportInfo] = None
        self.shutting_down = shutting_down
        self._skip = 0                       # bytes of payload still to discard
        self._after_skip: Optional[Tuple] = None
        self._pending_header: Optional[Tuple[int, int, int, int, int]] = None
        self._closed_event: Optional[Closed] = None

    # -- byte plumbing ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed what the client sent; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self.state == _S_CLOSED:
            return
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
            if not data:
                return
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._queued = 0
        return out

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._queued += len(data)

    def tls_established(self) -> None:
        """The TLS handshake after :class:`StartTLS` succeeded: haggling starts over. What was
        negotiated in the clear (structured replies, a metadata context) is forgotten, as the
        protocol requires."""
        if self.state != _S_TLS_HANDSHAKE:
            raise RuntimeError("tls_established() without a StartTLS event")
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta_selected = False
        self.state = _S_OPTIONS

    @property
    def closed(self) -> bool:
        return self.state == _S_CLOSED

    @property
    def meta_context_id(self) -> Optional[int]:
        if self._meta_selected and self.structured and self.export is not None \
                and self._meta_export == self.export.name:
            return BASE_ALLOCATION_ID
        return None

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return data

    def _skip_bytes(self, n: int) -> bool:
        """Discard n bytes of payload; True when done (else the rest goes as it arrives)."""
        have = min(n, self._available())
        self._pos += have
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._skip = n - have
        return self._skip == 0

    def _close(self, reason: str, graceful: bool) -> Closed:
        self.state = _S_CLOSED
        self._buf.clear()
        self._pos = 0
        self._skip = 0
        self._closed_event = Closed(reason, graceful)
        return self._closed_event

    def close_reason(self) -> Optional[Closed]:
        return self._closed_event

    # -- events ----------------------------------------------------------------------------------
    def next_event(self):
        """Return the next event (:class:`ExportChosen`, :class:`Request`, :class:`Closed`) or
        :data:`NEED_DATA`. After :class:`Closed` only :data:`NEED_DATA` follows."""
        while True:
            if self.state == _S_CLOSED or self.state == _S_TLS_HANDSHAKE:
                return NEED_DATA
            if self._queued > MAX_QUEUED_OUTPUT:
                return MUST_SEND
            if self._skip:
                if self._eof:
                    return self._close("client disconnected in the middle of a payload", False)
                return NEED_DATA
            if self._after_skip is not None:
                pending, self._after_skip = self._after_skip, None
                ev = self._finish_skipped(pending)
                if ev is not None:
                    return ev
                continue
            if self.state == _S_CLIENT_FLAGS:
                ev = self._client_flags()
            elif self.state == _S_OPTIONS:
                ev = self._option()
            else:
                ev = self._request()
            if ev is NEED_DATA:
                if self._eof:
                    if self._available() == 0 and self._pending_header is None:
                        what = "during the handshake" if self.state != _S_TRANSMISSION else ""
                        return self._close(("client disconnected " + what).strip(), False)
                    return self._close("client disconnected in the middle of a message", False)
                return NEED_DATA
            if ev is not None:
                return ev

    def _client_flags(self):
        if self._available() < 4:
            return NEED_DATA
        (flags,) = struct.unpack(">I", self._take(4))
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(f"client sent unknown handshake flags {flags:#x}", False)
        self.fixed = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = _S_OPTIONS
        return None

    # -- option haggling -------------------------------------------------------------------------
    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._queue(encode_option_reply(option, reply_type, data))

    def _error(self, option: int, reply_type: int, message: str = "") -> None:
        self._reply(option, reply_type, message.encode("utf-8", "replace")[:MAX_STRING])

    def _option(self):
        if self._pending_header is None:
            if self._available() < _HDR_OPT.size:
                return NEED_DATA
            magic, option, length = _HDR_OPT.unpack(self._take(_HDR_OPT.size))
            if magic != IHAVEOPT:
                return self._close(f"bad option magic {magic:#x}", False)
            if not self.fixed and option != OPT_EXPORT_NAME:
                # non-fixed newstyle knows only EXPORT_NAME; there is no way to say "unsupported"
                return self._close(f"option {option} from a client without fixed newstyle", False)
            if length > MAX_OPTION_DATA:
                if option == OPT_EXPORT_NAME:
                    return self._close("NBD_OPT_EXPORT_NAME name too long", False)
                self._skip_bytes(length)
                self._after_skip = ("option-too-big", option, length)
                return None
            self._pending_header = (option, length, 0, 0, 0)
        option, length = self._pending_header[0], self._pending_header[1]
        if self._available() < length:
            return NEED_DATA
        self._pending_header = None
        data = self._take(length)
        return self._handle_option(option, data)

    def _finish_skipped(self, pending):
        kind = pending[0]
        if kind == "option-too-big":
            _, option, length = pending
            self._error(option, REP_ERR_TOO_BIG, f"option data of {length} bytes is too large")
            return None
        if kind == "request":
            _, cookie, error, message = pending
            self._queue(error_reply(cookie, self.structured, error, message))
            return None
        raise AssertionError(kind)

    def _lookup(self, name: str) -> Optional[ExportInfo]:
        if name == "":
            return self.exports[0]
        return self._by_name.get(name)

    def _handle_option(self, option: int, data: bytes):
        if option == OPT_STARTTLS:
            return self._starttls(data)
        if self.tls == "require" and not self.tls_active:
            # Nothing but STARTTLS in the clear: not even the list of exports. EXPORT_NAME has
            # no error reply, so it ends the connection; ABORT is refused and then honoured.
            self.tls_refusals += 1
            if option == OPT_EXPORT_NAME:
                return self._close("NBD_OPT_EXPORT_NAME before TLS (TLS is required)", False)
            self._error(option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            if option == OPT_ABORT:
                return self._close("client aborted the handshake without starting TLS", True)
            return None
        if self.shutting_down and option != OPT_ABORT:
            if option == OPT_EXPORT_NAME:
                return self._close("server is shutting down", False)
            self._error(option, REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        if option == OPT_EXPORT_NAME:
            name = _decode_name(data)
            export = self._lookup(name) if name is not None else None
            if export is None:
                return self._close(f"NBD_OPT_EXPORT_NAME: no export named {data[:80]!r}", False)
            self._enter_transmission(export)
            self._queue(struct.pack(">QH", export.size, export.transmission_flags(self.structured)))
            if not self.no_zeroes:
                self._queue(bytes(124))
            return ExportChosen(export, self.structured, self.meta_context_id)
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)
            return self._close("client aborted the handshake", True)
        if option == OPT_LIST:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for e in self.exports:
                name = e.name.encode("utf-8")
                self._reply(option, REP_SERVER, struct.pack(">I", len(name)) + name
                            + e.description.encode("utf-8"))
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._info_go(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _starttls(self, data: bytes):
        if self.tls == "off":
            self._error(OPT_STARTTLS, REP_ERR_POLICY, "TLS is not available on this server")
            return None
        if data:
            self._error(OPT_STARTTLS, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if self.tls_active:
            self._error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already active")
            return None
        if self.shutting_down:
            self._error(OPT_STARTTLS, REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        self._reply(OPT_STARTTLS, REP_ACK)
        early = bytes(self._buf[self._pos:])
        self._buf.clear()
        self._pos = 0
        self.state = _S_TLS_HANDSHAKE
        return StartTLS(early)

    def _info_go(self, option: int, data: bytes):
        opt_name = "NBD_OPT_GO" if option == OPT_GO else "NBD_OPT_INFO"
        if len(data) < 6:
            self._error(option, REP_ERR_INVALID, f"{opt_name}: data too short")
            return None
        (nlen,) = struct.unpack_from(">I", data, 0)
        if nlen > MAX_STRING or 4 + nlen + 2 > len(data):
            self._error(option, REP_ERR_INVALID, f"{opt_name}: bad name length")
            return None
        raw_name = data[4:4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._error(option, REP_ERR_INVALID, f"{opt_name}: length does not match the request count")
            return None
        requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        name = _decode_name(raw_name)
        if name is None:
            self._error(option, REP_ERR_INVALID, f"{opt_name}: export name is not valid UTF-8")
            return None
        export = self._lookup(name)
        if export is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode("utf-8"))
        if INFO_DESCRIPTION in requests and export.description:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                        + export.description.encode("utf-8"))
        # Like qemu-nbd, always tell the block sizes: no alignment needed, 4 KiB preferred.
        self._reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK,
                                                  PREFERRED_BLOCK, MAX_PAYLOAD))
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size,
                                                  export.transmission_flags(self.structured)))
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            self._enter_transmission(export)
            return ExportChosen(export, self.structured, self.meta_context_id)
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        opt_name = "NBD_OPT_SET_META_CONTEXT" if option == OPT_SET_META_CONTEXT else "NBD_OPT_LIST_META_CONTEXT"
        if option == OPT_SET_META_CONTEXT and not self.structured:
            self._error(option, REP_ERR_INVALID, f"{opt_name} needs structured replies first")
            return
        queries = _parse_meta_request(data)
        if queries is None:
            self._error(option, REP_ERR_INVALID, f"{opt_name}: malformed request")
            return
        raw_name, raw_queries = queries
        name = _decode_name(raw_name)
        if name is None:
            self._error(option, REP_ERR_INVALID, f"{opt_name}: export name is not valid UTF-8")
            return
        export = self._lookup(name)
        if export is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        listing = option == OPT_LIST_META_CONTEXT
        selected = False
        if listing and not raw_queries:
            selected = True                         # no query: list everything we know
        for q in raw_queries:
            try:
                query = q.decode("utf-8")
            except UnicodeDecodeError:
                self._error(option, REP_ERR_INVALID, f"{opt_name}: query is not valid UTF-8")
                return
            if query == BASE_ALLOCATION or (listing and query == "base:"):
                selected = True
            # other namespaces (and unknown base: leaves) select nothing; that is not an error
        if listing:
            if selected:
                self._reply(option, REP_META_CONTEXT, struct.pack(">I", 0) + BASE_ALLOCATION.encode())
        else:
            self._meta_export = export.name
            self._meta_selected = selected
            if selected:
                self._reply(option, REP_META_CONTEXT,
                            struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._reply(option, REP_ACK)

    def _enter_transmission(self, export: ExportInfo) -> None:
        self.export = export
        self.state = _S_TRANSMISSION
        if self._meta_export != export.name:
            self._meta_selected = False

    # -- transmission ----------------------------------------------------------------------------
    def _request(self):
        if self._pending_header is None:
            if self._available() < _HDR_REQUEST.size:
                return NEED_DATA
            magic, flags, cmd, cookie, offset, length = _HDR_REQUEST.unpack(self._take(_HDR_REQUEST.size))
            if magic != REQUEST_MAGIC:
                return self._close(f"bad request magic {magic:#x}", False)
            if cmd == CMD_DISC:
                return self._close("client disconnected (NBD_CMD_DISC)", True)
            problem = self._validate(flags, cmd, offset, length)
            if cmd == CMD_WRITE:
                if problem is not None:
                    # the payload still follows: discard it (streaming, never buffered)
                    self._skip_bytes(length)
                    self._after_skip = ("request", cookie, problem[0], problem[1])
                    return None
                self._pending_header = (flags, cmd, cookie, offset, length)
            else:
                if problem is not None:
                    self._queue(error_reply(cookie, self.structured, problem[0], problem[1]))
                    return None
                return self._make_request(flags, cmd, cookie, offset, length, None)
        flags, cmd, cookie, offset, length = self._pending_header
        if self._available() < length:
            return NEED_DATA
        self._pending_header = None
        return self._make_request(flags, cmd, cookie, offset, length, self._take(length))

    def _make_request(self, flags, cmd, cookie, offset, length, data) -> Request:
        return Request(cmd, flags, cookie, offset, length, data, self.export, self.structured,
                       self.meta_context_id)

    def _validate(self, flags: int, cmd: int, offset: int, length: int) -> Optional[Tuple[int, str]]:
        """None if the request may run, else (error, message). Order: command, flags,
        write protection, size limits, range."""
        export = self.export
        assert export is not None
        name = COMMAND_NAMES.get(cmd)
        if name is None:
            return EINVAL, f"unknown command {cmd}"
        allowed = CMD_FLAG_FUA
        if cmd == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        elif cmd == CMD_READ and self.structured:
            allowed |= CMD_FLAG_DF
        elif cmd == CMD_BLOCK_STATUS:
            allowed |= CMD_FLAG_REQ_ONE
        if flags & ~allowed:
            return EINVAL, f"NBD_CMD_{name}: unsupported flags {flags & ~allowed:#x}"
        writes = cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
        if writes and export.readonly:
            return EPERM, f"NBD_CMD_{name}: export {export.name!r} is read-only"
        if cmd == CMD_FLUSH:
            return None                  # offset/length are reserved; nothing to check
        if cmd in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
            return EINVAL, f"NBD_CMD_{name}: length {length} exceeds the maximum payload {MAX_PAYLOAD}"
        if cmd == CMD_BLOCK_STATUS:
            if self.meta_context_id is None:
                return EINVAL, "NBD_CMD_BLOCK_STATUS without a selected metadata context"
            if length == 0:
                return EINVAL, "NBD_CMD_BLOCK_STATUS with length 0"
        if offset + length > export.size:
            err = ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
            return err, (f"NBD_CMD_{name}: offset {offset} + length {length} is beyond the end of "
                         f"the export ({export.size} bytes)")
        return None


def _decode_name(raw: bytes) -> Optional[str]:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta_request(data: bytes) -> Optional[Tuple[bytes, List[bytes]]]:
    """u32 name length, name, u32 query count, {u32 length, query}... -> (name, queries)."""
    try:
        (nlen,) = struct.unpack_from(">I", data, 0)
        if nlen > MAX_STRING:
            return None
        pos = 4 + nlen
        name = data[4:pos]
        if len(name) != nlen:
            return None
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if qlen > MAX_STRING or pos + qlen > len(data):
                return None
            queries.append(data[pos:pos + qlen])
            pos += qlen
        if pos != len(data):
            return None
        return name, queries
    except struct.error:
        return None


# ==============================================================================================
# Executing requests against a Disk
# ==============================================================================================

def _kind_name(kind) -> str:
    name = getattr(kind, "name", None)
    if name is None:
        name = str(kind)
    return name.rsplit(".", 1)[-1].upper()


def extent_runs(disk, offset: int, length: int) -> List[Tuple[int, int, str]]:
    """``disk.extents(offset, length)`` as contiguous (offset, length, kind-name) runs exactly
    covering the range (clipped, gaps filled with DATA = "unknown, read it"), merged."""
    runs: List[Tuple[int, int, str]] = []
    end = offset + length
    pos = offset
    for ext in disk.extents(offset, length):
        if isinstance(ext, tuple) and not hasattr(ext, "offset"):
            e_off, e_len, kind = ext[0], ext[1], ext[2]
        else:
            e_off, e_len, kind = ext.offset, ext.length, ext.kind
        a, b = max(e_off, pos), min(e_off + e_len, end)
        if b <= a:
            continue
        if a > pos:
            _append_run(runs, pos, a - pos, "DATA")
        _append_run(runs, a, b - a, _kind_name(kind))
        pos = b
        if pos >= end:
            break
    if pos < end:
        _append_run(runs, pos, end - pos, "DATA")
    return runs


def _append_run(runs, off, length, kind):
    if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == off:
        runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
    else:
        runs.append((off, length, kind))


def allocation_flags(kind_name: str) -> int:
    """base:allocation flags for an extent kind. DATA is allocated (0). UNALLOCATED (no layer of
    the chain has it) and ZERO (a VDI zero block, or a block known to be zero without storage)
    both read as zeros and occupy no space in the image: HOLE|ZERO."""
    if kind_name == "DATA":
        return 0
    return STATE_HOLE | STATE_ZERO


STATUS_WINDOW = 64 * 1024 * 1024     # first look-up window of a block-status request


def block_status_descriptors(disk, offset: int, length: int, req_one: bool,
                             limit: int = MAX_EXTENTS) -> List[Tuple[int, int]]:
    """(length, flags) descriptors covering [offset, offset+length) from its start, merged by
    flags, each length < 2**32 (requests are u32 anyway), at most ``limit`` of them (one with
    ``req_one``).

    The disk is asked about a window that grows 4x at a time until the answer is complete or
    long enough, so the work follows the size of the answer, not of the request: repeated
    REQ_ONE queries over a huge fragmented disk (``qemu-img map``) stay linear overall.
    """
    want = 1 if req_one else limit
    window = min(length, STATUS_WINDOW)
    while True:
        out: List[Tuple[int, int]] = []
        for _off, ln, kind in extent_runs(disk, offset, window):
            flags = allocation_flags(kind)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + ln, flags)
            else:
                out.append((ln, flags))
        if window >= length or len(out) > want:
            return out[:want]
        # the window ended inside the answer's last extent (or too few extents): look further
        window = min(length, window * 4)


def _read_plan(disk, offset: int, length: int) -> List[Tuple[int, int, bool]]:
    """(offset, length, is_hole) pieces for a structured read: holes shorter than HOLE_MIN are
    folded into the data around them so a fragmented region costs one read, not many."""
    runs = [(o, n, kind != "DATA") for o, n, kind in extent_runs(disk, offset, length)]
    plan: List[Tuple[int, int, bool]] = []
    for o, n, hole in runs:
        if hole and n < HOLE_MIN:
            hole = False
        if plan and plan[-1][2] == hole:
            plan[-1] = (plan[-1][0], plan[-1][1] + n, hole)
        else:
            plan.append((o, n, hole))
    return plan


def errno_for(exc: BaseException, command: int) -> Tuple[int, str]:
    """Map an exception from the disk to an NBD error number and a message."""
    from .. import errors  # local import: keep the protocol module importable on its own
    msg = str(exc) or exc.__class__.__name__
    if isinstance(exc, errors.ReadOnlyError):
        return EPERM, msg
    if isinstance(exc, errors.RangeError):
        return (ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL), msg
    if isinstance(exc, errors.UnsupportedError):
        return ENOTSUP, msg
    if isinstance(exc, MemoryError):
        return ENOMEM, "out of memory"
    if isinstance(exc, OSError):
        if exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            return ENOSPC, msg
        return EIO, msg
    if isinstance(exc, errors.VDiskError) and "no space left" in msg:
        return ENOSPC, msg
    return EIO, msg


def handle_request(req: Request, disk) -> List[bytes]:
    """Execute ``req`` on ``disk``; return the complete reply as buffers to send in order.

    Blocks on disk I/O. Never raises for a disk error: that becomes the reply's error number.
    """
    try:
        handler = _HANDLERS[req.command]
        return handler(req, disk)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a protocol error reply
        err, msg = errno_for(exc, req.command)
        return [error_reply(req.cookie, req.structured, err, f"NBD_CMD_{req.name}: {msg}")]


def _ok(req: Request) -> List[bytes]:
    # A simple reply is allowed for every command but READ even with structured replies on.
    return [encode_simple_reply(req.cookie)]


def _flush_if_fua(req: Request, disk) -> None:
    if req.flags & CMD_FLAG_FUA:
        disk.flush()


def _do_read(req: Request, disk) -> List[bytes]:
    off, n, cookie = req.offset, req.length, req.cookie
    if not req.structured:
        buf = bytearray(_HDR_SIMPLE.size + n)
        if n:
            _readinto_exact(disk, memoryview(buf)[_HDR_SIMPLE.size:], off)
        _HDR_SIMPLE.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, cookie)
        return [buf]
    if n == 0:
        return [encode_none_chunk(cookie)]
    if req.flags & CMD_FLAG_DF:
        plan = [(off, n, False)]
    else:
        plan = _read_plan(disk, off, n)
    # Read everything first, so an error can still be reported as a clean single ERROR chunk.
    pieces = []
    for i, (o, ln, hole) in enumerate(plan):
        done = i == len(plan) - 1
        if hole:
            pieces.append(encode_hole_chunk(cookie, o, ln, done))
        else:
            hdr = _HDR_CHUNK.size + 8
            buf = bytearray(hdr + ln)
            _readinto_exact(disk, memoryview(buf)[hdr:], o)
            _HDR_CHUNK.pack_into(buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                 REPLY_TYPE_OFFSET_DATA, cookie, 8 + ln)
            struct.pack_into(">Q", buf, _HDR_CHUNK.size, o)
            pieces.append(buf)
    return pieces


def _readinto_exact(disk, view: memoryview, offset: int) -> None:
    got = disk.readinto(view, offset)
    if got is not None and got != len(view):
        raise OSError(_errno.EIO, f"short read: {got} of {len(view)} bytes at offset {offset}")


def _do_write(req: Request, disk) -> List[bytes]:
    disk.pwrite(req.data, req.offset)
    _flush_if_fua(req, disk)
    return _ok(req)


_ZERO_CHUNK = bytes(1024 * 1024)


def _reads_as_zero(disk, offset: int, length: int) -> bool:
    return all(kind != "DATA" for _o, _n, kind in extent_runs(disk, offset, length))


def _do_write_zeroes(req: Request, disk) -> List[bytes]:
    off, n = req.offset, req.length
    if req.flags & CMD_FLAG_FAST_ZERO:
        # Fast only when nothing has to be written: the range already reads as zeros and the
        # client allows holes. Anything else would cost real I/O, which FAST_ZERO forbids.
        if (req.flags & CMD_FLAG_NO_HOLE) or not _reads_as_zero(disk, off, n):
            return [error_reply(req.cookie, req.structured, ENOTSUP,
                                "NBD_CMD_WRITE_ZEROES: fast zeroing is not possible here")]
        _flush_if_fua(req, disk)
        return _ok(req)
    if n:
        if req.flags & CMD_FLAG_NO_HOLE:
            # NO_HOLE: the server must not create a hole. Storage that is allocated stays
            # allocated (zeros are written into it); where nothing is allocated, nothing is.
            try:
                disk.write_zeroes(off, n, keep_allocated=True)
            except TypeError:                      # a Disk-like object without the keyword
                pos, end = off, off + n
                while pos < end:
                    step = min(len(_ZERO_CHUNK), end - pos)
                    disk.pwrite(memoryview(_ZERO_CHUNK)[:step], pos)
                    pos += step
        else:
            disk.write_zeroes(off, n)
    _flush_if_fua(req, disk)
    return _ok(req)


def _do_trim(req: Request, disk) -> List[bytes]:
    from .. import errors
    if req.length:
        try:
            disk.discard(req.offset, req.length)
        except errors.UnsupportedError:
            pass                                   # TRIM is advisory
    _flush_if_fua(req, disk)
    return _ok(req)


def _do_flush(req: Request, disk) -> List[bytes]:
    disk.flush()
    return _ok(req)


def _do_cache(req: Request, disk) -> List[bytes]:
    return _ok(req)                                # a hint: the page cache does the rest


def _do_block_status(req: Request, disk) -> List[bytes]:
    assert req.meta_context_id is not None
    desc = block_status_descriptors(disk, req.offset, req.length,
                                    bool(req.flags & CMD_FLAG_REQ_ONE))
    return [encode_block_status(req.cookie, req.meta_context_id, desc, done=True)]


_HANDLERS = {
    CMD_READ: _do_read,
    CMD_WRITE: _do_write,
    CMD_FLUSH: _do_flush,
    CMD_TRIM: _do_trim,
    CMD_CACHE: _do_cache,
    CMD_WRITE_ZEROES: _do_write_zeroes,
    CMD_BLOCK_STATUS: _do_block_status,
}

