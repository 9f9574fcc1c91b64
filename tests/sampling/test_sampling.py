"""Samplers: one contract suite over every registered sampler, then ECOS and k-center specifics."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cloud.errors import BudgetError
from cloud.sampling import PoolView, ScoreSet, get_sampler, list_samplers, proportional_quotas
from device_sdk.errors import MismatchError, UsageError

DIM = 16


def make_pool(sizes=(200, 200, 200, 200, 200, 200), spread: float = 0.25, seed: int = 0) -> PoolView:
    """One blob per cluster on the unit sphere; the blob centres are the centroids."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((len(sizes), DIM))
    centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
    assign = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    features = centroids[assign] + spread * rng.standard_normal((len(assign), DIM)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return PoolView(features=features, assign=assign, centroids=centroids)


def scores_for(pool: PoolView, sigma: float = 1.0) -> ScoreSet:
    """Devices that cover the first two clusters only."""
    scores = np.zeros(pool.n_clusters)
    scores[:2] = [120.0, 60.0]
    return ScoreSet(scores=scores, sigma=sigma)


def select(name: str, pool: PoolView, budget: int, scores=None, seed: int = 0, **config) -> np.ndarray:
    return get_sampler(name, **config).select(pool, budget, scores, np.random.default_rng(seed))


# ---- the contract every sampler keeps --------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> PoolView:
    return make_pool()


@pytest.mark.parametrize("name", list_samplers())
@pytest.mark.parametrize("budget", [1, 7, 150, 599])
def test_exact_unique_in_range(name, pool, budget):
    picks = select(name, pool, budget, scores_for(pool))
    assert picks.dtype == np.int64 and picks.shape == (budget,)
    assert len(np.unique(picks)) == budget
    assert picks.min() >= 0 and picks.max() < pool.size


@pytest.mark.parametrize("name", list_samplers())
def test_deterministic_for_the_same_rng_seed(name, pool):
    first = select(name, pool, 40, scores_for(pool), seed=5)
    np.testing.assert_array_equal(first, select(name, pool, 40, scores_for(pool), seed=5))


@pytest.mark.parametrize("name", list_samplers())
def test_budget_equal_to_the_pool_returns_all(name, pool):
    picks = select(name, pool, pool.size, scores_for(pool))
    np.testing.assert_array_equal(np.sort(picks), np.arange(pool.size))


@pytest.mark.parametrize("name", list_samplers())
@pytest.mark.parametrize("budget", [0, -3, 1201, 2.5, True])
def test_impossible_budget_is_a_budget_error(name, pool, budget):
    with pytest.raises(BudgetError, match="budget"):
        select(name, pool, budget, scores_for(pool))


@pytest.mark.parametrize("name", list_samplers())
def test_scores_for_another_clustering_are_a_mismatch(name, pool):
    with pytest.raises(MismatchError, match="clusters"):
        select(name, pool, 10, ScoreSet(np.ones(pool.n_clusters + 1)))


# ---- registry and inputs ---------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"random", "kcenter", "ecos"} <= set(list_samplers())
    with pytest.raises(UsageError, match="ecos, kcenter, random"):
        get_sampler("nope")
    with pytest.raises(UsageError, match="configuration"):
        get_sampler("random", threshold_sigmas=1.0)
    with pytest.raises(UsageError, match="oversample"):
        get_sampler("ecos", oversample=0.5)


def test_ecos_needs_scores(pool):
    with pytest.raises(UsageError, match="scores"):
        select("ecos", pool, 10, None)


def test_inconsistent_inputs_are_rejected(pool):
    with pytest.raises(MismatchError):
        PoolView(features=pool.features, assign=pool.assign[:-1], centroids=pool.centroids)
    with pytest.raises(MismatchError):
        PoolView(features=pool.features, assign=pool.assign, centroids=pool.centroids[:, :3])
    with pytest.raises(UsageError):
        ScoreSet(np.array([1.0, np.nan]))
    with pytest.raises(UsageError):
        ScoreSet(np.ones(3), sigma=-1.0)


# ---- ECOS ------------------------------------------------------------------------------------


def test_ecos_draws_only_from_covered_clusters_in_proportion(pool):
    picks = select("ecos", pool, 90, scores_for(pool, sigma=1.0), purity_power=0.0)
    assert np.bincount(pool.assign[picks], minlength=6).tolist() == [60, 30, 0, 0, 0, 0]


def test_purity_favours_clusters_with_more_votes_per_pool_point():
    """Two clusters with the same votes: the smaller one is more the device's (the larger one
    mixes in other data), so it gets more of the budget than score alone would give it."""
    pool = make_pool(sizes=(100, 400, 200))
    scores = ScoreSet(np.array([50.0, 50.0, 0.0]), sigma=1.0)
    flat = get_sampler("ecos", purity_power=0.0).plan(pool, 100, scores).quotas
    pure = get_sampler("ecos").plan(pool, 100, scores).quotas
    assert flat.tolist() == [50, 50, 0]
    assert pure[0] > 75 and pure.sum() == 100 and pure[2] == 0


def test_threshold_scales_with_the_noise(pool):
    scores = ScoreSet(np.array([50.0, 9.0, 5.0, 1.0, -4.0, 0.0]), sigma=3.0)
    plan = get_sampler("ecos").plan(pool, 64, scores)
    assert plan.kept.tolist() == [True, True, False, False, False, False]
    assert plan.threshold == 6.0 and not plan.fallback
    noiseless = get_sampler("ecos").plan(pool, 64, ScoreSet(scores.scores, sigma=0.0))
    assert noiseless.kept.tolist() == [True, True, True, True, False, False]


def test_capped_cluster_overflows_to_the_other_kept_ones():
    pool = make_pool(sizes=(10, 200, 200, 200))
    plan = get_sampler("ecos").plan(pool, 100, ScoreSet(np.array([60.0, 20.0, 20.0, 0.0]), sigma=1.0))
    assert plan.quotas.tolist() == [10, 45, 45, 0]


def test_budget_beyond_the_kept_clusters_goes_to_the_next_best_scores():
    pool = make_pool(sizes=(30, 30, 200, 200, 200))
    scores = ScoreSet(np.array([40.0, 20.0, 1.0, 1.5, -2.0]), sigma=1.0)
    plan = get_sampler("ecos").plan(pool, 100, scores)
    assert plan.kept.tolist() == [True, True, False, False, False]
    assert plan.quotas.tolist() == [30, 30, 0, 40, 0]


def test_non_positive_leftovers_go_to_the_cluster_nearest_the_kept_ones():
    pool = make_pool(sizes=(20, 50, 50))
    near = pool.centroids[0] + 0.1 * pool.centroids[2]
    centroids = np.stack([pool.centroids[0], pool.centroids[1], near / np.linalg.norm(near)])
    pool = PoolView(pool.features, pool.assign, centroids.astype(np.float32))
    plan = get_sampler("ecos").plan(pool, 30, ScoreSet(np.array([10.0, -1.0, -3.0]), sigma=1.0))
    assert plan.quotas.tolist() == [20, 0, 10]


def test_falls_back_to_the_top_clusters_when_nothing_passes(pool, caplog):
    scores = ScoreSet(np.array([1.0, 3.0, 0.5, -1.0, 2.0, 0.0]), sigma=5.0)
    with caplog.at_level(logging.WARNING):
        plan = get_sampler("ecos").plan(pool, 300, scores)
    assert plan.fallback and "falling back" in caplog.text
    assert plan.kept.tolist() == [False, True, False, False, True, False]
    assert plan.quotas.sum() == 300 and plan.quotas[1] > plan.quotas[4] > 0
    assert len(np.unique(select("ecos", pool, 300, scores))) == 300


def test_picks_are_near_the_centroid_yet_not_redundant():
    pool = make_pool(sizes=(400,), spread=0.4)
    # the 20 points nearest the centroid become copies of one point
    nearest = np.argsort(-(pool.features @ pool.centroids[0]))[:20]
    features = pool.features.copy()
    features[nearest] = features[nearest[0]]
    pool = PoolView(features, pool.assign, pool.centroids)
    picks = select("ecos", pool, 10, ScoreSet(np.array([50.0])), oversample=4.0)
    assert np.isin(picks, nearest).sum() == 1
    closeness = features[picks] @ pool.centroids[0]
    assert closeness.mean() > np.mean(features @ pool.centroids[0])


def test_proportional_quotas_are_exact_and_capped():
    quotas = proportional_quotas(np.array([1.0, 2.0, 3.0, 4.0]), np.array([100, 100, 5, 100]), 50)
    assert quotas.tolist() == [6, 13, 5, 26]  # 5, 10, 15, 20; the third is capped, 45 re-split 1:2:4
    assert proportional_quotas(np.array([1.0, 1.0, 1.0]), np.array([9, 9, 9]), 10).sum() == 10
    assert proportional_quotas(np.array([0.0, 0.0, 5.0]), np.array([3, 3, 2]), 6).tolist() == [2, 2, 2]
    assert proportional_quotas(np.array([2.0, 1.0]), np.array([3, 4]), 50).tolist() == [3, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights, caps = rng.random(12), rng.integers(0, 30, 12)
        total = int(rng.integers(1, 400))
        quotas = proportional_quotas(weights, caps, total)
        assert quotas.sum() == min(total, caps.sum()) and (quotas <= caps).all() and (quotas >= 0).all()


# ---- k-center --------------------------------------------------------------------------------


def coverage_radius(features: np.ndarray, picks: np.ndarray) -> float:
    """Largest cosine distance from a pool point to its nearest pick."""
    return float((1.0 - features @ features[picks].T).min(axis=1).max())


def test_kcenter_covers_the_pool_better_than_random(pool):
    kcenter = coverage_radius(pool.features, select("kcenter", pool, 30))
    random = coverage_radius(pool.features, select("random", pool, 30))
    assert kcenter < random
