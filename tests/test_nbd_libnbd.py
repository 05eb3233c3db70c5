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


def _wait_all(h, cookies):
    """Poll until every cookie of an aio batch completed; raise its error if one failed."""
    pending = set(cookies)
    while pending:
        h.poll(-1)
        for c in list(pending):
            if h.aio_command_completed(c):      # raises nbd.Error if the command failed
                pending.discard(c)


def check_multi_conn_model(nbd, uri, raw_path, model_out, seed, conns=4):
    """Several connections at once against a model of the disk.

    1. Each connection writes its own interleaved 2560-byte units (so every connection writes
       into the same image blocks: concurrent allocation) with 16 writes in flight, then every
       connection reads the whole region back: all writes of all connections are visible.
    2. Overlapping ranges in turn: a write (or zero, or trim) on one connection, once replied,
       is what another connection reads.
    3. One flush on one connection (CAN_MULTI_CONN: it covers the writes of all of them).
    The final model is written to ``model_out`` for the caller to compare with the image."""
    import random
    rnd = random.Random(seed)
    with open(raw_path, "rb") as f:
        model = bytearray(f.read())
    size = len(model)
    handles = [_connect(nbd, uri) for _ in range(conns)]
    assert all(h.can_multi_conn() for h in handles)
    unit, region = 2560, 6 << 20
    errors = []

    def writer(i):
        try:
            h = handles[i]
            units = list(range(i, region // unit, conns))
            rnd_i = random.Random(seed * 100 + i)
            rnd_i.shuffle(units)
            cookies = []
            for u in units:
                data = rnd_i.randbytes(unit)
                model[u * unit:(u + 1) * unit] = data        # disjoint: no lock needed
                cookies.append(h.aio_pwrite(data, u * unit))
                if len(cookies) >= 16:
                    _wait_all(h, cookies[:8])
                    cookies = cookies[8:]
            _wait_all(h, cookies)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"writer {i}: {exc!r}")
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors

    def reader(i):
        try:
            h = handles[i]
            step = 1 << 20
            for off in range(0, region, step):
                got = h.pread(step, off)
                if bytes(got) != bytes(model[off:off + step]):
                    errors.append(f"reader {i}: bytes at {off} differ from the model")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reader {i}: {exc!r}")
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors

    for step in range(60):
        a, b = rnd.sample(range(conns), 2)
        off = rnd.randrange(0, size - 1)
        ln = min(rnd.choice([1, 511, 4096, 65536, 200000]), size - off)
        op = rnd.choice(["write", "write", "write", "zero", "trim"])
        if op == "write":
            data = rnd.randbytes(ln)
            handles[a].pwrite(data, off)
            model[off:off + ln] = data
        elif op == "zero":
            handles[a].zero(ln, off)
            model[off:off + ln] = bytes(ln)
        else:
            handles[a].trim(ln, off)                 # this server: trimmed bytes read as zeros
            model[off:off + ln] = bytes(ln)
        lo, hi = max(0, off - 4096), min(size, off + ln + 4096)
        got = handles[b].pread(hi - lo, lo)
        assert bytes(got) == bytes(model[lo:hi]), f"step {step}: {op} on {a} not seen by {b}"
    handles[rnd.randrange(conns)].flush()
    with open(model_out, "wb") as f:
        f.write(model)


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
from test_nbd_support import build_chain, expected_allocation, import_nbd, need  # noqa: E402

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


@pytest.mark.parametrize("depth", [1, 2], ids=["dynamic", "differencing"])
def test_multi_conn_writes_are_visible_and_one_flush_makes_them_durable(tmp_path, depth):
    """Four connections to a writable export (a dynamic VHD: block allocation shared between
    connections; a differencing one: sector bitmaps too) against a model; after the one flush
    the server is killed (no close, no flush of its own): the image must hold every
    connection's writes. qemu-img judges the dynamic image (it reads no VHD parents)."""
    need("qemu-img")
    import signal
    import time

    import vdisk
    from test_nbd_support import free_port

    path, model = build_chain(tmp_path, "mc", "vhd", depth, size=16 << 20, seed=21)
    raw = tmp_path / "mc-initial.raw"
    raw.write_bytes(bytes(model))
    out = tmp_path / "mc-model.raw"
    port = free_port()
    code = ("from vdisk.serve.nbd import serve_nbd; "
            f"serve_nbd([{path!r}], port={port}, names=['d'], rw=True, on_connection=None)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        import socket
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        run_check("check_multi_conn_model", uri=f"nbd://127.0.0.1:{port}/d", raw_path=str(raw),
                  model_out=str(out), seed=7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    want = out.read_bytes()
    with vdisk.open(path) as d:
        assert d.pread(d.size, 0) == want
    if depth > 1:
        return
    r = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", path, str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
