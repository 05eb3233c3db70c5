"""The diff-area store: an append-only log whose records carry their own index entry and checksums."""
from __future__ import annotations

import os
import uuid

import pytest

from vdisk.errors import FormatError
from vdisk.shadow.store import FILE_HEADER_SIZE, REC_SIZE, ShadowStore

BS = 4096
SID = uuid.UUID(int=7)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "s.store")


def test_appended_blocks_read_back_after_reopen(path):
    s = ShadowStore.create(path, BS, SID)
    s.append([(3, BS, b"a" * BS), (9, BS, None), (1, 100, b"b" * 100)])
    s.close()
    s = ShadowStore.open(path, BS, SID, synced=0, writable=False)
    assert sorted(s.blocks()) == [1, 3, 9]
    assert s.read_block(3) == b"a" * BS
    assert s.read_block(9) == bytes(BS)             # a zero record stores no data
    assert s.read_block(1) == b"b" * 100
    assert s.nbytes == FILE_HEADER_SIZE + 3 * REC_SIZE + BS + 100


def test_a_block_is_preserved_once(path):
    s = ShadowStore.create(path, BS, SID)
    s.append([(3, BS, b"a" * BS)])
    s.append([(3, BS, b"z" * BS)])
    assert s.read_block(3) == b"a" * BS
    assert s.nbytes == FILE_HEADER_SIZE + REC_SIZE + BS


def _torn_tail(path):
    """A store whose last record's header reached the disk but half of its data did not."""
    s = ShadowStore.create(path, BS, SID)
    s.append([(1, BS, b"x" * BS)])
    good_end = s.nbytes
    s.append([(2, BS, b"y" * BS)])
    s.close()
    with open(path, "r+b") as f:
        f.seek(good_end + REC_SIZE + BS // 2)
        f.write(bytes(BS // 2))
    return good_end


def test_a_torn_append_is_ignored_when_reading(path):
    good_end = _torn_tail(path)
    s = ShadowStore.open(path, BS, SID, synced=good_end, writable=False)
    assert list(s.blocks()) == [1]
    assert os.path.getsize(path) > good_end             # a reader never cuts the file


def test_a_torn_append_is_cut_when_opened_for_writing(path):
    good_end = _torn_tail(path)
    s = ShadowStore.open(path, BS, SID, synced=good_end, writable=True)
    assert list(s.blocks()) == [1]
    assert os.path.getsize(path) == good_end
    s.append([(2, BS, b"w" * BS)])
    s.close()
    s = ShadowStore.open(path, BS, SID, synced=0, writable=False)
    assert s.read_block(2) == b"w" * BS


def test_records_below_the_synced_mark_are_trusted_without_reading_their_data(path):
    good_end = _torn_tail(path)
    whole = ShadowStore.open(path, BS, SID, synced=os.path.getsize(path), writable=False)
    assert sorted(whole.blocks()) == [1, 2]              # the catalog vouches for it: no data check


def test_a_truncated_record_is_ignored(path):
    s = ShadowStore.create(path, BS, SID)
    s.append([(1, BS, b"x" * BS), (2, BS, b"y" * BS)])
    s.close()
    os.truncate(path, os.path.getsize(path) - 10)
    assert list(ShadowStore.open(path, BS, SID, synced=0, writable=False).blocks()) == [1]


def test_a_store_of_another_shadow_is_refused(path):
    ShadowStore.create(path, BS, SID).close()
    with pytest.raises(FormatError, match="belongs to shadow"):
        ShadowStore.open(path, BS, uuid.UUID(int=8), synced=0, writable=False)
    with pytest.raises(FormatError, match="belongs to shadow"):
        ShadowStore.open(path, 2 * BS, SID, synced=0, writable=False)


def test_a_file_that_is_not_a_store_is_refused(path):
    with open(path, "wb") as f:
        f.write(b"hello" * 100)
    with pytest.raises(FormatError, match="shadow store header"):
        ShadowStore.open(path, BS, SID, synced=0, writable=False)
