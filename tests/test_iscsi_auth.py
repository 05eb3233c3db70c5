"""CHAP (RFC 7143 §12.1.3, MD5 per RFC 1994), the initiator ACL and the no-open-door rule,
driven without a network through TargetConnection's login (issue 16).

The expected responses are computed here with hashlib from the RFC's definition
MD5(identifier || secret || challenge); real initiators judge the same code in test_iscsi_chap.py.
"""
from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdisk
from vdisk.serve.iscsi import check_exposure, login_line
from vdisk.serve.iscsi_auth import AuthPolicy, ChapCredentials, load_secret, policy_from_files
from vdisk.serve.iscsi_pdu import OP_LOGIN_RSP, TargetConnection, parse_text

from test_iscsi_pdu import INITIATOR, IQN, login_pdu, one
from test_iscsi_support import chap_response

SECRET = b"correct-horse-battery"
TARGET_SECRET = b"target-staple-secret"
POLICY = AuthPolicy(chap=ChapCredentials("alice", SECRET),
                    mutual=ChapCredentials("target", TARGET_SECRET))

FIRST = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal"),
         ("AuthMethod", "CHAP,None")]
OPERATIONAL = [("MaxRecvDataSegmentLength", "65536"), ("ImmediateData", "Yes")]


def status(r) -> tuple[int, int]:
    assert r.opcode == OP_LOGIN_RSP
    return (r.bhs[36], r.bhs[37])


def challenged(policy=POLICY, first=FIRST):
    """A connection that has sent its CHAP challenge: (connection, identifier, challenge)."""
    conn = TargetConnection(IQN, "127.0.0.1:3260", auth=policy)
    r = one(conn.receive(login_pdu(first, 0, 1, transit=True)))
    assert status(r) == (0, 0) and not r.flags & 0x80            # no transit before CHAP
    assert dict(parse_text(r.data))["AuthMethod"] == "CHAP"
    r = one(conn.receive(login_pdu([("CHAP_A", "7,5")], 0, 1, transit=False)))
    keys = dict(parse_text(r.data))
    assert keys["CHAP_A"] == "5" and keys["CHAP_C"].startswith("0x")
    return conn, int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])


def answer(conn, keys):
    return one(conn.receive(login_pdu(keys, 0, 1, transit=True)))


def finish(conn):
    r = one(conn.receive(login_pdu(OPERATIONAL, 1, 3)))
    assert status(r) == (0, 0) and conn.full_feature
    return r


# -- one-way and mutual CHAP -----------------------------------------------------------------------
def test_the_right_response_logs_in_and_the_result_names_the_user():
    conn, ident, challenge = challenged()
    r = answer(conn, [("CHAP_N", "alice"), ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex())])
    assert status(r) == (0, 0) and r.flags & 0x80 and r.flags & 3 == 1   # on to operational
    assert not conn.full_feature
    finish(conn)
    result = conn.login_result
    assert result.accepted and result.chap_user == "alice" and result.initiator == INITIATOR
    assert not result.mutual


def test_a_base64_response_is_as_good_as_hex():
    conn, ident, challenge = challenged()
    r = answer(conn, [("CHAP_N", "alice"),
                      ("CHAP_R", "0b" + base64.b64encode(chap_response(ident, SECRET, challenge)).decode())])
    assert status(r) == (0, 0)


def test_every_login_gets_a_fresh_challenge():
    seen = {challenged()[2] for _ in range(20)}
    assert len(seen) == 20 and all(len(c) == 16 for c in seen)


@pytest.mark.parametrize("user,secret,reason", [
    ("alice", b"wrong-horse-battery", "wrong secret"),
    ("mallory", SECRET, "unknown user"),
    ("Alice", SECRET, "names are exact"),
])
def test_a_wrong_secret_or_user_is_an_authentication_failure(user, secret, reason):
    conn, ident, challenge = challenged()
    r = answer(conn, [("CHAP_N", user), ("CHAP_R", "0x" + chap_response(ident, secret, challenge).hex())])
    assert status(r) == (0x02, 0x01) and conn.closed and not conn.full_feature, reason
    assert not conn.login_result.accepted and conn.login_result.chap_user == user


def test_a_response_replayed_on_another_connection_is_refused():
    first, ident, challenge = challenged()
    recorded = [("CHAP_N", "alice"), ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex())]
    assert status(answer(first, recorded)) == (0, 0)
    for _ in range(5):                                      # the same bytes, new connections
        conn, _, _ = challenged()
        assert status(answer(conn, recorded)) == (0x02, 0x01)


def test_one_response_per_login():
    conn, ident, challenge = challenged()
    good = [("CHAP_N", "alice"), ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex())]
    r = one(conn.receive(login_pdu(good, 0, 1, transit=False)))
    assert status(r) == (0, 0)
    r = one(conn.receive(login_pdu(good, 0, 1, transit=True)))             # again: out of order
    assert status(r) == (0x02, 0x01) and conn.closed


def wrong_length(n):
    return "0x" + bytes(n).hex()


@pytest.mark.parametrize("value", [
    wrong_length(15), wrong_length(17), wrong_length(0) + "0", "0x", "0xzz" * 8, "", "abc",
    "0b!!!!", "0b" + base64.b64encode(bytes(15)).decode(), "16", "0X" + "f" * 4000,
    "0x" + "\u00e9" * 32,
])
def test_malformed_responses_are_refused(value):
    conn, _, _ = challenged()
    r = answer(conn, [("CHAP_N", "alice"), ("CHAP_R", value)])
    assert status(r) == (0x02, 0x01) and conn.closed and not conn.full_feature


@pytest.mark.parametrize("keys", [
    [("CHAP_R", "0x" + bytes(16).hex())],                                  # no CHAP_N
    [("CHAP_N", "alice")],                                                 # no CHAP_R
    [("CHAP_N", "alice"), ("CHAP_N", "alice"), ("CHAP_R", "0x" + bytes(16).hex())],
    [("CHAP_A", "5")],                                                     # algorithm again
    [("AuthMethod", "None")],                                              # method again
    [("CHAP_X", "1")],
])
def test_out_of_order_or_repeated_keys_are_refused(keys):
    conn, _, _ = challenged()
    r = answer(conn, keys)
    assert r.bhs[36] == 0x02 and conn.closed and not conn.full_feature


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "CHAP_A",
                                            "AuthMethod"]),
                          st.text(max_size=80)), max_size=6))
def test_no_response_but_the_right_one_gets_in(keys):
    conn, _, _ = challenged()
    for raw in conn.receive(login_pdu(keys, 0, 1, transit=True)):
        assert isinstance(raw, bytes)
    if not conn.closed:                                     # still in the security stage at best
        r = one(conn.receive(login_pdu(OPERATIONAL, 1, 3)))
        assert r.bhs[36] == 0x02
    assert not conn.full_feature


def test_mutual_chap_answers_the_initiators_challenge():
    conn, ident, challenge = challenged()
    mine = bytes(range(16, 48))
    r = answer(conn, [("CHAP_N", "alice"), ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex()),
                      ("CHAP_I", "77"), ("CHAP_C", "0x" + mine.hex())])
    assert status(r) == (0, 0)
    keys = dict(parse_text(r.data))
    assert keys["CHAP_N"] == "target"
    assert keys["CHAP_R"] == "0x" + chap_response(77, TARGET_SECRET, mine).hex()
    finish(conn)
    assert conn.login_result.mutual


@pytest.mark.parametrize("extra,why", [
    ([("CHAP_I", "77")], "challenge missing"),
    ([("CHAP_I", "256"), ("CHAP_C", "0x0102")], "identifier out of range"),
    ([("CHAP_I", "x"), ("CHAP_C", "0x0102")], "identifier not a number"),
    ([("CHAP_I", "1"), ("CHAP_C", "0x")], "empty challenge"),
    ([("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 1025)], "challenge too long"),
    (None, "the target's own challenge reflected back"),
])
def test_bad_mutual_requests_are_refused(extra, why):
    conn, ident, challenge = challenged()
    if extra is None:
        extra = [("CHAP_I", str(ident)), ("CHAP_C", "0x" + challenge.hex())]
    r = answer(conn, [("CHAP_N", "alice"),
                      ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex())] + extra)
    assert status(r) == (0x02, 0x01) and conn.closed, why
    assert "CHAP_R" not in dict(parse_text(r.data))        # nothing computed for a bad request


def test_mutual_chap_is_refused_when_the_target_has_no_identity():
    conn, ident, challenge = challenged(AuthPolicy(chap=ChapCredentials("alice", SECRET)))
    r = answer(conn, [("CHAP_N", "alice"), ("CHAP_R", "0x" + chap_response(ident, SECRET, challenge).hex()),
                      ("CHAP_I", "1"), ("CHAP_C", "0x" + bytes(range(16)).hex())])
    assert status(r) == (0x02, 0x01)


# -- no way around it ----------------------------------------------------------------------------
@pytest.mark.parametrize("pdus", [
    [(FIRST, 1, 3, True)],                                                  # straight to operational
    [(FIRST[:3], 0, 3, True)],                                              # no AuthMethod, transit
    [([("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "None")], 0, 1, True)],
    [(FIRST, 0, 1, False), ([("CHAP_A", "5")], 0, 1, False), (OPERATIONAL, 1, 3, True)],
    [(FIRST, 0, 1, False), ([("CHAP_A", "5")], 0, 1, False), ([], 0, 1, True)],
    [(FIRST, 0, 1, False), ([("CHAP_A", "6,7")], 0, 1, False)],             # no MD5
    [(FIRST, 0, 1, False)] + [([("X-pad", "1")], 0, 1, False)] * 20,        # a login that never ends
], ids=["operational", "no-method", "method-none", "skip-response-stage", "skip-response",
        "no-md5", "endless"])
def test_a_chap_target_cannot_be_entered_without_the_response(pdus):
    conn = TargetConnection(IQN, "127.0.0.1:3260", auth=POLICY)
    last = None
    for keys, csg, nsg, transit in pdus:
        last = one(conn.receive(login_pdu(keys, csg, nsg, transit=transit)))
        if conn.closed:
            break
    assert last.bhs[36] == 0x02 and conn.closed and not conn.full_feature


def test_discovery_sessions_need_chap_too():
    conn = TargetConnection(IQN, "127.0.0.1:3260", auth=POLICY)
    r = one(conn.receive(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery"),
                                    ("AuthMethod", "None")], 0, 3)))
    assert status(r) == (0x02, 0x01)


def test_without_chap_configured_logins_are_as_before():
    conn = TargetConnection(IQN, "127.0.0.1:3260")
    r = one(conn.receive(login_pdu(FIRST, 0, 1)))
    assert dict(parse_text(r.data))["AuthMethod"] == "None" and r.flags & 0x80
    finish(conn)
    assert conn.login_result.accepted and conn.login_result.chap_user is None


@pytest.mark.parametrize("policy", [
    AuthPolicy(allowed_initiators=frozenset({"iqn.2026-01.org.example:other"})),
    AuthPolicy(chap=ChapCredentials("alice", SECRET),
               allowed_initiators=frozenset({"iqn.2026-01.org.example:other"})),
], ids=["acl", "acl+chap"])
def test_an_initiator_outside_the_acl_is_an_authorization_failure(policy):
    conn = TargetConnection(IQN, "127.0.0.1:3260", auth=policy)
    r = one(conn.receive(login_pdu(FIRST, 0, 1)))
    assert status(r) == (0x02, 0x02) and conn.closed
    assert conn.login_result.reason == "initiator not in the allowed list"


def test_an_initiator_inside_the_acl_gets_in():
    conn = TargetConnection(IQN, "127.0.0.1:3260",
                            auth=AuthPolicy(allowed_initiators=frozenset({INITIATOR, "iqn.x:y"})))
    one(conn.receive(login_pdu(FIRST, 0, 1)))
    finish(conn)


# -- secrets -------------------------------------------------------------------------------------
def test_secret_files(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(SECRET)
    assert load_secret(str(good)) == SECRET
    for name, content, message in [
        ("short", b"elevenbytes", "12 to 255 bytes"),
        ("long", b"x" * 256, "more than 255"),
        ("newline", SECRET + b"\n", "ends with a newline"),
        ("empty", b"", "this one has 0"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(vdisk.VDiskError, match=message) as info:
            load_secret(str(path))
        assert str(path) in str(info.value) and SECRET.decode() not in str(info.value)
    with pytest.raises(vdisk.VDiskError, match="cannot read"):
        load_secret(str(tmp_path / "missing"))


def test_policies_that_cannot_be_right_are_refused(tmp_path):
    with pytest.raises(vdisk.VDiskError, match="must differ"):
        AuthPolicy(chap=ChapCredentials("a", SECRET), mutual=ChapCredentials("t", SECRET))
    with pytest.raises(vdisk.VDiskError, match="needs one-way CHAP"):
        AuthPolicy(mutual=ChapCredentials("t", SECRET))
    with pytest.raises(vdisk.VDiskError, match="both a user and a secret file"):
        policy_from_files(chap_user="alice")
    with pytest.raises(vdisk.VDiskError, match="RFC 7143 needs 12"):
        ChapCredentials("alice", b"short")


def test_secrets_never_show_in_reprs_or_log_lines():
    assert SECRET.decode() not in repr(POLICY) and TARGET_SECRET.decode() not in repr(POLICY)
    conn, ident, challenge = challenged()
    answer(conn, [("CHAP_N", "alice\r\nforged line"), ("CHAP_R", "0x" + bytes(16).hex())])
    line = login_line(("192.0.2.7", 50000), conn.login_result)
    assert line.startswith("iscsi login refused: peer 192.0.2.7:50000, initiator " + INITIATOR)
    assert "CHAP user alice??forged line" in line and "\n" not in line
    assert SECRET.decode() not in line and challenge.hex() not in line


# -- no open door --------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.1"])
def test_a_non_loopback_address_without_chap_is_refused_and_says_why(host):
    with pytest.raises(vdisk.VDiskError, match="without CHAP: any host that can reach it") as info:
        check_exposure(host, None, insecure=False)
    assert "--insecure" in str(info.value) and "--chap-secret-file" in str(info.value)
    with pytest.raises(vdisk.VDiskError):                   # an ACL is not authentication
        check_exposure(host, AuthPolicy(allowed_initiators=frozenset({INITIATOR})), insecure=False)
    check_exposure(host, None, insecure=True)
    check_exposure(host, POLICY, insecure=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.1.2.3"])
def test_loopback_needs_nothing(host):
    check_exposure(host, None, insecure=False)
