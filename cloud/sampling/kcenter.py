"""Greedy k-center: the diversity-only baseline (no device input, epsilon = 0)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from cloud.sampling.base import PoolView, Sampler, ScoreSet, register_sampler
from cloud.sampling.farthest import farthest_first


@register_sampler
class KCenterSampler(Sampler):
    """Farthest-first traversal over the whole pool from a random first point: covers the
    pool evenly, so it spends most of the budget on out-of-distribution regions."""

    name = "kcenter"

    def _select(self, pool: PoolView, budget: int, scores: Optional[ScoreSet], rng: np.random.Generator) -> np.ndarray:
        return farthest_first(pool.features, budget, first=int(rng.integers(pool.size)))
