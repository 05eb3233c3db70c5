"""The NBD wire codec: constants, header structs, and the encoding/decoding of the handshake,
options, requests, simple and structured replies. Pure functions and data; no state, no I/O.

Facts: NBD ``doc/proto.md`` (fixed newstyle, INFO/GO, structured replies, block status) and the
digest in ``spec/BLOCK-BACKENDS.md`` section 3. All integers on the wire are big-endian.
"""
from __future__ import annotations

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

HDR_OPT = struct.Struct(">QII")          # IHAVEOPT, option, length
HDR_OPT_REPLY = struct.Struct(">QIII")   # magic, option, type, length
HDR_REQUEST = struct.Struct(">IHHQQI")   # magic, flags, type, cookie, offset, length
HDR_SIMPLE = struct.Struct(">IIQ")       # magic, error, cookie
HDR_CHUNK = struct.Struct(">IHHQI")      # magic, flags, type, cookie, length
GREETING = struct.Struct(">QQH")


# ==============================================================================================
# Exports
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



# ==============================================================================================
# Encoding replies (used by the connection state machine and by the backend)
# ==============================================================================================

def encode_greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return HDR_OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return HDR_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, chunk_type: int, length: int, done: bool) -> bytes:
    return HDR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, chunk_type,
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
# Decoding option payloads
# ==============================================================================================

def decode_name(raw: bytes) -> Optional[str]:
    """An export name as text, or None when it is too long, holds NUL or is not UTF-8."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_meta_request(data: bytes) -> Optional[Tuple[bytes, List[bytes]]]:
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

