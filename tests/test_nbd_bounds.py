"""Memory and time bounds of the NBD server against clients that ask and never listen
(issue 13, item 6), measured with tracemalloc in the server's own process as the iSCSI bounds are.

* A client that pipelines 32 MiB READs and never reads a reply holds at most the connection's
  in-flight budget (64 MiB) plus the reply being handed over; several such clients together hold
  at most the server-wide budget; once their replies have not moved for ``send_timeout`` they
  are dropped and the memory comes back.
* Eight clients that pipeline ``NBD_OPT_LIST`` and never read the replies take every slot of a
  ``--shared 8`` server; the wait for their sockets to drain counts against the handshake
  deadline, so they are dropped on time and a correct client gets in. The handshake state
  machine stops parsing once its queued output is full.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc

import pytest

import vdisk
from vdisk.serve import nbd_proto as P
from vdisk.serve.nbd import MAX_INFLIGHT_BYTES, BackgroundNBDServer

from test_nbd_support import RawClient

MiB = 1 << 20
SIZE = 64 * MiB
READ = 32 * MiB
CMD_READ = 0


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bounds") / "big.raw")
    # every byte written: a read of data costs its buffer and nothing else
    with vdisk.create(path, SIZE, format="raw") as d:
        chunk = bytes(range(256)) * (4 * MiB // 256)
        for off in range(0, SIZE, len(chunk)):
            d.pwrite(chunk, off)
    return path


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def flood_reads(port: int, count: int = 200) -> RawClient:
    """Negotiate simple replies (every reply carries its data) and send ``count`` 32 MiB READs
    without ever reading an answer."""
    c = RawClient(port)
    c.greeting()
    c.go(b"", structured=False)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    for i in range(count):
        c.request(CMD_READ, 0, READ, cookie=i)
    return c


def settle(seconds: float = 1.5) -> None:
    time.sleep(seconds)


def test_one_client_that_never_reads_holds_at_most_its_budget(image, traced):
    with BackgroundNBDServer([image], send_timeout=None) as srv:
        c = flood_reads(srv.port)
        settle()
        current, peak = tracemalloc.get_traced_memory()
        c.close()
    # two 32 MiB replies fit the 64 MiB budget; the transport's copy of the one being handed
    # over is the only extra
    assert MAX_INFLIGHT_BYTES == 64 * MiB
    assert peak < 64 * MiB + READ + 8 * MiB, peak / MiB


def test_many_clients_that_never_read_hold_at_most_the_server_budget(image, traced):
    with BackgroundNBDServer([image], send_timeout=None, max_total_inflight=64 * MiB) as srv:
        clients = [flood_reads(srv.port) for _ in range(4)]
        settle(2.0)
        current, peak = tracemalloc.get_traced_memory()
        for c in clients:
            c.close()
    # four clients, each allowed 64 MiB, share a 64 MiB server budget; beyond it only the
    # transport's copies of replies being handed over, at most one per connection holding budget
    # (two here: 101-130 MiB measured)
    assert peak < 64 * MiB + 2 * READ + 8 * MiB, peak / MiB


def test_clients_that_never_read_are_dropped_and_a_correct_one_is_served(image, traced):
    with BackgroundNBDServer([image], send_timeout=1.0, max_total_inflight=64 * MiB) as srv:
        hogs = [flood_reads(srv.port) for _ in range(3)]
        settle(0.5)
        t0 = time.monotonic()
        c = RawClient(srv.port)
        c.greeting()
        c.go(b"")
        c.request(CMD_READ, 0, 4096, cookie=1)
        pieces, err = c.structured_read(1)
        waited = time.monotonic() - t0
        assert err == 0 and pieces[0] == bytes(range(256)) * 16
        # The correct client may be served before the hogs are dropped (a small cached read
        # needs no budget). Reading a hog's socket would make it a reading client, so first
        # wait, without reading, until the server holds no connection but the correct one.
        deadline = time.monotonic() + 30
        while len(srv.server._writers) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        for h in hogs:
            assert h.is_closed(timeout=10)
            h.close()
        time.sleep(0.3)
        current, _ = tracemalloc.get_traced_memory()
        c.close()
    assert waited < 10
    assert current < 16 * MiB, current / MiB                  # the hogs' replies are gone


def list_flood(port: int, seconds: float) -> socket.socket:
    """A client that sends its flags and then NBD_OPT_LIST after NBD_OPT_LIST, reading nothing,
    for as long as the server keeps taking them (at most ``seconds``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    s.sendall(struct.pack(">I", 3))
    burst = struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0) * 4096
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            s.sendall(burst)
    except (socket.timeout, OSError):
        pass                                      # the server stopped reading: our goal
    return s


HANDSHAKE = 5.0           # generous: a loaded CI machine must not time out the correct client


def test_eight_list_floods_do_not_hold_the_slots_past_the_deadline(image, traced):
    """Eight clients that pipeline NBD_OPT_LIST and never read the replies take every slot of a
    shared=8 server; the wait for their sockets to drain counts against the handshake deadline,
    so they are dropped on time and a correct client gets in."""
    with BackgroundNBDServer([image], shared=8, handshake_timeout=HANDSHAKE) as srv:
        floods = []
        threads = [threading.Thread(target=lambda: floods.append(list_flood(srv.port, 1.0)))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t0 = time.monotonic()
        c = RawClient(srv.port, timeout=20)              # waits for a slot, then negotiates
        c.greeting()
        size, _ = c.go(b"")
        waited = time.monotonic() - t0
        assert size == SIZE
        c.request(CMD_READ, 0, 4096, cookie=1)
        pieces, err = c.structured_read(1)
        assert err == 0
        _, peak = tracemalloc.get_traced_memory()
        c.close()
        for s in floods:
            s.close()
    assert waited < HANDSHAKE + 5                         # the deadline, not forever
    assert peak < 48 * MiB, peak / MiB                    # 8 x (1 MiB read + 256 KiB replies) + slack


def test_the_state_machine_stops_parsing_while_replies_pile_up():
    conn = P.ServerConnection([P.ExportInfo("x", 1 << 20)])
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0) * 100000)
    assert conn.next_event() is P.MUST_SEND
    assert len(conn.data_to_send()) <= P.MAX_QUEUED_OUTPUT + 4096
    handled = 0
    while (ev := conn.next_event()) is P.MUST_SEND:
        out = conn.data_to_send()
        assert len(out) <= P.MAX_QUEUED_OUTPUT + 4096
        handled += len(out)
    assert ev is P.NEED_DATA and handled > 0
