"""The sampler interface, its inputs, and the registry that names the implementations.

Every sampler (ECOS and the baselines) picks ``budget`` distinct pool indices from the same
inputs, so the pipeline, the CLI and one shared contract test suite treat them alike. Budget,
score and shape checks live here, once, in :meth:`Sampler.select`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Type, TypeVar

import numpy as np

from cloud.errors import BudgetError
from device_sdk.errors import MismatchError, UsageError
from device_sdk.registry import Registry


@dataclass(frozen=True, eq=False)
class PoolView:
    """What a sampler sees of the pool: unit-norm features (N x d float32), the cluster of
    every point (N int32), the cluster centroids (K x d float32) and, when the pool has domain
    folders, the domain of every point (``groups``: N int, -1 where a point has none)."""

    features: np.ndarray
    assign: np.ndarray
    centroids: np.ndarray
    groups: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n, k = len(self.features), len(self.centroids)
        if self.features.ndim != 2 or self.centroids.ndim != 2 or self.assign.shape != (n,):
            raise MismatchError(
                f"pool shapes disagree: features {self.features.shape}, assign {self.assign.shape}, "
                f"centroids {self.centroids.shape}; expected N x d, N and K x d"
            )
        if self.features.shape[1] != self.centroids.shape[1]:
            raise MismatchError(
                f"features have dimension {self.features.shape[1]} but centroids {self.centroids.shape[1]}: "
                "cluster the features these centroids came from"
            )
        if n and (self.assign.min() < 0 or self.assign.max() >= k):
            raise MismatchError(f"cluster ids must lie in 0..{k - 1} for {k} centroids")
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer) or (n and groups.min() < -1):
                raise MismatchError(f"groups must be N = {n} integers >= -1 (-1: no domain); got {groups.shape}")
            object.__setattr__(self, "groups", groups.astype(np.int64))

    @staticmethod
    def group_ids(names: Sequence[str]) -> Optional[np.ndarray]:
        """``groups`` from per-point domain names ("" = none); None unless two or more domains occur."""
        names = np.asarray(names, dtype=str)
        known = sorted(set(names.tolist()) - {""})
        if len(known) < 2:
            return None
        ids = np.searchsorted(np.asarray(known, dtype=str), names)
        return np.where(names == "", -1, ids).astype(np.int64)

    @property
    def size(self) -> int:
        return len(self.features)

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def cluster_sizes(self) -> np.ndarray:
        """Number of pool points in each cluster (K int64)."""
        return np.bincount(self.assign, minlength=self.n_clusters).astype(np.int64)


@dataclass(frozen=True, eq=False)
class ScoreSet:
    """Noisy coverage counts per cluster, summed over one or more devices, and the standard
    deviation of the noise in that sum (sqrt of the sum of the devices' variances; 0: exact).
    ``far`` is the (equally noisy) count of device samples outside every centroid's radius,
    when the probe asked for coverage; ``radius_quantile`` is the share of the pool's own points
    that lie inside their cluster's radius (so ``1 - radius_quantile`` of well-covered device
    samples are expected to land in the far bin by chance)."""

    scores: np.ndarray
    sigma: float = 0.0
    far: Optional[float] = None
    radius_quantile: float = 0.95

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.ndim != 1 or not np.isfinite(scores).all():
            raise UsageError(f"scores must be a 1-D array of finite numbers; got shape {scores.shape}")
        if not (np.isfinite(self.sigma) and self.sigma >= 0.0):
            raise UsageError(f"sigma must be a finite number >= 0; got {self.sigma!r}")
        if self.far is not None and not np.isfinite(self.far):
            raise UsageError(f"far must be a finite number; got {self.far!r}")
        if not 0.0 < self.radius_quantile <= 1.0:
            raise UsageError(f"radius_quantile must lie in (0, 1]; got {self.radius_quantile!r}")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "sigma", float(self.sigma))


class Sampler(ABC):
    """Picks ``budget`` distinct pool points. Subclasses set ``name`` (the registry key) and
    ``needs_scores``, and implement :meth:`_select` on inputs :meth:`select` has checked."""

    name: ClassVar[str]
    needs_scores: ClassVar[bool] = False

    def select(self, pool: PoolView, budget: int, scores: Optional[ScoreSet], rng: np.random.Generator) -> np.ndarray:
        """Indices (int64, unique, exactly ``budget`` of them) into the pool."""
        self.check(pool, budget, scores)
        return self._select(pool, int(budget), scores, rng)

    def check(self, pool: PoolView, budget: int, scores: Optional[ScoreSet]) -> None:
        """Raise the typed error a caller can act on if this call cannot be served."""
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise BudgetError(f"budget must be a whole number of points; got {budget!r}")
        if not 1 <= budget <= pool.size:
            raise BudgetError(f"budget {budget} does not fit a pool of {pool.size} points: choose 1..{pool.size}")
        if scores is None and self.needs_scores:
            raise UsageError(f"sampler {self.name!r} needs the devices' coverage scores; pass a ScoreSet")
        if scores is not None and len(scores.scores) != pool.n_clusters:
            raise MismatchError(
                f"scores cover {len(scores.scores)} clusters but the pool has {pool.n_clusters}: "
                "score against the centroids of this clustering"
            )

    @abstractmethod
    def _select(self, pool: PoolView, budget: int, scores: Optional[ScoreSet], rng: np.random.Generator) -> np.ndarray:
        """The sampler's own logic; ``budget`` is already known to lie in 1..N."""


SAMPLERS: Registry[Type[Sampler]] = Registry("sampler")
SamplerType = TypeVar("SamplerType", bound=Type[Sampler])


def register_sampler(cls: SamplerType) -> SamplerType:
    """Class decorator: make ``cls`` available to :func:`get_sampler` under ``cls.name``."""
    return SAMPLERS.register(cls)


def list_samplers() -> List[str]:
    return SAMPLERS.names()


def get_sampler(name: str, **config: object) -> Sampler:
    """A sampler by registry name, built with ``config`` (e.g. ``threshold_sigmas=3.0``)."""
    cls = SAMPLERS.get(name)
    try:
        inspect.signature(cls).bind(**config)
    except TypeError as exc:
        raise UsageError(f"sampler {name!r} does not take this configuration: {exc}") from None
    return cls(**config)
