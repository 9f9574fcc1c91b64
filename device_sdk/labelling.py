"""Automated client labelling: the device labels the cloud's proxy set by a private kNN vote.

The cloud sends the features of the ECOS proxy set (a :class:`~device_sdk.protocol.labels.LabelQuery`);
the device answers with one noisy label histogram per query, computed from its own labelled
images, and charges the release to its privacy ledger like a probe's scores.

The vote (docs/tasks.md has the full analysis)
    Every labelled device sample votes, with its own label, for the ``m = votes_per_sample``
    queries most similar to it (cosine similarity of unit-norm features; only queries within
    ``max_distance`` if the query sets one). ``votes[q, c]`` counts the samples of label ``c``
    that voted for query ``q``. Which queries a sample votes for depends only on that sample's
    feature and the (public) queries, never on the other samples: this is a reverse kNN, so
    there is no cascade where removing one sample moves another sample's votes.

Sensitivity
    Adding or removing one device sample adds or removes at most ``m`` votes, each in a different
    query row (a sample votes once per query), each changing one entry by exactly one. So the
    histogram matrix moves by at most ``m`` in L1 and ``sqrt(m)`` in L2 (add/remove adjacency,
    the ledger's convention; replacing a sample is two steps: ``sqrt(2m)``). A plain per-query
    kNN would instead let one sample sit among the k nearest neighbours of every query, for an
    L2 sensitivity of ``sqrt(2 * n_queries)``: that is the reason for the cap.

Noise and accounting
    N(0, sigma^2) on every entry of the (queries x labels) matrix, sigma calibrated to the epsilon
    asked for with ``calibrate_sigma(epsilon, delta, sqrt(m))``; one Gaussian release of
    sensitivity ``sqrt(m)`` in the ledger (``PrivacyLedger.release``), so it composes with the
    probes' releases and is refused past the budget. A repeated query id replays the stored
    answer for free; a query id reused for other content is refused (``ProbeConflict``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import MismatchError, ProbeConflict, UsageError
from device_sdk.privacy.accounting import calibrate_sigma, gaussian_noise
from device_sdk.privacy.accounting import epsilon as compose_epsilon
from device_sdk.privacy.ledger import PrivacyLedger, ReleaseResult
from device_sdk.protocol.labels import LabelQuery, LabelVotes

THUMB16 = "thumb16"  # feature space: 16x16 grey thumbnails, centred and unit-norm (thumbnail_features)
THUMB_SIZE = (16, 16)

__all__ = [
    "THUMB16",
    "answer_label_query",
    "thumbnail_features",
    "label_codes",
    "release_key",
    "vote_histograms",
    "vote_sensitivity",
]


def vote_sensitivity(votes_per_sample: int) -> float:
    """L2 sensitivity of the vote matrix under adding or removing one device sample: ``sqrt(m)``."""
    if (
        isinstance(votes_per_sample, bool)
        or not isinstance(votes_per_sample, (int, np.integer))
        or votes_per_sample < 1
    ):
        raise UsageError(f"votes_per_sample must be an integer >= 1, got {votes_per_sample!r}")
    return math.sqrt(int(votes_per_sample))


def thumbnail_features(images: np.ndarray) -> np.ndarray:
    """The ``thumb16`` feature space: uint8 NHWC images (already 16x16) -> grey, centred, unit-norm rows.

    Numpy only, the same on every device and in the cloud; label-bearing where a domain-sensitive
    encoder is not (an encoder trained to tell domains apart puts digits of one style together,
    whatever their class: docs/tasks.md has the measurement). The pool is public, so sending its
    thumbnails leaks nothing about the device.
    """
    if images.ndim != 4 or tuple(images.shape[1:3]) != THUMB_SIZE:
        raise UsageError(f"thumbnail features need {THUMB_SIZE} images (N, H, W, C), got {images.shape}")
    x = images.astype(np.float32).mean(axis=-1).reshape(len(images), -1)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def vote_histograms(
    queries: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    votes_per_sample: int,
    max_distance: Optional[float] = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Exact (noise-free) vote counts, shape (queries, n_labels), int64.

    ``labels`` are codes in ``[0, n_labels)``; a sample with code ``-1`` does not vote. Each
    voting sample adds one to ``[q, label]`` for each of its ``min(m, eligible queries)`` most
    similar queries (ties broken by query order), so each sample contributes at most ``m``
    votes, at most one per query row.
    """
    if queries.ndim != 2 or features.ndim != 2 or queries.shape[1] != features.shape[1]:
        raise MismatchError(f"queries {queries.shape} and device features {features.shape} have different dimensions")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(features),):
        raise UsageError(f"{labels.shape} labels for {len(features)} device samples")
    if np.any(labels >= n_labels) or np.any(labels < -1):
        raise UsageError(f"label codes must be in [-1, {n_labels})")
    m = int(votes_per_sample)
    vote_sensitivity(m)
    q = _unit(queries)
    hist = np.zeros((len(q), n_labels), dtype=np.int64)
    voters = np.flatnonzero(labels >= 0)
    m_eff = min(m, len(q))
    for start in range(0, len(voters), chunk):
        idx = voters[start : start + chunk]
        sims = _unit(features[idx]) @ q.T  # (samples, queries)
        # the m most similar queries of each sample: stable sort, so ties go to the lower query index
        top = np.argsort(-sims, axis=1, kind="stable")[:, :m_eff]
        rows = np.repeat(idx, m_eff)
        cols = top.reshape(-1)
        if max_distance is not None:
            keep = (1.0 - sims[np.repeat(np.arange(len(idx)), m_eff), cols]) <= max_distance
            rows, cols = rows[keep], cols[keep]
        np.add.at(hist, (cols, labels[rows]), 1)
    return hist


def label_codes(device_labels: Sequence[str], query_labels: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Codes of the device's labels in the query's label list; ``-1`` (no vote) for the others.

    Returns the codes and the sorted device labels the query does not know. A device none of whose
    labels the query knows cannot vote: ``MismatchError`` (its ``public`` text, for a refusal, names no label).
    """
    index = {name: i for i, name in enumerate(query_labels)}
    codes = np.array([index.get(v, -1) for v in device_labels], dtype=np.int64)
    unknown = sorted({v for v in device_labels if v not in index})
    if len(device_labels) and not np.any(codes >= 0):
        err = MismatchError(
            f"none of this device's labels ({', '.join(sorted(set(device_labels))[:10])}) is among the "
            f"query's labels ({', '.join(list(query_labels)[:10])})"
        )
        # what a refusal tells the cloud: the device's label names are its private data, never sent
        err.public = "none of this device's labels is among the query's labels"
        raise err
    return codes, unknown


def release_key(query: LabelQuery) -> str:
    """Ledger key of a label query: ``labels:<id>:<digest of its content>`` (replay and conflict checks)."""
    h = hashlib.sha256(np.ascontiguousarray(query.features, dtype=np.float32).tobytes())
    h.update(f"{query.feature_space}|{'|'.join(query.labels)}|{query.votes_per_sample}|{query.max_distance}".encode())
    return f"labels:{query.id}:{h.hexdigest()[:16]}"


def _same_id_other_content(query: LabelQuery) -> Callable[[str], bool]:
    key = release_key(query)
    prefix = key.rsplit(":", 1)[0] + ":"
    return lambda other: other != key and other.startswith(prefix) and ":" not in other[len(prefix) :]


def check_query_conflict(query: LabelQuery, ledger: PrivacyLedger) -> None:
    """Refuse early (before any image is read) a query id answered before with other content."""
    conflicts = _same_id_other_content(query)
    if any(conflicts(r["key"]) for r in ledger.releases()):
        raise ProbeConflict(
            f"label query {query.id[:40]} was answered before with other content; refused, "
            "nothing charged (a new question needs a new query id)"
        )


def resolve_sigma(ledger: PrivacyLedger, sensitivity: float, epsilon: Optional[float], sigma: Optional[float]) -> float:
    if (epsilon is None) == (sigma is None):
        raise UsageError("give exactly one of epsilon (of this release) or sigma (noise scale)")
    if sigma is not None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise UsageError(f"sigma must be > 0 (got {sigma}); a device never releases exact votes")
        return float(sigma)
    _, delta = ledger.budget
    return calibrate_sigma(float(epsilon), delta, sensitivity, ledger.accountant)


def answer_label_query(
    query: LabelQuery,
    feature_space: str,
    features: np.ndarray,
    labels: Sequence[str],
    ledger: PrivacyLedger,
    *,
    epsilon: Optional[float] = None,
    sigma: Optional[float] = None,
    commit: Callable[[bytes], None] = lambda payload: None,
    rng: Optional[np.random.Generator] = None,
) -> Tuple[LabelVotes, ReleaseResult]:
    """Vote on ``query`` with the device's labelled ``features``; noise, charge the ledger, return the message.

    ``feature_space`` names what made ``features`` (an encoder's sha256, or ``THUMB16``): it must be the query's.
    ``commit(payload)`` delivers the message; if it raises, the ledger is rolled back. ``rng`` is
    for tests only.
    """
    if query.feature_space != feature_space:
        raise MismatchError(
            f"label query is in feature space {query.feature_space[:16]}, these features are {feature_space[:16]}"
        )
    if features.ndim != 2 or features.shape[1] != query.features.shape[1]:
        raise MismatchError(
            f"the query has {query.features.shape[1]}-d features, the encoder outputs {features.shape[-1]}-d ones"
        )
    codes, _ = label_codes(list(labels), query.labels)
    sensitivity = vote_sensitivity(query.votes_per_sample)
    noise_sigma = resolve_sigma(ledger, sensitivity, epsilon, sigma)
    _, delta = ledger.budget
    release_eps = compose_epsilon([(noise_sigma, sensitivity)], delta, ledger.accountant)

    def produce() -> bytes:
        hist = vote_histograms(
            query.features, features, codes, len(query.labels), query.votes_per_sample, query.max_distance
        )
        noisy = hist + gaussian_noise(hist.size, noise_sigma, rng).reshape(hist.shape)
        return LabelVotes(
            query.id,
            ledger.device_id,
            query.feature_space,
            list(query.labels),
            noisy,
            {"mechanism": "gaussian", "sigma": noise_sigma, "sensitivity": sensitivity},
            {"epsilon": release_eps, "delta": delta, "accountant": ledger.accountant},
        ).to_bytes()

    result = ledger.release(
        release_key(query),
        noise_sigma,
        sensitivity,
        query.n_queries * len(query.labels),
        produce,
        commit,
        conflicts=_same_id_other_content(query),
    )
    return LabelVotes.from_bytes(result.payload, "released label votes"), result
