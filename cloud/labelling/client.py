"""The cloud's side of automated client labelling: ask devices to vote, keep the confident labels.

``group_features`` clusters the proxy set's features (by default ``thumb16`` thumbnails,
device_sdk/labelling.py) into a few groups; ``build_label_query`` puts the groups' centroids into
a :class:`~device_sdk.protocol.labels.LabelQuery`; every proxy image later takes its group's label.
``combine_votes`` checks each device's answer against the query and sums them (the noise of a
sum of independent Gaussians has sigma = sqrt(sum sigma_i^2)). ``confident_labels`` keeps a
query's top label only where it leads the runner-up by ``min_margin`` noise sigmas: a margin of
``t * sigma`` between two noisy counts is rarely noise alone (their difference has standard
deviation ``sqrt(2) sigma``); everything else stays unlabelled for the semi-supervised trainer.
This is post-processing of released numbers: it costs no privacy. ``check_votes`` refuses, before
anything is summed, votes no honest device sends for the query (the daemon checks each on arrival).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cloud.errors import ImplausibleVotes
from cloud.log import LOG
from cloud.pool.index import PoolIndex
from cloud.sampling.selection import Plausibility
from device_sdk.errors import MessageError, MismatchError
from device_sdk.labelling import vote_sensitivity
from device_sdk.protocol.labels import LabelQuery, LabelVotes
from device_sdk.protocol.round import new_id


def build_label_query(
    features: np.ndarray,
    feature_space: str,
    labels: Sequence[str],
    votes_per_sample: int = 10,
    max_distance: Optional[float] = None,
    codec: str = "float16",
    query_id: Optional[str] = None,
) -> LabelQuery:
    """A query over the proxy set's ``features`` in ``feature_space`` (``THUMB16`` or an encoder's sha256)."""
    return LabelQuery(
        query_id or new_id(),
        feature_space,
        list(labels),
        np.asarray(features, dtype=np.float32),
        int(votes_per_sample),
        None if max_distance is None else float(max_distance),
        codec,
    )


def group_features(features: np.ndarray, groups: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(centroids, assign)``: the proxy set in ``groups`` cosine clusters (``groups >= n``: one per image).

    The device votes over the groups' centroids and every image takes its group's label. Fewer
    released numbers mean less noise in total for the same epsilon: with one vote per device
    sample (sensitivity 1) a group of the device's own kind collects several votes over one noise
    draw, where one query per image would spread the same votes thinly over as many noise draws
    (measured in docs/tasks.md).
    """
    from cloud.pool.clustering import spherical_kmeans

    x = np.asarray(features, dtype=np.float32)
    if groups <= 0 or groups >= len(x):
        return x, np.arange(len(x), dtype=np.int64)
    fit = spherical_kmeans(x, int(groups), seed=seed)
    return fit.centroids.astype(np.float32), fit.assign.astype(np.int64)


def thumbnail_query_features(paths: Sequence[str]) -> np.ndarray:
    """``THUMB16`` features of pool images (decoded at 16x16, as the device does)."""
    from device_sdk.imagefolder import load_images
    from device_sdk.labelling import THUMB_SIZE, thumbnail_features

    return thumbnail_features(load_images(list(paths), THUMB_SIZE))


def picks_of_selection(index: PoolIndex, paths: Sequence[str]) -> np.ndarray:
    """Index rows of the selection's image paths (all must be in the index)."""
    where = {str(p): i for i, p in enumerate(index.paths)}
    missing = [p for p in paths if p not in where]
    if missing:
        raise MismatchError(f"{len(missing)} selected images are not in the index; first: {missing[0]}")
    return np.array([where[p] for p in paths], dtype=np.int64)


@dataclass
class VoteSet:
    votes: np.ndarray  # (queries, labels), summed over devices
    sigma: float  # noise of the sum
    devices: List[str]
    epsilons: Dict[str, float]  # per device: epsilon of its release


def combine_votes(query: LabelQuery, answers: Sequence[LabelVotes]) -> VoteSet:
    if not answers:
        raise MessageError("no label votes to combine")
    per_device: Dict[str, LabelVotes] = {}
    for a in answers:
        check_answers_query(query, a)
        if a.device_id in per_device:
            LOG.warning("device %s answered twice; counted once", a.device_id)
            continue
        per_device[a.device_id] = a
    total = sum(a.votes for a in per_device.values())
    sigma = math.sqrt(sum(a.sigma**2 for a in per_device.values()))
    return VoteSet(
        np.asarray(total, dtype=np.float64), sigma, sorted(per_device), {d: a.epsilon for d, a in per_device.items()}
    )


def check_answers_query(query: LabelQuery, votes: LabelVotes) -> None:
    """``MismatchError`` unless ``votes`` answer ``query``: its id, feature space, labels and shape."""
    who = f"label votes of device {votes.device_id}"
    if votes.query_id != query.id:
        raise MismatchError(f"{who} answer query {votes.query_id[:40]}, not {query.id[:40]}")
    if votes.feature_space != query.feature_space or list(votes.labels) != list(query.labels):
        raise MismatchError(f"{who} are for another feature space or label list than query {query.id[:40]}")
    if votes.votes.shape != (query.n_queries, len(query.labels)):
        raise MismatchError(
            f"{who} have shape {votes.votes.shape}, the query has {query.n_queries} x {len(query.labels)}"
        )


def confident_labels(votes: np.ndarray, sigma: float, min_margin: float = 2.0) -> Tuple[np.ndarray, np.ndarray]:
    """``(codes, margin)``: the top label's code where it leads by >= ``min_margin`` sigmas, else -1."""
    if votes.ndim != 2 or votes.shape[1] < 2:
        raise MismatchError(f"votes must be (queries, labels >= 2), got {votes.shape}")
    order = np.sort(votes, axis=1)
    margin = (order[:, -1] - order[:, -2]) / max(sigma, 1e-12)
    codes = np.where(margin >= min_margin, votes.argmax(axis=1), -1)
    return codes.astype(np.int64), margin


def check_votes(query: LabelQuery, votes: LabelVotes, limits: Plausibility) -> None:
    """Refuse votes that do not answer ``query`` (``MismatchError``) or that no honest device sends
    (:class:`ImplausibleVotes` with the failed ``check``).

    An honest answer has the query's id, feature space, labels and shape; the sensitivity
    ``sqrt(m)`` of the query's ``votes_per_sample`` (``sensitivity``); noise at least what the
    round's ``max_epsilon`` needs at that sensitivity, ``limits.min_sigma * sqrt(m)``
    (``noise_too_low``); every count within ``[-t*sigma, max_samples + t*sigma]`` (``count_range``:
    a query row gets at most one vote per device sample); and a total within ``min(m, queries) *
    max_samples + t*sigma*sqrt(n)`` for n counts (``total``), t = ``limits.tail_sigmas``.
    """
    who = f"label votes of device {votes.device_id}"
    check_answers_query(query, votes)
    sensitivity = vote_sensitivity(query.votes_per_sample)
    if not math.isclose(votes.sensitivity, sensitivity, rel_tol=1e-9):
        raise ImplausibleVotes(
            f"{who} claim L2 sensitivity {votes.sensitivity:g}; the query's is sqrt({query.votes_per_sample}) "
            f"= {sensitivity:g}",
            "sensitivity",
        )
    min_sigma = limits.min_sigma * sensitivity
    if votes.sigma < min_sigma:
        raise ImplausibleVotes(
            f"{who} carry noise sigma {votes.sigma:.4g}, below the {min_sigma:.4g} this round's max_epsilon needs",
            "noise_too_low",
        )
    t, n = limits.tail_sigmas, votes.votes.size
    lo, hi = -t * votes.sigma, limits.max_samples + t * votes.sigma
    if float(votes.votes.min()) < lo or float(votes.votes.max()) > hi:
        raise ImplausibleVotes(f"{who} hold a count outside [{lo:.4g}, {hi:.4g}]", "count_range")
    top = min(query.votes_per_sample, query.n_queries) * limits.max_samples + t * votes.sigma * math.sqrt(n)
    if float(votes.votes.sum()) > top:
        raise ImplausibleVotes(f"{who} sum to {float(votes.votes.sum()):.6g}, above {top:.6g}", "total")
