"""A raw iSCSI initiator for tests that must send what no real initiator sends: hostile CHAP
answers, replays, writes announced but never sent. Blocking sockets with a timeout, so a server
that stops answering fails the test instead of hanging it."""
from __future__ import annotations

import hashlib
import socket
import struct
from typing import Optional

from vdisk.serve.iscsi_pdu import BHS_LEN, OP_LOGIN_RSP, Pdu, PduReader, build_text, encode_lun, parse_text

INITIATOR = "iqn.2026-01.org.example:raw"


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 MD5 CHAP: MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes((ident,)) + secret + challenge).digest()


class RawInitiator:
    """One TCP connection speaking just enough iSCSI to log in and send commands."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = PduReader()
        self.pending: list[Pdu] = []
        self.cmdsn = 0
        self.exp_statsn = 0
        self.itt = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawInitiator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def send(self, bhs: bytearray, data: bytes = b"") -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        self.sock.sendall(bytes(bhs) + data + b"\x00" * ((-len(data)) & 3))

    def recv(self) -> Optional[Pdu]:
        """The next PDU, or None when the target closed the connection."""
        while not self.pending:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.pending += list(self.reader.feed(chunk))
        pdu = self.pending.pop(0)
        if pdu.opcode != 0x31:                     # R2T carries no StatSN of its own
            self.exp_statsn = (struct.unpack_from(">I", pdu.bhs, 24)[0] + 1) & 0xFFFFFFFF
        return pdu

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # -- login ----------------------------------------------------------------------------------
    def login_pdu(self, keys: list[tuple[str, str]], csg: int, nsg: int, transit: bool) -> Optional[Pdu]:
        bhs = bytearray(BHS_LEN)
        bhs[0] = 0x43                              # immediate Login Request
        bhs[1] = (0x80 if transit else 0) | (csg << 2) | nsg
        bhs[8:14] = b"\x80\x00\x00\x01\x23\x45"    # ISID
        struct.pack_into(">III", bhs, 16, 1, 0, 0)  # ITT, CID + reserved
        struct.pack_into(">II", bhs, 24, self.cmdsn, self.exp_statsn)
        self.send(bhs, build_text(keys))
        return self.recv()

    def login(self, target: str, *, user: Optional[str] = None, secret: bytes = b"",
              initiator: str = INITIATOR, session: str = "Normal") -> tuple[int, int]:
        """A complete login (with one-way CHAP when ``user`` is given): (status class, detail)."""
        first = [("InitiatorName", initiator), ("SessionType", session),
                 ("AuthMethod", "CHAP,None" if user else "None")]
        if session == "Normal":
            first.append(("TargetName", target))
        r = self.login_pdu(first, 0, 1, transit=not user)
        if r is None or r.bhs[36]:
            return status(r)
        if user:
            r = self.login_pdu([("CHAP_A", "5")], 0, 1, transit=False)
            if r is None or r.bhs[36]:
                return status(r)
            keys = dict(parse_text(r.data))
            ident, challenge = int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])
            response = chap_response(ident, secret, challenge)
            r = self.login_pdu([("CHAP_N", user), ("CHAP_R", "0x" + response.hex())], 0, 1, transit=True)
            if r is None or r.bhs[36]:
                return status(r)
        r = self.login_pdu([("HeaderDigest", "None"), ("DataDigest", "None"),
                            ("MaxRecvDataSegmentLength", "262144"), ("ImmediateData", "Yes"),
                            ("InitialR2T", "Yes"), ("MaxBurstLength", "262144"),
                            ("FirstBurstLength", "65536")], 1, 3, transit=True)
        return status(r)

    # -- commands -------------------------------------------------------------------------------
    def command(self, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False,
                data: bytes = b"", itt: Optional[int] = None) -> int:
        """Send a SCSI command (non-immediate, next CmdSN); returns its ITT."""
        itt = self.next_itt() if itt is None else itt
        bhs = bytearray(BHS_LEN)
        bhs[0] = 0x01
        bhs[1] = 0x80 | (0x40 if read else 0) | (0x20 if write else 0)
        bhs[8:16] = encode_lun(0)
        struct.pack_into(">IIII", bhs, 16, itt, edtl, self.cmdsn, self.exp_statsn)
        bhs[32:32 + len(cdb)] = cdb
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        self.send(bhs, data)
        return itt


def status(pdu: Optional[Pdu]) -> tuple[int, int]:
    """(status class, detail) of a login response; (-1, -1) when the connection was closed."""
    if pdu is None:
        return (-1, -1)
    assert pdu.opcode == OP_LOGIN_RSP, hex(pdu.opcode)
    return (pdu.bhs[36], pdu.bhs[37])
