"""Shared helpers for the NBD TLS tests and benchmark (no tests in here): a throw-away PKI made
with the ``openssl`` command line, laid out as qemu, nbdkit and libnbd expect.

    pki = make_pki(tmp_path)
    pki.server       # ca-cert.pem, server-cert.pem, server-key.pem   (for vdisk / qemu-nbd)
    pki.client       # ca-cert.pem, client-cert.pem, client-key.pem   (a client the CA vouches for)
    pki.anonymous    # ca-cert.pem only                               (trusts the server, no cert)
    pki.stranger     # another CA's ca-cert.pem + a client cert that CA signed
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
"""
CLIENT_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
"""


@dataclass
class Pki:
    root: Path
    server: Path
    client: Path
    anonymous: Path
    stranger: Path
    client_subject: str = "CN=vdisk-test-client,O=vdisk tests"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=str(cwd), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def _make_ca(work: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
             "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)


def _make_leaf(work: Path, ca: str, name: str, subject: str, ext: str) -> None:
    (work / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", f"{name}-key.pem",
             "-out", f"{name}.csr", "-subj", subject, cwd=work)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
             "-CAcreateserial", "-days", "3", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}-cert.pem", cwd=work)


def _folder(root: Path, name: str, files: dict) -> Path:
    d = root / name
    d.mkdir()
    for target, source in files.items():
        shutil.copy(source, d / target)
    return d


def make_pki(root: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a second CA
    with a client certificate of its own; RSA 2048, valid three days."""
    root = Path(root)
    work = root / "work"
    work.mkdir(parents=True)
    _make_ca(work, "ca", "vdisk test CA")
    _make_ca(work, "other-ca", "some other CA")
    _make_leaf(work, "ca", "server", "/CN=localhost/O=vdisk tests", SERVER_EXT)
    _make_leaf(work, "ca", "client", "/CN=vdisk-test-client/O=vdisk tests", CLIENT_EXT)
    _make_leaf(work, "other-ca", "foreign", "/CN=foreign-client", CLIENT_EXT)
    ca = work / "ca-cert.pem"
    return Pki(
        root=root,
        server=_folder(root, "server", {"ca-cert.pem": ca, "server-cert.pem": work / "server-cert.pem",
                                        "server-key.pem": work / "server-key.pem"}),
        client=_folder(root, "client", {"ca-cert.pem": ca, "client-cert.pem": work / "client-cert.pem",
                                        "client-key.pem": work / "client-key.pem"}),
        anonymous=_folder(root, "anonymous", {"ca-cert.pem": ca}),
        stranger=_folder(root, "stranger", {"ca-cert.pem": work / "other-ca-cert.pem",
                                            "client-cert.pem": work / "foreign-cert.pem",
                                            "client-key.pem": work / "foreign-key.pem"}),
    )
