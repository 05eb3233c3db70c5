"""Snapshot trees against a model: take / revert / delete sequences on VHD and VDI images.

After every step IMAGE reads the current state, every snapshot's frozen file reads the state it
froze, every file of the tree passes `vdisk check`, and (VHD) libvhdi reads the current chain.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vdisk
from vdisk import snapshot
from vdisk.ops.check import check

SIZE = 4 << 20
PAGE = 4096           # 4 KiB-aligned writes: libvhdi mis-reads partly set VHD bitmap bytes

from conftest import FAST_TMP, need_module


def open_in_tree(image: str, path: str, mode: str = "r"):
    return vdisk.open(path, mode, parent_search=snapshot.search_paths(image))


class TreeMachine(RuleBasedStateMachine):
    fmt = "vhd"

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vdisk-snap-", dir=FAST_TMP)
        self.image = os.path.join(self.tmp, f"disk.{self.fmt}")
        with vdisk.create(self.image, SIZE, format=self.fmt) as d:
            d.pwrite(b"\x01" * (3 * PAGE), 0)
        self.live = bytearray(SIZE)
        self.live[:3 * PAGE] = b"\x01" * (3 * PAGE)
        self.frozen: dict[str, bytes] = {}           # snapshot name -> content
        self.parent: dict[str, str | None] = {}
        self.current: str | None = None
        self.count = 0

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def dependents(self, name: str) -> int:
        return sum(1 for p in self.parent.values() if p == name) + (self.current == name)

    @rule(page=st.integers(0, SIZE // PAGE - 1), pages=st.integers(1, 80), value=st.integers(0, 255))
    def write(self, page, pages, value):
        off = page * PAGE
        n = min(pages * PAGE, SIZE - off)
        with open_in_tree(self.image, self.image, "r+") as d:
            d.pwrite(bytes([value]) * n, off)
        self.live[off:off + n] = bytes([value]) * n

    @rule()
    def take(self):
        self.count += 1
        name = f"s{self.count}"
        node = snapshot.take(self.image, name=name)
        assert node.name == name
        self.frozen[name] = bytes(self.live)
        self.parent[name] = self.current
        self.current = name

    @precondition(lambda self: self.frozen)
    @rule(data=st.data(), force=st.booleans())
    def revert(self, data, force):
        name = data.draw(st.sampled_from(sorted(self.frozen)))
        dirty = self.current is None or self.live != self.frozen[self.current]
        if dirty and not force:
            with pytest.raises(vdisk.VDiskError, match="--force"):
                snapshot.revert(self.image, name)
            return
        snapshot.revert(self.image, name, force=force)
        self.live[:] = self.frozen[name]
        self.current = name

    @precondition(lambda self: self.frozen)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.frozen)))
        if self.dependents(name) > 1:
            with pytest.raises(vdisk.UnsupportedError, match="dependents"):
                snapshot.delete(self.image, name)
            return
        snapshot.delete(self.image, name)
        for child, p in self.parent.items():
            if p == name:
                self.parent[child] = self.parent[name]
        if self.current == name:
            self.current = self.parent[name]
        del self.frozen[name], self.parent[name]

    # -- what must hold ------------------------------------------------------------------------
    @invariant()
    def image_reads_the_current_state(self):
        with open_in_tree(self.image, self.image) as d:
            assert d.pread(SIZE, 0) == self.live

    @invariant()
    def the_tree_matches_the_model(self):
        nodes, current = snapshot.snapshot_list(self.image)
        by_name = {n.name: n for n in nodes}
        assert set(by_name) == set(self.frozen)
        assert (by_name[self.current].id if self.current else None) == current
        for name, node in by_name.items():
            p = self.parent[name]
            assert node.parent == (by_name[p].id if p else None)
            path = os.path.join(snapshot.snapshot_dir(self.image), node.file)
            with open_in_tree(self.image, path) as d:
                assert d.pread(SIZE, 0) == self.frozen[name], f"snapshot {name} changed"

    @invariant()
    def every_file_passes_check(self):
        folder = snapshot.snapshot_dir(self.image)
        files = [self.image] + ([os.path.join(folder, f) for f in os.listdir(folder) if f != snapshot.TREE]
                                if os.path.isdir(folder) else [])
        assert not [f for f in files if f.endswith((".tmp", ".vdisk-new", ".vdisk-journal"))]
        for f in files:
            report = check(f, parent_search=snapshot.search_paths(self.image))
            assert report.clean, (f, report)

    @invariant()
    def libvhdi_reads_the_current_chain(self):
        if self.fmt != "vhd":
            return
        pyvhdi = need_module("pyvhdi")
        with open_in_tree(self.image, self.image) as d:
            paths = [c.path for c in d.chain]
        files = []
        for p in paths:
            f = pyvhdi.file()
            f.open(p)
            files.append(f)
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        try:
            assert files[0].read_buffer_at_offset(SIZE, 0) == bytes(self.live)
        finally:
            for f in files:
                f.close()


SETTINGS = settings(max_examples=10, stateful_step_count=14, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class VhdTree(TreeMachine):
    fmt = "vhd"


class VdiTree(TreeMachine):
    fmt = "vdi"


TestVhdTree = VhdTree.TestCase
TestVhdTree.settings = SETTINGS
TestVhdTree.pytestmark = [pytest.mark.judges(modules=("pyvhdi",))]     # checked before the machine runs
TestVdiTree = VdiTree.TestCase
TestVdiTree.settings = SETTINGS
