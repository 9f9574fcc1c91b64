"""Encode the pool with the exported encoder, with an on-disk feature cache.

The cloud encodes with the very ONNX artifact it sends to devices (through the device SDK's
runtime), so pool features and device features come from the same graph. The cache is one
``.npz`` per encoder sha256, keyed by ``path|size|mtime_ns``: re-indexing a grown pool only
encodes the new or changed images.
"""

from __future__ import annotations

import io
import os
from typing import Dict, List, Sequence

import numpy as np

from device_sdk.fsutil import atomic_write_bytes
from device_sdk.imagefolder import ImageItem
from device_sdk.runtime.models import Model
from device_sdk.scoring import encode_items

from cloud.log import Progress


def _key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class FeatureCache:
    def __init__(self, directory: str, encoder_sha256: str):
        self.path = os.path.join(directory, f"features-{encoder_sha256[:16]}.npz")
        self.table: Dict[str, np.ndarray] = {}
        if os.path.exists(self.path):
            with np.load(self.path, allow_pickle=False) as z:
                self.table = dict(zip(z["keys"].tolist(), z["features"]))

    def save(self) -> None:
        buf = io.BytesIO()
        keys = np.array(list(self.table), dtype=str)
        feats = np.stack(list(self.table.values())) if self.table else np.zeros((0, 0), np.float32)
        np.savez(buf, keys=keys, features=feats)
        atomic_write_bytes(self.path, buf.getvalue())


def encode_pool(model: Model, items: Sequence[ImageItem], cache_dir: str | None = None, batch: int = 512) -> np.ndarray:
    """Features (N x d float32) for ``items``, encoding only what the cache lacks."""
    cache = FeatureCache(cache_dir, model.sha256) if cache_dir else None
    keys = [_key(it.path) for it in items] if cache else []
    todo: List[int] = [i for i, k in enumerate(keys) if k not in cache.table] if cache else list(range(len(items)))
    progress = Progress("encoding pool", len(todo))
    fresh = encode_items(model, [items[i] for i in todo], batch, lambda done, total: progress.update(done - progress.done))
    if cache is None:
        return fresh
    for j, i in enumerate(todo):
        cache.table[keys[i]] = fresh[j]
    if todo:
        cache.save()
    return np.stack([cache.table[k] for k in keys]).astype(np.float32)
