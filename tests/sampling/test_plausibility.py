"""Plausibility of scores (issue 8, item 7): the cloud refuses what no honest device could send.

The attack: a device (or anyone who can publish on its outbox) sent counts of 1e6 with zero
noise, and they were summed into a fleet round. Now ``check_plausible`` refuses scores whose
noise is below what the round accepts (its ``max_epsilon`` at its ``delta``), non-finite values,
a declared sensitivity other than 1, and counts that ``max_samples`` samples plus 6 sigma of
noise cannot explain; ``combine_scores`` scales each device's vector down to an L1 norm of at
most ``max_samples``, so one device moves a fleet sum by at most that much. The daemon refuses
such scores when they arrive (logged, counted, not recorded, so the real answer still counts),
and ``ecos-cloud sample`` refuses such a file.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_daemon_rounds import cache  # noqa: F401 - a fixture: the trainer cache of the module

from cloud.cli import main as cloud_main
from cloud.errors import ImplausibleScores
from cloud.sampling.selection import Plausibility, check_plausible, combine_scores
from device_sdk.errors import UsageError
from device_sdk.privacy.accounting import calibrate_sigma
from device_sdk.protocol import outbox
from device_sdk.protocol.envelope import decode
from device_sdk.protocol.round import Scores

K = 16
ENC = "e" * 64
LIMITS = Plausibility.for_round(max_epsilon=1.0, delta=1e-5, max_samples=1000)
SIGMA = LIMITS.min_sigma  # ~3.73: an answer at exactly the round's epsilon


def scores(values, sigma=SIGMA, far=None, sensitivity=1.0, device="dev", probe="p1") -> Scores:
    return Scores(probe, device, ENC, np.asarray(values, dtype=np.float64), sigma, sensitivity, far=far)


def refused(s: Scores, limits: Plausibility = LIMITS) -> str:
    with pytest.raises(ImplausibleScores) as info:
        check_plausible(s, limits)
    assert info.value.code == "implausible_scores"
    return info.value.check


def test_the_attack_counts_of_a_million_without_noise_is_refused():
    assert refused(scores(np.full(K, 1e6), sigma=0.0)) == "noise_too_low"


def test_limits_follow_the_round_epsilon_and_delta():
    assert LIMITS.min_sigma == calibrate_sigma(1.0, 1e-5)
    assert Plausibility.for_round(0.58, 1e-5, 10).min_sigma == pytest.approx(6.137, abs=1e-3)
    with pytest.raises(UsageError):
        Plausibility.for_round(0.0, 1e-5, 10)
    check_plausible(scores(np.zeros(K), sigma=LIMITS.min_sigma), LIMITS)  # exactly the round's epsilon: accepted


@pytest.mark.parametrize(
    "make, check",
    [
        (lambda: scores(np.zeros(K), sigma=SIGMA * 0.99), "noise_too_low"),
        (lambda: scores(np.zeros(K), sigma=1e-300), "noise_too_low"),
        (lambda: scores(np.zeros(K), sigma=math.nan), "not_finite"),
        (lambda: scores(np.r_[np.zeros(K - 1), math.inf]), "not_finite"),
        (lambda: scores(np.zeros(K), far=math.nan), "not_finite"),
        (lambda: scores(np.zeros(K), sensitivity=0.001), "sensitivity"),
        (lambda: scores(np.zeros(K), sigma=5000.0), "noise_too_high"),  # more noise than any count: no information
        (lambda: scores(np.r_[np.zeros(K - 1), 1000 + 6.5 * SIGMA]), "count_range"),  # one count beyond the cap
        (lambda: scores(np.r_[np.zeros(K - 1), -6.5 * SIGMA]), "count_range"),  # a count no noise makes this negative
        (lambda: scores(np.zeros(K), far=1000 + 6.5 * SIGMA), "count_range"),  # the far bin is a count too
        (lambda: scores(np.zeros(K), far=-6.5 * SIGMA), "count_range"),
        (lambda: scores(np.full(K, 1000 / K + 2 * SIGMA)), "total"),  # each count possible, the sum is not
        (lambda: scores(np.full(K, 60.0), far=200.0), "total"),
        (lambda: scores(np.full(K, -2.5 * SIGMA)), "total"),  # each barely possible, all of them together not
    ],
)
def test_each_check_refuses_what_no_honest_device_sends(make, check):
    assert refused(make()) == check


def test_honest_answers_are_not_refused():
    """Every sample in one bin, noise at the round's sigma and more: 3,000 honest answers, none refused
    (6 sigma per value and on the sum: about 1e-9 each)."""
    rng = np.random.default_rng(8)
    for trial in range(3000):
        n = int(rng.choice([0, 1, 40, 999, 1000]))
        counts = np.bincount(rng.integers(0, K + 1, n), minlength=K + 1).astype(float)
        if trial % 3 == 0:
            counts = np.zeros(K + 1)
            counts[rng.integers(K + 1)] = n  # all in one cluster
        sigma = SIGMA * float(rng.choice([1.0, 3.0, 50.0]))
        noisy = counts + rng.normal(0.0, sigma, K + 1)
        check_plausible(scores(noisy[:K], sigma=sigma, far=float(noisy[K]) if trial % 2 else None), LIMITS)


def test_one_device_moves_a_fleet_sum_by_at_most_max_samples(caplog):
    index = SimpleNamespace(probe_id="p1", encoder_sha256=ENC, k=K)
    rng = np.random.default_rng(1)
    honest = scores(np.bincount(rng.integers(0, K, 300), minlength=K) + rng.normal(0, SIGMA, K), device="honest")
    loud = Plausibility.for_round(1.0, 1e-5, 1000)
    # at the edge of every check, with a lot of declared noise: sum and counts as large as allowed
    sigma = 900.0
    attacker = scores(np.r_[1000 + 5.9 * sigma, np.full(K - 1, -5.9 * sigma / 4)], sigma=sigma, device="attacker")
    check_plausible(attacker, loud)
    alone = combine_scores(index, [honest], limits=loud)
    with caplog.at_level(logging.WARNING):
        both = combine_scores(index, [honest, attacker], limits=loud)
    assert np.abs(both.scores - alone.scores).sum() <= 1000 + 1e-6
    assert "attacker" in caplog.text and "clipped" in caplog.text
    assert np.allclose(alone.scores, honest.scores)  # an honest answer is not clipped


def test_combine_scores_with_limits_refuses_implausible_answers():
    index = SimpleNamespace(probe_id="p1", encoder_sha256=ENC, k=K)
    forged = scores(np.full(K, 1e6), sigma=0.0, device="forger")
    with pytest.raises(ImplausibleScores, match="forger"):
        combine_scores(index, [scores(np.zeros(K)), forged], limits=LIMITS)
    assert combine_scores(index, [forged]) is not None  # no limits: simulations (noise-free benchmarks) still run


# ---- the daemon: refused on arrival, logged, counted, not recorded ----------------------------------


def test_the_daemon_refuses_forged_scores_and_the_round_is_not_poisoned(tmp_path, pool_index, cache, caplog):
    from test_daemon_rounds import make_daemon, tick_until

    from cloud.serve.store import RoundState

    daemon = make_daemon(tmp_path, pool_index, cache, max_epsilon=1.0, max_samples=1000)
    r = daemon.submit_round(["a", "b"], fleet=True)
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    k, enc = daemon.index.k, daemon.index.encoder_sha256
    forged = [
        Scores(r.round_id, "a", enc, np.full(k, 1e6), 0.0),  # the attack of the issue
        Scores(r.round_id, "a", enc, np.full(k, 1e6), 10.0),  # noisy enough, far too many samples
        Scores(r.round_id, "b", enc, np.zeros(k), 10.0, far=1e6),  # the coverage count too
        Scores(r.round_id, "b", enc, np.zeros(k), 10.0, 1e-3),  # sensitivity 1e-3: noise that protects nothing
    ]
    with caplog.at_level(logging.WARNING, logger="ecos.daemon"):
        for s in forged:
            daemon.handle_message(outbox(s.device_id), s.to_bytes())
    assert daemon.store.responses(r.round_id) == []  # nothing recorded: the real answers still count
    assert daemon.metrics.dropped.value(reason="implausible_scores") == 4
    assert daemon.metrics.scores_refused.value(check="noise_too_low") == 1
    assert daemon.metrics.scores_refused.value(check="count_range") == 2
    assert daemon.metrics.scores_refused.value(check="sensitivity") == 1
    assert caplog.text.count("implausible_scores") >= 4
    rng = np.random.default_rng(0)
    real = {
        d: Scores(r.round_id, d, enc, np.bincount(rng.integers(0, k, 40), minlength=k) + rng.normal(0, 4, k), 4.0)
        for d in ("a", "b")
    }
    for d, s in real.items():
        daemon.handle_message(outbox(d), s.to_bytes())
    assert sorted(x.device_id for x in daemon.store.responses(r.round_id)) == ["a", "b"]
    reached = tick_until(daemon, r.round_id, RoundState.TRAINING)
    assert reached.state is RoundState.TRAINING, reached.error
    assert reached.result["noise_sigma"] == pytest.approx(math.sqrt(2) * 4.0)
    tick_until(daemon, r.round_id, RoundState.DELIVERING)  # let the training thread finish


def test_a_round_records_why_a_device_counts_as_missing(tmp_path, pool_index, cache):
    from test_daemon_rounds import make_daemon, tick_until

    from cloud.serve.store import RoundState

    daemon = make_daemon(tmp_path, pool_index, cache, collect_seconds=0.5)
    r = daemon.submit_round(["a"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.handle_message(
        outbox("a"), Scores(r.round_id, "a", daemon.index.encoder_sha256, np.full(daemon.index.k, 1e6), 0.0).to_bytes()
    )
    failed = tick_until(daemon, r.round_id, RoundState.FAILED, timeout=10)
    assert failed.result["missing"] == ["a"] and failed.result["implausible"] == {"a": "noise_too_low"}
    assert "implausible" in failed.error


# ---- offline: ecos-cloud sample -----------------------------------------------------------------


def test_ecos_cloud_sample_refuses_a_forged_scores_file(tmp_path, pool_index, capsys):
    index, index_path = pool_index
    forged = tmp_path / "forged.scores"
    forged.write_bytes(Scores(index.probe_id, "forger", index.encoder_sha256, np.full(index.k, 1e6), 0.0).to_bytes())
    assert decode(forged.read_bytes()).type == "scores"
    out = tmp_path / "sel.csv"
    args = ["sample", "--index", str(index_path), "--scores", str(forged), "--budget", "10", "--out", str(out)]
    code = cloud_main(args)
    err = capsys.readouterr().err
    assert code == ImplausibleScores.exit_code and "error[implausible_scores]" in err and "forger" in err
    assert not out.exists()
    # the limits are options: a round that accepts anything (a simulation) says so explicitly
    code = cloud_main(args + ["--max-epsilon", "inf", "--max-samples", "100000000"])
    assert code == 0 and out.exists()
