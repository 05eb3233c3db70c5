"""A small asyncio iSCSI target exposing one image as LUN 0 (``vdisk serve iscsi``).

    from vdisk.serve.iscsi import serve_iscsi
    serve_iscsi("disk.vhd", host="127.0.0.1", port=3260, rw=False)     # blocks until Ctrl-C

    with start_iscsi_server("disk.vhd") as srv:                         # tests: background thread
        print(srv.url)                                                  # iscsi://127.0.0.1:PORT/IQN/0

Protocol work is in :mod:`vdisk.serve.iscsi_pdu` and device work in :mod:`vdisk.devices.scsi`;
this module only moves bytes between sockets and those two. Commands run one at a time on a
single worker thread, so the device sees them in arrival order and the event loop stays free.
Read-only unless ``rw=True``; binds to loopback unless told otherwise, and refuses any other
address without CHAP (``auth=AuthPolicy(chap=...)``) unless ``insecure=True``. Every login that
ends, accepted or refused, is reported as one line (``on_login``; default: the log).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import os
import re
import signal
import socket
import sys
import threading
from typing import Callable, Optional, Union

from ..devices.scsi import ScsiDisk
from ..errors import VDiskError
from .iscsi_auth import AuthPolicy
from .loopback import is_loopback
from .iscsi_pdu import (BHS_LEN, MAX_ACCEPTED_DSL, DataOutBudget, LoginResult, Pdu, ProtocolError,
                        PduReader, ScsiTask, TargetConnection, pad4)

__all__ = ["IscsiServer", "BackgroundIscsiServer", "serve_iscsi", "run_iscsi_server",
           "start_iscsi_server", "default_iqn"]

_log = logging.getLogger("vdisk.iscsi")

DEFAULT_PORT = 3260
IQN_PREFIX = "iqn.2026-01.org.vdisk"
LOGIN_TIMEOUT = 30.0              # seconds from connect to the full feature phase


def check_exposure(host: str, auth: Optional[AuthPolicy], insecure: bool) -> None:
    """Refuse to listen beyond loopback without CHAP, unless the caller said it is meant."""
    if insecure or is_loopback(host) or (auth is not None and auth.requires_chap):
        return
    raise VDiskError(
        f"refusing to serve iSCSI on {host or 'all addresses'} without CHAP: any host that can "
        "reach it could log in and read the image (or write it with --rw); give --chap-user and "
        "--chap-secret-file, or --insecure if every host on that network may")


def _printable(text: Optional[str], limit: int = 223) -> str:
    """Text from the network made safe for a one-line log entry (IQNs are at most 223 bytes)."""
    if not text:
        return "-"
    clean = "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def login_line(peer, result: LoginResult) -> str:
    """One log line for a login that ended: outcome, peer, initiator, CHAP user. No secret."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        peer_text = f"{host}:{peer[1]}"
    else:
        peer_text = str(peer)
    user = _printable(result.chap_user, 255) + (" (mutual)" if result.mutual else "")
    outcome = "accepted" if result.accepted else "abandoned" if result.abandoned else "refused"
    head = (f"iscsi login {outcome}: peer {peer_text}, "
            f"initiator {_printable(result.initiator)}, CHAP user {user}, "
            f"{_printable(result.session_type, 16).lower()} session")
    return head if result.accepted else f"{head}: {result.reason}"


def default_iqn(path: str) -> str:
    """``iqn.2026-01.org.vdisk:<image name>`` with the name reduced to IQN-legal characters."""
    stem = os.path.basename(os.fspath(path)) or "disk"
    name = re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-.") or "disk"
    return f"{IQN_PREFIX}:{name}"


class IscsiServer:
    """Serves one :class:`ScsiDisk` as LUN 0 of target ``iqn`` on ``host:port``.

    ``auth`` says who may log in (see :mod:`vdisk.serve.iscsi_auth`); without CHAP only a
    loopback address is accepted unless ``insecure``. ``on_login(line)`` gets one line per
    login that ends (default: the ``vdisk.iscsi`` log at INFO, refusals at WARNING).
    """

    def __init__(self, lu: ScsiDisk, *, iqn: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 auth: Optional[AuthPolicy] = None, insecure: bool = False,
                 on_login: Optional[Callable[[str], None]] = None):
        self.lu = lu
        self.iqn = iqn
        self.host = host
        self.port = port
        self.auth = auth if auth is not None else AuthPolicy()
        self.insecure = insecure
        self._on_login = on_login
        self._server: Optional[asyncio.base_events.Server] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix="vdisk-iscsi")
        self._tsih = itertools.count(1)
        self._writers: set[asyncio.StreamWriter] = set()
        self._budget = DataOutBudget()            # data-out memory of all sessions together

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"iscsi://{host}:{self.port}/{self.iqn}/0"

    async def start(self) -> None:
        check_exposure(self.host, self.auth, self.insecure)
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                      reuse_address=True)
        except OSError as exc:
            raise VDiskError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        async with self._server:
            await self._server.serve_forever()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
        self._executor.shutdown(wait=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # one PDU = one round trip
        # the address this initiator reached us on: meaningful in SendTargets even when bound
        # to a wildcard address
        local = writer.get_extra_info("sockname") or (self.host, self.port)
        portal = f"[{local[0]}]:{local[1]}" if ":" in str(local[0]) else f"{local[0]}:{local[1]}"
        tsih = next(self._tsih) % 0xFFFF or next(self._tsih)
        nexus = object()                          # this session's I_T nexus, for unit attentions
        conn = TargetConnection(self.iqn, portal, data_out_length=self.lu.data_out_length,
                                clip_transfer=self.lu.clip_transfer, on_reset=self.lu.reset,
                                refuse_before_data=functools.partial(self.lu.refuse_before_data,
                                                                     nexus=nexus),
                                tsih=tsih, budget=self._budget, auth=self.auth)
        peer = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOGIN_TIMEOUT
        try:
            while not conn.closed:
                if conn.full_feature:
                    pdu = await self._read_pdu(reader)
                else:                             # a login that never ends must not hold on
                    try:
                        async with asyncio.timeout_at(deadline):
                            pdu = await self._read_pdu(reader)
                    except TimeoutError:
                        self._report(peer, conn.unfinished_login(
                            f"login not finished within {LOGIN_TIMEOUT:g} s"))
                        break
                if pdu is None:
                    break
                actions = conn.receive(pdu)
                if conn.login_result is not None:
                    self._report(peer, conn.login_result)
                    conn.login_result = None
                for action in actions:
                    if isinstance(action, ScsiTask):
                        res = await loop.run_in_executor(
                            self._executor, functools.partial(
                                self.lu.execute_lun, action.lun, action.exec_cdb or action.cdb,
                                action.data_out, nexus=nexus))
                        writer.writelines(conn.complete(action, res.status, res.data_in, res.sense))
                    else:
                        writer.write(action)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            pass                                  # initiator went away or broke the protocol
        except Exception:                         # a bug ends this session, not the server
            _log.exception("iSCSI session from %s failed", writer.get_extra_info("peername"))
        finally:
            self._report(peer, conn.unfinished_login("the initiator left during login"))
            conn.release()
            self.lu.forget_nexus(nexus)
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _read_pdu(reader: asyncio.StreamReader) -> Optional[Pdu]:
        """The next PDU, or None for one whose data segment is longer than we accept."""
        bhs = await reader.readexactly(BHS_LEN)
        ahs_len, dsl = PduReader.lengths(bhs)
        if dsl > MAX_ACCEPTED_DSL:
            return None
        rest = await reader.readexactly(ahs_len + dsl + pad4(dsl)) if ahs_len or dsl else b""
        return Pdu(bhs, rest[:ahs_len], rest[ahs_len:ahs_len + dsl])

    def _report(self, peer, result: Optional[LoginResult]) -> None:
        if result is None:
            return
        line = login_line(peer, result)
        if self._on_login is not None:
            self._on_login(line)
        else:
            _log.log(logging.INFO if result.accepted else logging.WARNING, "%s", line)


def _open_lu(image: Union[str, os.PathLike, object], rw: bool,
             lu_options: dict) -> tuple[ScsiDisk, Callable[[], None], str]:
    """(logical unit, closer, name for the default IQN) for a path or an open Disk."""
    if isinstance(image, (str, os.PathLike)):
        import vdisk
        disk = vdisk.open(os.fspath(image), "r+" if rw else "r")
        try:
            return ScsiDisk(disk, read_only=not rw, **lu_options), disk.close, os.fspath(image)
        except BaseException:
            disk.close()
            raise
    disk = image
    read_only = disk.read_only or not rw
    return (ScsiDisk(disk, read_only=read_only, **lu_options), (lambda: None),
            str(getattr(disk, "path", "disk")))


async def run_iscsi_server(image, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                           iqn: Optional[str] = None, rw: bool = False,
                           on_ready: Optional[Callable[[IscsiServer], None]] = None,
                           auth: Optional[AuthPolicy] = None, insecure: bool = False,
                           on_login: Optional[Callable[[str], None]] = None,
                           **lu_options) -> None:
    """Serve ``image`` (a path or an open Disk) until cancelled; flushes and closes at the end.

    ``auth``, ``insecure`` and ``on_login`` are those of :class:`IscsiServer`; ``lu_options``
    go to :class:`ScsiDisk` (vendor, product, serial, physical_block_size).
    """
    check_exposure(host, auth, insecure)          # before the image is even opened
    lu, closer, name = _open_lu(image, rw, lu_options)
    server = IscsiServer(lu, iqn=iqn or default_iqn(name), host=host, port=port, auth=auth,
                         insecure=insecure, on_login=on_login)
    try:
        await server.start()
        if on_ready is not None:
            on_ready(server)
        await server.serve_forever()
    finally:
        await server.aclose()
        try:
            if not lu.read_only:
                lu.disk.flush()
        finally:
            closer()


def serve_iscsi(image_path_or_disk, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                iqn: Optional[str] = None, rw: bool = False, *, auth: Optional[AuthPolicy] = None,
                insecure: bool = False, **lu_options) -> None:
    """Blocking entry point for ``vdisk serve iscsi``: prints the URL and one line per login on
    stderr, stops on SIGINT/SIGTERM."""

    def ready(server: IscsiServer) -> None:
        mode = "read-write" if rw else "read-only"
        if server.auth.requires_chap:
            mode += ", CHAP" + (" with mutual" if server.auth.mutual else "")
        if server.auth.allowed_initiators:
            mode += f", {len(server.auth.allowed_initiators)} initiator(s) allowed"
        print(f"serving {server.url} ({mode}); Ctrl-C stops", file=sys.stderr, flush=True)

    def login(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, task.cancel)
            except (RuntimeError, ValueError):      # not the main thread: no signal handling
                pass
        try:
            await run_iscsi_server(image_path_or_disk, host=host, port=port, iqn=iqn, rw=rw,
                                   on_ready=ready, auth=auth, insecure=insecure, on_login=login,
                                   **lu_options)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


class BackgroundIscsiServer:
    """An iSCSI target on its own event-loop thread; ``stop()`` (or ``with``) ends it."""

    def __init__(self, image, *, host: str = "127.0.0.1", port: int = 0,
                 iqn: Optional[str] = None, rw: bool = False, **options):
        self._args = dict(host=host, port=port, iqn=iqn, rw=rw, **options)
        self._image = image
        self._ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task] = None
        self._error: Optional[BaseException] = None
        self.server: Optional[IscsiServer] = None
        self._thread = threading.Thread(target=self._run, name="vdisk-iscsi-server", daemon=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        def ready(server: IscsiServer) -> None:
            self.server = server
            self._ready.set()

        try:
            self._task = loop.create_task(run_iscsi_server(self._image, on_ready=ready, **self._args))
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:              # reported to the thread that called start()
            self._error = exc
        finally:
            loop.close()
            self._ready.set()

    def start(self) -> "BackgroundIscsiServer":
        self._thread.start()
        self._ready.wait()
        if self.server is None:
            raise self._error or RuntimeError("iSCSI server did not start")
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def iqn(self) -> str:
        return self.server.iqn

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()

    def __enter__(self) -> "BackgroundIscsiServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_iscsi_server(image, *, host: str = "127.0.0.1", port: int = 0, iqn: Optional[str] = None,
                       rw: bool = False, **options) -> BackgroundIscsiServer:
    """Start a target for ``image`` on a background thread (port 0 = a free port) and return it.

    ``options``: those of :func:`run_iscsi_server` (auth, insecure, on_login, and the
    :class:`ScsiDisk` ones)."""
    return BackgroundIscsiServer(image, host=host, port=port, iqn=iqn, rw=rw, **options).start()
