"""Farthest-first traversal (greedy k-center), shared by the k-center baseline and ECOS."""

from __future__ import annotations

import numpy as np


def farthest_first(points: np.ndarray, count: int, first: int) -> np.ndarray:
    """Positions (int64) of ``count`` rows of ``points`` (unit-norm), starting at ``first``;
    each next pick is the row farthest (lowest cosine, i.e. largest L2 distance on unit
    vectors) from its nearest earlier pick. Keeping each row's best cosine to the picks so
    far makes it O(count * N * d), with no allocation inside the loop.
    """
    if count >= len(points):
        return np.arange(len(points), dtype=np.int64)
    points = np.asarray(points, dtype=np.float32)
    picks = np.empty(count, dtype=np.int64)
    nearest = np.full(len(points), -np.inf, dtype=np.float32)
    similarity = np.empty(len(points), dtype=np.float32)
    latest = first
    for i in range(count):
        picks[i] = latest
        np.dot(points, points[latest], out=similarity)
        np.maximum(nearest, similarity, out=nearest)
        nearest[latest] = np.inf  # never pick a row twice, even among exact duplicates
        latest = int(np.argmin(nearest))
    return picks
