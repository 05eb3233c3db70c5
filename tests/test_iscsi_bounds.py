"""Memory and arithmetic bounds of the iSCSI target against initiators that announce more than
they send (issue 13, items 2 and 6).

A write's data-out is reserved against a per-connection and a target-wide budget before it is
solicited and allocated only as it arrives; a write that fails whatever data comes (write
protect, out of range, longer than one command) is answered before any data is asked for; what
does not fit gets TASK SET FULL. Residuals that do not fit in 32 bits saturate.
"""
from __future__ import annotations

import functools
import struct
import tracemalloc

import pytest

import vdisk
from vdisk.devices.scsi import MAX_TRANSFER_BLOCKS, ScsiDisk
from vdisk.devices.scsi_sense import CHECK_CONDITION, TASK_SET_FULL, decode_sense
from vdisk.serve.iscsi import start_iscsi_server
from vdisk.serve.iscsi_pdu import (MAX_CONNECTION_DATA_OUT, OP_R2T, OP_SCSI_RSP, DataOutBudget,
                                   PduReader, ScsiTask, TargetConnection)

from test_iscsi_pdu import logged_in, pdu, scsi_cmd
from test_iscsi_support import RawInitiator

MiB = 1 << 20


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


@pytest.fixture(params=[False, True], ids=["read-only", "writable"])
def lu(request, tmp_path):
    path = str(tmp_path / "lu.raw")
    vdisk.create(path, 64 * MiB, format="raw").close()
    with vdisk.open(path, "r+" if request.param else "r") as d:
        yield ScsiDisk(d)


def connect(lu: ScsiDisk, budget=None) -> TargetConnection:
    nexus = object()
    return logged_in(data_out_length=lu.data_out_length, clip_transfer=lu.clip_transfer,
                     refuse_before_data=functools.partial(lu.refuse_before_data, nexus=nexus),
                     budget=budget)


def run(conn: TargetConnection, lu: ScsiDisk, actions) -> list:
    """Execute the tasks among ``actions`` as the server does; parsed PDUs out."""
    out = []
    for action in actions:
        if isinstance(action, ScsiTask):
            res = lu.execute_lun(action.lun, action.exec_cdb or action.cdb, action.data_out)
            action = b"".join(conn.complete(action, res.status, res.data_in, res.sense))
        out += list(PduReader().feed(action))
    return out


def test_a_write_of_8_gib_announced_with_no_data_fails_cleanly(lu):
    """0x01000000 blocks = 8 GiB: the residual (>= 2^32) saturates; the session goes on."""
    conn = connect(lu)
    for cmdsn, (write_flag, edtl) in enumerate([(True, 0), (False, 0)]):
        [rsp] = run(conn, lu, conn.receive(scsi_cmd(write16(0, 0x01000000), write=write_flag,
                                                    edtl=edtl, itt=cmdsn + 1, cmdsn=cmdsn)))
        assert rsp.opcode == OP_SCSI_RSP
        # clipped to the announced 0 bytes (iSCSI overflow), the write moves nothing
        assert rsp.bhs[3] == (CHECK_CONDITION if lu.read_only or not write_flag else 0)
        if write_flag:
            assert rsp.flags & 0x04 and rsp.u32(44) == 0xFFFFFFFF   # overflow, saturated
    [rsp] = run(conn, lu, conn.receive(scsi_cmd(bytes(6), itt=9, cmdsn=2)))   # TEST UNIT READY
    assert rsp.opcode == OP_SCSI_RSP and rsp.itt == 9


def test_48_writes_of_64_mib_with_no_data_cost_no_memory(lu):
    """64 MiB is more than one command may move: refused at once, nothing solicited."""
    conn = connect(lu)
    tracemalloc.start()
    try:
        for i in range(48):
            [rsp] = run(conn, lu, conn.receive(scsi_cmd(write16(0, 64 * MiB // 512), write=True,
                                                        edtl=64 * MiB, itt=i + 1, cmdsn=i)))
            assert rsp.opcode == OP_SCSI_RSP and rsp.bhs[3] == CHECK_CONDITION
            key = decode_sense(rsp.data[2:])[0]
            assert key == (0x7 if lu.read_only else 0x5)            # DATA PROTECT / ILLEGAL REQUEST
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_writes_beyond_the_connection_budget_get_task_set_full(tmp_path):
    path = str(tmp_path / "rw.raw")
    vdisk.create(path, 64 * MiB, format="raw").close()
    with vdisk.open(path, "r+") as d:
        lu = ScsiDisk(d)
        conn = connect(lu)
        per_write = MAX_TRANSFER_BLOCKS * 512
        fits = MAX_CONNECTION_DATA_OUT // per_write
        tracemalloc.start()
        try:
            outcomes = []
            for i in range(48):
                [out] = run(conn, lu, conn.receive(scsi_cmd(write16(0, MAX_TRANSFER_BLOCKS), write=True,
                                                            edtl=per_write, itt=i + 1, cmdsn=i)))
                outcomes.append("R2T" if out.opcode == OP_R2T else out.bhs[3])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert outcomes == ["R2T"] * fits + [TASK_SET_FULL] * (48 - fits)
        assert peak < 4 * MiB                                   # reserved, not allocated
        conn.release()                                          # the initiator went away
        assert conn._budget.used == 0


def test_the_target_wide_budget_is_shared_and_given_back(tmp_path):
    path = str(tmp_path / "rw.raw")
    vdisk.create(path, 64 * MiB, format="raw").close()
    with vdisk.open(path, "r+") as d:
        lu = ScsiDisk(d)
        budget = DataOutBudget(limit=48 * 1024)
        a, b = connect(lu, budget), connect(lu, budget)
        [r2t] = run(a, lu, a.receive(scsi_cmd(write16(0, 64), write=True, edtl=32768, itt=1)))
        assert r2t.opcode == OP_R2T and budget.used == 32768
        [full] = run(b, lu, b.receive(scsi_cmd(write16(64, 64), write=True, edtl=32768, itt=1)))
        assert full.opcode == OP_SCSI_RSP and full.bhs[3] == TASK_SET_FULL
        # the data arrives burst by burst; the buffer grows with it and the budget comes back
        payload = bytes(range(256)) * 128
        out = r2t
        while out.opcode == OP_R2T:
            offset, length = out.u32(40), out.u32(44)
            [out] = run(a, lu, a.receive(pdu(0x05, 0x80, itt=1, data=payload[offset:offset + length],
                                             fields={20: out.u32(20), 40: offset})))
            if out.opcode == OP_R2T:
                assert len(a._tasks[1].buffer) == offset + length < 32768
        done = [out]
        assert done[-1].opcode == OP_SCSI_RSP and done[-1].bhs[3] == 0
        assert budget.used == 0 and d.pread(32768, 0) == payload
        [r2t] = run(b, lu, b.receive(scsi_cmd(write16(64, 64), write=True, edtl=32768, itt=2, cmdsn=1)))
        assert r2t.opcode == OP_R2T                              # now it fits


def test_a_hostile_initiator_over_tcp_leaves_the_target_small_and_serving(tmp_path):
    """The issue's reproduction on a real socket: 48 WRITE(16)s of 64 MiB, never any data, on a
    read-only target, then an 8 GiB write with no data; the target answers each and stays up."""
    path = str(tmp_path / "ro.raw")
    vdisk.create(path, 64 * MiB, format="raw").close()
    tracemalloc.start()
    try:
        with start_iscsi_server(path, rw=False) as srv:
            with RawInitiator(srv.port) as ini:
                assert ini.login(srv.iqn) == (0, 0)
                for _ in range(48):
                    ini.command(write16(0, 64 * MiB // 512), write=True, edtl=64 * MiB)
                ini.command(write16(0, 0x01000000), write=True, edtl=0)
                replies = [ini.recv() for _ in range(49)]
                assert all(r is not None and r.opcode == OP_SCSI_RSP for r in replies)
                ini.command(bytes(6))                             # TEST UNIT READY
                assert ini.recv().bhs[3] == 0
            with RawInitiator(srv.port) as other:                # and others still get in
                assert other.login(srv.iqn) == (0, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB
