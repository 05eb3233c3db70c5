"""The python ``nbd`` module (Debian python3-libnbd) against our server: option negotiation,
simple vs structured replies, error numbers (with libnbd's strict mode off, so invalid requests
reach the server).

The check_* functions use only the standard library and the ``nbd`` module. When ``nbd`` cannot be
imported into this interpreter (it is built for Debian's /usr/bin/python3), each check runs as
``/usr/bin/python3 tests/test_nbd_libnbd.py CHECK JSON-ARGS`` instead.
"""
from __future__ import annotations

import errno
import json
import sys
import threading

SYSTEM_PYTHON = "/usr/bin/python3"


# ==============================================================================================
# checks (stdlib + nbd only)
# ==============================================================================================

def _connect(nbd, uri, structured=True, meta=True, strict=True, flags=None):
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context("base:allocation")
    if flags is not None:
        h.set_handshake_flags(flags)
    h.connect_uri(uri)
    if not strict:
        h.set_strict_mode(0)
    return h


def _errno_of(nbd, fn):
    try:
        fn()
    except nbd.Error as e:
        return e.errnum
    return 0


def check_option_negotiation(nbd, host, port, exports):
    """exports: [[name, size, description], ...] in server order."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_tcp(host, str(port))
    assert h.aio_is_negotiating()
    assert h.get_protocol() == "newstyle-fixed"
    listed = []
    assert h.opt_list(lambda name, desc: listed.append([name, desc]) or 0) == len(exports)
    assert listed == [[n, d] for n, _s, d in exports], listed
    for name, size, desc in exports:
        h.set_export_name(name)
        h.set_full_info(True)
        h.opt_info()
        assert h.get_size() == size
        assert h.is_read_only() == 1
        assert h.get_canonical_export_name() == name
        assert h.get_export_description() == desc
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    contexts = []
    h.set_export_name(exports[0][0])
    assert h.opt_list_meta_context(lambda c: contexts.append(c) or 0) == 1
    assert contexts == ["base:allocation"]
    # an unknown export is an error the client can recover from (NBD_REP_ERR_UNKNOWN)
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
        raise AssertionError("opt_info on an unknown export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.ENOENT, e
    assert h.aio_is_negotiating()
    # the empty name is the default export: the first one
    h.set_export_name("")
    h.opt_info()
    assert h.get_canonical_export_name() == exports[0][0]
    h.opt_abort()
    assert h.aio_is_closed() or h.aio_is_dead()
    # negotiate, then go
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.connect_tcp(host, str(port))
    h.set_export_name(exports[-1][0])
    h.opt_go()
    assert h.aio_is_ready()
    assert h.get_size() == exports[-1][1]
    assert h.can_meta_context("base:allocation")
    h.shutdown()


def check_structured_and_simple(nbd, uri, raw_path, allocation):
    """allocation: [[offset, length, flags], ...] as the server must report base:allocation."""
    with open(raw_path, "rb") as f:
        content = f.read()
    size = len(content)
    hole = next(a for a in allocation if a[2] & 1 and a[1] >= 65536)
    data = next(a for a in allocation if not a[2] & 1)

    # structured replies
    h = _connect(nbd, uri)
    assert h.get_structured_replies_negotiated()
    assert h.can_df() and h.can_meta_context("base:allocation")
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, len(buf), status, bytes(buf)))
        return 0
    lo = max(0, hole[0] - 4096)
    n = min(size - lo, hole[1] + 8192)
    buf = h.pread_structured(n, lo, chunk)
    assert bytes(buf) == content[lo:lo + n]
    statuses = {c[2] for c in chunks}
    assert nbd.READ_HOLE in statuses, chunks           # the hole travelled as OFFSET_HOLE
    assert sum(c[1] for c in chunks) == n
    chunks.clear()
    buf = h.pread_structured(n, lo, chunk, flags=nbd.CMD_FLAG_DF)
    assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA and bytes(buf) == content[lo:lo + n]
    # block status, whole export, in the server's words
    got = []

    def extent(ctx, offset, entries, err):
        assert ctx == "base:allocation"
        for i in range(0, len(entries), 2):
            got.append([entries[i], entries[i + 1]])
        return 0
    pos = 0
    while pos < size:
        before = len(got)
        h.block_status(size - pos, pos, extent)
        pos += sum(e[0] for e in got[before:])
    merged = []
    off = 0
    for ln, fl in got:
        if merged and merged[-1][2] == fl:
            merged[-1][1] += ln
        else:
            merged.append([off, ln, fl])
        off += ln
    assert merged == allocation, (merged, allocation)
    got.clear()
    h.block_status(size - data[0], data[0], extent, flags=nbd.CMD_FLAG_REQ_ONE)
    assert len(got) == 1 and got[0] == [data[1], 0]
    h.shutdown()

    # simple replies only
    h = _connect(nbd, uri, structured=False, meta=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert bytes(h.pread(n, lo)) == content[lo:lo + n]
    assert bytes(h.pread(size, 0)) == content if size <= 32 << 20 else True
    chunks.clear()
    h.pread_structured(4096, data[0], chunk)          # libnbd turns a simple reply into one chunk
    assert len(chunks) == 1 and chunks[0][3] == content[data[0]:data[0] + 4096]
    h.shutdown()


def check_handshake_variants(nbd, uri, raw_path):
    with open(raw_path, "rb") as f:
        head = f.read(65536)
    # no handshake flags: old (non-fixed) newstyle, only NBD_OPT_EXPORT_NAME
    h = _connect(nbd, uri, meta=False, flags=0)
    assert h.get_protocol() == "newstyle"
    assert not h.get_structured_replies_negotiated()
    assert bytes(h.pread(65536, 0)) == head
    h.shutdown()
    # fixed newstyle without NO_ZEROES: the 124 zero bytes after EXPORT_NAME must be right
    h = nbd.NBD()
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_go()
    assert bytes(h.pread(65536, 0)) == head
    h.shutdown()


def check_errors(nbd, ro_uri, rw_uri, size, data_offset, hole_offset):
    E = errno
    for structured in (True, False):
        h = _connect(nbd, ro_uri, structured=structured, meta=structured, strict=False)
        assert h.is_read_only()
        assert _errno_of(nbd, lambda: h.pread(4096, size - 100)) == E.EINVAL
        assert _errno_of(nbd, lambda: h.pread(1, (1 << 63))) == E.EINVAL
        assert _errno_of(nbd, lambda: h.pread((32 << 20) + 1, 0)) == E.EINVAL
        assert _errno_of(nbd, lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE)) == E.EINVAL
        assert _errno_of(nbd, lambda: h.pwrite(b"x" * 512, 0)) == E.EPERM
        assert _errno_of(nbd, lambda: h.trim(4096, 0)) == E.EPERM
        assert _errno_of(nbd, lambda: h.zero(4096, 0)) == E.EPERM
        assert _errno_of(nbd, lambda: h.cache(4096, size)) == E.EINVAL
        assert _errno_of(nbd, lambda: h.cache(4096, 0)) == 0
        assert _errno_of(nbd, lambda: h.flush()) == 0
        if structured:
            assert _errno_of(nbd, lambda: h.block_status(8192, size - 4096, lambda *a: 0)) == E.EINVAL
        # still perfectly usable
        assert len(h.pread(4096, 0)) == 4096
        h.shutdown()
    h = _connect(nbd, rw_uri, strict=False)
    assert not h.is_read_only() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero()
    assert _errno_of(nbd, lambda: h.pwrite(b"y" * 4096, size - 1024)) == E.ENOSPC
    assert _errno_of(nbd, lambda: h.zero(4096, size - 1024)) == E.ENOSPC
    assert _errno_of(nbd, lambda: h.trim(4096, size - 1024)) == E.EINVAL
    assert _errno_of(nbd, lambda: h.pwrite(b"y" * 512, 0, flags=nbd.CMD_FLAG_REQ_ONE)) == E.EINVAL
    # FAST_ZERO: refused (ENOTSUP) where zeroing means real work, fine where it is free
    assert _errno_of(nbd, lambda: h.zero(65536, data_offset, flags=nbd.CMD_FLAG_FAST_ZERO)) == E.ENOTSUP
    assert _errno_of(nbd, lambda: h.zero(65536, hole_offset, flags=nbd.CMD_FLAG_FAST_ZERO)) == 0
    # writes with FUA, flush, and reading them back on a second connection (multi-conn)
    h.pwrite(b"\x42" * 8192, data_offset, flags=nbd.CMD_FLAG_FUA)
    h.flush()
    h2 = _connect(nbd, rw_uri)
    assert h2.can_multi_conn()
    assert bytes(h2.pread(8192, data_offset)) == b"\x42" * 8192
    h2.shutdown()
    h.shutdown()


def check_parallel_clients(nbd, uri, raw_path):
    with open(raw_path, "rb") as f:
        content = f.read()
    errors = []
    step = len(content) // 8

    def worker(i):
        try:
            h = _connect(nbd, uri)
            for _ in range(3):
                got = h.pread(step, i * step)
                assert bytes(got) == content[i * step:(i + 1) * step]
            h.shutdown()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def _main(argv):
    sys.path.append("/usr/lib/python3/dist-packages")
    import nbd
    name, args = argv[1], json.loads(argv[2])
    globals()[name](nbd, **args)
    print("ok", name)


if __name__ == "__main__":
    _main(sys.argv)
    sys.exit(0)


# ==============================================================================================
# pytest side
# ==============================================================================================

import functools  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from vdisk.serve.nbd import BackgroundNBDServer  # noqa: E402
from test_nbd_support import build_chain, expected_allocation, import_nbd  # noqa: E402

NBD = import_nbd()


@functools.lru_cache(maxsize=None)
def system_libnbd_problem():
    """Why /usr/bin/python3 cannot import nbd (python3-libnbd), or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"python3-libnbd is not available ({SYSTEM_PYTHON} is missing)"
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
        return f"python3-libnbd is not installed for {SYSTEM_PYTHON}"
    return None


def libnbd_problem():
    return None if NBD is not None else system_libnbd_problem()


# The judge (libnbd, here or under the system Python) is checked before the server fixtures start.
pytestmark = pytest.mark.judges(check=libnbd_problem)


def run_check(name, **kwargs):
    if NBD is not None:
        globals()[name](NBD, **kwargs)
        return
    r = subprocess.run([SYSTEM_PYTHON, os.path.abspath(__file__), name, json.dumps(kwargs)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("libnbd")
    out = {}
    for fmt, depth in (("vhd", 3), ("vdi", 2)):
        path, model = build_chain(d, f"lib{fmt}", fmt, depth, size=24 << 20, seed=11)
        raw = d / f"lib{fmt}.raw"
        raw.write_bytes(bytes(model))
        out[fmt] = (path, raw)
    return out


@pytest.fixture(scope="module")
def server(chain):
    with BackgroundNBDServer([chain["vhd"][0], chain["vdi"][0]]) as srv:
        yield srv


def test_option_negotiation(server, chain):
    exports = [[e.name, e.info.size, e.info.description] for e in server.server.exports]
    assert [e[0] for e in exports] == [os.path.basename(chain[f][0]) for f in ("vhd", "vdi")]
    run_check("check_option_negotiation", host="127.0.0.1", port=server.port, exports=exports)


@pytest.mark.parametrize("fmt", ["vhd", "vdi"])
def test_structured_and_simple_replies(server, chain, fmt):
    path, raw = chain[fmt]
    alloc = [list(a) for a in expected_allocation(path)]
    assert any(a[2] & 1 and a[1] >= 65536 for a in alloc) and any(not a[2] for a in alloc)
    run_check("check_structured_and_simple", uri=server.uri(os.path.basename(path)),
              raw_path=str(raw), allocation=alloc)


def test_handshake_variants(server, chain):
    path, raw = chain["vdi"]
    run_check("check_handshake_variants", uri=server.uri(os.path.basename(path)), raw_path=str(raw))


def test_error_numbers(chain, tmp_path):
    path, raw = chain["vhd"]
    rw_path, model = build_chain(tmp_path, "rwerr", "vhd", 2, size=24 << 20, seed=12)
    alloc = expected_allocation(rw_path)
    data_offset = next(a[0] for a in alloc if a[2] == 0 and a[1] >= 65536)
    hole_offset = next(a[0] for a in alloc if a[2] & 1 and a[1] >= 65536)
    with BackgroundNBDServer([path]) as ro, BackgroundNBDServer([rw_path], rw=True) as rw:
        run_check("check_errors", ro_uri=ro.uri(), rw_uri=rw.uri(), size=24 << 20,
                  data_offset=data_offset, hole_offset=hole_offset)
    # only the two in-range writes changed the image
    import vdisk
    model[data_offset:data_offset + 8192] = b"\x42" * 8192
    with vdisk.open(rw_path) as d:
        assert d.pread(d.size, 0) == bytes(model)


def test_parallel_clients(server, chain):
    path, raw = chain["vhd"]
    run_check("check_parallel_clients", uri=server.uri(os.path.basename(path)), raw_path=str(raw))


@pytest.mark.judges(check=system_libnbd_problem)
def test_fallback_runner_under_system_python(server, chain):
    """The subprocess path used where python3-libnbd does not fit the venv's Python."""
    path, raw = chain["vdi"]
    r = subprocess.run([SYSTEM_PYTHON, os.path.abspath(__file__), "check_handshake_variants",
                        json.dumps({"uri": server.uri(os.path.basename(path)), "raw_path": str(raw)})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok check_handshake_variants" in r.stdout, r.stdout + r.stderr
