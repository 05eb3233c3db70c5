"""The write-ahead journal: every interruption is rolled back or completed, never half-applied."""
from __future__ import annotations

import pytest

import vdisk
from vdisk import journal
from vdisk.io import ImageFile

from maint_crash import Crash, CrashSim, count_mutations, crashing

SIZE = 64 * 1024


def _make(path, pattern=7):
    data = bytes((i * pattern) & 0xFF for i in range(SIZE))
    with open(path, "wb") as f:
        f.write(data)
    return data


def _operation(path):
    """A typical in-place operation: overwrite data, fill a known-zero range, grow, then shrink at commit."""
    f = ImageFile(path, writable=True)
    try:
        with journal.Transaction(f, "test-op") as tx:
            tx.write_many([(100, b"A" * 300), (4096, b"B" * 5000)])
            tx.write(200, b"C" * 1000)                        # overlaps an already journaled range
            tx.write(SIZE, b"D" * 4096)                        # grows the file: no undo data needed
            tx.write(8192, bytes(512), old_zero=False)
            tx.commit(final_size=SIZE - 1024, redo=[(0, b"HEAD"), (SIZE - 1536, b"TAIL")])
    finally:
        f.close()


def _after(before: bytes) -> bytes:
    b = bytearray(before)
    b[100:400] = b"A" * 300
    b[4096:9096] = b"B" * 5000
    b[200:1200] = b"C" * 1000
    b[8192:8704] = bytes(512)
    b[0:4] = b"HEAD"
    b[SIZE - 1536:SIZE - 1532] = b"TAIL"
    return bytes(b[:SIZE - 1024])


def test_a_completed_operation_leaves_no_journal(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    _operation(str(p))
    assert p.read_bytes() == _after(before)
    assert not journal.pending(str(p))


def test_an_exception_inside_the_transaction_rolls_back(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    f = ImageFile(str(p), writable=True)
    with pytest.raises(RuntimeError):
        with journal.Transaction(f, "op") as tx:
            tx.write(10, b"x" * 100)
            tx.write(SIZE + 10, b"y")
            raise RuntimeError("operation failed")
    f.close()
    assert p.read_bytes() == before
    assert not journal.pending(str(p))


@pytest.mark.parametrize("drop", [False, True])
def test_a_crash_at_any_write_recovers_to_before_or_after(tmp_path, drop):
    p = tmp_path / "img.raw"
    before = _make(p)
    after = _after(before)
    total = count_mutations(lambda: _operation(str(p)))
    assert p.read_bytes() == after
    for cut in range(1, total + 1):
        _make(p)
        with crashing(CrashSim(cut_at=cut, drop_unsynced=drop, seed=cut)):
            with pytest.raises(Crash):
                _operation(str(p))
        journal.recover(str(p))
        assert not journal.pending(str(p))
        assert p.read_bytes() in (before, after), f"cut at write {cut}"


def test_recovery_is_idempotent_when_itself_interrupted(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    after = _after(before)
    total = count_mutations(lambda: _operation(str(p)))
    for cut in range(1, total + 1):
        _make(p)
        with crashing(CrashSim(cut_at=cut)):
            with pytest.raises(Crash):
                _operation(str(p))
        if not journal.pending(str(p)):
            continue
        with crashing(CrashSim(cut_at=2)):
            try:
                journal.recover(str(p))
            except Crash:
                pass
        journal.recover(str(p))
        assert p.read_bytes() in (before, after)


def test_read_only_open_refuses_a_pending_journal_and_writable_open_recovers(tmp_path):
    p = tmp_path / "img.vhd"
    with vdisk.create(str(p), 4 << 20, format="vhd") as d:
        d.pwrite(b"\x5a" * 4096, 0)
    pristine = p.read_bytes()
    f = ImageFile(str(p), writable=True)
    with crashing(CrashSim(cut_at=3)):
        with pytest.raises(Crash):
            with journal.Transaction(f, "compact") as tx:
                tx.write(0, b"garbage" * 100)
                tx.write(1000, b"more garbage")
    f.close()
    assert journal.pending(str(p))
    with pytest.raises(vdisk.JournalPendingError, match="vdisk recover"):
        vdisk.open(str(p))
    with vdisk.open(str(p), "r+") as d:          # completes or rolls back first
        assert d.pread(4096, 0) == b"\x5a" * 4096
    assert not journal.pending(str(p))
    assert p.read_bytes() == pristine


def test_a_foreign_file_in_the_journal_place_is_not_applied(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    with open(journal.journal_path(str(p)), "wb") as f:
        f.write(b"hello, I am not a journal")
    with pytest.raises(vdisk.VDiskError, match="not a vdisk journal"):
        journal.recover(str(p))
    assert p.read_bytes() == before


def test_a_torn_journal_header_means_the_image_was_never_touched(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    with open(journal.journal_path(str(p)), "wb") as f:
        f.write(journal.MAGIC + b"\x01\x02")
    r = journal.recover(str(p))
    assert r.action == "discarded"
    assert p.read_bytes() == before
    assert not journal.pending(str(p))


def test_recover_without_a_journal_does_nothing(tmp_path):
    p = tmp_path / "img.raw"
    _make(p)
    assert journal.recover(str(p)).action == "none"


def test_a_failure_after_the_commit_record_completes_instead_of_rolling_back(tmp_path):
    """Once COMMIT is durable the REDO writes may land where no undo data was kept (space the
    operation freed), so an in-process failure must finish the operation, as recovery does."""
    p = tmp_path / "img.raw"
    before = _make(p)
    after = _after(before)
    total = count_mutations(lambda: _operation(str(p)))

    class Failing(CrashSim):
        """Raises once, like ENOSPC, but the process lives on."""
        def __call__(self, kind, file, offset, length):
            if kind != "sync":
                self.count += 1
                if self.count == self.cut_at:
                    raise OSError("simulated I/O error")

    _make(p)
    # The last three mutations are two REDO writes and the truncation; fail the first REDO write.
    with crashing(Failing(cut_at=total - 2)):
        with pytest.raises(OSError):
            _operation(str(p))
    assert not journal.pending(str(p))
    assert p.read_bytes() == after


def test_a_journal_left_by_a_replaced_image_is_never_applied_to_the_new_one(tmp_path):
    p = tmp_path / "img.vhd"
    vdisk.create(str(p), 4 << 20, format="vhd").close()
    f = ImageFile(str(p), writable=True)
    tx = journal.Transaction(f, "compact")
    tx.begin()
    tx.write(600, b"\x01" * 512)
    f.close()
    p.unlink()                                          # the user replaces the image
    vdisk.create(str(p), 4 << 20, format="vhd").close()
    fresh = p.read_bytes()
    with pytest.raises(vdisk.JournalPendingError, match="another file"):
        journal.recover(str(p))
    assert p.read_bytes() == fresh


def test_a_hole_punched_through_a_journaled_file_is_rolled_back(tmp_path):
    p = tmp_path / "img.raw"
    before = _make(p)
    f = ImageFile(str(p), writable=True)
    with pytest.raises(RuntimeError):
        with journal.Transaction(f, "commit") as tx, f.journaled(tx):
            assert f.punch_hole(8192, 16384)          # its old bytes reach the journal first
            assert open(p, "rb").read()[8192:8192 + 16384] == bytes(16384)
            raise RuntimeError("stop")
    f.close()
    assert p.read_bytes() == before
