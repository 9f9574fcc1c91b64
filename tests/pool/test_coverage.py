"""Coverage reporting (issue 9): the far bin on the device, its privacy cost, and the cloud's rule."""

from __future__ import annotations

import numpy as np
import pytest
from test_sampling import make_pool

from cloud.sampling import PoolView, ScoreSet, get_sampler
from device_sdk.device import answer_probe, release_key
from device_sdk.errors import MessageError, MismatchError, UsageError
from device_sdk.imagefolder import scan_image_folder
from device_sdk.privacy.accounting import epsilon
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol.round import Probe, Scores
from device_sdk.runtime import load_model
from device_sdk.scoring import coverage_counts, encode_items


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- device: the far bin ---------------------------------------------------------------------


def test_far_bin_counts_samples_outside_their_centroids_radius():
    c = np.eye(3, dtype=np.float32)
    f = _unit(np.array([[1, 0.01, 0], [1, 1, 0], [0, 0, 1], [0, 0.2, 1]], np.float32))
    counts = coverage_counts(f, c, radii=np.array([0.1, 0.1, 0.05], np.float32))
    # [1,1,0] is 0.29 from centroid 0 (radius 0.1): far; [0,0.2,1] is 0.019 from centroid 2: near
    np.testing.assert_array_equal(counts, [1, 0, 2, 1])
    assert counts.sum() == len(f)


def test_far_bin_keeps_sensitivity_one():
    """Adding any one sample changes exactly one of the K + 1 counts, by exactly one."""
    rng = np.random.default_rng(1)
    c, f = _unit(rng.normal(size=(10, 6))), _unit(rng.normal(size=(300, 6)))
    radii = rng.uniform(0.0, 0.6, size=10)
    base = coverage_counts(f, c, radii=radii)
    for extra in _unit(rng.normal(size=(50, 6))):
        diff = coverage_counts(np.vstack([f, extra]), c, radii=radii) - base
        assert np.abs(diff).sum() == 1 and diff.max() == 1


def test_radii_must_match_the_centroids():
    with pytest.raises(MismatchError):
        coverage_counts(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), radii=np.ones(2))


def test_probe_and_scores_carry_coverage_on_the_wire():
    c = _unit(np.random.default_rng(0).normal(size=(5, 4))).astype(np.float32)
    plain = Probe("p1", "ab" * 32, c, created="t")
    with_radii = Probe("p1", "ab" * 32, c, created="t", radii=np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32))
    assert Probe.from_bytes(plain.to_bytes()).radii is None
    back = Probe.from_bytes(with_radii.to_bytes())
    np.testing.assert_allclose(back.radii, with_radii.radii, rtol=1e-3)
    s = Scores("p1", "dev", "ab" * 32, np.arange(5.0), 2.0, far=7.5, message_id="m", created="t")
    assert Scores.from_bytes(s.to_bytes()).far == 7.5
    assert Scores.from_bytes(Scores("p1", "dev", "ab" * 32, np.arange(5.0), 2.0, message_id="m").to_bytes()).far is None


def test_bad_radii_are_refused():
    c = np.eye(3, dtype=np.float32)
    for radii in (np.array([0.1, np.inf, 0.1]), np.array([0.1, -0.5, 0.1]), np.array([0.1, 0.1])):
        payload = Probe("p", "ab" * 32, c, created="t", radii=radii.astype(np.float32)).to_bytes()
        with pytest.raises(MessageError):
            Probe.from_bytes(payload)


@pytest.fixture()
def device(pool_index, encoder_path, digits_root, tmp_path):
    index, _ = pool_index
    model = load_model(str(encoder_path))
    feats = encode_items(model, scan_image_folder(digits_root / "devices" / "street" / "local"))
    return index, model, feats, tmp_path


def test_coverage_costs_no_extra_privacy(device):
    """The far bin is part of the same release: the same sigma buys the same epsilon."""
    index, model, feats, tmp = device
    spent = []
    for name, probe in (("plain", index.probe()), ("cov", index.probe(radius_quantile=0.95))):
        ledger = PrivacyLedger.open(tmp / f"{name}.json", device_id="d", budget_epsilon=1.0)
        scores, res = answer_probe(probe, model, feats, ledger, epsilon=0.58, rng=np.random.default_rng(0))
        spent.append(ledger.spent()[0])
        assert (scores.far is None) == (name == "plain")
    assert spent[0] == pytest.approx(spent[1]) == pytest.approx(epsilon([(scores.sigma, 1.0)], 1e-5))
    counts = coverage_counts(feats, index.centroids, radii=index.radii(0.95))
    assert abs(scores.far - counts[-1]) < 6 * scores.sigma
    assert release_key(index.probe()) != release_key(index.probe(radius_quantile=0.95))
    assert release_key(index.probe(radius_quantile=0.9)) != release_key(index.probe(radius_quantile=0.95))


def test_radii_hold_the_quantile_of_the_pools_own_points(pool_index):
    index, _ = pool_index
    radii = index.radii(0.9)
    distance = 1.0 - np.einsum("ij,ij->i", index.features, index.centroids[index.assign])
    inside = distance <= radii[index.assign]
    # about 0.9: quantiles of clusters of a few dozen points interpolate between members
    assert radii.shape == (index.k,) and 0.85 <= inside.mean() <= 0.97


# ---- cloud: the coverage rule ----------------------------------------------------------------


def _scores(pool: PoolView, far, sigma=1.0, q=0.95) -> ScoreSet:
    s = np.zeros(pool.n_clusters)
    s[:2] = [120.0, 60.0]
    return ScoreSet(s, sigma=sigma, far=far, radius_quantile=q)


def test_no_far_count_is_plain_ecos():
    pool = make_pool()
    ecos = get_sampler("ecos")
    plain = ecos.plan(pool, 300, ScoreSet(_scores(pool, None).scores, sigma=1.0))
    assert plain.uncovered == 0.0 and plain.diverse is None
    assert ecos.plan(pool, 300, _scores(pool, 0.0)).quotas.tolist() == plain.quotas.tolist()


def test_expected_false_far_rate_moves_nothing():
    """Up to twice the pool's own outside-radius rate (1 - q) counts as covered."""
    pool = make_pool()
    for far_share in (0.05, 0.1):
        plan = get_sampler("ecos").plan(pool, 300, _scores(pool, far=180 * far_share / (1 - far_share)))
        assert plan.uncovered == pytest.approx(0.0, abs=1e-9)
    assert get_sampler("ecos").plan(pool, 300, _scores(pool, far=180 * 0.2 / 0.8)).uncovered > 0.1


def test_uncovered_devices_get_diversity_in_proportion():
    pool = make_pool()
    ecos = get_sampler("ecos")
    half = ecos.plan(pool, 300, _scores(pool, far=180.0))  # half the samples far: u = (0.5 - 0.1) / 0.9
    assert half.uncovered == pytest.approx(0.4 / 0.9)
    assert half.diverse.sum() == round(half.uncovered * 300) and half.quotas.sum() == 300
    assert (half.diverse[2:] > 0).all()  # the diversity term reaches clusters the device did not score
    none = ecos.plan(pool, 300, _scores(pool, far=1e6))
    assert none.uncovered == pytest.approx(1.0, abs=1e-3)
    # no coverage at all: a cluster-stratified uniform draw, like random sampling
    np.testing.assert_array_equal(none.diverse, [50] * 6)


def test_coverage_picks_are_distinct_and_exact():
    pool = make_pool()
    for far in (0.0, 90.0, 180.0, 1e5):
        picks = get_sampler("ecos").select(pool, 500, _scores(pool, far=far), np.random.default_rng(0))
        assert len(picks) == 500 == len(np.unique(picks))


def test_coverage_can_be_switched_off():
    pool = make_pool()
    plan = get_sampler("ecos", coverage=False).plan(pool, 300, _scores(pool, far=1e6))
    assert plan.uncovered == 0.0 and plan.diverse is None


def test_max_distance_tightens_the_radii():
    c = np.eye(2, dtype=np.float32)
    f = _unit(np.array([[1, 0.01], [1, 0.6], [0, 1]], np.float32))  # distances 0.00005, 0.14, 0
    radii = np.array([0.5, 0.5], np.float32)
    np.testing.assert_array_equal(coverage_counts(f, c, radii=radii), [2, 1, 0])
    np.testing.assert_array_equal(coverage_counts(f, c, max_distance=0.1, radii=radii), [1, 1, 1])


def test_uncovered_far_share_scales_the_rule():
    """If data from a missing domain shows only f1 < 1 of its samples far, a far share of f1
    already means 'nothing covered'."""
    pool = make_pool()
    s = _scores(pool, far=180.0)  # f = 0.5
    assert get_sampler("ecos", uncovered_far_share=0.5).plan(pool, 300, s).uncovered == pytest.approx(1.0)
    assert get_sampler("ecos", uncovered_far_share=0.7).plan(pool, 300, s).uncovered == pytest.approx(0.4 / 0.6)
    with pytest.raises(UsageError):
        get_sampler("ecos", uncovered_far_share=0.0)
