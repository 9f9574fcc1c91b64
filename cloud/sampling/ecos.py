"""ECOS sampling: "compress -> filter -> diversely decompress" (the paper's sampling step; docs/sampling.md).

The pool is already compressed into K clusters; the devices sent one noisy coverage count per
cluster. This module (a) filters out clusters whose score is not clearly above the noise,
(b) splits the budget over the kept clusters in proportion to their scores, and (c) inside
each cluster picks points near the centroid that are not redundant with each other.

Coverage (docs/sampling.md): when the devices also reported how many of their samples lie
outside every centroid's radius (the far bin of the same histogram), the part of the device's
data the pool does not cover is estimated as ``u`` and ``round(u * B)`` of the budget goes to
the diversity term instead: a cluster-stratified uniform draw over the whole pool. With full
coverage (u = 0) this is plain ECOS; with no coverage at all (u = 1) it is random sampling.

Domains (docs/sampling.md): when the pool has domain folders, the votes spread over each
cluster's domains say which domains the devices' data comes from; where the votes fit those
domains, the proximity term draws from their points only (:meth:`EcosSampler._domains`); where
they fit none, the device's domain is most likely absent and part of the budget goes to the
diversity term (:meth:`EcosSampler.misfit`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from cloud.sampling.base import PoolView, Sampler, ScoreSet, register_sampler
from cloud.sampling.farthest import farthest_first
from device_sdk.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """How ECOS splits a budget, for reports: ``quotas`` (K int64, points drawn from each
    cluster, summing to the budget), ``kept`` (K bool, clusters that passed the filter, or the
    fallback's top clusters), the ``threshold`` the scores were held to, and ``fallback``
    (True when no cluster passed it)."""

    quotas: np.ndarray
    kept: np.ndarray
    threshold: float
    fallback: bool
    diverse: Optional[np.ndarray] = None  # K int64: of ``quotas``, points drawn uniformly (coverage term)
    uncovered: float = 0.0  # estimated share of the devices' data outside the pool's coverage
    domain_mix: Optional[np.ndarray] = None  # G float: the devices' estimated share in each pool domain
    relevant: Optional[np.ndarray] = None  # N bool: points of the domains the proximity term draws from
    domain_fit: Optional[float] = None  # cosine of the votes to the chosen domains' spread (see EcosSampler)
    outside: Optional[np.ndarray] = None  # K int64: of the proximity quota, points from the other domains


@register_sampler
@dataclass(frozen=True)
class EcosSampler(Sampler):
    """ECOS sampler. With noise (sigma > 0) a cluster is kept when its score exceeds
    ``threshold_sigmas * sigma``, so pure noise rarely passes (2 sigma: ~2.3% of empty
    clusters); without noise when it reaches ``min_count``. Each cluster contributes up to
    ``ceil(oversample * quota)`` candidates nearest its centroid to the diversity pass."""

    name = "ecos"
    needs_scores = True

    threshold_sigmas: float = 2.0
    min_count: float = 1.0
    oversample: float = 2.0
    coverage: bool = True  # use the far count, when the scores have one
    far_slack: float = 2.0  # far shares up to far_slack * (1 - radius_quantile) count as covered
    uncovered_far_share: float = 1.0  # far share of data from a domain the pool lacks (docs/sampling.md)
    purity_power: float = 2.0  # 0: budget in proportion to score (the first version)
    domain_floor: float = 0.2  # pool with domain folders: keep domains with >= floor x the top domain's share
    domain_fit: float = 0.7  # ... only if the votes look like those domains' own spread over the clusters
    misfit_diversity: float = 0.5  # votes that fit no pool domain: up to this share of the budget to diversity

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold_sigmas) and self.threshold_sigmas >= 0):
            raise UsageError(f"threshold_sigmas must be a finite number >= 0; got {self.threshold_sigmas!r}")
        if not (math.isfinite(self.min_count) and self.min_count > 0):
            raise UsageError(f"min_count must be a finite number > 0; got {self.min_count!r}")
        if not (math.isfinite(self.oversample) and self.oversample >= 1):
            raise UsageError(f"oversample must be a finite number >= 1; got {self.oversample!r}")
        if not 0.0 < self.uncovered_far_share <= 1.0:
            raise UsageError(f"uncovered_far_share must lie in (0, 1]; got {self.uncovered_far_share!r}")
        if not 0.0 <= self.domain_floor <= 1.0:
            raise UsageError(f"domain_floor must lie in [0, 1] (0: ignore the domains); got {self.domain_floor!r}")
        if not -1.0 <= self.domain_fit <= 1.0:
            raise UsageError(f"domain_fit must lie in [-1, 1]; got {self.domain_fit!r}")
        if not 0.0 <= self.misfit_diversity <= 1.0:
            raise UsageError(f"misfit_diversity must lie in [0, 1]; got {self.misfit_diversity!r}")

    def plan(self, pool: PoolView, budget: int, scores: Optional[ScoreSet]) -> SamplingPlan:
        """The per-cluster quotas :meth:`select` would draw, without drawing them."""
        self.check(pool, budget, scores)
        return self._plan(pool, int(budget), scores)

    def _select(self, pool: PoolView, budget: int, scores: Optional[ScoreSet], rng: np.random.Generator) -> np.ndarray:
        """Picks grouped by cluster, best-scored cluster first (so a rank reads as priority);
        the coverage term's uniform picks come last."""
        plan = self._plan(pool, budget, scores)
        diverse = plan.diverse if plan.diverse is not None else np.zeros_like(plan.quotas)
        proximal = plan.quotas - diverse
        members = _members_by_cluster(pool.assign, pool.n_clusters)
        parts = []
        for j in np.argsort(-scores.scores, kind="stable"):
            if not proximal[j]:
                continue
            if plan.relevant is None:
                parts.append(self._pick_in_cluster(pool.features, members[j], pool.centroids[j], int(proximal[j])))
                continue
            inside = members[j][plan.relevant[members[j]]]
            n_out = int(plan.outside[j])
            for group, quota in ((inside, int(proximal[j]) - n_out), (members[j][~plan.relevant[members[j]]], n_out)):
                if quota:
                    parts.append(self._pick_in_cluster(pool.features, group, pool.centroids[j], quota))
        taken = np.zeros(pool.size, dtype=bool)
        for part in parts:
            taken[part] = True
        for j in np.flatnonzero(diverse):
            free = members[j][~taken[members[j]]]
            parts.append(rng.choice(free, size=int(diverse[j]), replace=False).astype(np.int64))
        return np.concatenate(parts)

    def _plan(self, pool: PoolView, budget: int, scores: ScoreSet) -> SamplingPlan:
        sizes = pool.cluster_sizes()
        kept, threshold, fallback = self._filter(scores, sizes, budget)
        uncovered = self.uncovered(scores, kept, self.far_slack, self.uncovered_far_share) if self.coverage else 0.0
        mix, relevant, fit = self._domains(pool, scores, kept)
        if relevant is None and fit is not None:  # needs no far count: the votes' fit says it
            uncovered = max(uncovered, self.misfit(fit))
        n_diverse = int(round(uncovered * budget))
        eligible = sizes if relevant is None else np.bincount(pool.assign[relevant], minlength=pool.n_clusters)
        # the purity reference over the kept clusters with points to draw: one without (all another domain's,
        # kept on noise) would count its score per max(0, 1) point and inflate the reference
        reference = kept & (eligible > 0)
        weights = np.clip(scores.scores, 0.0, None) * purity(scores.scores, eligible, reference) ** self.purity_power
        n_proximal = budget - n_diverse
        n_inside = min(n_proximal, int(eligible.sum()))
        proximal = _allocate(scores.scores, kept, eligible, n_inside, pool.centroids, weights)
        outside = None
        if relevant is not None:  # the relevant domains cannot hold the proximity term: the rest from the others
            outside = _allocate(scores.scores, kept, sizes - eligible, n_proximal - int(proximal.sum()), pool.centroids)
            proximal = proximal + outside
        diverse = None
        if n_diverse:
            room = sizes - proximal
            diverse = proportional_quotas(room.astype(np.float64), room, n_diverse)
        return SamplingPlan(
            quotas=proximal if diverse is None else proximal + diverse,
            kept=kept,
            threshold=threshold,
            fallback=fallback,
            diverse=diverse,
            uncovered=uncovered if n_diverse else 0.0,
            domain_mix=mix,
            relevant=relevant,
            outside=outside,
            domain_fit=fit,
        )

    def _domains(self, pool: PoolView, scores: ScoreSet, kept: np.ndarray) -> Tuple[Optional[np.ndarray], ...]:
        """The devices' mix over the pool's domains, the points of the domains that matter, the fit.

        Each kept cluster's (clipped) score is spread over the domains of its pool points in
        proportion to their counts: ``mix[g] = sum_k s_k n_kg / n_k``, normalised. The proximity
        term then draws only from domains with at least ``domain_floor`` times the top domain's
        share (and points without a domain): a cluster that mixes the device's domain with
        another gives its quota to the device's. Only if the devices' data looks like those
        domains: the votes of a device drawn from them spread over the clusters as the domains'
        own pool points do, so the cosine between the kept scores and ``sum_g mix[g] n_kg / N_g``
        must reach ``domain_fit``; a device whose domain the pool lacks piles its votes on the
        few clusters of the nearest domain that resemble it (cosine 0.17-0.60 on the real-data
        benchmark, against 0.69-0.99 for a device whose domain is there), and narrowing the draw
        to that domain would only concentrate the budget on the wrong data. Post-processing of
        the same noisy counts: no privacy cost. (None, None, None) when the pool has fewer than
        two domains or the rule is off; (mix, None, fit) when the fit is too low.
        """
        if pool.groups is None or self.domain_floor <= 0.0:
            return None, None, None
        known = pool.groups >= 0
        ids, code = np.unique(pool.groups[known], return_inverse=True)  # compact ids (those of group_ids already are)
        if len(ids) < 2:
            return None, None, None
        counts = np.zeros((pool.n_clusters, len(ids)), dtype=np.float64)
        np.add.at(counts, (pool.assign[known], code), 1.0)
        frac = counts / np.maximum(pool.cluster_sizes(), 1)[:, None]
        votes = np.clip(scores.scores, 0.0, None) * kept
        mix = votes @ frac
        if mix.sum() <= 0.0:
            return None, None, None
        mix = mix / mix.sum()
        chosen = mix >= self.domain_floor * mix.max()
        spread = (counts / np.maximum(counts.sum(axis=0), 1.0)) @ np.where(chosen, mix, 0.0)
        fit = float(votes @ spread / max(np.linalg.norm(votes) * np.linalg.norm(spread), 1e-12))
        if fit < self.domain_fit:
            logger.info("domain rule off: the votes fit the pool's domains at cosine %.2f < %.2f", fit, self.domain_fit)
            return mix, None, fit
        relevant = ~known
        relevant[known] = chosen[code]
        return mix, relevant, fit

    def misfit(self, fit: float) -> float:
        """Share of the budget for the diversity term when the votes fit no domain of the pool.

        The votes of a device whose domain the pool has follow that domain's spread over the
        clusters (cosine ``fit`` >= ``domain_fit``); lower, the device's domain is most likely
        absent and its nearest domain a doubtful proxy: ``misfit_diversity`` times
        ``clip((domain_fit - fit) / width, 0, 1)``, full at 0.4 for the default ``domain_fit`` 0.7
        (``width = max(0.3, domain_fit - 0.4)``: a ramp, never a step, whatever ``domain_fit``).
        """
        if self.misfit_diversity <= 0.0 or fit >= self.domain_fit:
            return 0.0
        width = max(0.3, self.domain_fit - 0.4)
        return float(self.misfit_diversity * min(1.0, (self.domain_fit - fit) / width))

    @staticmethod
    def uncovered(scores: ScoreSet, kept: np.ndarray, slack: float = 2.0, uncovered_far_share: float = 1.0) -> float:
        """Share of the devices' samples the pool does not cover, from the far count.

        ``near`` = the (clipped) scores of the kept clusters, ``far`` = the far count (both
        noisy); the far share ``f = far / (near + far)`` is discounted by the share
        ``f0 = slack * (1 - radius_quantile)`` that well-covered data shows by chance (pool points
        lie outside their radius ``1 - q`` of the time by construction; a device's unseen images,
        measured, up to about twice that). Data from a domain the pool lacks shows a far share
        ``f1`` (``uncovered_far_share``); a mixture of the two gives
        ``u = clip((f - f0) / (f1 - f0), 0, 1)``. No far count: 0 (plain ECOS). Nothing clearly
        scored at all: 1.
        """
        if scores.far is None:
            return 0.0
        near = float(np.clip(scores.scores[kept], 0.0, None).sum())
        far = max(float(scores.far), 0.0)
        if near + far <= 0.0:
            return 1.0
        f0 = min(slack * (1.0 - scores.radius_quantile), 0.5)
        f1 = max(min(uncovered_far_share, 1.0), f0 + 0.05)
        return float(np.clip((far / (near + far) - f0) / (f1 - f0), 0.0, 1.0))

    def _filter(self, scores: ScoreSet, sizes: np.ndarray, budget: int) -> Tuple[np.ndarray, float, bool]:
        """Clusters clearly covered by the devices; the top-scored ones if none is."""
        if scores.sigma > 0:
            threshold = self.threshold_sigmas * scores.sigma
            kept = scores.scores > threshold
        else:
            threshold = self.min_count
            kept = scores.scores >= threshold
        if kept.any():
            return kept, threshold, False
        kept = _top_clusters(scores.scores, sizes, budget)
        logger.warning(
            "no cluster score passed the threshold %.3g (max score %.3g); falling back to the %d top-scored clusters",
            threshold,
            scores.scores.max(),
            int(kept.sum()),
        )
        return kept, threshold, True

    def _pick_in_cluster(
        self, features: np.ndarray, members: np.ndarray, centroid: np.ndarray, quota: int
    ) -> np.ndarray:
        """``quota`` members: candidates are the members nearest the centroid, then a
        farthest-first pass from the nearest one spreads the picks over the candidates."""
        if quota >= len(members):
            return members
        similarity = features[members] @ centroid
        n_candidates = min(len(members), math.ceil(self.oversample * quota))
        nearest = np.argpartition(-similarity, n_candidates - 1)[:n_candidates]
        first = int(np.argmax(similarity[nearest]))
        candidates = members[nearest]
        return candidates[farthest_first(features[candidates], quota, first=first)]


def proportional_quotas(weights: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas (int64) proportional to ``weights``, each at most its cap, summing to
    ``min(total, caps.sum())``. Shares above their cap are fixed at the cap and the excess is
    split again over the others until none overflows; integers by largest remainder. When the
    positively weighted entries are all full, the rest is split evenly over the others."""
    caps = np.asarray(caps, dtype=np.int64)
    target = int(min(total, caps.sum()))
    share = _capped_shares(np.asarray(weights, dtype=np.float64), caps, target)
    quotas = np.floor(share).astype(np.int64)
    short = target - int(quotas.sum())
    if short > 0:
        open_ = np.flatnonzero(quotas < caps)
        remainders = share[open_] - quotas[open_]
        quotas[open_[np.argsort(-remainders, kind="stable")[:short]]] += 1
    return quotas


def _capped_shares(weights: np.ndarray, caps: np.ndarray, target: int) -> np.ndarray:
    """Real-valued water-filling behind :func:`proportional_quotas`."""
    share = np.zeros(len(weights), dtype=np.float64)
    full = caps <= 0
    remaining = float(target)
    while remaining > 0 and not full.all():
        open_ = np.flatnonzero(~full)
        w = weights[open_]
        w = w / w.sum() if w.sum() > 0 else np.full(len(open_), 1.0 / len(open_))
        trial = remaining * w
        over = trial >= caps[open_]
        if not over.any():
            share[open_] = trial
            break
        capped = open_[over]
        share[capped] = caps[capped]
        full[capped] = True
        remaining -= float(caps[capped].sum())
    return share


def purity(scores: np.ndarray, sizes: np.ndarray, kept: np.ndarray, reference: float = 0.9) -> np.ndarray:
    """How device-like each cluster is, in [0, 1]: its votes per pool point ``s_k / n_k`` over
    the ``reference`` quantile of that ratio among the kept clusters (capped at 1).

    A cluster that is all the device's domain collects about as many votes per pool point as the
    domain's other clusters; one that mixes in other domains collects fewer for its size."""
    ratio = np.clip(scores, 0.0, None) / np.maximum(sizes, 1)
    if not kept.any():
        return np.ones(len(scores))
    top = float(np.quantile(ratio[kept], reference))
    return np.ones(len(scores)) if top <= 0 else np.clip(ratio / top, 0.0, 1.0)


def _allocate(
    scores: np.ndarray,
    kept: np.ndarray,
    sizes: np.ndarray,
    budget: int,
    centroids: np.ndarray,
    weights: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Budget over the kept clusters by ``weights`` (default: score); what they cannot hold goes
    to the other clusters, best score first (ties and non-positive scores: centroid nearest the kept)."""
    quotas = np.zeros(len(scores), dtype=np.int64)
    if budget <= 0:
        return quotas
    chosen = np.flatnonzero(kept)
    w = np.clip(scores, 0.0, None) if weights is None else weights
    quotas[chosen] = proportional_quotas(w[chosen], sizes[chosen], budget)
    rest = budget - int(quotas.sum())
    if rest > 0:
        order = _overflow_order(scores, kept, centroids)
        room = sizes[order]
        before = np.cumsum(room) - room
        quotas[order] = np.clip(rest - before, 0, room)
    return quotas


def _overflow_order(scores: np.ndarray, kept: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Clusters not kept, by positive score, then by cosine of their centroid to the nearest
    kept centroid: with no usable score, the closest region is the best guess."""
    others = np.flatnonzero(~kept)
    proximity = (centroids[others] @ centroids[kept].T).max(axis=1)
    return others[np.lexsort((-proximity, -np.clip(scores[others], 0.0, None)))]


def _top_clusters(scores: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Mask of the highest-scored clusters that together hold at least ``budget`` points."""
    order = np.argsort(-scores, kind="stable")
    count = int(np.searchsorted(np.cumsum(sizes[order]), budget)) + 1
    kept = np.zeros(len(scores), dtype=bool)
    kept[order[:count]] = True
    return kept


def _members_by_cluster(assign: np.ndarray, k: int) -> List[np.ndarray]:
    """Pool indices of each cluster's points, from one stable sort (not K scans of the pool)."""
    order = np.argsort(assign, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(np.bincount(assign, minlength=k))[:-1])
