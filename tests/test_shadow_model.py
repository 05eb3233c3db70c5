"""Shadow copies against a model: every surviving shadow reads exactly the bytes the image held
when it was made, and the live image reads its model, through writes, discards, creates, deletes
(oldest, middle, all), diff-area evictions, reopens and crashes cut at the I/O seam.

After a crash the live image is judged, not adopted: every byte must read its value at the last
completed flush of the live image (creating a shadow and closing flush it) or a value written
over it since; only then does the model go on from what the image reads."""
from __future__ import annotations

import os
import random
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vdisk
import vdisk.io
from vdisk.shadow import ShadowedDisk, open_shadow_view, open_shadowed

SIZE = 1 << 20

from conftest import FAST_TMP


class Crash(Exception):
    """The simulated power cut."""


def make_image(folder: str, kind: str) -> tuple[str, bytearray]:
    """An image of the given kind with some content; returns (path, model)."""
    rng = random.Random(kind)
    model = bytearray(SIZE)
    for _ in range(4):
        off = rng.randrange(0, SIZE - 70000)
        model[off:off + 70000] = bytes([rng.randrange(1, 256)]) * 70000
    if kind.endswith("-diff"):
        fmt = kind.split("-")[0]
        base = os.path.join(folder, f"base.{fmt}")
        with vdisk.create(base, SIZE, format=fmt, block_size=128 << 10 if fmt == "vhd" else 32 << 10) as b:
            b.pwrite(model[:SIZE // 2], 0)
        path = os.path.join(folder, f"child.{fmt}")
        with vdisk.create(path, format=fmt, parent=base) as d:
            d.pwrite(model[SIZE // 2:], SIZE // 2)
        return path, model
    fmt = kind.split("-")[0]
    bs = {"raw": None, "vhd": 128 << 10, "vdi": 32 << 10}[fmt]
    path = os.path.join(folder, f"disk.{fmt}")
    with vdisk.create(path, SIZE, format=fmt, block_size=bs) as d:
        d.pwrite(model, 0)
    return path, model


def crash_close(d: ShadowedDisk) -> None:
    """Drop every file descriptor without flushing anything: what a killed process leaves."""
    for layer in d.layers:
        layer.file.close()
    d.shadow_set.close()


offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 200_000)


class ShadowMachine(RuleBasedStateMachine):
    kind = "vhd-dynamic"

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vdisk-shadow-", dir=FAST_TMP)
        self.path, self.live = make_image(self.tmp, self.kind)
        self.durable = bytes(self.live)                 # the live image at its last flush
        self.since: list[tuple[int, bytes]] = []        # live writes since then
        self.disk = open_shadowed(self.path, "r+")
        self.shadows: list[tuple[str, bytes]] = []      # (id, content at creation), oldest first
        self.limited = False

    def teardown(self):
        vdisk.io.fault_hook = None
        try:
            if not self.disk.closed:
                self.disk.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------
    def _sync_evictions(self) -> None:
        """Shadows may only disappear by eviction of the oldest, and only when a limit is set."""
        alive = [s.id for s in self.disk.shadows]
        ids = [sid for sid, _ in self.shadows]
        gone = [sid for sid in ids if sid not in alive]
        assert ids[len(gone):] == alive, "a shadow other than the oldest disappeared"
        if gone:
            assert self.limited, "shadows disappeared without any limit"
        self.shadows = self.shadows[len(gone):]

    def _written(self, offset: int, data: bytes) -> None:
        self.live[offset:offset + len(data)] = data
        self.since.append((offset, data))

    def _flushed(self) -> None:
        self.durable = bytes(self.live)
        self.since = []

    def _judge_live_after_crash(self, cut_write: tuple | None, flushed: bool) -> None:
        """The live image after a crash: each byte its value at the last flush or one written
        since (*cut_write*, the cut operation's own, included); exactly the model when the
        crash came after a flush that nothing followed. The model then goes on from it."""
        got = self.disk.pread(SIZE, 0)
        if flushed:
            assert got == self.live, "the live image lost writes that a completed flush made durable"
        g = np.frombuffer(got, np.uint8)
        ok = g == np.frombuffer(self.durable, np.uint8)
        for off, data in self.since + ([cut_write] if cut_write else []):
            ok[off:off + len(data)] |= g[off:off + len(data)] == np.frombuffer(data, np.uint8)
        bad = np.flatnonzero(~ok)
        assert not len(bad), (f"{len(bad)} live bytes read neither their value at the last flush nor one "
                              f"written since, first at {int(bad[0])}")
        self.live[:] = got
        self._flushed()

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset, min(length, SIZE - offset)

    def _reopen(self) -> None:
        self.disk = open_shadowed(self.path, "r+")
        assert all(s.valid for s in self.disk.shadows), self.disk.shadow_notes

    def _with_crash_at(self, cut: int, torn: bool, action) -> bool:
        """Run *action* with the I/O seam cut at its *cut*-th mutating call; True if it crashed.

        A torn cut of a diff-area append lets the file grow to its full length with the second
        half of the bytes never written (zeros), as a power cut between data pages can leave it.
        """
        calls = [0]
        real_pwritev = vdisk.io.ImageFile.pwritev

        def hook(kind, file, offset, length):
            calls[0] += 1
            if calls[0] == cut:
                raise Crash(f"cut at {kind} of {file.path}")

        def tearing_pwritev(file, buffers, offset):
            if calls[0] + 1 == cut and torn and file.path.endswith(".store"):
                calls[0] += 1
                data = bytearray(b"".join(bytes(b) for b in buffers))
                half = len(data) // 2
                data[half:] = bytes(len(data) - half)
                os.pwrite(file.fd, data, offset)
                raise Crash(f"torn append to {file.path}")
            return real_pwritev(file, buffers, offset)

        vdisk.io.fault_hook = hook
        vdisk.io.ImageFile.pwritev = tearing_pwritev
        try:
            action()
            return False
        except Crash:
            return True
        finally:
            vdisk.io.fault_hook = None
            vdisk.io.ImageFile.pwritev = real_pwritev

    # -- live changes --------------------------------------------------------------------------
    @rule(offset=offsets, length=lengths, value=st.integers(0, 255))
    def write(self, offset, length, value):
        offset, length = self._span(offset, length)
        self.disk.pwrite(bytes([value]) * length, offset)
        self._written(offset, bytes([value]) * length)
        self._sync_evictions()

    @rule(offset=offsets, length=lengths)
    def write_zeroes(self, offset, length):
        offset, length = self._span(offset, length)
        self.disk.write_zeroes(offset, length)
        self._written(offset, bytes(length))
        self._sync_evictions()

    @rule(offset=offsets, length=lengths)
    def discard(self, offset, length):
        offset, length = self._span(offset, length)
        self.disk.discard(offset, length)
        self._written(offset, bytes(length))
        self._sync_evictions()

    # -- shadows -------------------------------------------------------------------------------
    @rule()
    def create(self):
        info = self.disk.create_shadow("model")
        self._flushed()
        self.shadows.append((info.id, bytes(self.live)))
        self._sync_evictions()
        assert len(self.disk.shadows) <= self.disk.shadow_set.catalog.max_shadows

    @precondition(lambda self: self.shadows)
    @rule()
    def delete_oldest(self):
        assert self.disk.delete_oldest_shadow() == self.shadows.pop(0)[0]

    @precondition(lambda self: len(self.shadows) >= 3)
    @rule(data=st.data())
    def delete_middle(self, data):
        i = data.draw(st.integers(1, len(self.shadows) - 2))
        self.disk.delete_shadow(self.shadows.pop(i)[0])

    @precondition(lambda self: self.shadows)
    @rule()
    def delete_newest(self):
        self.disk.delete_shadow(self.shadows.pop()[0])

    @precondition(lambda self: self.shadows)
    @rule()
    def delete_all(self):
        assert self.disk.delete_all_shadows() == len(self.shadows)
        self.shadows = []

    @rule(max_bytes=st.sampled_from([None, 300_000, 1_000_000]), max_count=st.sampled_from([None, 2, 64]))
    def set_limits(self, max_bytes, max_count):
        self.disk.set_shadow_limits(max_shadows=max_count, max_diff_bytes=max_bytes)
        self.limited = True
        self._sync_evictions()
        limit = self.disk.shadow_set.catalog.max_diff_bytes
        if limit is not None:
            assert self.disk.shadow_set.diff_area_bytes() <= limit

    @rule()
    def reopen(self):
        self.disk.close()
        self._flushed()
        if self.shadows:
            sid, content = self.shadows[0]
            with open_shadow_view(self.path, sid) as view:     # a read-only open of one shadow
                assert view.pread(SIZE, 0) == content
        self._reopen()

    # -- crashes -------------------------------------------------------------------------------
    @rule(cut=st.integers(1, 12), torn=st.booleans(), offset=offsets, length=lengths, value=st.integers(1, 255),
          op=st.sampled_from(["write", "discard", "create", "delete", "close"]))
    def crash(self, cut, torn, offset, length, value, op):
        offset, length = self._span(offset, length)
        before = [sid for sid, _ in self.shadows]
        actions = {
            "write": lambda: self.disk.pwrite(bytes([value]) * length, offset),
            "discard": lambda: self.disk.discard(offset, length),
            "create": lambda: self.disk.create_shadow("crash"),
            "delete": lambda: self.disk.delete_shadow(before[len(before) // 2]) if before else None,
            "close": self.disk.close,
        }
        crashed = self._with_crash_at(cut, torn, actions[op])
        if not crashed:
            if op == "close":
                self._reopen()
            self._adopt(op, offset, length, value, before, exact=True)
            return
        crash_close(self.disk)
        self._reopen()
        self._adopt(op, offset, length, value, before, exact=False)

    def _adopt(self, op, offset, length, value, before, exact):
        """Bring the model in line with an operation that finished, or judge the live image
        after one cut at any point (a kill: shadows must stay exact regardless)."""
        alive = [s.id for s in self.disk.shadows]
        new = bytes([value]) * length if op == "write" else bytes(length) if op == "discard" else None
        extra = [sid for sid in alive if sid not in before] if op == "create" else []
        if exact:
            if new is not None:
                self._written(offset, new)
            if op in ("create", "close"):
                self._flushed()
        else:
            # A shadow that exists was made after create's flush, and nothing followed it.
            self._judge_live_after_crash((offset, new) if new is not None else None, flushed=bool(extra))
        if op in ("write", "discard"):
            self._sync_evictions()
        elif op == "create":
            assert len(extra) <= 1 and (exact is False or len(extra) == 1)
            if extra:
                self.shadows.append((extra[0], bytes(self.live)))
            self._sync_evictions()
        elif op == "delete":
            self.shadows = [(sid, c) for sid, c in self.shadows if sid in alive]
            if exact and before:
                assert before[len(before) // 2] not in alive
        else:
            self._sync_evictions()

    # -- what must always hold -----------------------------------------------------------------
    @invariant()
    def live_reads_model(self):
        assert self.disk.pread(SIZE, 0) == self.live

    @invariant()
    def shadows_read_their_creation_bytes(self):
        assert [s.id for s in self.disk.shadows] == [sid for sid, _ in self.shadows]
        for sid, content in self.shadows:
            view = self.disk.shadow_view(sid)
            assert view.pread(SIZE, 0) == content, f"shadow {sid} changed"

    @invariant()
    def diff_lists_exactly_the_changed_sectors(self):
        if not self.shadows:
            return
        sid, content = self.shadows[0]
        got = self.disk.diff(sid, "live")
        changed = set()
        for off, n in got:
            assert off % 512 == 0 and n > 0
            changed.update(range(off // 512, -(-(off + n) // 512)))
        expect = {i for i in range(SIZE // 512) if content[i * 512:(i + 1) * 512] != self.live[i * 512:(i + 1) * 512]}
        assert changed == expect
        assert got == sorted(got)


SETTINGS = settings(max_examples=50, stateful_step_count=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _machine(kind: str):
    cls = type(f"ShadowMachine_{kind.replace('-', '_')}", (ShadowMachine,), {"kind": kind})
    cls.TestCase.settings = SETTINGS
    return cls.TestCase


TestShadowsRaw = _machine("raw-flat")
TestShadowsVhdDynamic = _machine("vhd-dynamic")
TestShadowsVdiDynamic = _machine("vdi-dynamic")
TestShadowsVhdDifferencing = _machine("vhd-diff")
TestShadowsVdiDifferencing = _machine("vdi-diff")
