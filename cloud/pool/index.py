"""The pool index: the pool's images, their features, the k-means clusters and the probe.

Stored as one ``.npz`` (no object arrays, read with ``allow_pickle=False``) written atomically.
The probe id is fixed when the index is built, so every scores file can be matched to it.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from cloud.export.parity import accepted_encoders
from cloud.log import LOG
from cloud.pool.clustering import spherical_kmeans
from cloud.pool.dataset import Unreadable
from cloud.pool.features import encode_pool_checked
from cloud.pool.index_file import read_index_file
from cloud.pool.manifest import is_manifest, scan_pool
from device_sdk.errors import InputError
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.imagefolder import ImageItem
from device_sdk.protocol.round import Probe, new_id, utc_now
from device_sdk.runtime import load_model

INDEX_FORMAT = 1


@dataclass
class PoolIndex:
    paths: np.ndarray  # str, as given on the command line
    labels: np.ndarray  # str
    domains: np.ndarray  # str
    features: np.ndarray  # N x d float32, unit norm
    assign: np.ndarray  # N int32
    centroids: np.ndarray  # K x d float32, unit norm
    encoder_sha256: str
    probe_id: str
    created: str
    # the same encoder in other formats, admitted by the parity gate (cloud.export.parity): probes name them too
    encoder_variants: Tuple[str, ...] = ()
    unreadable: Unreadable = field(default_factory=Unreadable)  # files left out when it was built (not saved)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def accepted_encoders(self) -> Tuple[str, ...]:
        """The encoder this index was built with, then its variants: what a device may score with."""
        return (self.encoder_sha256,) + tuple(v for v in self.encoder_variants if v != self.encoder_sha256)

    def probe(
        self, codec: str = "float16", max_distance: Optional[float] = None, radius_quantile: Optional[float] = None
    ) -> Probe:
        """The probe of this index; with ``radius_quantile`` it asks for coverage (see :meth:`radii`)."""
        radii = None if radius_quantile is None else self.radii(radius_quantile)
        return Probe(
            self.probe_id,
            self.encoder_sha256,
            self.centroids,
            codec,
            max_distance,
            self.created,
            radii=radii,
            encoders=self.accepted_encoders[1:] or None,
        )

    def radii(self, quantile: float = 0.95) -> np.ndarray:
        """Per cluster, the cosine distance within which ``quantile`` of its own members lie.

        A device sample farther than that from its nearest centroid is "far": the pool has
        nothing quite like it. Tiny clusters borrow the median radius of all clusters.
        """
        if not 0.0 < quantile <= 1.0:
            raise InputError(f"radius quantile must lie in (0, 1]; got {quantile}")
        distance = 1.0 - np.einsum("ij,ij->i", self.features, self.centroids[self.assign])
        radii = np.zeros(self.k, dtype=np.float64)
        sizes = np.bincount(self.assign, minlength=self.k)
        order = np.argsort(self.assign, kind="stable")
        for k, members in enumerate(np.split(order, np.cumsum(sizes)[:-1])):
            radii[k] = np.quantile(distance[members], quantile) if len(members) >= 5 else np.nan
        fill = np.nanmedian(radii) if np.isfinite(radii).any() else 0.0
        radii = np.where(np.isfinite(radii), radii, fill)
        # float16 on the wire: round up so that float16/float32 centroids keep every member inside its radius
        # (int8 centroids move by up to ~1e-3 in cosine, which can push a boundary member out)
        return np.nextafter(radii.astype(np.float16), np.float16(np.inf)).astype(np.float32)

    def save(self, path: str) -> None:
        meta = {
            "format": INDEX_FORMAT,
            "encoder_sha256": self.encoder_sha256,
            "probe_id": self.probe_id,
            "created": self.created,
        }
        if self.encoder_variants:
            meta["encoder_variants"] = list(self.encoder_variants)
        buf = io.BytesIO()
        np.savez(
            buf,
            paths=self.paths,
            labels=self.labels,
            domains=self.domains,
            features=self.features,
            assign=self.assign,
            centroids=self.centroids,
            meta=np.array(json.dumps(meta)),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "PoolIndex":
        """Read an index file; a missing one is an ``InputError``, any other defect a ``MessageError``."""
        arrays, meta = read_index_file(path, INDEX_FORMAT)
        return cls(**arrays, **meta)


def build_index(
    pool_root: str,
    encoder_path: str,
    k: int,
    iters: int = 20,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    threads: int = 0,
    batch: int = 256,
    workers: int = 2,
) -> PoolIndex:
    """Scan (a folder or a CSV/Parquet manifest), encode (cached) and cluster the pool; a fresh probe id.

    The cache is pruned of files no longer in the pool (this is the whole pool). A path a manifest
    lists more than once is indexed once (its first row), so that no selection holds a file twice."""
    items = scan_pool(pool_root)
    return build_index_from_items(
        _first_of_each_path(items, pool_root) if is_manifest(pool_root) else items,
        encoder_path,
        k,
        iters,
        seed,
        cache_dir,
        threads,
        batch,
        where=pool_root,
        workers=workers,
        prune_missing=True,
    )


def _first_of_each_path(items: Sequence[ImageItem], where: str) -> Sequence[ImageItem]:
    """``items`` without the rows whose (normalised) path an earlier row has (checked by hash first: no set
    of a million paths is built unless there is a repeat)."""
    hashes = np.fromiter((hash(os.path.normpath(it.path)) for it in items), dtype=np.int64, count=len(items))
    if len(np.unique(hashes)) == len(items):
        return items
    seen: set = set()
    kept = []
    for it in items:
        key = os.path.normpath(it.path)
        if key not in seen:
            seen.add(key)
            kept.append(it)
    LOG.warning(
        "%s: %d duplicate row(s) skipped (a path listed again; its first row is kept)", where, len(items) - len(kept)
    )
    return kept


def build_index_from_items(
    items,
    encoder_path: str,
    k: int,
    iters: int = 20,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    threads: int = 0,
    batch: int = 256,
    where: str = "a list",
    workers: int = 2,
    prune_missing: bool = False,
) -> PoolIndex:
    """:func:`build_index` over a given list of images (e.g. a manifest, or a pool minus one domain).

    Unreadable files are left out of the index (``index.unreadable`` counts and lists them)."""
    model = load_model(encoder_path, threads=threads)
    variants = accepted_encoders(encoder_path)
    LOG.info(
        "pool: %d images under %s; encoder %s (%d-d)%s",
        len(items),
        where,
        model.sha256[:12],
        model.meta.feature_dim,
        "".join(f"; also accepts {v[:12]}" for v in variants),
    )
    encoded = encode_pool_checked(model, items, cache_dir, batch, workers, prune_missing=prune_missing)
    features = encoded.features
    if len(encoded.kept) != len(items):
        items = [items[i] for i in encoded.kept]
    if not items:
        raise InputError(f"no readable image in {where}")
    LOG.info("clustering %d features into k=%d", len(features), k)
    km = spherical_kmeans(
        features,
        k,
        iters=iters,
        seed=seed,
        progress=lambda it, total, change: LOG.info(
            "k-means iteration %d/%d: %.2f%% reassigned", it, total, 100 * change
        ),
    )
    return PoolIndex(
        paths=np.array([it.path for it in items], dtype=str),
        labels=np.array([it.label for it in items], dtype=str),
        domains=np.array([it.domain for it in items], dtype=str),
        features=features,
        assign=km.assign.astype(np.int32),
        centroids=km.centroids.astype(np.float32),
        encoder_sha256=model.sha256,
        probe_id=new_id(),
        created=utc_now(),
        encoder_variants=variants,
        unreadable=encoded.unreadable,
    )
