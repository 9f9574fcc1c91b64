"""Pools as users have them: CSV manifests, unreadable files, and a feature cache that resumes."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from cloud.pool.features import encode_pool_checked
from cloud.pool.index import build_index
from cloud.pool.manifest import scan_pool
from device_sdk.errors import InputError
from device_sdk.imagefolder import scan_image_folder
from device_sdk.runtime import load_model


def _entries(cache_dir: str) -> int:
    return sum(len(np.load(p)["keys"]) for p in glob.glob(os.path.join(cache_dir, "features-*", "shard-*.npz")))


def test_csv_manifest_with_relative_paths_extra_columns_and_bad_rows(digits_root, encoder_path, tmp_path):
    items = scan_image_folder(str(digits_root / "pool"))[:40]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff definitely not a jpeg")
    rows = ["path,label,domain,source_url"]
    rows += [
        f"{os.path.relpath(it.path, tmp_path)},{it.label},{it.domain},http://example/{i}" for i, it in enumerate(items)
    ]
    rows += ["broken.jpg,3,x,", "missing/nowhere.png,3,x,", ",,,"]
    (tmp_path / "pool.csv").write_text("\n".join(rows) + "\n")

    listed = scan_pool(str(tmp_path / "pool.csv"))
    assert len(listed) == 42 and listed[0].label == items[0].label and os.path.isabs(listed[0].path)
    index = build_index(str(tmp_path / "pool.csv"), str(encoder_path), k=4, iters=5, threads=1)
    assert len(index.paths) == 40 and index.unreadable.count == 2
    assert {os.path.basename(p) for p, _ in index.unreadable.examples} == {"broken.jpg", "nowhere.png"}
    assert list(index.labels) == [it.label for it in items]


def test_a_path_listed_twice_in_a_manifest_is_indexed_once(digits_root, encoder_path, tmp_path, caplog):
    """Scraped manifests repeat rows (the same file found twice): the index, and so every selection,
    holds each file once (its first row), with a warning."""
    items = scan_image_folder(str(digits_root / "pool"))[:12]
    rows = ["path,label"] + [f"{it.path},{it.label}" for it in items]
    rows += [f"{items[0].path},other", f"{os.path.dirname(items[1].path)}/./{os.path.basename(items[1].path)},"]
    (tmp_path / "pool.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        index = build_index(str(tmp_path / "pool.csv"), str(encoder_path), k=2, iters=3, threads=1)
    assert sorted(index.paths) == sorted(it.path for it in items) and index.labels[0] == items[0].label
    assert "2 duplicate row(s)" in caplog.text


def test_parquet_manifest_with_nulls_extra_columns_and_a_damaged_file(digits_root, encoder_path, tmp_path):
    pa = pytest.importorskip("pyarrow")  # the parquet extra; scripts/setup.sh installs it
    import pyarrow.parquet as pq

    items = scan_image_folder(str(digits_root / "pool"))[:30]
    table = pa.table(
        {
            "path": [os.path.relpath(it.path, tmp_path) for it in items] + [None, "missing.png"],
            "label": [it.label for it in items] + [None, None],
            "width": list(range(len(items) + 2)),  # extra columns are metadata: ignored
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet", row_group_size=7)  # several row groups
    listed = scan_pool(str(tmp_path / "pool.parquet"))
    assert [it.label for it in listed] == [it.label for it in items] + [""]  # the row without a path is skipped
    assert all(it.domain == "" for it in listed) and os.path.isabs(listed[0].path)
    index = build_index(str(tmp_path / "pool.parquet"), str(encoder_path), k=4, iters=5, threads=1)
    assert len(index.paths) == 30 and index.unreadable.count == 1
    assert list(index.labels) == [it.label for it in items]

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        scan_pool(str(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "nopath.parquet")
    with pytest.raises(InputError, match="'path' column"):
        scan_pool(str(tmp_path / "nopath.parquet"))


def test_manifest_column_names_in_any_case(tmp_path):
    """Scrapers and spreadsheets write Path, LABEL, Domain: the same columns."""
    (tmp_path / "m.csv").write_text("Path, LABEL ,Domain,Source\na.png,cat,web,x\n")
    (item,) = scan_pool(str(tmp_path / "m.csv"))
    assert (os.path.basename(item.path), item.label, item.domain) == ("a.png", "cat", "web")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"PATH": ["b.png"], "Label": ["dog"]}), tmp_path / "m.parquet")
    (item,) = scan_pool(str(tmp_path / "m.parquet"))
    assert (os.path.basename(item.path), item.label, item.domain) == ("b.png", "dog", "")


def test_manifest_without_a_path_column_is_an_input_error(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(InputError, match="'path' column"):
        scan_pool(str(tmp_path / "m.csv"))
    with pytest.raises(InputError, match="not found"):
        scan_pool(str(tmp_path / "absent.csv"))
    (tmp_path / "empty.csv").write_text("path,label\n,cat\n")
    with pytest.raises(InputError, match=r"empty.csv: no row has a path \(1 row\(s\) without one\)"):
        scan_pool(str(tmp_path / "empty.csv"))
    (tmp_path / "pool.tsv").write_text("path\ta.png\n")
    with pytest.raises(InputError, match=r"pool.tsv is a file: a pool is an image folder or a manifest \(.csv"):
        scan_pool(str(tmp_path / "pool.tsv"))


@pytest.mark.parametrize("where", ["header", "row"])
def test_a_manifest_that_is_not_utf8_is_an_input_error_that_says_so(tmp_path, where):
    """Excel's 'CSV' is often cp1252: a clear error naming the line, not a UnicodeDecodeError traceback."""
    text = "p\xe4th,label\na.png,1\n" if where == "header" else "path,label\na.png,caf\xe9\n"
    (tmp_path / "m.csv").write_bytes(text.encode("cp1252"))
    line = "line 1" if where == "header" else "line 2"
    with pytest.raises(InputError, match=f"m.csv: not UTF-8 .*{line}.*save it as UTF-8"):
        scan_pool(str(tmp_path / "m.csv"))


class _Interrupted(Exception):
    pass


class _Counting:
    """The model, counting the images it encodes; optionally interrupted after ``stop_after`` batches."""

    def __init__(self, model, stop_after=None):
        self.model, self.stop_after, self.images, self.batches = model, stop_after, 0, 0
        self.meta, self.sha256 = model.meta, model.sha256

    def run(self, images):
        if self.stop_after is not None and self.batches >= self.stop_after:
            raise _Interrupted()
        self.batches += 1
        self.images += len(images)
        return self.model.run(images)


def test_interrupted_indexing_resumes_without_recomputing(digits_root, encoder_path, tmp_path):
    items = scan_image_folder(str(digits_root / "pool"))[:30]
    cache = str(tmp_path / "cache")
    model = load_model(str(encoder_path))
    reference = encode_pool_checked(model, items).features

    first = _Counting(model, stop_after=3)  # batches of 4, shards of 8: two shards (16 images) reach the disk
    with pytest.raises(_Interrupted):
        encode_pool_checked(first, items, cache, batch=4, shard_size=8)
    assert _entries(cache) == 8  # 12 encoded before the interruption: one full shard written, 4 lost

    second = _Counting(model)
    resumed = encode_pool_checked(second, items, cache, batch=4, shard_size=8)
    assert second.images == 30 - 8  # only what no shard held
    np.testing.assert_allclose(resumed.features, reference, atol=1e-6)

    third = _Counting(model)
    again = encode_pool_checked(third, items, cache, batch=4, shard_size=8)
    assert third.images == 0 and again.cached == 30
    np.testing.assert_array_equal(again.features, resumed.features)


def test_ctrl_c_keeps_what_was_encoded_for_the_next_run(digits_root, encoder_path, tmp_path):
    """Ctrl-C (KeyboardInterrupt) writes the encoded part of the unfinished shard before it stops:
    a pool smaller than one shard resumes too, instead of starting over."""
    items = scan_image_folder(str(digits_root / "pool"))[:30]
    cache = str(tmp_path / "cache")
    model = load_model(str(encoder_path))

    class CtrlC(_Counting):
        def run(self, images):
            if self.batches >= self.stop_after:
                raise KeyboardInterrupt
            return super().run(images)

    first = CtrlC(model, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        encode_pool_checked(first, items, cache, batch=4, shard_size=1000)
    assert first.images == 12 and _entries(cache) == 12

    second = _Counting(model)
    resumed = encode_pool_checked(second, items, cache, batch=4, shard_size=1000)
    assert second.images == 30 - 12 and resumed.cached == 12
    np.testing.assert_allclose(resumed.features, encode_pool_checked(model, items).features, atol=1e-6)


def test_changed_and_removed_files_are_pruned_and_unreadable_ones_not_retried(digits_root, encoder_path, tmp_path):
    import shutil

    src = scan_image_folder(str(digits_root / "pool"))[:12]
    for i, it in enumerate(src):
        shutil.copy(it.path, tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    items = scan_image_folder(str(tmp_path))
    cache = str(tmp_path / "cache")
    model = load_model(str(encoder_path))
    first = encode_pool_checked(model, items, cache)
    assert len(first.features) == 12 and first.unreadable.count == 1 and _entries(cache) == 13

    os.utime(tmp_path / "0.png", ns=(1, 1))  # changed mtime: encoded again, the old entry pruned
    counting = _Counting(model)
    second = encode_pool_checked(counting, items, cache)
    assert counting.images == 1 and second.unreadable.count == 1 and _entries(cache) == 13

    fewer = [it for it in items if not it.path.endswith("5.png")]
    encode_pool_checked(model, fewer, cache, prune_missing=True)
    assert _entries(cache) == 12


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_decoding_in_parts_gives_the_files_bytes_and_lists_the_unreadable(digits_root, tmp_path, workers):
    """decode_batches cuts each batch into one part per worker: rows, the ok mask and the unreadable
    list are those of decoding file by file, whatever the batch and part sizes."""
    from cloud.pool.dataset import Unreadable, decode_batches, default_preprocess

    paths = [it.path for it in scan_image_folder(str(digits_root / "pool"))[:23]]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff broken")
    paths[5:5] = [str(tmp_path / "bad.jpg")]
    paths.append(str(tmp_path / "missing.png"))
    spec = default_preprocess((32, 32))
    unreadable = Unreadable()
    got = list(decode_batches(spec, paths, batch=7, workers=workers, unreadable=unreadable))
    assert [start for start, _, _ in got] == list(range(0, len(paths), 7))
    images = np.concatenate([im for _, im, _ in got])
    ok = np.concatenate([k for _, _, k in got])
    assert list(np.flatnonzero(~ok)) == [5, len(paths) - 1] and not images[~ok].any()
    assert unreadable.count == 2 and [p for p, _ in unreadable.examples] == [paths[5], paths[-1]]
    np.testing.assert_array_equal(images[ok], np.stack([spec.decode(p) for p, k in zip(paths, ok) if k]))


def test_a_file_met_every_epoch_is_listed_once(caplog):
    """Streamed training meets an unreadable file once an epoch: it counts every meeting but lists
    (and reports) each file once, without a '+' while fewer than ``keep`` different files failed."""
    import logging

    from cloud.cli.common import _log_streamed_unreadable
    from cloud.pool.dataset import PoolSet, Unreadable

    bad = Unreadable(keep=3)
    for _ in range(8):  # 8 epochs, the same 2 files
        bad.add("a.jpg", "a.jpg: not a readable image")
        bad.add("b.jpg", "b.jpg: not a readable image")
    assert bad.count == 16 and [p for p, _ in bad.examples] == ["a.jpg", "b.jpg"]
    data = PoolSet.__new__(PoolSet)
    data.unreadable = bad
    with caplog.at_level(logging.WARNING):
        _log_streamed_unreadable(data)
    assert "streaming: 2 unreadable file(s)" in caplog.text
    for name in ("c.jpg", "d.jpg"):
        bad.add(name, f"{name}: not a readable image")
    assert len(bad.examples) == 3  # keep: 3 different files listed, the rest only counted
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _log_streamed_unreadable(data)
    assert "streaming: 3+ unreadable file(s)" in caplog.text
