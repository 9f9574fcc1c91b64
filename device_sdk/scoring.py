"""Centroid coverage (CC) scores: what the device computes from its private images.

Each local sample votes once, for its nearest centroid (cosine similarity on unit-norm
features), optionally only if it lies within ``max_distance`` of it. With per-centroid
``radii`` (coverage reporting), a sample farther than its nearest centroid's radius votes in one
extra "far" bin instead. Adding or removing one sample therefore changes exactly one count by
one: L2 sensitivity 1, whatever K is, with or without the far bin.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import MismatchError
from device_sdk.imagefolder import ImageItem
from device_sdk.protocol.round import Probe
from device_sdk.runtime import Model


def coverage_counts(
    features: np.ndarray,
    centroids: np.ndarray,
    max_distance: Optional[float] = None,
    chunk: int = 8192,
    radii: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Votes per centroid: ``counts[k]`` = local samples whose nearest centroid is ``k``.

    With ``radii`` (K cosine distances) the result has K + 1 entries: the last one counts the
    samples that lie outside the radius of their nearest centroid (and vote nowhere else); a
    ``max_distance`` given as well tightens every radius to it.
    """
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise MismatchError(f"features {features.shape} and centroids {centroids.shape} have different dimensions")
    c = _unit(centroids.astype(np.float32))
    if radii is not None and np.shape(radii) != (len(c),):
        raise MismatchError(f"{np.shape(radii)} radii for {len(c)} centroids")
    bins = len(c) + (radii is not None)
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, len(features), chunk):
        sims = _unit(features[start : start + chunk].astype(np.float32)) @ c.T
        nearest = sims.argmax(axis=1)
        distance = 1.0 - sims[np.arange(len(nearest)), nearest]
        if radii is not None:
            limit = np.asarray(radii, dtype=np.float32)[nearest]
            if max_distance is not None:  # both given: the tighter one decides what counts as near
                limit = np.minimum(limit, np.float32(max_distance))
            nearest = np.where(distance <= limit, nearest, len(c))
        elif max_distance is not None:
            nearest = nearest[distance <= max_distance]
        counts += np.bincount(nearest, minlength=bins)
    return counts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_compatible(probe: Probe, model: Model) -> None:
    """The probe's centroids live in the feature space of one encoder: ours must be one it accepts.

    A probe accepts its ``encoder_sha256`` and the artifacts it names in ``encoders`` (the same
    encoder in other formats, e.g. TFLite next to ONNX, checked for parity by the cloud).
    """
    accepted = probe.accepted_encoders
    if model.sha256 not in accepted:
        names = ", ".join(f"{e[:12]}..." for e in accepted)
        raise MismatchError(f"probe was made for encoder {names}, this device runs {model.sha256[:12]}...")
    if model.meta.feature_dim is not None and probe.feature_dim != model.meta.feature_dim:
        raise MismatchError(
            f"probe has {probe.feature_dim}-d centroids, the encoder outputs {model.meta.feature_dim}-d features"
        )


def encode_items(
    model: Model,
    items: Sequence[ImageItem],
    batch: int = 256,
    progress: Optional[Callable[[int, int], None]] = None,
    unreadable: Optional[List[Tuple[str, str]]] = None,
) -> np.ndarray:
    """Decode (as the artifact says) and encode images in batches (bounded memory); ``progress(done, total)``.

    The first unreadable file is an ``InputError``; with an ``unreadable`` list it is skipped instead
    (no row in the result) and ``(path, reason)`` appended to the list.
    """
    spec = model.meta.preprocessing()
    outs: List[np.ndarray] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        paths = [it.path for it in chunk]
        if unreadable is None:
            images = spec.decode_many(paths)
        else:
            images, _ = spec.decode_readable(paths, unreadable)
        if len(images):
            outs.append(model.run(images))
        if progress is not None:
            progress(start + len(chunk), len(items))
    return np.concatenate(outs) if outs else np.zeros((0, model.meta.feature_dim or 0), np.float32)


def log_unreadable(log: logging.Logger, what: str, unreadable: Sequence[Tuple[str, str]]) -> None:
    """One warning: how many files were skipped, and the first three with the reason (all at debug level)."""
    if unreadable:
        log.warning(
            "%s: %d unreadable image(s) skipped; first: %s",
            what,
            len(unreadable),
            "; ".join(reason for _, reason in unreadable[:3]),
        )
        for _, reason in unreadable[3:]:
            log.debug("%s: skipped %s", what, reason)
