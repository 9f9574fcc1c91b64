"""Uniform random sampling: the baseline that asks nothing of the device."""

from __future__ import annotations

from typing import Optional

import numpy as np

from cloud.sampling.base import PoolView, Sampler, ScoreSet, register_sampler


@register_sampler
class RandomSampler(Sampler):
    """``budget`` pool points uniformly at random, without replacement."""

    name = "random"

    def _select(self, pool: PoolView, budget: int, scores: Optional[ScoreSet], rng: np.random.Generator) -> np.ndarray:
        return rng.choice(pool.size, size=budget, replace=False).astype(np.int64)
