"""TLS for the NBD server: the X.509 credentials folder, the server's ``ssl.SSLContext``, the
exposure rule and the one-line connection log.

The credentials folder uses the file names QEMU's ``tls-creds-x509`` object (and so qemu-nbd,
nbdkit and libnbd) expect::

    ca-cert.pem        the CA that signed the client certificates (needed with verify_peer)
    server-cert.pem    this server's certificate (the chain, leaf first)
    server-key.pem     its private key, unencrypted (nothing here could prompt for a passphrase)

Only the standard library's :mod:`ssl` is used; TLS 1.2 is the oldest version offered.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Optional

from ..errors import VDiskError
from .loopback import is_loopback

__all__ = ["TlsConfig", "server_context", "is_loopback", "check_exposure", "connection_line",
           "peer_subject", "CA_CERT", "SERVER_CERT", "SERVER_KEY"]

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
TLS_MODES = ("off", "on", "require")


@dataclass(frozen=True)
class TlsConfig:
    """``mode``: ``"off"`` (STARTTLS refused), ``"on"`` (offered, clients may go without) or
    ``"require"`` (nothing but STARTTLS before TLS). ``context``: the server context (None when
    off). ``verify_peer``: clients must show a certificate signed by the CA."""

    mode: str = "off"
    context: Optional[ssl.SSLContext] = None
    verify_peer: bool = False

    @classmethod
    def from_options(cls, creds_dir: Optional[str] = None, mode: Optional[str] = None,
                     verify_peer: bool = False) -> "TlsConfig":
        """The configuration of ``--tls-creds DIR --tls MODE --tls-verify-peer``: with a folder
        the mode defaults to ``require`` (as qemu-nbd does), without one to ``off``."""
        if mode is None:
            mode = "require" if creds_dir is not None else "off"
        if mode not in TLS_MODES:
            raise VDiskError(f"--tls must be one of {', '.join(TLS_MODES)}, not {mode!r}")
        if mode == "off":
            if creds_dir is not None or verify_peer:
                raise VDiskError("--tls=off contradicts --tls-creds/--tls-verify-peer; "
                                 "drop one of them")
            return cls()
        if creds_dir is None:
            raise VDiskError(f"--tls={mode} needs --tls-creds DIR (with {CA_CERT}, "
                             f"{SERVER_CERT}, {SERVER_KEY})")
        return cls(mode, server_context(creds_dir, verify_peer), verify_peer)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def required(self) -> bool:
        return self.mode == "require"


def _no_passphrase() -> bytes:
    raise VDiskError("the key is encrypted; give an unencrypted server-key.pem "
                     "(openssl pkey -in KEY -out server-key.pem)")


def server_context(creds_dir: str, verify_peer: bool = False) -> ssl.SSLContext:
    """A TLS server context from a qemu-style credentials folder. Every problem with the folder
    is one :class:`VDiskError` naming the file (never the key's content)."""
    if not os.path.isdir(creds_dir):
        raise VDiskError(f"{creds_dir}: --tls-creds must be a folder holding {CA_CERT}, "
                         f"{SERVER_CERT} and {SERVER_KEY}")
    cert, key, ca = (os.path.join(creds_dir, n) for n in (SERVER_CERT, SERVER_KEY, CA_CERT))
    needed = [cert, key] + ([ca] if verify_peer else [])
    for path in needed:
        if not os.path.isfile(path):
            why = " (--tls-verify-peer checks client certificates against it)" if path == ca else ""
            raise VDiskError(f"{path}: missing{why}; the TLS folder needs {CA_CERT}, "
                             f"{SERVER_CERT} and {SERVER_KEY}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except VDiskError as exc:
        raise VDiskError(f"{key}: {exc}") from None
    except ssl.SSLError as exc:
        raise VDiskError(f"{cert} / {key}: not a usable certificate and key pair "
                         f"({exc.reason or exc})") from None
    except OSError as exc:
        raise VDiskError(f"{creds_dir}: cannot read the TLS credentials: {exc.strerror or exc}") from None
    if verify_peer:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise VDiskError(f"{ca}: not a usable CA certificate "
                             f"({getattr(exc, 'reason', None) or exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_exposure(host: str, tls: TlsConfig, insecure: bool) -> None:
    """Refuse to listen beyond loopback unless every client must use TLS, or the caller said
    with ``insecure`` that the open door is meant."""
    if insecure or tls.required or is_loopback(host):
        return
    where = host or "all addresses"
    if tls.enabled:
        raise VDiskError(
            f"refusing to serve NBD on {where} with --tls=on: clients could still connect without "
            "TLS and read the image (or write it with --rw); use --tls=require, or --insecure if "
            "every host on that network may")
    raise VDiskError(
        f"refusing to serve NBD on {where} without TLS: any host that can reach it could read "
        "the image (or write it with --rw); give --tls-creds DIR (and --tls-verify-peer to admit "
        "only clients with a certificate), or --insecure if every host on that network may")


def _printable(text: str, limit: int = 200) -> str:
    clean = "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


_RDN_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
              "emailAddress": "emailAddress"}


def peer_subject(ssl_object) -> Optional[str]:
    """The verified client certificate's subject as ``CN=...,O=...``, or None without one."""
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return None
    if not cert:
        return None
    parts = [f"{_RDN_SHORT.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return _printable(",".join(parts)) if parts else "(empty subject)"


def _peer_text(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer) if peer else "-"


def connection_line(peer, outcome: str, *, tls_version: Optional[str] = None,
                    subject: Optional[str] = None, export: Optional[str] = None,
                    readonly: bool = True, reason: Optional[str] = None) -> str:
    """One log line for a connection that was accepted (an export chosen), refused or abandoned
    before that: peer, TLS and client certificate, export, and why. No key, no secret."""
    tls = f"TLS {tls_version}" if tls_version else "no TLS"
    cert = f"client certificate {subject}" if subject else "no client certificate"
    line = f"nbd connection {outcome}: peer {_peer_text(peer)}, {tls}, {cert}"
    if export is not None:
        line += f", export {_printable(export)} ({'read-only' if readonly else 'read-write'})"
    if reason:
        line += f": {_printable(reason, 300)}"
    return line
