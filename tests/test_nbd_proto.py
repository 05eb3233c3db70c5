"""Sans-IO tests of the NBD protocol (vdisk.serve.nbd_wire / nbd_conn / nbd_backend, reached here
through their one-release alias vdisk.serve.nbd_proto): the handshake state machine, option
haggling, request validation, reply encoding and request execution, with no socket anywhere (an
in-memory disk stands in for images)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.blockdev import Extent, ExtentKind
from vdisk.errors import RangeError, ReadOnlyError, UnsupportedError, VDiskError
from vdisk.serve import nbd_proto as P
from test_nbd_support import MemDisk

DATA, UNALLOCATED = ExtentKind.DATA, ExtentKind.UNALLOCATED

EXPORTS = [P.ExportInfo("a.vhd", 1 << 20, readonly=False, description="vhd dynamic"),
           P.ExportInfo("b.vdi", 2 << 20, readonly=True)]


# ----------------------------------------------------------------------------------------------
# helpers: drive a ServerConnection with bytes, decode its output
# ----------------------------------------------------------------------------------------------

def opt(option, data=b""):
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def go_data(name=b"", infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + struct.pack(f">{len(infos)}H", *infos)


def meta_data(name, *queries):
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def req(cmd, offset=0, length=0, flags=0, cookie=7, data=b""):
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def feed(conn, data, step=None):
    """Feed bytes (optionally in pieces); return the list of events."""
    events = []
    pieces = [data] if not step else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not P.NEED_DATA:
            events.append(ev)
    return events


def option_replies(out: bytes):
    """Decode option replies -> [(option, type, data)]."""
    res, pos = [], 0
    while pos < len(out):
        magic, option, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPTION_REPLY_MAGIC
        pos += 20
        res.append((option, rtype, out[pos:pos + length]))
        pos += length
    return res


def new_conn(flags=P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, exports=EXPORTS):
    conn = P.ServerConnection(exports)
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
    assert feed(conn, struct.pack(">I", flags)) == []
    return conn


def negotiated(name=b"a.vhd", structured=True, meta=True, exports=EXPORTS):
    conn = new_conn(exports=exports)
    data = b""
    if structured:
        data += opt(P.OPT_STRUCTURED_REPLY)
    if meta:
        data += opt(P.OPT_SET_META_CONTEXT, meta_data(name, b"base:allocation"))
    data += opt(P.OPT_GO, go_data(name))
    events = feed(conn, data)
    assert isinstance(events[-1], P.ExportChosen)
    conn.data_to_send()
    return conn


def simple(out: bytes):
    magic, err, cookie = struct.unpack_from(">IIQ", out)
    assert magic == P.SIMPLE_REPLY_MAGIC
    return err, cookie


def chunks(out):
    """Decode a list of buffers / bytes of structured chunks -> [(flags, type, cookie, payload)]."""
    if isinstance(out, list):
        out = b"".join(bytes(b) for b in out)
    res, pos = [], 0
    while pos < len(out):
        magic, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", out, pos)
        assert magic == P.STRUCTURED_REPLY_MAGIC
        pos += 20
        res.append((flags, ctype, cookie, out[pos:pos + length]))
        pos += length
    return res


# ----------------------------------------------------------------------------------------------
# handshake and options
# ----------------------------------------------------------------------------------------------

def test_unknown_client_flags_close():
    conn = P.ServerConnection(EXPORTS)
    conn.data_to_send()
    ev = feed(conn, struct.pack(">I", 0x4 | 1))
    assert isinstance(ev[0], P.Closed) and not ev[0].graceful
    assert conn.closed
    assert feed(conn, opt(P.OPT_LIST)) == []          # nothing more after closing


def test_export_name_with_and_without_zeroes():
    for flags, tail in ((1 | 2, 0), (1, 124), (0, 124)):
        conn = new_conn(flags)
        ev = feed(conn, opt(P.OPT_EXPORT_NAME, b"b.vdi"))
        assert isinstance(ev[0], P.ExportChosen) and ev[0].export.name == "b.vdi"
        out = conn.data_to_send()
        assert len(out) == 10 + tail
        size, tflags = struct.unpack(">QH", out[:10])
        assert size == 2 << 20
        assert tflags & P.TF_HAS_FLAGS and tflags & P.TF_READ_ONLY
        assert not tflags & (P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_DF)
        assert out[10:] == bytes(tail)


def test_export_name_default_and_unknown():
    conn = new_conn()
    ev = feed(conn, opt(P.OPT_EXPORT_NAME, b""))
    assert ev[0].export.name == "a.vhd"                # the empty name = the first export
    conn = new_conn()
    ev = feed(conn, opt(P.OPT_EXPORT_NAME, b"nope"))
    assert isinstance(ev[0], P.Closed) and not ev[0].graceful
    assert conn.data_to_send() == b""                 # EXPORT_NAME cannot error: hang up


def test_nonfixed_client_only_export_name():
    conn = new_conn(0)
    ev = feed(conn, opt(P.OPT_LIST))
    assert isinstance(ev[0], P.Closed)


def test_bad_option_magic_closes():
    conn = new_conn()
    ev = feed(conn, struct.pack(">QII", 0x1234, P.OPT_LIST, 0))
    assert isinstance(ev[0], P.Closed) and "magic" in ev[0].reason


def test_list_and_unknown_options_keep_haggling():
    conn = new_conn()
    feed(conn, opt(P.OPT_LIST) + opt(P.OPT_LIST, b"x") + opt(99, b"junk") + opt(P.OPT_EXTENDED_HEADERS)
         + opt(P.OPT_PEEK_EXPORT) + opt(P.OPT_STARTTLS))
    r = option_replies(conn.data_to_send())
    assert [x[:2] for x in r] == [(3, P.REP_SERVER), (3, P.REP_SERVER), (3, P.REP_ACK),
                                  (3, P.REP_ERR_INVALID), (99, P.REP_ERR_UNSUP),
                                  (11, P.REP_ERR_UNSUP), (4, P.REP_ERR_UNSUP),
                                  (5, P.REP_ERR_POLICY)]
    n = struct.unpack(">I", r[0][2][:4])[0]
    assert r[0][2][4:4 + n] == b"a.vhd" and r[0][2][4 + n:] == b"vhd dynamic"
    assert r[1][2][4:] == b"b.vdi"
    ev = feed(conn, opt(P.OPT_GO, go_data(b"b.vdi")))
    assert isinstance(ev[0], P.ExportChosen)


def test_info_then_go():
    conn = new_conn()
    feed(conn, opt(P.OPT_INFO, go_data(b"a.vhd", (P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE, 77))))
    r = option_replies(conn.data_to_send())
    assert r[-1][1] == P.REP_ACK and all(x[1] == P.REP_INFO for x in r[:-1])
    infos = {struct.unpack(">H", x[2][:2])[0]: x[2][2:] for x in r[:-1]}
    assert infos[P.INFO_NAME] == b"a.vhd"
    assert infos[P.INFO_DESCRIPTION] == b"vhd dynamic"
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (1, 4096, P.MAX_PAYLOAD)
    size, flags = struct.unpack(">QH", infos[P.INFO_EXPORT])
    assert size == 1 << 20 and not flags & P.TF_READ_ONLY
    assert flags & P.TF_SEND_TRIM and flags & P.TF_SEND_WRITE_ZEROES and flags & P.TF_SEND_FAST_ZERO
    assert not flags & P.TF_SEND_DF                 # no structured replies negotiated yet
    assert conn.state == "options"
    # the default export by empty name reports its real name
    feed(conn, opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_GO, go_data(b"", (P.INFO_NAME,))))
    r = option_replies(conn.data_to_send())
    infos = {struct.unpack(">H", x[2][:2])[0]: x[2][2:] for x in r if x[1] == P.REP_INFO}
    assert infos[P.INFO_NAME] == b"a.vhd"
    assert struct.unpack(">QH", infos[P.INFO_EXPORT])[1] & P.TF_SEND_DF
    assert conn.state == "transmission"


@pytest.mark.parametrize("data, expect", [
    (go_data(b"zzz"), P.REP_ERR_UNKNOWN),
    (b"\0\0", P.REP_ERR_INVALID),                                   # too short
    (struct.pack(">I", 50) + b"a.vhd" + b"\0\0", P.REP_ERR_INVALID),  # name length beyond data
    (go_data(b"a.vhd", (1,)) + b"\0", P.REP_ERR_INVALID),           # trailing byte
    (go_data(b"a.vhd", (1, 2))[:-2], P.REP_ERR_INVALID),            # count says 2, one present
    (go_data(b"\xff\xfe"), P.REP_ERR_INVALID),                      # not UTF-8
])
def test_go_errors(data, expect):
    conn = new_conn()
    assert feed(conn, opt(P.OPT_GO, data)) == []
    r = option_replies(conn.data_to_send())
    assert r == [(P.OPT_GO, expect, r[0][2])] and r[0][2]          # with a message
    assert conn.state == "options"


def test_structured_reply_option():
    conn = new_conn()
    feed(conn, opt(P.OPT_STRUCTURED_REPLY, b"x") + opt(P.OPT_STRUCTURED_REPLY))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_ERR_INVALID, P.REP_ACK]
    assert conn.structured


def test_meta_contexts():
    conn = new_conn()
    # SET needs structured replies; LIST does not (like qemu-nbd)
    feed(conn, opt(P.OPT_SET_META_CONTEXT, meta_data(b"a.vhd", b"base:allocation")))
    assert option_replies(conn.data_to_send())[0][1] == P.REP_ERR_INVALID
    feed(conn, opt(P.OPT_LIST_META_CONTEXT, meta_data(b"a.vhd")))
    r = option_replies(conn.data_to_send())
    assert [x[1] for x in r] == [P.REP_META_CONTEXT, P.REP_ACK]
    assert r[0][2] == struct.pack(">I", 0) + b"base:allocation"
    feed(conn, opt(P.OPT_LIST_META_CONTEXT, meta_data(b"a.vhd", b"base:")))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_META_CONTEXT, P.REP_ACK]
    feed(conn, opt(P.OPT_LIST_META_CONTEXT, meta_data(b"a.vhd", b"qemu:dirty-bitmap:x", b"base:other")))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_ACK]
    feed(conn, opt(P.OPT_LIST_META_CONTEXT, meta_data(b"nope")))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_ERR_UNKNOWN]
    feed(conn, opt(P.OPT_LIST_META_CONTEXT, meta_data(b"a.vhd", b"base:allocation")[:-3]))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_ERR_INVALID]
    feed(conn, opt(P.OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    feed(conn, opt(P.OPT_SET_META_CONTEXT, meta_data(b"a.vhd", b"x-foo:bar", b"base:allocation")))
    r = option_replies(conn.data_to_send())
    assert [x[1] for x in r] == [P.REP_META_CONTEXT, P.REP_ACK]
    assert r[0][2] == struct.pack(">I", P.BASE_ALLOCATION_ID) + b"base:allocation"
    # "base:" alone selects nothing in SET
    feed(conn, opt(P.OPT_SET_META_CONTEXT, meta_data(b"a.vhd", b"base:")))
    assert [x[1] for x in option_replies(conn.data_to_send())] == [P.REP_ACK]
    ev = feed(conn, opt(P.OPT_GO, go_data(b"a.vhd")))
    assert ev[0].meta_context_id is None


def test_meta_context_is_per_export():
    conn = new_conn()
    feed(conn, opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_SET_META_CONTEXT, meta_data(b"a.vhd", b"base:allocation")))
    ev = feed(conn, opt(P.OPT_GO, go_data(b"b.vdi")))
    assert ev[0].meta_context_id is None
    conn.data_to_send()
    assert feed(conn, req(P.CMD_BLOCK_STATUS, 0, 4096)) == []
    (flags, ctype, cookie, payload), = chunks(conn.data_to_send())
    assert ctype == P.REPLY_TYPE_ERROR and struct.unpack(">I", payload[:4])[0] == P.EINVAL


def test_abort_is_graceful():
    conn = new_conn()
    ev = feed(conn, opt(P.OPT_ABORT))
    assert isinstance(ev[0], P.Closed) and ev[0].graceful
    assert option_replies(conn.data_to_send()) == [(P.OPT_ABORT, P.REP_ACK, b"")]


def test_oversized_option_is_skipped_without_buffering():
    conn = new_conn()
    big = P.MAX_OPTION_DATA + 12345
    feed(conn, struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, big))
    for _ in range(big // 8192):
        feed(conn, b"\x55" * 8192)
        assert len(conn._buf) < 16 * 1024                       # never accumulated
    feed(conn, b"\x55" * (big % 8192) + opt(P.OPT_LIST))
    r = option_replies(conn.data_to_send())
    assert r[0][1] == P.REP_ERR_TOO_BIG and r[-1][1] == P.REP_ACK


def test_eof_during_handshake():
    conn = new_conn()
    conn.receive_data(opt(P.OPT_GO, go_data(b"a.vhd"))[:-3])
    assert conn.next_event() is P.NEED_DATA
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.graceful


def test_shutting_down_refuses_options():
    conn = P.ServerConnection(EXPORTS, shutting_down=True)
    conn.data_to_send()
    feed(conn, struct.pack(">I", 3) + opt(P.OPT_LIST))
    assert option_replies(conn.data_to_send())[0][1] == P.REP_ERR_SHUTDOWN


# ----------------------------------------------------------------------------------------------
# transmission: request validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("request_bytes, err", [
    (req(42, 0, 512), P.EINVAL),                                          # unknown command
    (req(P.CMD_READ, 0, 512, flags=1 << 7), P.EINVAL),                    # unknown flag
    (req(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_NO_HOLE), P.EINVAL),        # flag of another command
    (req(P.CMD_BLOCK_STATUS, 0, 512, flags=P.CMD_FLAG_DF), P.EINVAL),
    (req(P.CMD_READ, (1 << 20) - 511, 512), P.EINVAL),                    # past the end
    (req(P.CMD_READ, 1 << 63, 512), P.EINVAL),
    (req(P.CMD_READ, 0, P.MAX_PAYLOAD + 1), P.EINVAL),                    # too big
    (req(P.CMD_TRIM, 1 << 20, 1), P.EINVAL),
    (req(P.CMD_CACHE, (1 << 64) - 1, 1), P.EINVAL),
    (req(P.CMD_WRITE_ZEROES, 1 << 20, 4096), P.ENOSPC),                   # write past end
    (req(P.CMD_WRITE_ZEROES, 0, 4096, flags=P.CMD_FLAG_DF), P.EINVAL),
])
def test_invalid_requests_get_errors(structured, request_bytes, err):
    conn = negotiated(structured=structured, meta=structured)
    assert feed(conn, request_bytes) == []
    out = conn.data_to_send()
    if structured:
        (flags, ctype, cookie, payload), = chunks(out)
        assert flags == P.REPLY_FLAG_DONE and ctype == P.REPLY_TYPE_ERROR and cookie == 7
        e, mlen = struct.unpack(">IH", payload[:6])
        assert e == err and len(payload) == 6 + mlen and mlen > 0
    else:
        assert out == P.encode_simple_reply(7, err)
    # and the connection carries on
    ev = feed(conn, req(P.CMD_READ, 0, 512, cookie=8))
    assert isinstance(ev[0], P.Request) and ev[0].cookie == 8


def test_df_needs_structured_replies():
    conn = negotiated(structured=False, meta=False)
    assert feed(conn, req(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF)) == []
    assert simple(conn.data_to_send()) == (P.EINVAL, 7)
    conn = negotiated()
    ev = feed(conn, req(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF))
    assert ev[0].flags == P.CMD_FLAG_DF


def test_block_status_needs_a_context_and_length():
    conn = negotiated(meta=False)
    feed(conn, req(P.CMD_BLOCK_STATUS, 0, 512))
    assert chunks(conn.data_to_send())[0][1] == P.REPLY_TYPE_ERROR
    conn = negotiated()
    feed(conn, req(P.CMD_BLOCK_STATUS, 0, 0))
    assert chunks(conn.data_to_send())[0][1] == P.REPLY_TYPE_ERROR
    ev = feed(conn, req(P.CMD_BLOCK_STATUS, 0, 1 << 20))
    assert ev[0].meta_context_id == P.BASE_ALLOCATION_ID


@pytest.mark.parametrize("cmd", [P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES])
def test_read_only_export_gives_eperm_and_skips_payload(cmd):
    conn = negotiated(b"b.vdi", meta=False)
    data = b"\xaa" * 4096 if cmd == P.CMD_WRITE else b""
    # fed one byte at a time: the payload is skipped, the next request is parsed correctly
    ev = feed(conn, req(cmd, 0, 4096, data=data) + req(P.CMD_READ, 0, 4096, cookie=9), step=1)
    assert len(ev) == 1 and ev[0].command == P.CMD_READ and ev[0].cookie == 9
    (flags, ctype, cookie, payload), = chunks(conn.data_to_send())
    assert struct.unpack(">I", payload[:4])[0] == P.EPERM and cookie == 7


def test_oversized_write_is_refused_and_skipped():
    conn = negotiated()
    n = P.MAX_PAYLOAD + 4096
    feed(conn, req(P.CMD_WRITE, 0, n))
    sent = 0
    while sent < n:
        step = min(1 << 20, n - sent)
        assert feed(conn, bytes(step)) == []
        sent += step
        assert len(conn._buf) < (2 << 20)
    ev = feed(conn, req(P.CMD_READ, 0, 512, cookie=11))
    assert ev[0].cookie == 11
    assert struct.unpack(">I", chunks(conn.data_to_send())[0][3][:4])[0] == P.EINVAL


def test_write_out_of_range_is_enospc_and_payload_skipped():
    conn = negotiated()
    feed(conn, req(P.CMD_WRITE, (1 << 20) - 100, 200, data=b"x" * 200) + req(P.CMD_FLUSH, cookie=3))
    out = chunks(conn.data_to_send())
    assert struct.unpack(">I", out[0][3][:4])[0] == P.ENOSPC


def test_write_payload_and_disc():
    conn = negotiated()
    ev = feed(conn, req(P.CMD_WRITE, 4096, 5, data=b"hello") + req(P.CMD_DISC) + req(P.CMD_READ, 0, 1))
    assert ev[0].command == P.CMD_WRITE and ev[0].data == b"hello"
    assert isinstance(ev[1], P.Closed) and ev[1].graceful
    assert len(ev) == 2                                      # nothing is read after DISC


def test_bad_request_magic_and_eof_mid_request():
    conn = negotiated()
    ev = feed(conn, b"\x00" * 28)
    assert isinstance(ev[0], P.Closed) and not ev[0].graceful
    conn = negotiated()
    ev = feed(conn, req(P.CMD_WRITE, 0, 4096, data=b"\x01" * 1000))
    assert ev == []
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.graceful       # the partial WRITE never comes out
    conn = negotiated()
    feed(conn, req(P.CMD_READ, 0, 512)[:10])
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), P.Closed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 200), min_size=1, max_size=40))
def test_arbitrary_fragmentation_gives_same_events(splits):
    stream = (struct.pack(">I", 3) + opt(P.OPT_STRUCTURED_REPLY) + opt(77, b"abc")
              + opt(P.OPT_SET_META_CONTEXT, meta_data(b"a.vhd", b"base:allocation"))
              + opt(P.OPT_GO, go_data(b"a.vhd", (3,)))
              + req(P.CMD_WRITE, 10, 300, data=bytes(range(256)) + b"z" * 44, cookie=1)
              + req(P.CMD_READ, 0, 700, cookie=2) + req(42, cookie=3)
              + req(P.CMD_BLOCK_STATUS, 0, 4096, flags=P.CMD_FLAG_REQ_ONE, cookie=4)
              + req(P.CMD_DISC))

    def run(pieces):
        conn = P.ServerConnection(EXPORTS)
        out, events = [conn.data_to_send()], []
        for p in pieces:
            events += feed(conn, p)
            out.append(conn.data_to_send())
        return b"".join(out), [repr(e) for e in events]

    pieces, pos = [], 0
    for s in splits:
        pieces.append(stream[pos:pos + s])
        pos += s
    pieces.append(stream[pos:])
    assert run(pieces) == run([stream])


# ----------------------------------------------------------------------------------------------
# executing requests
# ----------------------------------------------------------------------------------------------

def request(cmd, offset=0, length=0, flags=0, data=None, structured=True, readonly=False, size=None,
            meta=True):
    info = P.ExportInfo("m", size or (4 << 20), readonly=readonly)
    return P.Request(cmd, flags, 5, offset, length, data, info, structured,
                     P.BASE_ALLOCATION_ID if meta else None)


def sparse_disk():
    d = MemDisk(4 << 20)                       # 64 KiB blocks
    d.fill(0, b"A" * 4096)                     # block 0 DATA
    d.fill(3 * 65536, b"B" * 65536)            # block 3 DATA; 1-2 holes (128 KiB)
    d.fill(5 * 65536, b"C" * 10)               # block 5 DATA; block 4 hole (64 KiB)
    d.write_zeroes(8 * 65536, 2 * 65536)       # blocks 8-9 ZERO
    return d


def test_read_simple_reply():
    d = sparse_disk()
    out = P.handle_request(request(P.CMD_READ, 100, 5000, structured=False), d)
    buf = b"".join(bytes(b) for b in out)
    assert simple(buf) == (0, 5)
    assert buf[16:] == bytes(d.data[100:5100])


def test_structured_read_sends_holes():
    d = sparse_disk()
    out = chunks(P.handle_request(request(P.CMD_READ, 0, 12 * 65536), d))
    assert all(c[2] == 5 for c in out)
    assert [c[0] for c in out] == [0] * (len(out) - 1) + [P.REPLY_FLAG_DONE]
    image, covered = bytearray(12 * 65536), 0
    kinds = []
    for flags, ctype, cookie, payload in out:
        if ctype == P.REPLY_TYPE_OFFSET_DATA:
            off = struct.unpack(">Q", payload[:8])[0]
            image[off:off + len(payload) - 8] = payload[8:]
            covered += len(payload) - 8
            kinds.append(("data", off, len(payload) - 8))
        else:
            assert ctype == P.REPLY_TYPE_OFFSET_HOLE
            off, ln = struct.unpack(">QI", payload)
            covered += ln
            kinds.append(("hole", off, ln))
    assert covered == 12 * 65536 and bytes(image) == bytes(d.data[:12 * 65536])
    # holes of >= 64 KiB travel as OFFSET_HOLE; the 64 KiB hole (block 4) too; ZERO blocks also
    assert kinds == [("data", 0, 65536), ("hole", 65536, 2 * 65536), ("data", 3 * 65536, 65536),
                     ("hole", 4 * 65536, 65536), ("data", 5 * 65536, 65536),
                     ("hole", 6 * 65536, 6 * 65536)]


def test_small_holes_are_folded_into_data():
    d = MemDisk(1 << 20, block=4096)
    d.fill(0, b"x" * 4096)
    d.fill(3 * 4096, b"y" * 4096)             # an 8 KiB hole between: sent as data
    out = chunks(P.handle_request(request(P.CMD_READ, 0, 4 * 4096, size=1 << 20), d))
    assert len(out) == 1 and out[0][1] == P.REPLY_TYPE_OFFSET_DATA
    assert out[0][3][8:] == bytes(d.data[:4 * 4096])


def test_df_read_is_one_chunk():
    d = sparse_disk()
    out = chunks(P.handle_request(request(P.CMD_READ, 0, 10 * 65536, flags=P.CMD_FLAG_DF), d))
    assert len(out) == 1 and out[0][0] == P.REPLY_FLAG_DONE
    assert out[0][3] == struct.pack(">Q", 0) + bytes(d.data[:10 * 65536])


def test_zero_length_read():
    d = MemDisk(1 << 20)
    assert chunks(P.handle_request(request(P.CMD_READ, 0, 0), d)) == [(1, 0, 5, b"")]
    assert b"".join(P.handle_request(request(P.CMD_READ, 0, 0, structured=False), d)) == P.encode_simple_reply(5)


def test_read_error_is_eio():
    d = MemDisk(1 << 20)
    d.fill(0, b"q" * 65536)
    d.fail_reads = True
    (flags, ctype, cookie, payload), = chunks(P.handle_request(request(P.CMD_READ, 0, 4096), d))
    assert ctype == P.REPLY_TYPE_ERROR and flags == 1 and struct.unpack(">I", payload[:4])[0] == P.EIO
    out = b"".join(P.handle_request(request(P.CMD_READ, 0, 4096, structured=False), d))
    assert out == P.encode_simple_reply(5, P.EIO)              # no data after an error


def test_write_fua_flush_trim_cache():
    d = MemDisk(1 << 20)
    out = P.handle_request(request(P.CMD_WRITE, 10, 3, data=b"abc"), d)
    assert simple(out[0]) == (0, 5) and d.flushes == 0 and d.data[10:13] == b"abc"
    P.handle_request(request(P.CMD_WRITE, 10, 3, data=b"xyz", flags=P.CMD_FLAG_FUA), d)
    assert d.flushes == 1
    P.handle_request(request(P.CMD_FLUSH), d)
    assert d.flushes == 2
    P.handle_request(request(P.CMD_TRIM, 0, 65536 * 2, flags=P.CMD_FLAG_FUA), d)
    assert ("discard", 0, 131072) in d.calls and d.flushes == 3
    before = list(d.calls)
    assert simple(P.handle_request(request(P.CMD_CACHE, 0, 4096), d)[0]) == (0, 5)
    assert d.calls == before


def test_write_zeroes_variants():
    d = MemDisk(1 << 20)
    d.fill(0, b"\xff" * (1 << 20))
    P.handle_request(request(P.CMD_WRITE_ZEROES, 65536, 131072), d)
    assert d.calls[-1] == ("write_zeroes", 65536, 131072)
    assert d.state[1] == d.state[2] == "ZERO"
    P.handle_request(request(P.CMD_WRITE_ZEROES, 5 * 65536, 65536, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA), d)
    assert d.state[5] == "DATA" and d.data[5 * 65536:6 * 65536] == bytes(65536)
    assert d.calls[-2:] == [("write_zeroes_keep", 5 * 65536, 65536), ("flush",)]

    p = MemDisk(1 << 20)                       # NO_HOLE on allocated blocks: zeros, still DATA
    p.fill(0, b"\xff" * (1 << 20))
    P.handle_request(request(P.CMD_WRITE_ZEROES, 100, 3 << 20 >> 2, flags=P.CMD_FLAG_NO_HOLE, size=1 << 20), p)
    assert p.data[100:100 + (3 << 18)] == bytes(3 << 18) and p.data[99] == 0xff
    assert p.data[100 + (3 << 18)] == 0xff and all(s == "DATA" for s in p.state)
    # FAST_ZERO: cheap (no-op) where the range already reads as zero, ENOTSUP elsewhere
    n = len(d.calls)
    assert simple(P.handle_request(request(P.CMD_WRITE_ZEROES, 65536, 65536, flags=P.CMD_FLAG_FAST_ZERO), d)[0])[0] == 0
    assert len(d.calls) == n
    for flags, off in ((P.CMD_FLAG_FAST_ZERO, 7 * 65536),
                       (P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_NO_HOLE, 65536)):
        (fl, ctype, cookie, payload), = chunks(P.handle_request(request(P.CMD_WRITE_ZEROES, off, 4096, flags=flags), d))
        assert struct.unpack(">I", payload[:4])[0] == P.ENOTSUP
    assert d.data[7 * 65536:7 * 65536 + 4096] == b"\xff" * 4096   # untouched


def test_block_status_mapping():
    d = sparse_disk()
    (flags, ctype, cookie, payload), = chunks(P.handle_request(request(P.CMD_BLOCK_STATUS, 0, 12 * 65536), d))
    assert ctype == P.REPLY_TYPE_BLOCK_STATUS and flags == P.REPLY_FLAG_DONE
    ctx, = struct.unpack(">I", payload[:4])
    desc = list(struct.iter_unpack(">II", payload[4:]))
    assert ctx == P.BASE_ALLOCATION_ID
    H, Z = P.STATE_HOLE, P.STATE_ZERO
    assert desc == [(65536, 0), (2 * 65536, H | Z), (65536, 0), (65536, H | Z), (65536, 0),
                    (6 * 65536, H | Z)]
    # REQ_ONE: a single extent, not longer than asked, starting mid-extent
    out = chunks(P.handle_request(request(P.CMD_BLOCK_STATUS, 65536 + 100, 8000, flags=P.CMD_FLAG_REQ_ONE), d))
    assert list(struct.iter_unpack(">II", out[0][3][4:])) == [(8000, H | Z)]
    out = chunks(P.handle_request(request(P.CMD_BLOCK_STATUS, 100, 10 * 65536, flags=P.CMD_FLAG_REQ_ONE), d))
    assert list(struct.iter_unpack(">II", out[0][3][4:])) == [(65536 - 100, 0)]


def test_block_status_descriptor_limit():
    d = MemDisk(4 << 20, block=512)
    for i in range(0, 8192, 2):
        d.fill(i * 512, b"x")
    desc = P.block_status_descriptors(d, 0, 4 << 20, False, limit=100)
    assert len(desc) == 100 and sum(n for n, _ in desc) == 100 * 512


def test_extent_runs_tolerates_gaps_and_overhang():
    class T:
        size = 1000

        def extents(self, offset, length):
            return [Extent(0, 300, DATA, 0), Extent(500, 1000, UNALLOCATED, 0)]   # gap 300-500, overhang
    assert P.extent_runs(T(), 100, 600) == [(100, 400, DATA), (500, 200, UNALLOCATED)]


def test_extent_kinds_must_be_extentkind_members():
    class T:
        size = 1000

        def extents(self, offset, length):
            return [Extent(0, 1000, "DATA", 0)]
    with pytest.raises(TypeError):
        P.extent_runs(T(), 0, 1000)


def test_allocation_flags():
    assert P.allocation_flags(DATA) == 0
    assert P.allocation_flags(ExtentKind.ZERO) == P.STATE_HOLE | P.STATE_ZERO
    assert P.allocation_flags(UNALLOCATED) == P.STATE_HOLE | P.STATE_ZERO


@pytest.mark.parametrize("exc, cmd, err", [
    (ReadOnlyError("ro"), P.CMD_WRITE, P.EPERM),
    (RangeError("r"), P.CMD_WRITE, P.ENOSPC),
    (RangeError("r"), P.CMD_READ, P.EINVAL),
    (UnsupportedError("u"), P.CMD_WRITE_ZEROES, P.ENOTSUP),
    (OSError(28, "full"), P.CMD_WRITE, P.ENOSPC),
    (OSError(122, "quota"), P.CMD_WRITE, P.ENOSPC),
    (OSError(5, "bad"), P.CMD_READ, P.EIO),
    (VDiskError("x.vhd: no space left on device"), P.CMD_WRITE, P.ENOSPC),
    (VDiskError("x.vhd: I/O error: bad"), P.CMD_WRITE, P.EIO),
    (MemoryError(), P.CMD_READ, P.ENOMEM),
    (ValueError("bug"), P.CMD_READ, P.EIO),
])
def test_errno_mapping(exc, cmd, err):
    assert P.errno_for(exc, cmd)[0] == err


def test_disk_errors_become_replies():
    class Full(MemDisk):
        def pwrite(self, data, offset):
            raise VDiskError("img: no space left on device")
    d = Full(1 << 20)
    (flags, ctype, cookie, payload), = chunks(P.handle_request(request(P.CMD_WRITE, 0, 1, data=b"x"), d))
    e, mlen = struct.unpack(">IH", payload[:6])
    assert e == P.ENOSPC and b"no space" in payload[6:6 + mlen]
    out = P.handle_request(request(P.CMD_WRITE, 0, 1, data=b"x", structured=False), d)
    assert simple(out[0]) == (P.ENOSPC, 5)


# ----------------------------------------------------------------------------------------------
# a model: random traffic through ServerConnection + handle_request against a bytearray
# ----------------------------------------------------------------------------------------------

ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, (1 << 20) + 4096), st.integers(0, 70000), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, (1 << 20) + 4096), st.integers(0, 200000), st.sampled_from([0, 2, 16])),
    st.tuples(st.just("trim"), st.integers(0, 1 << 20), st.integers(0, 200000), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, (1 << 20) + 4096), st.integers(0, 200000), st.sampled_from([0, 4])),
    st.tuples(st.just("status"), st.integers(0, 1 << 20), st.integers(0, 300000), st.sampled_from([0, 8])),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=25), st.booleans())
def test_model_against_bytearray(script, structured):
    size = 1 << 20
    exports = [P.ExportInfo("m", size, readonly=False)]
    disk = MemDisk(size, block=65536)
    model = bytearray(size)
    conn = negotiated(b"m", structured=structured, meta=structured, exports=exports)
    for cookie, (op, off, ln, arg) in enumerate(script):
        if op == "write":
            ln = min(ln, 70000)
            data = bytes([arg]) * ln
            ev = feed(conn, req(P.CMD_WRITE, off, ln, cookie=cookie, data=data))
        elif op == "zero":
            ev = feed(conn, req(P.CMD_WRITE_ZEROES, off, ln, flags=arg, cookie=cookie))
        elif op == "trim":
            ev = feed(conn, req(P.CMD_TRIM, off, ln, cookie=cookie))
        elif op == "read":
            ev = feed(conn, req(P.CMD_READ, off, ln, flags=arg if structured else 0, cookie=cookie))
        else:
            if not structured:
                continue
            ev = feed(conn, req(P.CMD_BLOCK_STATUS, off, ln, flags=arg, cookie=cookie))
        in_range = off + ln <= size and not (op == "status" and ln == 0)
        if not in_range:
            assert ev == []
            out = conn.data_to_send()
            if structured:
                err = struct.unpack(">I", chunks(out)[0][3][:4])[0]
            else:
                err = simple(out)[0]
            assert err == (P.ENOSPC if op in ("write", "zero") else P.EINVAL)
            continue
        (r,) = ev
        out = b"".join(bytes(b) for b in P.handle_request(r, disk))
        if op == "write":
            model[off:off + ln] = bytes([arg]) * ln
        elif op == "zero":
            if arg == 16:                          # FAST_ZERO: either done, or ENOTSUP and untouched
                if out[:4] == struct.pack(">I", P.STRUCTURED_REPLY_MAGIC):
                    assert struct.unpack(">I", chunks(out)[0][3][:4])[0] == P.ENOTSUP
                    continue
                if simple(out)[0] == P.ENOTSUP:
                    continue
                assert simple(out)[0] == 0
            model[off:off + ln] = bytes(ln)
        elif op == "trim":
            first, last = -(-off // 65536), (off + ln) // 65536
            for b in range(first, last):
                model[b * 65536:(b + 1) * 65536] = bytes(65536)   # MemDisk zeroes trimmed blocks
        elif op == "read":
            if structured:
                got = bytearray(ln)
                cover = 0
                for flags, ctype, ck, payload in chunks(out):
                    assert ck == cookie
                    if ctype == P.REPLY_TYPE_OFFSET_DATA:
                        o = struct.unpack(">Q", payload[:8])[0] - off
                        got[o:o + len(payload) - 8] = payload[8:]
                        cover += len(payload) - 8
                    elif ctype == P.REPLY_TYPE_OFFSET_HOLE:
                        o, n = struct.unpack(">QI", payload)
                        assert model[o:o + n] == bytes(n)
                        cover += n
                assert cover == ln and bytes(got) == bytes(model[off:off + ln])
            else:
                assert out[:16] == P.encode_simple_reply(cookie) and out[16:] == model[off:off + ln]
        else:
            (flags, ctype, ck, payload), = chunks(out)
            desc = list(struct.iter_unpack(">II", payload[4:]))
            assert 1 <= len(desc) and sum(n for n, _ in desc) <= ln and all(n > 0 for n, _ in desc)
            if arg:
                assert len(desc) == 1
            pos = off
            for n, fl in desc:
                if fl & P.STATE_ZERO:
                    assert model[pos:pos + n] == bytes(n)
                pos += n
        assert bytes(disk.data) == bytes(model)


class StripedDisk:
    """A huge synthetic disk: DATA/UNALLOCATED stripes of ``stripe`` bytes; records look-ups."""

    def __init__(self, size, stripe):
        self.size, self.stripe, self.asked = size, stripe, []

    def extents(self, offset, length):
        self.asked.append(length)
        out, pos, end = [], offset, offset + length
        while pos < end:
            nxt = min((pos // self.stripe + 1) * self.stripe, end)
            out.append(Extent(pos, nxt - pos, DATA if (pos // self.stripe) % 2 == 0 else UNALLOCATED, 0))
            pos = nxt
        return out


def test_block_status_work_follows_the_answer():
    d = StripedDisk(1 << 40, 1 << 20)                       # 1 TiB, 1 MiB stripes: 1M extents
    desc = P.block_status_descriptors(d, 5 << 20, 0xFFFFFFFF, True)
    assert desc == [(1 << 20, P.STATE_HOLE | P.STATE_ZERO)]
    assert d.asked == [P.STATUS_WINDOW]                     # not 4 GiB worth of extents
    d = StripedDisk(1 << 40, 1 << 40)                       # one extent: the window grows
    assert P.block_status_descriptors(d, 0, 0xFFFFFFFF, True) == [(0xFFFFFFFF, 0)]
    assert d.asked[0] == P.STATUS_WINDOW and d.asked[-1] == 0xFFFFFFFF and len(d.asked) <= 5
    d = StripedDisk(1 << 40, 4096)
    desc = P.block_status_descriptors(d, 0, 0xFFFFFFFF, False, limit=1000)
    assert len(desc) == 1000 and d.asked == [P.STATUS_WINDOW]
