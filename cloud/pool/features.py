"""Encode the pool with the exported encoder, through a sharded, resumable feature cache.

The cloud encodes with the very artifact it sends to devices (through the device SDK's runtime and
its preprocessing), so pool features and device features come from the same graph and the same
decoding. Decoding runs in ``workers`` threads, one batch ahead of inference.

The cache is a folder per encoder (``features-<sha256[:16]>/``) of shards ``shard-NNNNNN.npz``, each
written atomically as soon as ``shard_size`` new features exist: a crashed run loses at most one
shard's work, Ctrl-C (``KeyboardInterrupt``) none (the unfinished shard is written before it stops),
and a restart encodes only what no shard holds. An entry is keyed by the file's
absolute path and stamped with its size and mtime (64-bit hashes of each): a file whose size or
mtime changed is encoded again and its old entry pruned; with ``prune_missing`` (a run over the
whole pool) entries of files that are no longer in the pool are pruned too. Files that cannot be
read are counted, listed and left out of the result; their stamp is remembered, so a restart
does not try them again until they change.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cloud.log import LOG, Progress
from cloud.pool.dataset import Unreadable, decode_batches
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.imagefolder import ImageItem
from device_sdk.runtime import Model

SHARD_RE = re.compile(r"shard-(\d{6})\.npz$")


def _hash64(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True
    )


def file_keys(paths: Sequence[str], workers: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """``(path_key, stamp)`` int64 per file: hashes of the absolute path and of ``size|mtime_ns`` (0 = missing)."""

    def one(path: str) -> Tuple[int, int]:
        key = _hash64(os.path.abspath(path))
        try:
            st = os.stat(path)
        except OSError:
            return key, 0
        return key, _hash64(f"{st.st_size}|{st.st_mtime_ns}")

    keys = np.empty(len(paths), dtype=np.int64)
    stamps = np.empty(len(paths), dtype=np.int64)

    def part(start: int) -> None:  # a slice per task: one future per file cost more than its stat
        for i in range(start, min(start + 4096, len(paths))):
            keys[i], stamps[i] = one(paths[i])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(part, range(0, len(paths), 4096)))
    return keys, stamps


@dataclass
class EncodedPool:
    """Features of the readable files (``features[i]`` is ``items[kept[i]]``) and the unreadable ones."""

    features: np.ndarray
    kept: np.ndarray
    unreadable: Unreadable = field(default_factory=Unreadable)
    cached: int = 0
    encoded: int = 0


class ShardedCache:
    """The feature shards of one encoder under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str, encoder_sha256: str, dim: int):
        self.folder = os.path.join(directory, f"features-{encoder_sha256[:16]}")
        os.makedirs(self.folder, exist_ok=True)
        self.dim = dim
        self._next = 1 + max([int(m.group(1)) for m in map(SHARD_RE.search, self.shards()) if m] or [0])

    def shards(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.folder, "shard-*.npz")))

    def write(self, keys: np.ndarray, stamps: np.ndarray, features: np.ndarray) -> str:
        """One new shard (features of unreadable files are NaN rows); returns its path."""
        path = os.path.join(self.folder, f"shard-{self._next:06d}.npz")
        self._next += 1
        self._save(path, keys, stamps, features)
        return path

    @staticmethod
    def _save(path: str, keys: np.ndarray, stamps: np.ndarray, features: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=keys.astype(np.int64), stamps=stamps.astype(np.int64), features=features.astype(np.float32))
        atomic_write_bytes(path, buf.getvalue())

    def fill(self, keys: np.ndarray, stamps: np.ndarray, out: np.ndarray, prune_missing: bool = False) -> np.ndarray:
        """Copy cached features of the requested files into ``out``; returns which rows were found.

        Found rows of unreadable files stay NaN in ``out``. Stale entries (another stamp for a
        requested path; with ``prune_missing`` also paths not requested) are pruned: their shard
        is rewritten without them, or removed when nothing in it is live.
        """
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return found
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for shard in self.shards():
            try:
                with np.load(shard, allow_pickle=False) as z:
                    k, s, f = z["keys"], z["stamps"], z["features"]
            except Exception as exc:  # noqa: BLE001 - a damaged shard is dropped, its files encoded again
                LOG.warning("feature cache: dropping unreadable shard %s (%s)", shard, exc.__class__.__name__)
                os.remove(shard)
                continue
            if f.ndim != 2 or f.shape[1] != self.dim or len(k) != len(f) or len(s) != len(f):
                LOG.warning("feature cache: dropping shard %s of another shape", shard)
                os.remove(shard)
                continue
            pos = np.minimum(np.searchsorted(sorted_keys, k), len(keys) - 1)
            requested = sorted_keys[pos] == k
            rows = order[pos]
            live = requested & (stamps[rows] == s)
            out[rows[live]] = f[live]
            found[rows[live]] = True
            stale = (requested & ~live) | (~requested if prune_missing else np.zeros(len(k), dtype=bool))
            if stale.all():
                os.remove(shard)
            elif stale.any():
                self._save(shard, k[~stale], s[~stale], f[~stale])
        # a path listed twice: the first copy was filled, give the others the same row
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
        for i in dup:
            out[order[i]], found[order[i]] = out[order[i - 1]], found[order[i - 1]]
        return found


def encode_pool_checked(
    model: Model,
    items: Sequence[ImageItem],
    cache_dir: Optional[str] = None,
    batch: int = 256,
    workers: int = 2,
    shard_size: int = 16384,
    prune_missing: bool = False,
) -> EncodedPool:
    """Features (float32, unit norm) of the readable ``items``, encoding only what the cache lacks."""
    paths = [it.path for it in items]
    dim = int(model.meta.feature_dim or 0)
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    unreadable = Unreadable()
    cache = keys = stamps = None
    found = np.zeros(len(paths), dtype=bool)
    if cache_dir:
        LOG.info("feature cache: checking %d files", len(paths))
        keys, stamps = file_keys(paths, workers=max(4, workers))
        cache = ShardedCache(cache_dir, model.sha256, dim)
        found = cache.fill(keys, stamps, out, prune_missing=prune_missing)
        LOG.info("feature cache %s: %d of %d files cached", cache.folder, int(found.sum()), len(paths))
    todo = np.flatnonzero(~found)
    spec = model.meta.preprocessing()
    progress = Progress("encoding pool", len(todo))
    pending: List[np.ndarray] = []
    try:
        for start, images, ok in decode_batches(spec, [paths[i] for i in todo], batch, workers, unreadable):
            rows = todo[start : start + len(images)]
            if ok.any():
                out[rows[ok]] = model.run(images[ok])
            if cache is not None:
                pending.append(rows)
                if sum(len(r) for r in pending) >= shard_size:
                    _flush(cache, keys, stamps, out, pending)
            progress.update(len(rows))
    except KeyboardInterrupt:  # Ctrl-C: the finished batches of the unfinished shard are kept, not encoded again
        if cache is not None and pending:
            kept = sum(len(r) for r in pending)
            _flush(cache, keys, stamps, out, pending)
            LOG.warning("interrupted: %d more encoded files kept in %s; run again to resume", kept, cache.folder)
        raise
    if cache is not None:
        _flush(cache, keys, stamps, out, pending)
    kept_mask = ~np.isnan(out[:, 0]) if dim else np.ones(len(paths), dtype=bool)
    for i in np.flatnonzero(~kept_mask & found):
        unreadable.add(paths[i], f"{paths[i]}: unreadable when last tried (cached; touch or replace it to retry)")
    unreadable.log("encoding pool")
    kept = np.flatnonzero(kept_mask)
    features = out if len(kept) == len(out) else out[kept]
    return EncodedPool(features, kept, unreadable, int(found.sum()), len(todo))


def _flush(
    cache: ShardedCache, keys: np.ndarray, stamps: np.ndarray, out: np.ndarray, pending: List[np.ndarray]
) -> None:
    if not pending:
        return
    rows = np.concatenate(pending)
    pending.clear()
    cache.write(keys[rows], stamps[rows], out[rows])


def encode_pool(
    model: Model, items: Sequence[ImageItem], cache_dir: Optional[str] = None, batch: int = 256, workers: int = 2
) -> np.ndarray:
    """Features (N x d float32) for ``items``; an unreadable file is an ``InputError`` (:func:`encode_pool_checked`)."""
    from device_sdk.errors import InputError

    result = encode_pool_checked(model, items, cache_dir, batch, workers)
    if result.unreadable.count:
        raise InputError(f"{result.unreadable.count} unreadable image(s); first: {result.unreadable.examples[0][1]}")
    return result.features
