"""Finding a VDI's parent by scanning its folder (issue 19): a deep chain in one folder must not
open every .vdi of the folder at every level — each layer is opened once, and the files that are
not the parent are told apart by their header alone."""
from __future__ import annotations

import vdisk
import vdisk.chain as chain

DEPTH = 12


def build(tmp_path):
    paths = [tmp_path / f"layer{i:02d}.vdi" for i in range(DEPTH)]
    vdisk.create(paths[0], 8 << 20, format="vdi").close()
    for i in range(1, DEPTH):
        with vdisk.create(paths[i], parent=paths[i - 1]) as d:
            d.pwrite(bytes([i]) * 4096, i * 4096)
    return paths


def test_a_deep_vdi_chain_in_one_folder_opens_each_layer_once(tmp_path, monkeypatch):
    paths = build(tmp_path)
    opened = []
    real = chain.open_layer

    def counting(path, **kw):
        opened.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(chain, "open_layer", counting)
    with vdisk.open(paths[-1]) as d:
        assert len(d.layers) == DEPTH
        for i in range(1, DEPTH):
            assert d.pread(4096, i * 4096) == bytes([i]) * 4096
    assert sorted(opened) == sorted(map(str, paths)), opened


def test_a_missing_parent_still_reports_every_file_scanned(tmp_path):
    paths = build(tmp_path)
    paths[5].unlink()
    try:
        vdisk.open(paths[-1]).close()
    except vdisk.ParentError as exc:
        text = str(exc)
    else:
        raise AssertionError("the chain opened without its sixth layer")
    assert "UUID scan of" in text and "layer04.vdi" in text and "does not match" in text
