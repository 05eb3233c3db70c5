"""Shadow copies through the library: what a user of vdisk.open / vdisk.shadow can rely on."""
from __future__ import annotations

import json
import os

import pytest

import vdisk
from vdisk.shadow import (ShadowedDisk, export_shadow, list_shadows, open_shadow_view, open_shadowed,
                          store_dir)

MiB = 1 << 20

@pytest.fixture
def tmp_path(tmpfs_path):
    """These tests fsync a lot: run them on tmpfs when there is one."""
    return tmpfs_path


@pytest.fixture(params=["vhd", "vdi", "raw"])
def image(request, tmp_path):
    path = str(tmp_path / f"disk.{request.param}")
    with vdisk.create(path, 4 * MiB, format=request.param) as d:
        d.pwrite(b"\x11" * MiB, 0)
    return path


def test_a_writable_open_of_a_shadowed_image_enforces_copy_on_write(image):
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow("before").id
    with vdisk.open(image, "r+") as d:                 # a tool that knows nothing about shadows
        assert isinstance(d, ShadowedDisk)
        with d.as_file() as f:
            f.seek(1000)
            f.write(b"\x22" * 5000)
    with open_shadow_view(image, sid) as v:
        assert v.pread(MiB, 0) == b"\x11" * MiB
    with vdisk.open(image) as d:
        assert d.pread(5000, 1000) == b"\x22" * 5000


def test_read_only_opens_and_images_without_shadows_stay_plain_disks(image):
    with vdisk.open(image, "r+") as d:
        assert type(d) is vdisk.Disk
    with open_shadowed(image, "r+") as d:
        d.create_shadow()
    with vdisk.open(image) as d:
        assert type(d) is vdisk.Disk


def test_the_open_pipeline_not_the_core_wraps_the_disk_in_the_filter(image):
    from vdisk import disk as core
    from vdisk.openers import STEPS
    with open_shadowed(image, "r+") as d:
        d.create_shadow()
    with core.open(image, "r+") as plain:               # the core knows nothing about shadows
        assert type(plain) is vdisk.Disk
    with vdisk.open(image, "r+") as d:
        assert isinstance(d, ShadowedDisk) and type(d.disk) is vdisk.Disk
        assert not hasattr(d, "_engine") and d.layers is d.disk.layers   # one engine: the Disk's
        d.pwrite(b"\x33" * 512, 0)
    assert "shadows" in [step.name for step in STEPS]


def test_a_shadow_view_is_read_only_and_checks_ranges(image):
    with open_shadowed(image, "r+") as d:
        v = d.shadow_view(d.create_shadow().id)
        assert v.read_only and v.size == d.size and v.uuid != d.uuid
        for call in (lambda: v.pwrite(b"x", 0), lambda: v.write_zeroes(0, 512), lambda: v.discard(0, 512)):
            with pytest.raises(vdisk.ReadOnlyError):
                call()
        with pytest.raises(vdisk.RangeError):
            v.pread(2, d.size - 1)


def test_views_read_the_creation_bytes_after_every_kind_of_change(image):
    with open_shadowed(image, "r+") as d:
        first = d.create_shadow("first").id
        d.pwrite(b"\x33" * 3000, 70_000)
        second = d.create_shadow("second").id
        d.discard(0, 2 * MiB)
        d.write_zeroes(3 * MiB, 4096)
        d.pwrite(b"\x44" * 10, 3 * MiB + 100)
        expect_first = b"\x11" * MiB + bytes(3 * MiB)
        expect_second = bytearray(expect_first)
        expect_second[70_000:73_000] = b"\x33" * 3000
        assert d.shadow_view(first).pread(4 * MiB, 0) == expect_first
        assert d.shadow_view(second).pread(4 * MiB, 0) == expect_second
        assert d.pread(2 * MiB, 0) == bytes(2 * MiB)


def test_view_extents_mark_preserved_blocks_and_follow_the_live_image_elsewhere(image):
    with open_shadowed(image, "r+") as d:
        v = d.shadow_view(d.create_shadow().id)
        d.pwrite(b"\x55", 0)                             # block 0 preserved as data
        d.pwrite(b"\x55", 2 * MiB)                       # a block that read as zeros
        ext = v.extents()
        assert ext[0] == vdisk.Extent(0, 64 << 10, vdisk.ExtentKind.DATA, None)
        at = {e.offset: e for e in ext}
        assert at[2 * MiB].kind == vdisk.ExtentKind.ZERO and at[2 * MiB].length == 64 << 10
        assert sum(e.length for e in ext) == d.size
        assert all(a.offset + a.length == b.offset for a, b in zip(ext, ext[1:]))


def test_deleting_the_middle_shadow_keeps_the_older_view(image):
    with open_shadowed(image, "r+") as d:
        a = d.create_shadow("a").id
        b = d.create_shadow("b").id
        d.pwrite(b"\x66" * 100, 0)                      # preserved only in b's store
        c = d.create_shadow("c").id
        d.delete_shadow(b[:8])                          # a unique prefix names it
        assert [s.id for s in d.shadows] == [a, c]
        assert d.shadow_view(a).pread(MiB, 0) == b"\x11" * MiB
        assert d.shadow_view(c).pread(100, 0) == b"\x66" * 100


def test_the_shadow_count_limit_deletes_the_oldest(image):
    with open_shadowed(image, "r+") as d:
        d.set_shadow_limits(max_shadows=3)
        ids = [d.create_shadow(str(i)).id for i in range(5)]
        assert [s.id for s in d.shadows] == ids[2:]


def test_the_diff_area_maximum_evicts_oldest_shadows_and_never_fails_a_write(image):
    with open_shadowed(image, "r+") as d:
        d.set_shadow_limits(max_diff_bytes=300_000)
        old = d.create_shadow("old").id
        d.pwrite(b"\x77" * (128 << 10), 0)              # two 64 KiB blocks preserved in old's store
        new = d.create_shadow("new").id
        d.pwrite(b"\x88" * (192 << 10), 256 << 10)      # three more: the sum exceeds the maximum
        assert [s.id for s in d.shadows] == [new]
        assert d.shadow_set.diff_area_bytes() <= 300_000
        d.pwrite(b"\x99" * MiB, 0)                       # more than the whole diff area: all go
        assert d.shadows == []
        assert d.pread(MiB, 0) == b"\x99" * MiB
    assert old != new


def test_an_image_changed_behind_our_back_invalidates_its_shadows(tmp_path):
    path = str(tmp_path / "disk.raw")
    vdisk.create(path, MiB, format="raw").close()
    with open_shadowed(path, "r+") as d:
        sid = d.create_shadow().id
    with open(path, "r+b") as f:                         # another tool writes the file
        f.seek(4096)
        f.write(b"changed")
    [info] = list_shadows(path)
    assert not info.valid and "changed outside vdisk" in info.invalid_reason
    with pytest.raises(vdisk.VDiskError, match="invalid"):
        open_shadow_view(path, sid)
    with open_shadowed(path, "r+") as d:                # the verdict is recorded, writes go on
        d.pwrite(b"x", 0)
        assert not d.shadows[0].valid
        d.delete_all_shadows()
        fresh = d.create_shadow().id
        d.pwrite(b"y", 0)
    with open_shadow_view(path, fresh) as v:
        assert v.pread(1, 0) == b"x"


def test_an_unclean_session_keeps_its_shadows(image):
    d = open_shadowed(image, "r+")
    sid = d.create_shadow().id
    d.pwrite(b"\xaa" * 4096, 0)
    for layer in d.layers:                               # the writer dies without closing
        layer.file.close()
    d.shadow_set.close()
    with open_shadowed(image, "r+") as d:
        assert d.shadows[0].valid
        assert any("did not close cleanly" in n for n in d.shadow_notes)
        assert d.shadow_view(sid).pread(MiB, 0) == b"\x11" * MiB


def test_a_view_cannot_be_opened_while_another_writer_holds_the_image(image):
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow().id
        with pytest.raises(vdisk.LockError):
            open_shadow_view(image, sid)


def test_unknown_and_deleted_shadows_are_clear_errors(image):
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow().id
        view = d.shadow_view(sid)
        d.delete_shadow(sid)
        with pytest.raises(vdisk.VDiskError, match="was deleted"):
            view.pread(1, 0)
        with pytest.raises(vdisk.VDiskError, match="no shadow"):
            d.shadow_view("0000")


def test_a_read_only_open_cannot_change_shadows(image):
    with open_shadowed(image, "r+") as d:
        d.create_shadow()
    with open_shadowed(image, "r") as d:
        with pytest.raises(vdisk.ReadOnlyError):
            d.create_shadow()
        with pytest.raises(vdisk.ReadOnlyError):
            d.delete_oldest_shadow()


def test_a_damaged_catalog_refuses_writable_opens(image):
    with open_shadowed(image, "r+") as d:
        d.create_shadow()
    with open(os.path.join(store_dir(image), "catalog.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(vdisk.VDiskError, match="damaged shadow catalog"):
        vdisk.open(image, "r+")


def test_an_interrupted_create_leaves_no_orphan_store(image):
    import vdisk.io

    with open_shadowed(image, "r+") as d:
        d.create_shadow()
    d = open_shadowed(image, "r+")
    calls = []

    def cut_at_catalog_rename(kind, file, offset, length):
        if file.path.endswith("catalog.json.tmp"):
            raise OSError("power cut")
        calls.append(file.path)

    vdisk.io.fault_hook = cut_at_catalog_rename
    try:
        with pytest.raises(OSError):
            d.create_shadow()
    finally:
        vdisk.io.fault_hook = None
    d.close()
    assert any(p.endswith(".store") for p in calls)
    with open_shadowed(image, "r+") as d:
        assert len(d.shadows) == 1
    stores = [n for n in os.listdir(store_dir(image)) if n.endswith(".store")]
    assert len(stores) == 1


def test_diff_lists_changed_ranges_between_two_shadows_and_live(image):
    with open_shadowed(image, "r+") as d:
        a = d.create_shadow().id
        d.pwrite(b"\x01" * 1000, 5000)
        d.pwrite(b"\x11" * 512, 200_000)                 # rewrites what was there: no change
        b = d.create_shadow().id
        d.pwrite(b"\x02" * 512, 3 * MiB)
        assert d.diff(a, b) == [(4608, 1536)]
        assert d.diff(b, a) == [(4608, 1536)]
        assert d.diff(b) == [(3 * MiB, 512)]
        assert d.diff(a, "live") == [(4608, 1536), (3 * MiB, 512)]
        assert d.diff(a, a) == []


def test_export_writes_a_standalone_image_of_the_shadow(image, tmp_path):
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow().id
        d.pwrite(b"\xee" * MiB, 0)
    dst = str(tmp_path / "exported.vdi")
    export_shadow(image, sid, dst)
    with vdisk.open(dst) as e:
        assert e.format == "vdi"
        assert e.pread(MiB + 10, 0) == b"\x11" * MiB + bytes(10)


def test_the_catalog_is_documented_json(image):
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow("doc").id
    with open(os.path.join(store_dir(image), "catalog.json")) as f:
        cat = json.load(f)
    assert cat["format"] == "vdisk-shadows" and cat["version"] == 1
    assert cat["block_size"] == 64 << 10 and cat["max_shadows"] == 64
    assert cat["session"] is None and cat["fingerprint"]["files"][0]["path"] == os.path.basename(image)
    assert cat["shadows"][0]["id"] == sid and cat["shadows"][0]["store"] == f"{sid}.store"


def test_module_level_diff_opens_the_image_read_only(image):
    import vdisk.shadow
    with open_shadowed(image, "r+") as d:
        sid = d.create_shadow().id
        d.pwrite(b"\x02" * 600, 10_000)
        expect = d.diff(sid)
    assert vdisk.shadow.diff(image, sid) == expect == [(9728, 1024)]


class _Cut(Exception):
    pass


@pytest.mark.parametrize("action", ["delete-middle", "delete-newest", "write", "discard", "create"])
def test_a_cut_at_any_write_keeps_every_shadow_exact(image, action):
    """Interrupt the operation at each of its writes in turn, reopen: every shadow still reads
    the bytes of its creation (the operation itself happened entirely or not at all)."""
    import vdisk.io

    def setup():
        with open_shadowed(image, "r+") as d:
            d.delete_all_shadows()
            d.pwrite(b"\x11" * MiB, 0)
            d.write_zeroes(MiB, 3 * MiB)
            views = {}
            for i in range(3):
                sid = d.create_shadow(str(i)).id
                views[sid] = d.pread(d.size, 0)
                d.pwrite(bytes([0x20 + i]) * (200 << 10), i * (150 << 10))
            return views

    cut = 0
    while True:
        cut += 1
        views = setup()
        ids = list(views)
        d = open_shadowed(image, "r+")
        calls = [0]

        def hook(kind, file, offset, length):
            calls[0] += 1
            if calls[0] >= cut:
                raise _Cut()

        ops = {"delete-middle": lambda: d.delete_shadow(ids[1]), "delete-newest": lambda: d.delete_shadow(ids[2]),
               "write": lambda: d.pwrite(b"\x77" * (300 << 10), 100_000),
               "discard": lambda: d.discard(0, 2 * MiB), "create": lambda: d.create_shadow("new")}
        vdisk.io.fault_hook = hook
        try:
            ops[action]()
            done = True
        except _Cut:
            done = False
        finally:
            vdisk.io.fault_hook = None
        if done:
            d.close()
        else:
            for layer in d.layers:                       # the process dies here
                layer.file.close()
            d.shadow_set.close()
        with open_shadowed(image, "r+") as d:
            alive = [s.id for s in d.shadows]
            assert all(s.valid for s in d.shadows)
            for sid in alive:
                if sid in views:
                    assert d.shadow_view(sid).pread(d.size, 0) == views[sid], (action, cut, sid)
            if action.startswith("delete"):
                assert set(ids) - set(alive) <= {ids[1] if action == "delete-middle" else ids[2]}
            else:
                assert set(ids) <= set(alive)
        if done:
            break
        assert cut < 200


def test_a_shadow_is_a_write_protected_scsi_disk(image):
    import struct

    from vdisk.devices.scsi import ScsiDisk
    from vdisk.devices.scsi_sense import decode_sense
    with open_shadowed(image, "r+") as d:
        lu = ScsiDisk(d.shadow_view(d.create_shadow().id))
        d.pwrite(b"\x44" * 512, 0)
        read = lu.execute(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))
        assert read.status == 0 and read.data_in == b"\x11" * 512
        write = lu.execute(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), b"\x55" * 512)
        assert decode_sense(write.sense) == (7, 0x27, 0)      # DATA PROTECT, WRITE PROTECTED
        assert d.pread(512, 0) == b"\x44" * 512
