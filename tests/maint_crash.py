"""Crash simulation at the I/O seam (vdisk.io.fault_hook) for the maintenance tests.

``CrashSim(cut_at=n)`` lets n-1 mutating calls (writes and truncations, in the image and in its
journal) through and "kills the process" at the n-th: that call and every later one raise
:class:`Crash`. With ``drop_unsynced=True`` the crash is a power cut: each file becomes what it
was at its last barrier (fdatasync) plus a random subset of the later mutations, applied in
their order (see crash_sim.py; undoing writes in reverse would resurrect replaced bytes).
``assert_crash_safe`` judges every cut with vdisk's check and, where qemu reads the image, with
``qemu-img check`` / ``qemu-img compare``.
"""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
import tempfile

import vdisk
import vdisk.io
from conftest import need
from crash_sim import Mutation, apply


class Crash(Exception):
    """The simulated process died here."""


class CrashSim:
    def __init__(self, cut_at: int | None = None, drop_unsynced: bool = False, seed: int = 0):
        self.cut_at = cut_at
        self.drop_unsynced = drop_unsynced
        self.rng = random.Random(seed)
        self.count = 0
        self.dead = False
        # path -> (bytes at the last barrier, mutations since), only while drop_unsynced
        self.pending: dict[str, tuple[bytes, list[Mutation]]] = {}
        self._last: tuple | None = None          # (fd, Mutation): a write to read back

    def _settle(self) -> None:
        if self._last is not None:
            (fd, m), self._last = self._last, None
            try:
                got = os.pread(fd, len(m.data), m.offset)
            except OSError:                      # closed since: its bytes are unknowable; keep zeros
                return
            m.data = got + bytes(len(m.data) - len(got))

    def __call__(self, kind, file, offset, length):
        if self.dead:
            raise Crash("process is dead")
        if self.drop_unsynced:
            self._settle()
        path = os.path.realpath(file.path)
        if kind == "sync":
            self.pending.pop(path, None)
            return
        self.count += 1
        if self.cut_at is not None and self.count >= self.cut_at:
            self.dead = True
            if self.drop_unsynced:
                self._drop()
            raise Crash(f"crash at mutation {self.count} ({kind} {file.path}@{offset}+{length})")
        if self.drop_unsynced:
            if path not in self.pending:
                self.pending[path] = (os.pread(file.fd, os.fstat(file.fd).st_size, 0), [])
            m = Mutation(self.count, path, kind, offset, bytes(length) if kind == "write" else b"")
            self.pending[path][1].append(m)
            if kind == "write":
                self._last = (file.fd, m)

    def _drop(self) -> None:
        for path, (base, mutations) in self.pending.items():
            if not os.path.exists(path):
                continue                          # removed after its writes: stays removed
            content = bytearray(base)
            for m in mutations:
                if self.rng.random() < 0.5:      # this one reached the disk
                    apply(content, m)
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(content)


@contextlib.contextmanager
def crashing(sim: CrashSim):
    """Install *sim* as the fault hook for the duration of the block."""
    with vdisk.io.injected_faults(sim):
        yield sim


def count_mutations(fn) -> int:
    """How many writes/truncations *fn()* performs (through the seam)."""
    sim = CrashSim()
    with crashing(sim):
        fn()
    return sim.count


def snapshot(folder) -> dict:
    """Byte copies of every file in *folder* (small test images only)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def restore(folder, snap: dict) -> None:
    for p in list(folder.iterdir()):
        if p.is_file() and p.name not in snap:
            p.unlink()
    for name, data in snap.items():
        with open(folder / name, "wb") as f:
            f.write(data)


def recover_all(folder) -> None:
    """What the next writable open does: finish or roll back every pending journal."""
    from vdisk import journal
    for p in sorted(folder.iterdir()):
        if p.name.endswith(journal.SUFFIX):
            journal.recover(str(p)[: -len(journal.SUFFIX)])


QEMU_FORMAT = {"vhd": "vpc", "vdi": "vdi"}


QEMU_VDI_BLOCK = 1 << 20       # the only VDI block size qemu opens


def qemu_readable(folder, images) -> dict[str, str]:
    """qemu-img's format name for each image it can judge: base VHDs, and base VDIs of 1 MiB
    blocks (qemu opens no differencing VHD, no VDI with a parent link, no other VDI block size)."""
    out = {}
    for name in images:
        with vdisk.open(str(folder / name)) as d:
            if d.subtype == "differencing" or (d.format == "vdi" and d.block_size != QEMU_VDI_BLOCK):
                continue
            out[name] = QEMU_FORMAT[d.format]
    return out


def write_raw(image: str, dst: str) -> None:
    """The virtual content of *image* as read by vdisk, as a sparse raw file (only data runs written)."""
    with vdisk.open(image) as d, open(dst, "wb") as f:
        for e in d.extents():
            if e.kind == vdisk.ExtentKind.DATA:
                for at in range(e.offset, e.offset + e.length, 4 << 20):
                    n = min(4 << 20, e.offset + e.length - at)
                    f.seek(at)
                    f.write(d.pread(n, at))
        f.truncate(d.size)


def qemu_verdict(path: str, qemu_fmt: str, reference: str) -> str | None:
    """What qemu-img finds wrong with *path* (check for VDI; compare with *reference*), or None."""
    if qemu_fmt == "vdi":
        chk = subprocess.run(["qemu-img", "check", "-q", "-f", "vdi", path], capture_output=True, text=True)
        if chk.returncode != 0:
            return f"qemu-img check exit {chk.returncode}: {(chk.stdout + chk.stderr).strip()}"
    cmp = subprocess.run(["qemu-img", "compare", "-f", qemu_fmt, "-F", "raw", path, reference],
                         capture_output=True, text=True)
    if cmp.returncode != 0:
        return f"qemu-img compare exit {cmp.returncode}: {(cmp.stdout + cmp.stderr).strip()}"
    return None


def assert_crash_safe(folder, operation, state, images, *, drop_every: int = 3, max_cuts: int | None = None):
    """Cut *operation* at every write; after recovery every image in *images* checks clean and
    ``state()`` equals the state before or after the operation. Every *drop_every*-th cut also
    loses a random half of the writes not yet flushed.

    qemu-img judges too, wherever it reads the image: a base VHD or VDI must read, byte for byte,
    as vdisk read it in the outcome state() found (qemu-img compare), and a VDI must pass
    qemu-img check. Tests using this carry @pytest.mark.judges("qemu-img") so that is checked first."""
    from vdisk.ops.check import check
    need("qemu-img")
    pristine = snapshot(folder)
    judged = qemu_readable(folder, images)
    with tempfile.TemporaryDirectory(prefix="vdisk-crash-refs-") as refs:
        def ref(outcome: str, name: str) -> str:
            return os.path.join(refs, f"{outcome}-{name}.raw")
        before = state()
        for name in judged:
            write_raw(str(folder / name), ref("before", name))
        total = count_mutations(operation)
        after = state()
        for name in judged:
            write_raw(str(folder / name), ref("after", name))
        assert total > 0
        cuts = list(range(1, total + 1))
        if max_cuts is not None and len(cuts) > max_cuts:
            step = len(cuts) / max_cuts
            cuts = sorted({cuts[int(i * step)] for i in range(max_cuts)} | {total})
        outcomes = set()
        for cut in cuts:
            restore(folder, pristine)
            sim = CrashSim(cut_at=cut, drop_unsynced=drop_every > 0 and cut % drop_every == 0, seed=cut)
            with crashing(sim):
                try:
                    operation()
                except Crash:
                    pass
            recover_all(folder)
            for name in images:
                report = check(str(folder / name))
                assert report.exit_code == 0, f"cut {cut}/{total}: {report.summary()}"
            now = state()
            assert now in (before, after), f"cut {cut}/{total}: content is neither the before nor the after state"
            outcome = "after" if now == after else "before"
            for name, qemu_fmt in judged.items():
                problem = qemu_verdict(str(folder / name), qemu_fmt, ref(outcome, name))
                assert problem is None, f"cut {cut}/{total}: {name} ({outcome}): {problem}"
            outcomes.add(outcome)
    return total, outcomes
