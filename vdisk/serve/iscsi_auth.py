"""Who may log in to the iSCSI target: CHAP (RFC 7143 §12.1.3, RFC 1994 MD5) and an initiator
ACL, sans-IO.

    policy = AuthPolicy(chap=ChapCredentials("alice", load_secret("alice.secret")),
                        mutual=ChapCredentials("target", load_secret("target.secret")),
                        allowed_initiators=frozenset({"iqn.2026-01.org.example:host"}))
    auth = LoginAuthenticator(policy)           # one per login
    answers = auth.receive(pairs)               # the AuthMethod / CHAP_* keys of one login PDU
    auth.failure, auth.complete, auth.user

Each login gets a fresh identifier and a 16-byte challenge from :mod:`secrets`, so a response
seen on the wire is worthless on any other connection; one response per login is checked, with
:func:`hmac.compare_digest`, and anything out of order, malformed or repeated fails the login.
Secrets are never part of a message, a repr or a log line.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Optional

from ..errors import VDiskError

__all__ = ["ChapCredentials", "AuthPolicy", "LoginAuthenticator", "load_secret", "policy_from_files",
           "MIN_SECRET_BYTES", "STATUS_AUTH_FAILURE", "STATUS_AUTHORIZATION_FAILURE"]

MIN_SECRET_BYTES = 12             # RFC 7143 §12.1.3: at least 96 bits
MAX_SECRET_BYTES = 255
CHALLENGE_BYTES = 16
MAX_PEER_CHALLENGE_BYTES = 1024
CHAP_MD5 = "5"

STATUS_INITIATOR_ERROR = (0x02, 0x00)
STATUS_AUTH_FAILURE = (0x02, 0x01)
STATUS_AUTHORIZATION_FAILURE = (0x02, 0x02)

SECURITY_KEYS = ("AuthMethod",)   # and every CHAP_* key


def is_security_key(key: str) -> bool:
    return key in SECURITY_KEYS or key.startswith("CHAP_")


@dataclass(frozen=True)
class ChapCredentials:
    """A CHAP name and its secret (the secret never appears in a repr)."""
    user: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.user or any(ord(c) < 0x20 for c in self.user):
            raise VDiskError(f"CHAP user {self.user!r}: must be non-empty printable text")
        if not MIN_SECRET_BYTES <= len(self.secret) <= MAX_SECRET_BYTES:
            raise VDiskError(f"CHAP secret of {self.user!r} has {len(self.secret)} bytes; "
                             f"RFC 7143 needs {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")


def load_secret(path: str) -> bytes:
    """A CHAP secret from a file: all its bytes, 12 to 255 of them.

    The bytes are taken as they are, as QEMU's ``-object secret,file=`` takes them, so one file
    serves both ends. A trailing newline is refused rather than kept or dropped: either choice
    would make the secret differ from what one of the initiators sends.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise VDiskError(f"{path}: cannot read the CHAP secret: {exc.strerror or exc}") from None
    if secret.endswith((b"\n", b"\r")):
        raise VDiskError(f"{path}: the CHAP secret ends with a newline, which initiators would not "
                         "send; write the file without one (printf '%s' SECRET > FILE)")
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        shown = f"more than {MAX_SECRET_BYTES}" if len(secret) > MAX_SECRET_BYTES else str(len(secret))
        raise VDiskError(f"{path}: a CHAP secret must have {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} "
                         f"bytes (RFC 7143), this one has {shown}")
    return secret


@dataclass(frozen=True)
class AuthPolicy:
    """What a login must show: the initiator's CHAP credentials (None: no authentication), the
    target's own for mutual CHAP, and the initiator names allowed in (empty: any)."""
    chap: Optional[ChapCredentials] = None
    mutual: Optional[ChapCredentials] = None
    allowed_initiators: frozenset = frozenset()

    def __post_init__(self) -> None:
        if self.mutual is not None and self.chap is None:
            raise VDiskError("mutual CHAP needs one-way CHAP too: the target only authenticates "
                             "itself to an initiator that authenticated first")
        if self.mutual is not None and hmac.compare_digest(self.mutual.secret, self.chap.secret):
            raise VDiskError("the mutual CHAP secret must differ from the initiator's secret "
                             "(RFC 7143 §12.1.3)")

    @property
    def requires_chap(self) -> bool:
        return self.chap is not None


def policy_from_files(chap_user: Optional[str] = None, chap_secret_file: Optional[str] = None,
                      mutual_user: Optional[str] = None, mutual_secret_file: Optional[str] = None,
                      allowed_initiators=()) -> AuthPolicy:
    """The policy of ``vdisk serve iscsi``'s options: each user with the file holding its secret."""
    def pair(user, path, what) -> Optional[ChapCredentials]:
        if user is None and path is None:
            return None
        if user is None or path is None:
            raise VDiskError(f"{what} needs both a user and a secret file")
        return ChapCredentials(user, load_secret(path))

    return AuthPolicy(chap=pair(chap_user, chap_secret_file, "CHAP"),
                      mutual=pair(mutual_user, mutual_secret_file, "mutual CHAP"),
                      allowed_initiators=frozenset(allowed_initiators or ()))


def decode_binary(value: str) -> bytes:
    """An RFC 7143 binary value: ``0x`` hex or ``0b`` base64. ValueError otherwise."""
    if len(value) < 3 or value[0] != "0" or value[1] not in "xXbB":
        raise ValueError("not a 0x/0b binary value")
    body = value[2:]
    if value[1] in "xX":
        if len(body) % 2:
            body = "0" + body
        try:
            return bytes.fromhex(body)
        except ValueError:
            raise ValueError("bad hex digits") from None
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


def decode_number(value: str) -> int:
    if value[:2] in ("0x", "0X"):
        return int(value[2:], 16)
    if not value.isdigit():
        raise ValueError("not a number")
    return int(value)


def chap_md5(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes((identifier,)) + secret + challenge).digest()


class LoginAuthenticator:
    """The target side of the security stage of one login.

    Feed it the AuthMethod and CHAP_* keys of each login request in order (:meth:`receive`);
    it answers them and records the outcome: ``complete`` once the initiator may leave the
    security stage, ``failure`` as (status class, detail, reason) when the login must be
    refused. ``user`` is the CHAP name the initiator gave, for the log.
    """

    def __init__(self, policy: AuthPolicy):
        self.policy = policy
        self.complete = not policy.requires_chap
        self.failure: Optional[tuple[int, int, str]] = None
        self.user: Optional[str] = None
        self.mutual = False
        self._state = "start"                      # start, method, challenged, done
        self._identifier = secrets.randbelow(256)
        self._challenge = secrets.token_bytes(CHALLENGE_BYTES)

    def fail(self, reason: str, status: tuple[int, int] = STATUS_AUTH_FAILURE) -> list:
        """Refuse this login (the first reason given is the one kept)."""
        if self.failure is None:
            self.failure = (*status, reason)
        self.complete = False
        self._state = "done"
        return []

    def check_initiator(self, name: str) -> None:
        """The ACL: a name outside ``allowed_initiators`` fails the login (authorization)."""
        allowed = self.policy.allowed_initiators
        if allowed and name not in allowed:
            self.fail("initiator not in the allowed list", STATUS_AUTHORIZATION_FAILURE)

    def receive(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Answer the security keys of one login request (others must be filtered out)."""
        answers: list[tuple[str, str]] = []
        chap_keys: dict[str, str] = {}
        for key, value in pairs:
            if self.failure is not None:
                return []
            if key == "AuthMethod":
                answers += self._auth_method(value)
            elif key == "CHAP_A":
                answers += self._algorithm(value)
            elif key in ("CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"):
                if key in chap_keys:
                    return self.fail(f"{key} given twice")
                chap_keys[key] = value
            else:
                return self.fail(f"unexpected security key {key[:32]!r}", STATUS_INITIATOR_ERROR)
        if chap_keys and self.failure is None:
            answers += self._response(chap_keys)
        return [] if self.failure is not None else answers

    def _auth_method(self, value: str) -> list[tuple[str, str]]:
        if self._state != "start":
            return self.fail("AuthMethod negotiated twice")
        choices = value.split(",")
        if self.policy.requires_chap:
            if "CHAP" not in choices:
                self.fail("initiator does not offer CHAP, which this target requires")
                return [("AuthMethod", "Reject")]
            self._state = "method"
            return [("AuthMethod", "CHAP")]
        if "None" not in choices:
            self.fail("initiator offers only authentication this target is not set up for")
            return [("AuthMethod", "Reject")]
        self._state = "done"
        return [("AuthMethod", "None")]

    def _algorithm(self, value: str) -> list[tuple[str, str]]:
        if self._state != "method":
            return self.fail("CHAP_A out of order")
        if CHAP_MD5 not in value.split(","):
            self.fail("initiator offers no CHAP algorithm but MD5")
            return [("CHAP_A", "Reject")]
        self._state = "challenged"
        return [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self._identifier)),
                ("CHAP_C", "0x" + self._challenge.hex())]

    def _response(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if self._state != "challenged":
            return self.fail("CHAP response out of order")
        self._state = "done"                       # one response per login, right or wrong
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            return self.fail("CHAP_N or CHAP_R missing")
        self.user = name
        try:
            got = decode_binary(response)
        except ValueError:
            return self.fail("CHAP_R is not a binary value")
        want = chap_md5(self._identifier, self.policy.chap.secret, self._challenge)
        # both comparisons always run: the time taken says nothing about which one failed
        name_ok = hmac.compare_digest(name.encode("utf-8", "surrogateescape"),
                                      self.policy.chap.user.encode("utf-8"))
        response_ok = hmac.compare_digest(got, want)
        if not (name_ok and response_ok):
            return self.fail("wrong CHAP name or response")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            self.complete = True
            return []
        return self._mutual(keys.get("CHAP_I"), keys.get("CHAP_C"))

    def _mutual(self, identifier: Optional[str], challenge: Optional[str]) -> list[tuple[str, str]]:
        if identifier is None or challenge is None:
            return self.fail("mutual CHAP needs both CHAP_I and CHAP_C")
        if self.policy.mutual is None:
            return self.fail("initiator asks for mutual CHAP, which this target is not set up for")
        try:
            ident = decode_number(identifier)
            peer_challenge = decode_binary(challenge)
        except ValueError:
            return self.fail("CHAP_I or CHAP_C malformed")
        if not 0 <= ident <= 255 or not 1 <= len(peer_challenge) <= MAX_PEER_CHALLENGE_BYTES:
            return self.fail("CHAP_I or CHAP_C out of range")
        if hmac.compare_digest(peer_challenge, self._challenge):
            return self.fail("initiator reflected the target's challenge")
        self.mutual = True
        self.complete = True
        return [("CHAP_N", self.policy.mutual.user),
                ("CHAP_R", "0x" + chap_md5(ident, self.policy.mutual.secret, peer_challenge).hex())]
