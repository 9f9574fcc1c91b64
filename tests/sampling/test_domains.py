"""ECOS on a pool with domain folders: the devices' votes, spread over each cluster's domains,
say which domains the proximity term draws from (docs/sampling.md, "Pools with domain folders")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sampling import make_pool, select

from cloud.sampling import PoolView, ScoreSet, get_sampler
from device_sdk.errors import MismatchError, UsageError


def domain_pool() -> PoolView:
    """Four clusters of 200: 0 and 1 all domain A, 2 half A half B, 3 all B."""
    pool = make_pool(sizes=(200, 200, 200, 200))
    groups = np.zeros(pool.size, dtype=np.int64)
    groups[500:] = 1  # the second half of cluster 2, and cluster 3
    return dataclasses.replace(pool, groups=groups)


def votes(*per_cluster: float) -> ScoreSet:
    return ScoreSet(np.asarray(per_cluster, dtype=np.float64), sigma=1.0)


def test_a_mixed_cluster_gives_its_quota_to_the_devices_domain():
    pool = domain_pool()
    scores = votes(100.0, 100.0, 50.0, 0.0)  # a device of domain A: half of cluster 2 is like it
    blind = select("ecos", dataclasses.replace(pool, groups=None), 500, scores)
    aware = select("ecos", pool, 500, scores)
    assert len(aware) == 500 and len(set(aware.tolist())) == 500
    assert np.sum(pool.groups[blind] == 1) >= 25  # cluster 2 gives about half of its 100 picks to B
    assert np.all(pool.groups[aware] == 0)  # all 500 A points
    plan = get_sampler("ecos").plan(pool, 500, scores)
    assert plan.domain_mix[0] > 0.85 and plan.relevant.sum() == 500 and plan.outside.sum() == 0


def test_a_device_of_two_domains_keeps_both():
    pool = domain_pool()
    scores = votes(100.0, 0.0, 0.0, 100.0)
    picks = select("ecos", pool, 300, scores)
    share_a = np.mean(pool.groups[picks] == 0)
    assert 0.3 < share_a < 0.7


def test_beyond_the_relevant_points_the_rest_comes_from_the_other_domains():
    pool = domain_pool()
    picks = select("ecos", pool, 700, votes(100.0, 100.0, 50.0, 0.0))
    assert len(set(picks.tolist())) == 700
    assert np.sum(pool.groups[picks] == 0) == 500  # every A point, then 200 B points


def test_floor_zero_or_one_domain_is_plain_ecos():
    pool = domain_pool()
    scores = votes(100.0, 100.0, 50.0, 0.0)
    off = select("ecos", pool, 300, scores, domain_floor=0.0)
    blind = select("ecos", dataclasses.replace(pool, groups=None), 300, scores)
    single = select("ecos", dataclasses.replace(pool, groups=np.zeros(pool.size, dtype=np.int64)), 300, scores)
    assert off.tolist() == blind.tolist() == single.tolist()
    with pytest.raises(UsageError, match="domain_floor"):
        get_sampler("ecos", domain_floor=1.5)


def test_points_without_a_domain_stay_eligible():
    pool = domain_pool()
    groups = pool.groups.copy()
    groups[450:500] = -1  # part of cluster 2's A half lost its folder
    picks = select("ecos", dataclasses.replace(pool, groups=groups), 500, votes(100.0, 100.0, 50.0, 0.0))
    assert np.all(groups[picks] != 1)


def test_group_ids_and_their_checks():
    assert PoolView.group_ids(["a", "a", ""]) is None  # one domain: nothing to tell apart
    assert PoolView.group_ids(["b", "a", "", "b"]).tolist() == [1, 0, -1, 1]
    pool = make_pool(sizes=(5, 5))
    with pytest.raises(MismatchError, match="groups"):
        dataclasses.replace(pool, groups=np.zeros(3, dtype=np.int64))
    with pytest.raises(MismatchError, match="groups"):
        dataclasses.replace(pool, groups=np.full(10, -2))


def _index(pool: PoolView):
    from cloud.pool.index import PoolIndex

    return PoolIndex(
        paths=np.array([f"p{i}.png" for i in range(pool.size)]),
        labels=np.array(["1"] * pool.size),
        domains=np.where(pool.groups == 0, "a", "b"),
        features=pool.features,
        assign=pool.assign,
        centroids=pool.centroids,
        encoder_sha256="0" * 64,
        probe_id="p",
        created="2026-01-01T00:00:00Z",
    )


def test_selection_shows_the_index_domains_unless_told_not_to():
    """The CLI and the daemon select through ``selection.select``: a pool with domain folders gets the rule."""
    from cloud.sampling.selection import select as select_from_index

    index = _index(domain_pool())
    scores = votes(100.0, 100.0, 50.0, 0.0)
    aware = select_from_index(index, "ecos", 500, scores)
    blind = select_from_index(index, "ecos", 500, scores, use_domains=False)
    assert np.all(index.domains[aware] == "a") and np.any(index.domains[blind] == "b")


def test_votes_unlike_the_domains_own_spread_leave_the_rule_off():
    """A device whose domain is absent piles its votes on a few clusters of the nearest domain:
    domain A spans clusters 0-3, the votes land on 0 and on 3 (a quarter B) only."""
    pool = make_pool(sizes=(200, 200, 200, 200, 200, 200))
    groups = np.zeros(pool.size, dtype=np.int64)
    groups[750:] = 1  # the last quarter of cluster 3, and clusters 4-5
    pool = dataclasses.replace(pool, groups=groups)
    scores = votes(100.0, 0.0, 0.0, 50.0, 0.0, 0.0)
    plan = get_sampler("ecos").plan(pool, 300, scores)
    assert plan.domain_fit == pytest.approx(27500 / (np.hypot(100, 50) * np.sqrt(3 * 200**2 + 150**2)))
    assert plan.relevant is None and plan.domain_mix[0] > 0.9
    blind = select("ecos", dataclasses.replace(pool, groups=None), 300, scores)
    assert select("ecos", pool, 300, scores, misfit_diversity=0.0).tolist() == blind.tolist()  # the hedge: below
    assert np.any(groups[blind] == 1)
    assert np.all(groups[select("ecos", pool, 300, scores, domain_fit=0.5)] == 0)  # a looser fit: the rule applies


def test_votes_that_fit_no_domain_send_part_of_the_budget_to_diversity():
    """The same absent-domain votes: with ``misfit_diversity`` the sampler hedges in proportion to
    how far the fit falls below ``domain_fit`` (docs/sampling.md); it costs nothing where the votes fit."""
    pool = make_pool(sizes=(200, 200, 200, 200, 200, 200))
    groups = np.zeros(pool.size, dtype=np.int64)
    groups[750:] = 1
    pool = dataclasses.replace(pool, groups=groups)
    scores = votes(100.0, 0.0, 0.0, 50.0, 0.0, 0.0)
    fit = 27500 / (np.hypot(100, 50) * np.sqrt(3 * 200**2 + 150**2))
    sampler = get_sampler("ecos", misfit_diversity=0.8)
    plan = sampler.plan(pool, 300, scores)
    assert plan.uncovered == pytest.approx(0.8 * (0.7 - fit) / (0.7 - 0.4))
    assert plan.diverse.sum() == round(plan.uncovered * 300) > 0 and plan.quotas.sum() == 300
    picks = sampler.select(pool, 300, scores, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 300
    assert np.sum(pool.assign[picks] == 1) > 0  # cluster 1 got no votes: only the diversity term draws there
    default = get_sampler("ecos").plan(pool, 300, scores)  # misfit_diversity 0.5 by default
    assert default.uncovered == pytest.approx(0.5 * (0.7 - fit) / (0.7 - 0.4))
    off = get_sampler("ecos", misfit_diversity=0.0).plan(pool, 300, scores)
    assert off.diverse is None and off.uncovered == 0.0
    fitting = sampler.plan(domain_pool(), 500, votes(100.0, 100.0, 50.0, 0.0))  # a device of domain A
    assert fitting.domain_fit >= 0.7 and fitting.diverse is None
    flat = sampler.plan(dataclasses.replace(pool, groups=None), 300, scores)  # no domains: no fit, no hedge
    assert flat.domain_fit is None and flat.diverse is None
    assert (
        sampler.plan(pool, 300, scores).uncovered
        == get_sampler("ecos", misfit_diversity=0.8, coverage=False).plan(pool, 300, scores).uncovered
    )  # no far count needed
    loose = get_sampler("ecos", domain_fit=0.3)  # a looser fit check still ramps: no jump at its own threshold
    assert loose.misfit(0.3) == 0.0 and 0.0 < loose.misfit(0.299) < 0.01 and loose.misfit(0.0) == 0.5
    with pytest.raises(UsageError, match="misfit_diversity"):
        get_sampler("ecos", misfit_diversity=1.5)


def test_ecos_cloud_sample_ignore_domains(tmp_path):
    import csv

    from cloud.cli import main as cloud_main
    from device_sdk.protocol.round import Scores

    index = _index(domain_pool())
    index.save(str(tmp_path / "pool.index.npz"))
    answer = Scores(index.probe_id, "dev", index.encoder_sha256, np.array([100.0, 100.0, 50.0, 0.0]), 1.0)
    (tmp_path / "a.scores").write_bytes(answer.to_bytes())
    domains = {}
    for flag in ([], ["--ignore-domains"]):
        out = tmp_path / f"sel{len(flag)}.csv"
        args = ["sample", "--index", str(tmp_path / "pool.index.npz"), "--scores", str(tmp_path / "a.scores")]
        args += ["--budget", "500", "--out", str(out), "--max-epsilon", "inf", "--radius-quantile", "0"] + flag
        assert cloud_main(args) == 0
        with open(out) as fh:
            domains[len(flag)] = {row["domain"] for row in csv.DictReader(fh)}
    assert domains == {0: {"a"}, 1: {"a", "b"}}


def test_a_kept_cluster_without_relevant_points_leaves_the_purity_reference_alone():
    """A cluster of another domain that passes the threshold on noise has no point the proximity
    term may draw from; its votes per relevant point (s / max(0, 1) = s) must not become the
    reference that the chosen domains' clusters' purity is measured against."""
    pool = make_pool(sizes=(200, 200, 200, 200, 200))
    groups = np.zeros(pool.size, dtype=np.int64)
    groups[800:] = 1  # cluster 4 is all domain B
    pool = dataclasses.replace(pool, groups=groups)
    quiet = get_sampler("ecos").plan(pool, 300, ScoreSet(np.array([100.0, 80.0, 60.0, 40.0, 0.0]), sigma=5.0))
    noisy = get_sampler("ecos").plan(pool, 300, ScoreSet(np.array([100.0, 80.0, 60.0, 40.0, 20.0]), sigma=5.0))
    assert noisy.kept[4] and noisy.relevant is not None and not noisy.relevant[800:].any()
    assert noisy.quotas.tolist() == quiet.quotas.tolist()


@st.composite
def _random_case(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 60))
    assign = rng.integers(0, k, n).astype(np.int32)
    n_groups = draw(st.integers(1, 3))
    groups = rng.integers(0, n_groups, n) if draw(st.booleans()) else assign.astype(np.int64) % n_groups
    groups[rng.random(n) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -1  # some or every point without a domain
    features = rng.standard_normal((n, 4)).astype(np.float32)
    centroids = rng.standard_normal((k, 4)).astype(np.float32)
    pool = PoolView(
        features / np.linalg.norm(features, axis=1, keepdims=True),
        assign,
        centroids / np.linalg.norm(centroids, axis=1, keepdims=True),
        groups=groups,
    )
    scores = rng.normal(0.0, 20.0, k) + (rng.random(k) < 0.5) * rng.random(k) * draw(st.sampled_from([0.0, 200.0]))
    sigma = draw(st.sampled_from([0.0, 1.0, 10.0]))  # 10: often no cluster passes (fallback)
    far = draw(st.one_of(st.none(), st.floats(-50.0, 500.0)))
    budget = draw(st.one_of(st.integers(1, n), st.just(n)))
    config = dict(domain_fit=draw(st.sampled_from([-1.0, 0.7])), purity_power=draw(st.sampled_from([0.0, 2.0])))
    return pool, ScoreSet(scores, sigma=sigma, far=far), budget, config, seed


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_random_case())
def test_random_pools_give_exactly_the_budget_with_the_domain_rule(case):
    pool, scores, budget, config, seed = case
    sampler = get_sampler("ecos", **config)
    picks = sampler.select(pool, budget, scores, np.random.default_rng(seed))
    assert picks.shape == (budget,) and len(np.unique(picks)) == budget
    assert picks.min() >= 0 and picks.max() < pool.size
    plan = sampler.plan(pool, budget, scores)
    assert plan.quotas.sum() == budget and np.all(plan.quotas <= pool.cluster_sizes())
    if plan.relevant is not None:  # the proximity picks come first: the relevant points, then the others
        n_proximal = budget - (0 if plan.diverse is None else int(plan.diverse.sum()))
        assert np.sum(plan.relevant[picks[:n_proximal]]) == min(n_proximal, int(plan.relevant.sum()))


def test_sparse_group_ids_are_compacted():
    """A caller's own ids (not group_ids'): 7 and 10**9 behave as 0 and 1, with no K x 10**9 table."""
    pool = domain_pool()
    sparse = dataclasses.replace(pool, groups=np.where(pool.groups == 0, 7, 10**9))
    scores = votes(100.0, 100.0, 50.0, 0.0)
    assert select("ecos", sparse, 500, scores).tolist() == select("ecos", pool, 500, scores).tolist()
