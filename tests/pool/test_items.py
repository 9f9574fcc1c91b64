"""ItemList: a pool's file list in numpy arrays gives back the very items a list would hold."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cloud.pool.dataset import default_preprocess, pool_set
from cloud.pool.items import ItemList, PathView, item_paths
from cloud.pool.manifest import scan_pool
from device_sdk.errors import InputError
from device_sdk.imagefolder import ImageItem, scan_image_folder

ITEMS = [
    ImageItem("/data/pool/a/1.jpg", "cat", "siteA"),
    ImageItem("/data/pool/a/2.jpg", "dog", "siteA"),
    ImageItem("relative/été/ünï 3.png", "", ""),
    ImageItem("/data//pool/b/", "cat", "siteB/cam"),  # kept as written: double slash, empty file name
    ImageItem("noslash.jpg", "bird", ""),
    ImageItem("/data/pool/a/1.jpg", "cat", "siteA"),  # a repeated row stays a row
]


def test_item_list_round_trips_every_field_and_order():
    items = ItemList.from_items(ITEMS)
    assert len(items) == len(ITEMS) and list(items) == ITEMS and items == ITEMS
    assert [items[i] for i in range(len(ITEMS))] == ITEMS and items[-1] == ITEMS[-1]
    assert items.paths() == [it.path for it in ITEMS] and items.labels() == [it.label for it in ITEMS]
    assert items.domains() == [it.domain for it in ITEMS]
    assert items.paths(np.array([4, 0, 2])) == [ITEMS[4].path, ITEMS[0].path, ITEMS[2].path]
    assert list(items[1:5:2]) == ITEMS[1:5:2] and list(items[::-1]) == ITEMS[::-1]
    keep = np.array([True, False, True, True, False, True])
    assert list(items.take(keep)) == [it for it, k in zip(ITEMS, keep) if k]
    assert list(items.take([3, 3, 0])) == [ITEMS[3], ITEMS[3], ITEMS[0]]
    assert list(items.take(np.zeros(0, np.int64))) == [] and len(ItemList.from_items([])) == 0
    with pytest.raises(IndexError):
        items[len(ITEMS)]
    assert ItemList.from_items(items) is items


def test_path_views_decode_the_rows_asked_for():
    items = ItemList.from_items(ITEMS)
    order = np.array([5, 2, 0, 4])
    view = PathView(items, order)
    assert len(view) == 4 and view[1:3] == [ITEMS[2].path, ITEMS[0].path] and view[3] == ITEMS[4].path
    assert item_paths(ITEMS, order) == item_paths(items, order) == [ITEMS[i].path for i in order]


def test_pool_set_codes_match_the_names_as_before():
    data = pool_set(ITEMS, default_preprocess((32, 32)))
    assert data.label_names == ["bird", "cat", "dog"] and data.domain_names == ["siteA", "siteB/cam"]
    assert data.labels.tolist() == [1, 2, -1, 1, 0, 1] and data.domains.tolist() == [0, 0, -1, 1, -1, 0]
    assert data.labels.dtype == np.int64 and isinstance(data.items, ItemList) and list(data.items) == ITEMS
    given = pool_set(ITEMS, label_names=["dog", "cat"], domain_names=[])
    assert given.labels.tolist() == [1, 0, -1, 1, -1, 1] and given.domains.tolist() == [-1] * 6


def test_compact_scans_equal_the_lists(digits_root, tmp_path):
    folder = str(digits_root / "pool")
    assert scan_pool(folder, compact=True) == scan_image_folder(folder)
    items = scan_image_folder(folder)[:25]
    rows = ["path,label,domain"] + [f"{os.path.relpath(it.path, tmp_path)},{it.label},{it.domain}" for it in items]
    (tmp_path / "pool.csv").write_text("\n".join(rows + [",x,y"]) + "\n")
    listed = scan_pool(str(tmp_path / "pool.csv"))
    compact = scan_pool(str(tmp_path / "pool.csv"), compact=True)
    assert isinstance(compact, ItemList) and isinstance(listed, list) and compact == listed and len(listed) == 25
    assert [os.path.realpath(p) for p in compact.paths()] == [os.path.realpath(it.path) for it in items]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        scan_pool(str(tmp_path / "empty"), compact=True)
    with pytest.raises(InputError, match="not found"):
        scan_pool(str(tmp_path / "nope"), compact=True)


def test_streamed_batches_are_the_same_from_an_item_list_and_from_a_list(digits_root, tmp_path):
    import dataclasses

    import torch

    from cloud.training.data import Streaming, channel_stats_streaming

    items = scan_image_folder(str(digits_root / "pool"))[:50]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    items.insert(7, ImageItem(str(tmp_path / "broken.jpg"), "3", "x"))
    compact = pool_set(items, default_preprocess((40, 40)))
    plain = dataclasses.replace(compact, items=list(items), unreadable=type(compact.unreadable)())
    assert channel_stats_streaming(compact, 20, seed=3, workers=2) == channel_stats_streaming(plain, 20, 3, 2)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))
    chunks = [order[s : s + 16] for s in range(0, len(order), 16)]
    got = [list(Streaming(d, (0.5,) * 3, (0.25,) * 3, 2).batches(chunks)) for d in (compact, plain)]
    assert len(got[0]) == len(got[1]) == 4
    for (ia, xa), (ib, xb) in zip(*got):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert compact.unreadable.count == plain.unreadable.count == 1
    assert compact.unreadable.examples[0][0] == plain.unreadable.examples[0][0] == str(tmp_path / "broken.jpg")
    rows = np.array([3, 7, 1])
    assert torch.equal(
        Streaming(compact, (0.5,) * 3, (0.25,) * 3).take(rows), Streaming(plain, (0.5,) * 3, (0.25,) * 3).take(rows)
    )


def test_compact_parquet_scan_equals_the_list(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"path": ["a/1.jpg", None, "/abs/2.png", "b/3.jpg"], "domain": ["x", "y", None, "x"]})
    pq.write_table(table, tmp_path / "pool.parquet", row_group_size=2)
    listed = scan_pool(str(tmp_path / "pool.parquet"))
    compact = scan_pool(str(tmp_path / "pool.parquet"), compact=True)
    assert compact == listed and len(listed) == 3 and compact[1] == ImageItem("/abs/2.png", "", "")
    assert pool_set(compact).domain_names == ["x"] and pool_set(compact).domains.tolist() == [0, -1, 0]


def test_a_mapped_list_gives_the_same_items_and_leaves_no_file(tmp_path, monkeypatch):
    import cloud.pool.items as items_mod

    monkeypatch.setattr(items_mod, "_FLUSH", 4)  # several writes per file
    many = ITEMS * 5
    plain = ItemList.from_items(many)
    mapped = ItemList.from_items(many, folder=str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []  # the files are unlinked once mapped, their folder removed
    if not items_mod.CAN_MAP:
        pytest.skip("lists stay in memory where a mapped file cannot be unlinked")
    assert mapped.mapped and not plain.mapped and mapped.folder == str(tmp_path / "work")
    assert mapped == plain and list(mapped) == many and mapped.paths() == plain.paths()
    assert mapped.labels() == plain.labels() and mapped.domains() == plain.domains()
    assert mapped.paths(np.array([29, 2, 3])) == [many[29].path, many[2].path, many[3].path]
    assert list(mapped.take([3, 2])) == [many[3], many[2]] and mapped[-1] == many[-1]
    assert mapped.nbytes() == plain.nbytes()
    assert not mapped.label_codes.flags.writeable  # read-only: what is mapped stays as written
    data, ref = pool_set(mapped), pool_set(plain)
    assert isinstance(data.labels, np.memmap) and data.labels.dtype == ref.labels.dtype == np.int64
    assert data.labels.tolist() == ref.labels.tolist() and data.domains.tolist() == ref.domains.tolist()
    assert data.label_names == ref.label_names and os.listdir(tmp_path / "work") == []
    empty = ItemList.from_items([], folder=str(tmp_path / "work"))
    assert len(empty) == 0 and empty.paths() == [] and os.listdir(tmp_path / "work") == []


def test_a_failed_scan_leaves_no_file(tmp_path, monkeypatch):
    import cloud.pool.items as items_module

    (tmp_path / "work").mkdir()
    # a manifest that fails partway, after some items were written out (flushes every 2 items here)
    monkeypatch.setattr(items_module, "_FLUSH", 2)
    (tmp_path / "pool.csv").write_bytes(b"path,label\na.jpg,x\nb.jpg,y\nc.jpg,z\n\xe9.jpg,w\n")
    with pytest.raises(InputError, match="UTF-8"):
        scan_pool(str(tmp_path / "pool.csv"), compact=True, folder=str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []

    def no_room(self):  # the last write of build() fails (a full disk)
        raise OSError(28, "No space left on device")

    (tmp_path / "ok.csv").write_text("path,label\na.jpg,x\n")
    monkeypatch.setattr(items_module.ItemListBuilder, "_flush", no_room)
    if items_module.CAN_MAP:
        with pytest.raises(OSError, match="No space"):
            scan_pool(str(tmp_path / "ok.csv"), compact=True, folder=str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []
    monkeypatch.undo()
    (tmp_path / "bad.csv").write_text("nopath\nx\n")
    with pytest.raises(InputError, match="not a pool manifest"):
        scan_pool(str(tmp_path / "bad.csv"), compact=True, folder=str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []


def test_mapped_scans_equal_the_lists(digits_root, tmp_path):
    folder = str(digits_root / "pool")
    mapped = scan_pool(folder, compact=True, folder=str(tmp_path / "work"))
    assert mapped == scan_image_folder(folder) and os.listdir(tmp_path / "work") == []
    assert isinstance(scan_pool(folder, folder=str(tmp_path / "work")), list)


def test_path_views_read_a_list_of_batches_as_their_concatenation():
    import torch

    items = ItemList.from_items(ITEMS)
    chunks = [torch.tensor([5, 2], dtype=torch.int32), torch.tensor([0, 4]), np.array([1, 3, 3])]
    view, whole = PathView(items, chunks), PathView(items, np.array([5, 2, 0, 4, 1, 3, 3]))
    assert len(view) == len(whole) == 7
    for start in range(8):
        for stop in range(start, 9):
            assert view[start:stop] == whole[start:stop] == [ITEMS[i].path for i in [5, 2, 0, 4, 1, 3, 3][start:stop]]
    assert [view[i] for i in range(-7, 7)] == [whole[i] for i in range(-7, 7)] and view[::3] == whole[::3]
    assert len(PathView(items, [])) == 0 and PathView(items, [])[0:4] == []


def test_int32_split_and_epoch_order_draw_what_int64_drew():
    import torch

    from cloud.training.data import epoch_order
    from cloud.training.encoder import split_indices

    for n in (0, 1, 7, 1000, 65537):
        train, val = split_indices(n, 0.1, 3)
        perm = np.random.default_rng(3).permutation(n)  # as drawn before: int64
        n_val = int(round(n * 0.1))
        assert (
            train.dtype == np.int32
            and train.tolist() == perm[n_val:].tolist()
            and val.tolist() == perm[:n_val].tolist()
        )
        gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        order = epoch_order(train, gen)
        assert order.dtype == torch.int32
        assert order.tolist() == torch.from_numpy(perm[n_val:])[torch.randperm(len(train), generator=ref)].tolist()
        assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))  # the generators stay in step


def test_batches_are_the_list_of_slices_made_on_demand(digits_root):
    import torch

    from cloud.training.data import Batches, Streaming

    order = torch.randperm(50, generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    listed = [order[s : s + 16] for s in range(0, 50, 16)]
    for count in (None, 2, 4, 9, 0):
        got = Batches(order, 16, count)
        want = listed[:count] if count is not None else listed
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert [len(b) for b in got[::-1]] == [len(b) for b in want[::-1]]
    assert torch.equal(Batches(order, 16)[-1], listed[-1])
    with pytest.raises(IndexError):
        Batches(order, 16)[4]
    items = scan_image_folder(str(digits_root / "pool"))[:50]
    source = Streaming(pool_set(items, default_preprocess((40, 40))), (0.5,) * 3, (0.25,) * 3, 2)
    lazy, plain = list(source.batches(Batches(order, 16, 3))), list(source.batches(listed[:3]))
    assert len(lazy) == len(plain) == 3
    assert all(torch.equal(ia, ib) and torch.equal(xa, xb) for (ia, xa), (ib, xb) in zip(lazy, plain))
