"""Faithful crash states from a log of what reached the I/O seam (vdisk.io.fault_hook).

A :class:`Recorder` lets a workload run to its end while it logs, per file, every mutation (a
write with the bytes it left, a truncation with the new size) and every barrier (fdatasync),
each at its place *seq* in one sequence over all files. From that one log
:meth:`Recorder.crash_files` builds the files as a crash just before event *cut* leaves them
(events 1..cut-1 happened, cut and later never did), in two models:

* **kill** — the process dies; every issued write persists.
* **power cut** — each file is what it was at its last barrier before the cut, plus any subset
  (*keep*) of its later mutations applied *in their order*. (Undoing writes one by one in
  reverse is not the same: it can resurrect bytes that a kept later write had replaced.)

A mutation is the unit: kept or lost whole (torn sectors are not modelled). Cuts fall before
barriers as well as before mutations: the last write before a barrier, kept while earlier ones
since the previous barrier are lost, is a state only a cut just before that barrier produces.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import vdisk.io


@dataclass
class Mutation:
    number: int                 # 1-based, in issue order over all files
    path: str
    kind: str                   # "write" or "truncate"
    offset: int                 # write offset, or the new size of a truncation
    data: bytes = b""
    seq: int = 0                # place among all events (mutations and barriers), 1-based


@dataclass
class FileLog:
    initial: bytes
    events: list = field(default_factory=list)     # Mutation, or ("sync", its seq)


def apply(content: bytearray, m: Mutation) -> None:
    """Apply one mutation to a file's bytes (a write past the end extends it with zeros first)."""
    if m.kind == "truncate":
        if m.offset < len(content):
            del content[m.offset:]
        else:
            content.extend(bytes(m.offset - len(content)))
        return
    end = m.offset + len(m.data)
    if end > len(content):
        content.extend(bytes(end - len(content)))
    content[m.offset:end] = m.data


class Recorder:
    """Fault hook that lets every call through and logs it (install with :func:`hooked`)."""

    def __init__(self):
        self.files: dict[str, FileLog] = {}
        self.count = 0                               # mutations issued so far
        self.seq = 0                                 # events (mutations and barriers) so far
        self._last: Optional[Mutation] = None        # a write whose bytes are read back next call
        self._fds: dict[str, int] = {}

    def _read(self, path: str, length: int, offset: int) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, length, offset)

    def _settle(self) -> None:
        """The previous write has now completed: keep the bytes it left."""
        m, self._last = self._last, None
        if m is not None:
            got = self._read(m.path, len(m.data), m.offset)
            m.data = got + bytes(len(m.data) - len(got))

    def __call__(self, kind: str, file, offset: int, length: int) -> None:
        self._settle()
        path = os.path.realpath(file.path)
        log = self.files.get(path)
        if log is None:
            size = os.fstat(file.fd).st_size
            log = self.files[path] = FileLog(self._read(path, size, 0) if size else b"")
        self.seq += 1
        if kind == "sync":
            log.events.append(("sync", self.seq))
            return
        self.count += 1
        m = Mutation(self.count, path, kind, offset, seq=self.seq)   # truncate: offset is the new size
        if kind == "write":
            m.data = bytes(length)                   # placeholder of the right length
            self._last = m
        log.events.append(m)

    def close(self) -> None:
        self._settle()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- crash states ---------------------------------------------------------------------------
    def pending(self, cut: int) -> dict[str, list[Mutation]]:
        """Per file, the mutations issued before event *cut* and after that file's last barrier."""
        out = {}
        for path, log in self.files.items():
            todo: list[Mutation] = []
            for ev in log.events:
                if isinstance(ev, tuple):
                    if ev[1] < cut:
                        todo = []
                elif ev.seq < cut:
                    todo.append(ev)
            if todo:
                out[path] = todo
        return out

    def crash_files(self, cut: int, keep: Optional[Iterable[int]] = None) -> dict[str, bytes]:
        """Every logged file as a crash just before event *cut* (a seq) leaves it.

        *keep* None is the kill model; otherwise the numbers (:attr:`Mutation.number`) of the
        mutations after each file's last barrier that reached the disk (the power cut model;
        the others are lost).
        """
        keep_set = None if keep is None else set(keep)
        out = {}
        for path, log in self.files.items():
            content = bytearray(log.initial)
            durable_upto = 0                          # events index after the last barrier < cut
            for i, ev in enumerate(log.events):
                if isinstance(ev, tuple) and ev[1] < cut:
                    durable_upto = i + 1
            for i, ev in enumerate(log.events):
                if isinstance(ev, tuple) or ev.seq >= cut:
                    continue
                if keep_set is None or i < durable_upto or ev.number in keep_set:
                    apply(content, ev)
            out[path] = bytes(content)
        return out


def write_files(files: dict[str, bytes]) -> None:
    """Put crash-state bytes into place (the files keep their names; nothing else is touched)."""
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def hooked(hook):
    """Install *hook* as the I/O seam's fault hook for the duration of the block."""
    with vdisk.io.injected_faults(hook):
        yield hook
