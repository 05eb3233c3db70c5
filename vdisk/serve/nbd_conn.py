"""The NBD connection, sans-IO: handshake state machine, option haggling, request parsing.

Nothing here touches a socket. :class:`ServerConnection` consumes the bytes a client sent
(:meth:`~ServerConnection.receive_data`) and yields events (:meth:`~ServerConnection.next_event`);
whatever the server must say back is collected for :meth:`~ServerConnection.data_to_send`.
Option haggling is answered entirely inside the state machine; in the transmission phase every
well-formed, in-range request comes out as a :class:`Request` and every malformed one is answered
with the protocol's error reply without ever reaching the disk. What a request does to a disk is
:mod:`vdisk.serve.nbd_backend`'s job; the bytes are :mod:`vdisk.serve.nbd_wire`'s.

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
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .nbd_wire import (BASE_ALLOCATION, BASE_ALLOCATION_ID, CMD_BLOCK_STATUS, CMD_DISC,
                       CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
                       CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
                       CMD_WRITE_ZEROES, COMMAND_NAMES, EINVAL, ENOSPC, EPERM,
                       FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, HDR_OPT, HDR_REQUEST,
                       IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME,
                       MAX_OPTION_DATA, MAX_PAYLOAD, MAX_QUEUED_OUTPUT, MAX_STRING,
                       MIN_BLOCK, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
                       OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
                       OPT_STRUCTURED_REPLY, PREFERRED_BLOCK, REP_ACK, REP_ERR_INVALID,
                       REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD, REP_ERR_TOO_BIG,
                       REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
                       REP_SERVER, REQUEST_MAGIC, ExportInfo, decode_name, encode_greeting,
                       encode_option_reply, error_reply, parse_meta_request)


# ==============================================================================================
# Events
# ==============================================================================================

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
        with memoryview(self._buf) as view:     # one copy (a slice of the bytearray is another)
            data = bytes(view[self._pos:self._pos + n])
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
            if self._available() < HDR_OPT.size:
                return NEED_DATA
            magic, option, length = HDR_OPT.unpack(self._take(HDR_OPT.size))
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
            name = decode_name(data)
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
        name = decode_name(raw_name)
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
        queries = parse_meta_request(data)
        if queries is None:
            self._error(option, REP_ERR_INVALID, f"{opt_name}: malformed request")
            return
        raw_name, raw_queries = queries
        name = decode_name(raw_name)
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
            if self._available() < HDR_REQUEST.size:
                return NEED_DATA
            magic, flags, cmd, cookie, offset, length = HDR_REQUEST.unpack(self._take(HDR_REQUEST.size))
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

