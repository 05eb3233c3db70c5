"""The iSCSI PDU codec and connection state machine, driven without a network (RFC 7143 subset)."""
from __future__ import annotations

import struct

import pytest

from vdisk.serve.iscsi_pdu import (BHS_LEN, OP_DATA_IN, OP_LOGIN_RSP, OP_LOGOUT_RSP, OP_NOP_IN,
                                   OP_R2T, OP_REJECT, OP_SCSI_RSP, OP_TEXT_RSP, OP_TMF_RSP,
                                   TARGET_MAX_BURST, TARGET_MAX_RECV_DSL, Pdu, PduReader,
                                   ProtocolError, ScsiTask, TargetConnection, build_text,
                                   decode_lun, encode_lun, parse_text)

IQN = "iqn.2026-01.org.vdisk:test"
INITIATOR = "iqn.2026-01.org.example:host"


def pdu(opcode, flags=0, *, itt=1, data=b"", immediate=False, fields=None):
    """A request PDU; ``fields`` maps byte offsets to u32 values."""
    bhs = bytearray(BHS_LEN)
    bhs[0] = opcode | (0x40 if immediate else 0)
    bhs[1] = flags
    bhs[5:8] = len(data).to_bytes(3, "big")
    struct.pack_into(">I", bhs, 16, itt)
    for offset, value in (fields or {}).items():
        struct.pack_into(">I", bhs, offset, value)
    return Pdu(bytes(bhs), b"", data)


def parse(raw: bytes) -> list[Pdu]:
    return list(PduReader().feed(raw))


def one(actions) -> Pdu:
    [raw] = actions
    [out] = parse(raw)
    return out


def login_pdu(keys, csg, nsg, transit=True, cmdsn=0, exp_stat=0):
    flags = (0x80 if transit else 0) | (csg << 2) | nsg
    return pdu(0x03, flags, immediate=True, data=build_text(keys), fields={24: cmdsn, 28: exp_stat})


def logged_in(**kwargs) -> TargetConnection:
    conn = TargetConnection(IQN, "127.0.0.1:3260", **kwargs)
    one(conn.receive(login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN),
                                ("SessionType", "Normal"), ("AuthMethod", "None")], 0, 1)))
    one(conn.receive(login_pdu([("MaxRecvDataSegmentLength", "4096"), ("MaxBurstLength", "8192"),
                                ("FirstBurstLength", "4096"), ("ImmediateData", "Yes")], 1, 3)))
    assert conn.full_feature
    return conn


def scsi_cmd(cdb, *, read=False, write=False, edtl=0, data=b"", itt=7, cmdsn=0, lun=0):
    flags = 0x80 | (0x40 if read else 0) | (0x20 if write else 0)
    p = pdu(0x01, flags, itt=itt, data=data, fields={20: edtl, 24: cmdsn})
    bhs = bytearray(p.bhs)
    bhs[8:16] = encode_lun(lun)
    bhs[32:32 + len(cdb)] = cdb
    return Pdu(bytes(bhs), b"", data)


# -- codec ----------------------------------------------------------------------------------------
def test_reader_reassembles_fragmented_and_padded_pdus():
    a = pdu(0x00, 0x80, itt=5, data=b"abcde")
    b = pdu(0x06, 0x80, itt=6)
    stream = a.bhs + a.data + b"\x00\x00\x00" + b.bhs
    reader, got = PduReader(), []
    for i in range(0, len(stream), 7):
        got += list(reader.feed(stream[i:i + 7]))
    assert [(p.opcode, p.itt, p.data) for p in got] == [(0x00, 5, b"abcde"), (0x06, 6, b"")]


def test_reader_refuses_absurd_data_segments():
    bhs = bytearray(BHS_LEN)
    bhs[5:8] = (0xFFFFFF).to_bytes(3, "big")
    with pytest.raises(ProtocolError):
        list(PduReader(max_dsl=1 << 20).feed(bytes(bhs)))


def test_text_keys_and_luns_round_trip():
    pairs = [("InitiatorName", INITIATOR), ("X-odd", "a=b")]
    assert parse_text(build_text(pairs)) == pairs
    with pytest.raises(ProtocolError):
        parse_text(b"novalue\x00")
    assert decode_lun(encode_lun(0)) == 0 and decode_lun(encode_lun(5)) == 5
    assert decode_lun(encode_lun(300)) == 300


# -- login ----------------------------------------------------------------------------------------
def test_login_negotiates_and_enters_full_feature_phase():
    conn = TargetConnection(IQN, "127.0.0.1:3260", tsih=9)
    r = one(conn.receive(login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN),
                                    ("SessionType", "Normal"), ("AuthMethod", "CHAP,None")], 0, 1,
                                   exp_stat=100)))
    assert r.opcode == OP_LOGIN_RSP and r.flags == 0x80 | (0 << 2) | 1
    assert (r.bhs[36], r.bhs[37]) == (0, 0)
    keys = dict(parse_text(r.data))
    assert keys["AuthMethod"] == "None" and keys["TargetPortalGroupTag"] == "1"
    assert r.u32(24) == 100                                       # StatSN starts at ExpStatSN
    r = one(conn.receive(login_pdu([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"),
                                    ("MaxRecvDataSegmentLength", "4096"),
                                    ("MaxBurstLength", "16776192"), ("FirstBurstLength", "65536"),
                                    ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                                    ("MaxOutstandingR2T", "8"), ("ErrorRecoveryLevel", "2"),
                                    ("X-com.example.thing", "1")], 1, 3)))
    assert r.flags == 0x80 | (1 << 2) | 3
    assert struct.unpack(">H", r.bhs[14:16])[0] == 9              # TSIH on the final response
    keys = dict(parse_text(r.data))
    assert keys["HeaderDigest"] == "None" and keys["DataDigest"] == "None"
    assert keys["MaxBurstLength"] == str(TARGET_MAX_BURST)
    assert keys["InitialR2T"] == "Yes" and keys["ImmediateData"] == "Yes"
    assert keys["MaxOutstandingR2T"] == "1" and keys["ErrorRecoveryLevel"] == "0"
    assert keys["X-com.example.thing"] == "NotUnderstood"
    assert keys["MaxRecvDataSegmentLength"] == str(TARGET_MAX_RECV_DSL)
    assert conn.full_feature and conn.params.max_recv_dsl_initiator == 4096


@pytest.mark.parametrize("keys,detail", [
    ([("InitiatorName", INITIATOR), ("TargetName", "iqn.2000-01.org.example:other")], 0x03),
    ([("TargetName", IQN)], 0x07),                                                   # no initiator
    ([("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP")], 0x01),
    ([("InitiatorName", INITIATOR), ("SessionType", "Weird")], 0x07),
])
def test_login_failures_end_the_connection(keys, detail):
    conn = TargetConnection(IQN, "127.0.0.1:3260")
    r = one(conn.receive(login_pdu(keys, 0, 1)))
    assert (r.bhs[36], r.bhs[37]) == (0x02, detail)
    assert conn.closed and not conn.full_feature


def test_commands_before_login_are_a_protocol_error():
    conn = TargetConnection(IQN, "127.0.0.1:3260")
    with pytest.raises(ProtocolError):
        conn.receive(scsi_cmd(bytes(6)))


def test_discovery_session_answers_send_targets():
    conn = TargetConnection(IQN, "127.0.0.1:3260")
    one(conn.receive(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")], 0, 3)))
    r = one(conn.receive(pdu(0x04, 0x80, itt=3, data=build_text([("SendTargets", "All")]))))
    assert r.opcode == OP_TEXT_RSP and r.itt == 3
    assert parse_text(r.data) == [("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")]
    assert one(conn.receive(scsi_cmd(bytes(6)))).opcode == OP_REJECT


# -- full feature phase ----------------------------------------------------------------------------
def test_read_data_is_split_to_the_initiators_segment_size():
    conn = logged_in()
    [task] = conn.receive(scsi_cmd(b"\x28" + bytes(9), read=True, edtl=12288, itt=42))
    assert isinstance(task, ScsiTask) and task.itt == 42 and task.read
    stat = conn.stat_sn
    pdus = [p for raw in conn.complete(task, 0, bytes(range(256)) * 40, b"") for p in parse(raw)]
    assert [p.opcode for p in pdus] == [OP_DATA_IN] * 3
    assert [len(p.data) for p in pdus] == [4096, 4096, 2048]       # MaxRecvDataSegmentLength 4096
    assert [p.u32(36) for p in pdus] == [0, 1, 2]                   # DataSN
    assert [p.u32(40) for p in pdus] == [0, 4096, 8192]             # buffer offset
    last = pdus[-1]
    assert last.flags & 0x81 == 0x81 and last.bhs[3] == 0           # F and S: status rides here
    assert last.flags & 0x02 and last.u32(44) == 12288 - 10240      # underflow residual
    assert last.u32(24) == stat and conn.stat_sn == stat + 1
    assert not pdus[0].flags & 0x80 and pdus[1].flags & 0x80        # F closes each 8 KiB burst


def test_data_beyond_the_expected_length_is_an_overflow():
    conn = logged_in()
    [task] = conn.receive(scsi_cmd(b"\x12" + bytes(5), read=True, edtl=36))
    [last] = parse(b"".join(conn.complete(task, 0, bytes(96), b"")))
    assert len(last.data) == 36 and last.flags & 0x04 and last.u32(44) == 60


def test_check_condition_carries_sense_in_the_response():
    conn = logged_in()
    [task] = conn.receive(scsi_cmd(b"\x28" + bytes(9), read=True, edtl=512))
    sense = bytes((0x70, 0, 5)) + bytes(15)
    r = one(conn.complete(task, 0x02, b"", sense))
    assert r.opcode == OP_SCSI_RSP and r.bhs[3] == 0x02
    assert r.data == struct.pack(">H", 18) + sense


def test_write_gets_immediate_data_then_solicits_the_rest():
    conn = logged_in(data_out_length=lambda cdb: 16384)
    payload = bytes(range(256)) * 64
    r2t = one(conn.receive(scsi_cmd(b"\x2a" + bytes(9), write=True, edtl=16384,
                                    data=payload[:4096], itt=9)))
    assert r2t.opcode == OP_R2T and r2t.itt == 9
    ttt, (r2tsn, offset, length) = r2t.u32(20), struct.unpack(">III", r2t.bhs[36:48])
    assert (r2tsn, offset, length) == (0, 4096, 8192)              # MaxBurstLength 8192
    out = conn.receive(pdu(0x05, 0x00, itt=9, data=payload[4096:8192], fields={20: ttt, 40: 4096}))
    assert out == []
    r2t = one(conn.receive(pdu(0x05, 0x80, itt=9, data=payload[8192:12288],
                               fields={20: ttt, 36: 1, 40: 8192})))
    ttt2, (r2tsn, offset, length) = r2t.u32(20), struct.unpack(">III", r2t.bhs[36:48])
    assert (r2tsn, offset, length) == (1, 12288, 4096) and ttt2 != ttt
    [task] = conn.receive(pdu(0x05, 0x80, itt=9, data=payload[12288:], fields={20: ttt2, 40: 12288}))
    assert isinstance(task, ScsiTask) and task.data_out == payload
    r = one(conn.complete(task, 0, b"", b""))
    assert r.opcode == OP_SCSI_RSP and r.bhs[3] == 0 and r.u32(36) == 2   # ExpDataSN = R2Ts


def test_write_residual_when_the_initiator_expects_more_than_the_command_needs():
    conn = logged_in(data_out_length=lambda cdb: 512)
    [task] = conn.receive(scsi_cmd(b"\x2a" + bytes(9), write=True, edtl=1024, data=bytes(1024)))
    assert len(task.data_out) == 512
    r = one(conn.complete(task, 0, b"", b""))
    assert r.flags & 0x02 and r.u32(44) == 512


def test_data_out_for_an_unknown_transfer_is_rejected():
    conn = logged_in()
    r = one(conn.receive(pdu(0x05, 0x80, itt=77, data=bytes(512), fields={20: 5})))
    assert r.opcode == OP_REJECT


def test_command_numbers_advance_and_the_window_stays_open():
    conn = logged_in()
    for sn in range(3):
        [task] = conn.receive(scsi_cmd(bytes(6), cmdsn=sn, itt=sn + 1))
        r = one(conn.complete(task, 0, b"", b""))
        assert r.u32(28) == sn + 1 and r.u32(32) == sn + 1 + 31    # ExpCmdSN, MaxCmdSN
    nop = pdu(0x00, 0x80, itt=50, immediate=True, data=b"ping", fields={20: 0xFFFFFFFF, 24: 3})
    r = one(conn.receive(nop))
    assert r.opcode == OP_NOP_IN and r.itt == 50 and r.data == b"ping"
    assert r.u32(28) == 3                                          # immediate: CmdSN not used
    assert conn.receive(pdu(0x00, 0x80, itt=0xFFFFFFFF, fields={20: 0xFFFFFFFF})) == []


def test_lun_reset_is_passed_on_and_answered():
    resets = []
    conn = logged_in(on_reset=lambda: resets.append(1))
    r = one(conn.receive(pdu(0x02, 0x80 | 5, itt=11, immediate=True)))
    assert r.opcode == OP_TMF_RSP and r.bhs[2] == 0 and resets == [1]
    r = one(conn.receive(pdu(0x02, 0x80 | 8, itt=12, immediate=True)))   # TASK REASSIGN
    assert r.bhs[2] == 0x05


def test_commands_outside_the_cmdsn_window_are_ignored():
    conn = logged_in()
    assert conn.receive(scsi_cmd(bytes(6), cmdsn=5)) == []          # too high
    [task] = conn.receive(scsi_cmd(bytes(6), cmdsn=0))
    conn.complete(task, 0, b"", b"")
    assert conn.receive(scsi_cmd(bytes(6), cmdsn=0, itt=8)) == []   # too low: already used
    assert conn.exp_cmd_sn == 1


def test_a_data_sequence_error_fails_the_command_not_the_session():
    conn = logged_in(data_out_length=lambda cdb: 8192)
    r2t = one(conn.receive(scsi_cmd(b"\x2a" + bytes(9), write=True, edtl=8192, itt=30)))
    r = one(conn.receive(pdu(0x05, 0x80, itt=30, data=bytes(4096),
                             fields={20: r2t.u32(20), 36: 27})))          # DataSN 27, not 0
    assert r.opcode == OP_SCSI_RSP and r.itt == 30 and r.bhs[3] == 0x02
    assert r.data[2 + 2] & 0x0F == 0x0B and r.data[2 + 12] == 0x4B      # ABORTED COMMAND / 4B
    [task] = conn.receive(scsi_cmd(bytes(6), itt=31, cmdsn=1))          # the session goes on
    assert task.itt == 31


def test_a_short_write_is_clipped_to_what_the_initiator_sends():
    clipped = []

    def clip(cdb, nbytes):
        clipped.append(nbytes)
        return b"clipped"

    conn = logged_in(data_out_length=lambda cdb: 1024, clip_transfer=clip)
    [task] = conn.receive(scsi_cmd(b"\x2a" + bytes(9), write=True, edtl=512, data=bytes(512)))
    assert task.exec_cdb == b"clipped" and clipped == [512] and len(task.data_out) == 512
    r = one(conn.complete(task, 0, b"", b""))
    assert r.flags & 0x04 and r.u32(44) == 512                          # overflow residual


def test_abort_of_a_finished_task_says_it_does_not_exist():
    conn = logged_in()
    [task] = conn.receive(scsi_cmd(bytes(6), itt=40))
    conn.complete(task, 0, b"", b"")
    r = one(conn.receive(pdu(0x02, 0x80 | 1, itt=41, immediate=True, fields={20: 40})))
    assert r.opcode == OP_TMF_RSP and r.bhs[2] == 0x01


def test_aborted_task_gets_no_response():
    conn = logged_in(data_out_length=lambda cdb: 8192)
    r2t = one(conn.receive(scsi_cmd(b"\x2a" + bytes(9), write=True, edtl=8192, itt=21)))
    assert r2t.opcode == OP_R2T
    r = one(conn.receive(pdu(0x02, 0x80 | 1, itt=22, immediate=True, fields={20: 21})))
    assert r.bhs[2] == 0
    assert one(conn.receive(pdu(0x05, 0x80, itt=21, data=bytes(8192), fields={20: r2t.u32(20)}))).opcode == OP_REJECT


def test_unknown_opcode_is_rejected_and_logout_closes():
    conn = logged_in()
    r = one(conn.receive(pdu(0x1C, 0x80, itt=5)))
    assert r.opcode == OP_REJECT and r.bhs[2] == 0x05                  # command not supported
    assert r.data[:BHS_LEN][0] & 0x3F == 0x1C                           # the rejected header
    r = one(conn.receive(pdu(0x06, 0x80, itt=6, immediate=True)))
    assert r.opcode == OP_LOGOUT_RSP and r.bhs[2] == 0 and conn.closed
