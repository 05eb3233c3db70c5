"""Malformed and hostile clients over raw sockets: bad magic, unknown options and commands,
oversized options and requests, out-of-range offsets, clients that vanish mid-message.

Every case gets the protocol's error reply or a clean disconnect; after every case the server
still serves (checked by an autouse fixture), and at the end the writable image holds exactly its
model: no byte changed outside the requests that were valid.
"""
from __future__ import annotations

import os
import random
import struct
import time

import pytest

from vdisk.serve.nbd import BackgroundNBDServer
from test_nbd_support import RawClient, build_chain, read_image

SIZE = 16 << 20
IHAVEOPT = 0x49484156454F5054
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
EPERM, EINVAL, ENOSPC = 1, 22, 28
ERR_UNSUP, ERR_INVALID, ERR_TOO_BIG = 0x80000001, 0x80000003, 0x80000009


class State:
    server = None
    path = None
    model = None
    name = b""


@pytest.fixture(scope="module", autouse=True)
def writable_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("malformed")
    path, model = build_chain(d, "victim", "vhd", 2, size=SIZE, seed=5)
    State.path, State.model, State.name = path, model, os.path.basename(path).encode()
    with BackgroundNBDServer([path], rw=True) as srv:
        State.server = srv
        yield srv
    # after everything: the image holds the model, byte for byte
    assert read_image(path) == bytes(model)


@pytest.fixture(autouse=True)
def server_still_serves():
    yield
    c = client()
    c.greeting()
    c.go(State.name)
    for off in (0, SIZE // 2, SIZE - 4096):
        c.request(CMD_READ, off, 4096, cookie=99)
        pieces, err = c.structured_read(99)
        assert err == 0
        got = b"".join(pieces[k] for k in sorted(pieces))
        assert got == bytes(State.model[off:off + 4096])
    c.request(CMD_DISC)
    assert c.is_closed()
    c.close()


def client():
    return RawClient(State.server.port)


def negotiated(structured=True, meta=False):
    c = client()
    c.greeting()
    size, flags = c.go(State.name, structured=structured, meta=meta)
    assert size == SIZE
    return c


def error_of(c, structured=True):
    if structured:
        kind = c.any_reply()
        if kind[0] == "simple":
            return kind[1], kind[2]
        _, flags, ctype, cookie, payload = kind
        assert ctype & 0x8000 and flags & 1
        err, mlen = struct.unpack(">IH", payload[:6])
        assert 6 + mlen <= len(payload)
        return err, cookie
    err, cookie, _ = c.simple_reply()
    return err, cookie


# ----------------------------------------------------------------------------------------------
# handshake
# ----------------------------------------------------------------------------------------------

def test_unknown_client_flags_disconnect():
    c = client()
    c.greeting(flags=0x80000001)
    assert c.is_closed()


def test_bad_option_magic_disconnects():
    c = client()
    c.greeting()
    c.send(struct.pack(">QII", 0xDEADBEEF, 7, 0))
    assert c.is_closed()


@pytest.mark.parametrize("seed", range(6))
def test_garbage_at_any_phase(seed):
    rnd = random.Random(seed)
    c = client()
    if seed % 3 == 0:
        c.recv_exact(18)
    elif seed % 3 == 1:
        c.greeting()
    else:
        c.greeting()
        c.go(State.name)
    try:
        c.send(rnd.randbytes(rnd.choice([1, 27, 4096, 100000])))
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.is_closed(timeout=2)
    c.close()


def test_unknown_options_then_go():
    c = client()
    c.greeting()
    for opt in (0, 4, 11, 12, 0x7FFFFFFF, 0xFFFFFFFF):
        c.option(opt, b"whatever")
        (o, rtype, msg), = c.option_replies()
        assert o == opt and rtype == ERR_UNSUP and msg
    c.option(3, b"data")                                   # LIST with data
    assert c.option_replies()[-1][1] == ERR_INVALID
    c.option(7, b"\x00\x00\x00\x09abc")                    # GO with a lying name length
    assert c.option_replies()[-1][1] == ERR_INVALID
    size, _ = c.go(State.name)
    assert size == SIZE
    c.close()


def test_oversized_option_is_refused_and_skipped():
    c = client()
    c.greeting()
    c.option(3, os.urandom(1 << 20))
    (o, rtype, _), = c.option_replies()
    assert rtype == ERR_TOO_BIG
    c.option(3)
    replies = c.option_replies()
    assert replies[-1][1] == 1 and replies[0][1] == 2
    c.close()


def test_huge_option_then_vanish():
    c = client()
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, 6, 0xFFFFFFFF) + os.urandom(300000))
    c.close()


def test_export_name_unknown_disconnects():
    c = client()
    c.greeting()
    c.option(1, b"no-such-export")
    assert c.is_closed()


def test_vanish_in_the_middle_of_the_handshake():
    for cut in (0, 2, 10, 20):
        c = client()
        c.greeting()
        c.send(struct.pack(">QII", IHAVEOPT, 7, 40)[:cut])
        c.close()


# ----------------------------------------------------------------------------------------------
# transmission
# ----------------------------------------------------------------------------------------------

def test_bad_request_magic_disconnects():
    c = negotiated()
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, CMD_READ, 1, 0, 512))
    assert c.is_closed()


@pytest.mark.parametrize("structured", [True, False])
def test_invalid_requests_get_errors_and_the_connection_continues(structured):
    c = negotiated(structured=structured)
    cases = [
        (dict(cmd=42, offset=0, length=512), EINVAL),
        (dict(cmd=CMD_READ, offset=0, length=512, flags=0x8000), EINVAL),
        (dict(cmd=CMD_READ, offset=SIZE - 100, length=512), EINVAL),
        (dict(cmd=CMD_READ, offset=(1 << 64) - 1, length=1), EINVAL),
        (dict(cmd=CMD_READ, offset=0, length=64 << 20), EINVAL),            # oversized
        (dict(cmd=CMD_READ, offset=0, length=0xFFFFFFFF), EINVAL),
        (dict(cmd=CMD_TRIM, offset=SIZE, length=1), EINVAL),
        (dict(cmd=CMD_CACHE, offset=SIZE + 1, length=0), EINVAL),
        (dict(cmd=CMD_WZ, offset=SIZE - 1, length=2), ENOSPC),
        (dict(cmd=CMD_WZ, offset=(1 << 64) - 512, length=4096), ENOSPC),
        (dict(cmd=CMD_BS, offset=0, length=4096), EINVAL),                 # no meta context
    ]
    for i, (kw, err) in enumerate(cases):
        c.request(cookie=1000 + i, **kw)
        assert error_of(c, structured) == (err, 1000 + i), kw
    # writes past the end: the payload is consumed, nothing is written
    payload = b"\xee" * 5000
    c.request(CMD_WRITE, SIZE - 4000, len(payload), cookie=7, data=payload)
    assert error_of(c, structured) == (ENOSPC, 7)
    c.request(CMD_READ, SIZE - 4096, 4096, cookie=8)
    if structured:
        pieces, err = c.structured_read(8)
        got = b"".join(pieces[k] for k in sorted(pieces))
    else:
        err, cookie, got = c.simple_reply(4096)
    assert err == 0 and got == bytes(State.model[SIZE - 4096:])
    c.request(CMD_DISC)
    assert c.is_closed()


def test_oversized_write_is_consumed_and_refused():
    c = negotiated()
    n = 40 << 20
    c.request(CMD_WRITE, 0, n, cookie=5)
    block = b"\xcc" * (1 << 20)
    for _ in range(n >> 20):
        c.send(block)
    assert error_of(c) == (EINVAL, 5)
    c.request(CMD_FLUSH, cookie=6)
    assert error_of(c) == (0, 6)
    c.close()


def test_vanish_mid_write_changes_nothing():
    for sent in (0, 1, 4095, 65535):
        c = negotiated()
        c.request(CMD_WRITE, 1 << 20, 65536, cookie=1, data=b"\x99" * sent)
        c.close()
    c = negotiated()
    c.request(CMD_WRITE, 0, 0, cookie=1)                    # zero-length write is fine
    assert error_of(c) == (0, 1)
    c.send(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 2, 0, 512)[:13])
    c.close()


def test_vanish_with_replies_pending():
    c = negotiated()
    for i in range(40):
        c.request(CMD_READ, (i * (1 << 20)) % (SIZE - (1 << 20)), 1 << 20, cookie=i)
    c.close()
    c = negotiated()
    for i in range(20):
        c.request(CMD_BS if i % 2 else CMD_READ, 0, 4096, cookie=i)
    c.close()


def test_disc_finishes_the_write_first():
    c = negotiated(structured=False)
    data = os.urandom(12345)
    off = 3 * (1 << 20) + 77
    c.request(CMD_WRITE, off, len(data), cookie=1, data=data)
    c.request(CMD_DISC)
    assert c.simple_reply() == (0, 1, b"")
    assert c.is_closed()
    State.model[off:off + len(data)] = data


def test_pipelined_requests_each_answered_once():
    c = negotiated(meta=True)
    rnd = random.Random(3)
    expect = {}
    writes = []
    for cookie in range(1, 60):
        kind = rnd.choice(["read", "status", "bad", "flush", "cache"])
        off = rnd.randrange(0, SIZE - 65536)
        if kind == "read":
            c.request(CMD_READ, off, 65536, cookie=cookie)
        elif kind == "status":
            c.request(CMD_BS, off, 65536, cookie=cookie, flags=8)
        elif kind == "bad":
            c.request(CMD_READ, SIZE, 1, cookie=cookie)
        elif kind == "flush":
            c.request(CMD_FLUSH, cookie=cookie)
        else:
            c.request(CMD_CACHE, off, 4096, cookie=cookie)
        expect[cookie] = kind
    # and a few writes inside the model's range, with FUA
    for cookie in range(100, 104):
        off = rnd.randrange(0, SIZE - 8192)
        data = os.urandom(8192)
        c.request(CMD_WRITE, off, len(data), flags=1, cookie=cookie, data=data)
        writes.append((off, data))
        expect[cookie] = "write"
    seen = {}
    reads = {}
    while len(seen) < len(expect) or any(v is False for v in seen.values()):
        r = c.any_reply()
        cookie = r[2] if r[0] == "simple" else r[3]
        assert cookie in expect
        if r[0] == "simple":
            assert cookie not in seen
            seen[cookie] = r[1]
            continue
        _, flags, ctype, _, payload = r
        if ctype == 1:
            reads.setdefault(cookie, {})[struct.unpack(">Q", payload[:8])[0]] = payload[8:]
        elif ctype == 2:
            o, n = struct.unpack(">QI", payload)
            reads.setdefault(cookie, {})[o] = bytes(n)
        elif ctype == 5:
            assert len(payload) == 12                           # REQ_ONE: one extent
        elif ctype & 0x8000:
            seen[cookie] = struct.unpack(">I", payload[:4])[0]
        if flags & 1:
            seen.setdefault(cookie, 0)
        else:
            seen.setdefault(cookie, False)
    for cookie, kind in expect.items():
        assert seen[cookie] == (EINVAL if kind == "bad" else 0), (cookie, kind)
    for off, data in writes:
        State.model[off:off + len(data)] = data
    c.request(CMD_DISC)
    c.close()


def test_read_only_export_refuses_and_skips_payload(tmp_path):
    path, model = build_chain(tmp_path, "ro", "vdi", 1, size=4 << 20, seed=8)
    before = open(path, "rb").read()
    with BackgroundNBDServer([path]) as srv:
        c = RawClient(srv.port)
        c.greeting()
        size, flags = c.go(b"")
        assert flags & 2                                        # READ_ONLY
        c.request(CMD_WRITE, 0, 4096, cookie=1, data=b"\x01" * 4096)
        c.request(CMD_TRIM, 0, 4096, cookie=2)
        c.request(CMD_WZ, 0, 4096, cookie=3)
        c.request(CMD_READ, 0, 4096, cookie=4)
        assert [error_of(c) for _ in range(3)] == [(EPERM, 1), (EPERM, 2), (EPERM, 3)]
        pieces, err = c.structured_read(4)
        assert err == 0 and b"".join(pieces[k] for k in sorted(pieces)) == bytes(model[:4096])
        c.close()
    assert open(path, "rb").read() == before


def test_idle_handshake_times_out_and_frees_the_slot(tmp_path):
    path, model = build_chain(tmp_path, "idle", "vhd", 1, size=4 << 20, seed=9)
    with BackgroundNBDServer([path], shared=1, handshake_timeout=0.5) as srv:
        a = RawClient(srv.port)
        a.greeting()                                    # ... and then nothing
        b = RawClient(srv.port)                         # waits for A's slot
        assert a.is_closed(timeout=5)
        b.greeting()
        size, _ = b.go(b"")
        assert size == 4 << 20
        time.sleep(1.0)                                 # no timeout once transmitting
        b.request(CMD_READ, 0, 4096, cookie=1)
        pieces, err = b.structured_read(1)
        assert err == 0 and b"".join(pieces[k] for k in sorted(pieces)) == bytes(model[:4096])
        a.close()
        b.close()
