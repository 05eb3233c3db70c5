"""NBD export of vdisk images: an asyncio server around the sans-IO connection in
:mod:`vdisk.serve.nbd_conn` and the request backend in :mod:`vdisk.serve.nbd_backend`.

    from vdisk.serve.nbd import serve_nbd
    serve_nbd(["a.vhd", "b.vdi"])               # nbd://127.0.0.1:10809/a.vhd and /b.vdi, read-only

Several clients at once; several exports by name (default: the image's file name; ``names``
overrides); read-only unless ``rw=True``; loopback unless ``host`` says otherwise, and any other
address only with TLS required (``tls=TlsConfig.from_options(creds_dir)``) or ``insecure=True``.
TLS wraps the socket only: the protocol in :mod:`vdisk.serve.nbd_conn` decides when, the shell
here runs the handshake. One line per connection (accepted, refused or abandoned, with the peer
and its certificate subject) goes to ``on_connection``, or to the ``vdisk.nbd`` log. Disk I/O runs in
a thread pool, so a slow request on one connection never stalls another, and one client's
requests run concurrently (replies may come back out of order, as NBD allows). A small read
whose bytes are all in the page cache is answered on the event loop itself
(``preadv(RWF_NOWAIT)``), which is cheaper than the round trip through a worker thread.

For tests and embedding, :class:`BackgroundNBDServer` runs the same server in a thread on a free
port::

    with BackgroundNBDServer([disk]) as srv:
        subprocess.run(["qemu-img", "info", srv.uri()])
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from ..errors import VDiskError
from .nbd_backend import handle_request, read_cached
from .nbd_conn import MUST_SEND, NEED_DATA, Closed, ExportChosen, Request, ServerConnection, StartTLS
from .nbd_wire import CMD_READ, CMD_WRITE, ExportInfo
from .nbd_tls import TlsConfig, check_exposure, connection_line, peer_subject

log = logging.getLogger("vdisk.nbd")

DEFAULT_PORT = 10809
DEFAULT_SHARED = 8              # simultaneous clients; more wait (queued) for a free slot
RECV_CHUNK = 1024 * 1024
# In flight = from the moment a request is admitted until its reply has left the server's buffers.
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024   # per connection: READ/WRITE payload in flight
MAX_INFLIGHT_REQUESTS = 64              # per connection
MAX_TOTAL_INFLIGHT_BYTES = 256 * 1024 * 1024   # all connections together
HANDSHAKE_TIMEOUT = 60.0                # seconds a client may take to reach transmission (TLS included)
#: bytes of replies the transport may hold before the next reply waits for it to drain
TRANSPORT_QUEUE = 4 * 1024 * 1024
SEND_TIMEOUT = 60.0                     # seconds replies may wait for a client that reads nothing
INLINE_READ_MAX = 64 * 1024             # largest cached READ answered on the event loop itself
COALESCE_MAX = 64 * 1024                # replies smaller than this may share one send()
COALESCE_COUNT = 16                     # ...and at most this many: the client starts on them early


@dataclass
class Export:
    name: str
    disk: object
    info: ExportInfo
    owned: bool              # opened by us: closed when the server stops


def _describe(disk) -> str:
    parts = [str(p) for p in (getattr(disk, "format", None), getattr(disk, "subtype", None)) if p]
    chain = getattr(disk, "chain", None)
    try:
        depth = len(chain) if chain is not None else 0
    except TypeError:
        depth = 0
    if depth > 1:
        parts.append(f"chain of {depth}")
    return " ".join(parts)


def _default_name(image, disk, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.path.basename(os.fspath(image))
    for attr in ("path", "name", "filename"):
        value = getattr(disk, attr, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            return os.path.basename(os.fspath(value))
    return f"disk{index}"


def open_exports(images: Sequence, names=None, rw: bool = False) -> List[Export]:
    """Open (or adopt) the images and name them. Paths are opened with ``vdisk.open(path, "r+"
    if rw else "r")`` and closed again by the server; Disk objects are served as they are (a
    Disk opened read-only is exported read-only even with ``rw``)."""
    import vdisk

    if isinstance(images, (str, os.PathLike)) or hasattr(images, "readinto"):
        images = [images]
    images = list(images)
    if not images:
        raise VDiskError("nothing to serve: no image given")
    if names is not None:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if len(names) != len(images):
            raise VDiskError(f"{len(names)} export name(s) for {len(images)} image(s); "
                             "a name can only be given when serving one image, or one name per image")
    exports: List[Export] = []
    try:
        for i, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                disk = vdisk.open(os.fspath(image), "r+" if rw else "r")
                owned = True
            else:
                disk, owned = image, False
            name = names[i] if names is not None else _default_name(image, disk, i)
            if any(e.name == name for e in exports):
                exports.append(Export(name, disk, None, owned))  # so it gets closed below
                raise VDiskError(f"two exports would be named {name!r}; give distinct names")
            if len(name.encode("utf-8")) > 4096 or "\0" in name:
                exports.append(Export(name, disk, None, owned))
                raise VDiskError(f"export name {name[:40]!r}... is not a valid NBD name")
            readonly = not rw or disk.read_only
            info = ExportInfo(name=name, size=int(disk.size), readonly=readonly,
                              description=_describe(disk))
            exports.append(Export(name, disk, info, owned))
    except BaseException:
        for e in exports:
            if e.owned:
                try:
                    e.disk.close()
                except Exception:  # noqa: BLE001
                    pass
        raise
    return exports


def format_uri(host: str, port: int, name: str = "") -> str:
    from urllib.parse import quote
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if host in ("", "0.0.0.0", "::"):
        h = "127.0.0.1" if host != "::" else "[::1]"
    return f"nbd://{h}:{port}/{quote(name)}"


class NBDServer:
    """The asyncio NBD server. Use :meth:`start` / :meth:`aclose` inside an event loop, or
    :func:`serve_nbd` / :class:`BackgroundNBDServer` from plain code."""

    def __init__(self, images: Sequence, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 names=None, rw: bool = False, shared: Optional[int] = DEFAULT_SHARED,
                 workers: Optional[int] = None, handshake_timeout: Optional[float] = HANDSHAKE_TIMEOUT,
                 tls: Optional[TlsConfig] = None, insecure: bool = False,
                 on_connection: Optional[Callable[[str], None]] = None,
                 send_timeout: Optional[float] = SEND_TIMEOUT,
                 max_total_inflight: int = MAX_TOTAL_INFLIGHT_BYTES, inline_reads: bool = True):
        if shared is not None and shared < 0:
            raise VDiskError("--shared must be 0 (unlimited) or a positive number of clients")
        self.tls = tls if tls is not None else TlsConfig()
        check_exposure(host, self.tls, insecure)        # before any image is opened
        self.host, self.port = host, port
        self.shared = shared or None                     # None = unlimited
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        #: reads whose bytes are all in the page cache run on the event loop (no worker thread)
        self.inline_reads = inline_reads
        self.max_total_inflight = max(max_total_inflight, MAX_INFLIGHT_BYTES)
        self._on_connection = on_connection
        self.exports = open_exports(images, names, rw)
        self._disks = {e.name: e.disk for e in self.exports}
        # CAN_MULTI_CONN: one Disk object serves every connection, so a flush on any connection
        # covers writes from all of them. Only advertise it when several connections may run.
        multi = self.shared is None or self.shared > 1
        self._infos = [ExportInfo(e.info.name, e.info.size, e.info.readonly, e.info.description,
                                  multi) for e in self.exports]
        for e, info in zip(self.exports, self._infos):
            e.info = info
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or min(16, (os.cpu_count() or 2) * 2 + 4),
            thread_name_prefix="vdisk-nbd")
        self._server: Optional[asyncio.AbstractServer] = None
        self._clients: set = set()
        self._writers: set = set()
        self._slots: Optional[asyncio.Semaphore] = None
        self._total_inflight = 0                         # bytes, all connections
        self._budget_freed: Optional[asyncio.Condition] = None
        self._budget_waiters = 0
        self._closing = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> "NBDServer":
        if self.shared:
            self._slots = asyncio.Semaphore(self.shared)
        self._budget_freed = asyncio.Condition()
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                      reuse_address=True, limit=RECV_CHUNK)
        except OSError as exc:
            self._close_disks()
            raise VDiskError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sockets = self._server.sockets or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("serving %s on %s:%d (TLS %s)", ", ".join(e.name for e in self.exports), self.host,
                 self.port, self.tls.mode)
        return self

    async def serve_forever(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    async def aclose(self) -> None:
        """Stop accepting, end every connection (in-flight requests finish first), close the
        images that were opened here."""
        if self._closed:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        self._close_disks()

    def _close_disks(self) -> None:
        for e in self.exports:
            if e.owned:
                try:
                    e.disk.close()
                except Exception as exc:  # noqa: BLE001
                    log.warning("closing %s: %s", e.name, exc)

    def uri(self, name: Optional[str] = None) -> str:
        uri = format_uri(self.host, self.port, self.exports[0].name if name is None else name)
        return "nbds://" + uri[len("nbd://"):] if self.tls.enabled else uri

    @property
    def uris(self) -> List[str]:
        return [self.uri(e.name) for e in self.exports]

    # -- one client ------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            if self._slots is not None:
                async with self._slots:
                    await self._session(reader, writer, peer)
            else:
                await self._session(reader, writer, peer)
        except Exception:  # noqa: BLE001 - one bad connection must never take the server down
            log.exception("connection from %s failed", peer)
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._clients.discard(task)

    def _report(self, line: str, ok: bool) -> None:
        if self._on_connection is not None:
            self._on_connection(line)
        else:
            log.log(logging.INFO if ok else logging.WARNING, "%s", line)

    async def _admit(self, budget: dict, cost: int) -> None:
        """Wait until a request of ``cost`` bytes fits the connection's and the server's
        in-flight budgets, then take it from both."""
        def fits() -> bool:
            if budget["count"] >= MAX_INFLIGHT_REQUESTS:
                return False
            if budget["count"] and budget["bytes"] + cost > MAX_INFLIGHT_BYTES:
                return False
            return self._total_inflight + cost <= self.max_total_inflight

        assert self._budget_freed is not None
        if not fits():
            self._budget_waiters += 1
            try:
                async with self._budget_freed:
                    await self._budget_freed.wait_for(fits)
            finally:
                self._budget_waiters -= 1
        budget["bytes"] += cost
        budget["count"] += 1
        self._total_inflight += cost

    async def _release(self, budget: dict, cost: int) -> None:
        budget["bytes"] -= cost
        budget["count"] -= 1
        self._total_inflight -= cost
        assert self._budget_freed is not None
        if self._budget_waiters:               # nobody waiting: no lock, no wake-up to send
            async with self._budget_freed:
                self._budget_freed.notify_all()

    async def _send_watchdog(self, writer, raw_transport) -> None:
        """End a connection whose replies have not moved for ``send_timeout`` seconds: a client
        that never reads must not hold its share of the in-flight budget forever."""
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.send_timeout / 4)
        last, since = 0, loop.time()
        while not writer.transport.is_closing():
            await asyncio.sleep(tick)
            size = raw_transport.get_write_buffer_size()
            if writer.transport is not raw_transport:           # TLS: plaintext not yet encrypted
                size += writer.transport.get_write_buffer_size()
            now = loop.time()
            if size == 0 or size < last:
                since = now
            elif now - since > self.send_timeout:
                log.info("%s: replies not read for %gs; closing", writer.get_extra_info("peername"),
                         self.send_timeout)
                writer.transport.abort()
                return
            last = size

    async def _session(self, reader, writer, peer) -> None:
        if self._closing or writer.transport.is_closing():
            return
        conn = ServerConnection(self._infos, shutting_down=self._closing, tls=self.tls.mode)
        loop = asyncio.get_running_loop()
        raw_transport = writer.transport
        inflight: set = set()
        budget = {"bytes": 0, "count": 0}
        write_turn = asyncio.Lock()
        # Replies may queue in the transport up to a few MiB (not asyncio's 64 KiB) before the
        # next waits its turn, so the socket never idles between replies of a pipelining client.
        writer.transport.set_write_buffer_limits(high=TRANSPORT_QUEUE)
        disk = None
        broken = False
        deadline = (loop.time() + self.handshake_timeout) if self.handshake_timeout else None
        who = {"tls_version": None, "subject": None}
        reported = False
        hard = False           # end without delivering what is queued (the peer misbehaved)

        def report(outcome: str, reason: Optional[str] = None, export: Optional[ExportInfo] = None):
            nonlocal reported
            if reported:
                return
            reported = True
            self._report(connection_line(peer, outcome, export=export.name if export else None,
                                         readonly=export.readonly if export else True,
                                         reason=reason, **who), outcome == "accepted")

        # Small replies finished in the same turn of the event loop leave in one send() (a
        # pipelining client's 4 KiB reads would otherwise cost a system call and a TCP segment
        # each); large ones are written as they are, never copied into a batch.
        batch: list = []
        batch_due = False
        batch_bytes = 0

        def flush_batch() -> None:
            nonlocal batch_due, batch_bytes
            batch_due = False
            if batch:
                data = b"".join(batch) if len(batch) > 1 else batch[0]
                batch.clear()
                batch_bytes = 0
                if not writer.transport.is_closing():
                    writer.write(data)

        def send_reply(data) -> None:
            nonlocal batch_due, batch_bytes
            if len(data) >= COALESCE_MAX:
                flush_batch()
                if not writer.transport.is_closing():
                    writer.write(memoryview(data))
                return
            batch.append(data)
            batch_bytes += len(data)
            if len(batch) >= COALESCE_COUNT:
                flush_batch()           # let the client start on these while we go on
                return
            if not batch_due:
                batch_due = True
                loop.call_soon(flush_batch)

        def queued() -> int:
            """Reply bytes the transports hold (under TLS: plaintext and ciphertext)."""
            size = writer.transport.get_write_buffer_size()
            if writer.transport is not raw_transport:
                size += raw_transport.get_write_buffer_size()
            return size

        def send(data) -> None:
            if data:
                flush_batch()                   # whatever is batched goes first, in order
                if not writer.transport.is_closing():
                    writer.write(data)

        async def run(req: Request, cost: int) -> None:
            nonlocal broken
            try:
                buffers = await loop.run_in_executor(self._pool, handle_request, req, disk)
                # One reply at a time enters the transport, and only once the one before it has
                # left: the transport's copy of a reply counts against the in-flight budget too.
                async with write_turn:
                    await writer.drain()
                    if not writer.transport.is_closing():
                        for b in buffers:
                            send_reply(b)       # no await between: never interleaved
                    del buffers             # the transport (or the batch) holds it; not two copies
                    await writer.drain()
            except (ConnectionError, OSError):
                broken = True
            except Exception:  # noqa: BLE001 - a bug here must end this connection, not the server
                log.exception("%s: NBD_CMD_%s failed", peer, req.name)
                broken = True
                writer.transport.abort()
            finally:
                await self._release(budget, cost)

        watchdog = asyncio.create_task(self._send_watchdog(writer, raw_transport)) \
            if self.send_timeout else None
        try:
            send(conn.data_to_send())
            while not writer.transport.is_closing():
                ev = conn.next_event()
                if ev is NEED_DATA or ev is MUST_SEND:
                    send(conn.data_to_send())
                    flush_batch()               # all that was parsed is answered: send it now
                    if broken:
                        conn.receive_data(b"")
                        continue
                    data = None
                    try:
                        # still haggling: the whole wait, for the client to read what we sent
                        # as well as to send more, counts against the handshake deadline
                        async with asyncio.timeout_at(deadline if disk is None else None):
                            await writer.drain()
                            if ev is NEED_DATA:
                                data = await reader.read(RECV_CHUNK)
                    except TimeoutError:      # (an OSError since 3.11: must come first)
                        report("refused", f"handshake not finished within {self.handshake_timeout:g} s")
                        hard = True
                        break
                    except (ConnectionError, OSError):
                        data = b""
                    if data is not None:
                        conn.receive_data(data)
                    continue
                if isinstance(ev, StartTLS):
                    send(conn.data_to_send())                     # the ACK, still in the clear
                    if ev.early_data:
                        report("refused", "client sent data after NBD_OPT_STARTTLS without "
                                          "waiting for the reply")
                        hard = True
                        break
                    try:
                        async with asyncio.timeout_at(deadline):
                            await writer.start_tls(self.tls.context)
                    except TimeoutError:
                        report("refused", f"TLS handshake not finished within {self.handshake_timeout:g} s")
                        hard = True
                        break
                    except (ssl.SSLError, ConnectionError, OSError) as exc:
                        reason = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
                        report("refused", f"TLS handshake failed: {reason}")
                        hard = True
                        break
                    writer.transport.set_write_buffer_limits(high=TRANSPORT_QUEUE)   # the TLS transport
                    ssl_object = writer.get_extra_info("ssl_object")
                    who["tls_version"] = ssl_object.version() if ssl_object is not None else "?"
                    who["subject"] = peer_subject(ssl_object)
                    conn.tls_established()
                    continue
                if isinstance(ev, ExportChosen):
                    send(conn.data_to_send())
                    disk = self._disks[ev.export.name]
                    report("accepted", export=ev.export)
                    continue
                if isinstance(ev, Request):
                    send(conn.data_to_send())
                    # A small read served from the page cache costs less than the trip to a
                    # worker thread and back (two thread switches, GIL hand-offs): it is
                    # answered here and now, while the replies waiting to leave are few (the
                    # transport's limit stands in for the in-flight budget). Large reads go to
                    # the pool, where their copying overlaps the sending of other replies; so
                    # does anything that would wait for the disk.
                    if ev.command == CMD_READ and self.inline_reads and \
                            ev.length <= INLINE_READ_MAX and queued() + batch_bytes < TRANSPORT_QUEUE:
                        ready = read_cached(ev, disk)
                        if ready is not None:
                            for b in ready:
                                send_reply(b)
                            continue
                    cost = ev.length if ev.command in (CMD_READ, CMD_WRITE) else 0
                    await self._admit(budget, cost)
                    t = asyncio.create_task(run(ev, cost))
                    inflight.add(t)
                    t.add_done_callback(inflight.discard)
                    continue
                if isinstance(ev, Closed):
                    if disk is None:
                        if conn.tls_refusals:
                            report("refused", f"TLS is required and the client did not start it "
                                              f"({ev.reason})")
                        elif ev.graceful or ev.reason.startswith("client disconnected"):
                            report("abandoned", ev.reason)
                        else:
                            report("refused", ev.reason)
                    log.info("%s: %s", peer, ev.reason)
                    break
        finally:
            if disk is None:
                report("abandoned", "connection lost during the handshake")
            if hard:
                writer.transport.abort()
            # Finish what is running (never close a disk under a worker), send queued replies;
            # the watchdog still ends a client that does not read them.
            if inflight:
                await asyncio.gather(*list(inflight), return_exceptions=True)
            send(conn.data_to_send())
            flush_batch()
            try:
                if self.send_timeout:
                    async with asyncio.timeout(self.send_timeout):
                        await writer.drain()
                else:
                    await writer.drain()
            except (ConnectionError, OSError, TimeoutError):
                writer.transport.abort()
            if watchdog is not None:
                watchdog.cancel()


def _install_signals(loop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):      # RuntimeError covers NotImplemented (no signals)
            pass


def _print_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_nbd(images: Sequence, host: str = "127.0.0.1", port: int = DEFAULT_PORT, names=None,
              rw: bool = False, shared: Optional[int] = DEFAULT_SHARED, *,
              workers: Optional[int] = None, handshake_timeout: Optional[float] = HANDSHAKE_TIMEOUT,
              ready: Optional[Callable[[NBDServer], None]] = None,
              tls: Optional[TlsConfig] = None, insecure: bool = False,
              on_connection: Optional[Callable[[str], None]] = _print_line) -> None:
    """Serve ``images`` (paths or open Disk objects) over NBD until SIGINT/SIGTERM.

    ``names``: export names (a string when one image); default each image's file name.
    ``rw``: writable exports (paths are then opened ``"r+"``, which locks them exclusively).
    ``shared``: how many clients may be connected at once (0 = no limit); more wait their turn.
    ``handshake_timeout``: seconds a client may spend before choosing an export (None: forever).
    ``ready(server)`` is called once the socket listens (``server.uris`` lists the exports).
    ``tls``: a :class:`~vdisk.serve.nbd_tls.TlsConfig` (default: no TLS). A ``host`` that is not
    loopback is refused unless TLS is required or ``insecure``.
    ``on_connection(line)`` gets one line per connection (default: printed on stderr).
    """
    async def main() -> None:
        server = NBDServer(images, host=host, port=port, names=names, rw=rw, shared=shared,
                           workers=workers, handshake_timeout=handshake_timeout, tls=tls,
                           insecure=insecure, on_connection=on_connection)
        stop = asyncio.Event()
        _install_signals(asyncio.get_running_loop(), stop)
        await server.start()
        try:
            if ready is not None:
                ready(server)
            await stop.wait()
        finally:
            await server.aclose()

    asyncio.run(main())


class BackgroundNBDServer:
    """The server in a background thread (its own event loop), on a free port by default.

        srv = BackgroundNBDServer(["a.vhd"]).start()
        ... srv.uri(), srv.port ...
        srv.stop()

    Also a context manager. Exceptions while opening images or binding are raised by start().
    """

    def __init__(self, images: Sequence, *, host: str = "127.0.0.1", port: int = 0, names=None,
                 rw: bool = False, shared: Optional[int] = DEFAULT_SHARED,
                 workers: Optional[int] = None, handshake_timeout: Optional[float] = HANDSHAKE_TIMEOUT,
                 **options):
        """``options``: the rest of :class:`NBDServer`'s keywords (tls, insecure, on_connection,
        send_timeout, max_total_inflight, inline_reads)."""
        self._kwargs = dict(host=host, port=port, names=names, rw=rw, shared=shared, workers=workers,
                            handshake_timeout=handshake_timeout, **options)
        self._images = images
        self.server: Optional[NBDServer] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._started = threading.Event()
        self._error: Optional[BaseException] = None

    def start(self) -> "BackgroundNBDServer":
        self._thread = threading.Thread(target=self._run, name="vdisk-nbd-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.server = NBDServer(self._images, **self._kwargs)
                await self.server.start()
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                self._error = exc
                self._started.set()
                return
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.aclose()

        asyncio.run(main())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def host(self) -> str:
        return self._kwargs["host"]

    def uri(self, name: Optional[str] = None) -> str:
        assert self.server is not None
        return self.server.uri(name)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("NBD server thread did not stop")
        self._thread = None

    def __enter__(self) -> "BackgroundNBDServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["serve_nbd", "NBDServer", "BackgroundNBDServer", "Export", "open_exports", "format_uri",
           "TlsConfig", "DEFAULT_PORT", "DEFAULT_SHARED"]
