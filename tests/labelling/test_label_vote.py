"""Automated client labelling on the device: the vote's sensitivity bound, noise, ledger and messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_sdk.errors import MessageError, MismatchError, PrivacyBudgetExceeded, ProbeConflict
from device_sdk.labelling import (
    THUMB16,
    answer_label_query,
    check_query_conflict,
    thumbnail_features,
    vote_histograms,
    vote_sensitivity,
)
from device_sdk.privacy.accounting import calibrate_sigma, epsilon
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol.labels import LabelQuery, LabelVotes, decode_label_message

LABELS = ["a", "b", "c", "d"]


def _data(seed=0, n=60, q=25, d=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(q, d)), rng.normal(size=(n, d)), rng.integers(0, len(LABELS), n)


@pytest.mark.parametrize("m", [1, 3, 10, 40])
@pytest.mark.parametrize("max_distance", [None, 0.9])
def test_one_sample_moves_the_votes_by_at_most_the_bound(m, max_distance):
    queries, feats, labels = _data(m)
    full = vote_histograms(queries, feats, labels, len(LABELS), m, max_distance)
    assert full.sum() <= len(feats) * min(m, len(queries))
    if max_distance is None:
        assert full.sum() == len(feats) * min(m, len(queries))  # every sample casts all its votes
    worst_l2 = 0.0
    for i in range(len(feats)):  # remove each sample in turn (add/remove adjacency)
        keep = np.arange(len(feats)) != i
        diff = full - vote_histograms(queries, feats[keep], labels[keep], len(LABELS), m, max_distance)
        assert diff.min() >= 0 and diff.max() <= 1  # only this sample's own votes went
        assert (diff.sum(axis=1) <= 1).all()  # at most one vote per query row
        assert diff.sum() <= m
        worst_l2 = max(worst_l2, float(np.linalg.norm(diff)))
    assert worst_l2 <= vote_sensitivity(m) + 1e-12
    if max_distance is None and m <= len(queries):
        assert worst_l2 == pytest.approx(math.sqrt(m))  # the bound is reached: it is tight


def test_added_sample_and_replaced_sample():
    queries, feats, labels = _data(1)
    m = 5
    base = vote_histograms(queries, feats, labels, len(LABELS), m)
    extra = np.random.default_rng(9).normal(size=(1, feats.shape[1]))
    added = vote_histograms(queries, np.vstack([feats, extra]), np.append(labels, 2), len(LABELS), m)
    assert np.linalg.norm(added - base) == pytest.approx(math.sqrt(m))
    replaced = vote_histograms(queries, np.vstack([feats[1:], extra]), np.append(labels[1:], 2), len(LABELS), m)
    assert np.linalg.norm(replaced - base) <= math.sqrt(2 * m) + 1e-12


def test_samples_without_a_known_label_do_not_vote():
    queries, feats, labels = _data(2)
    labels = labels.copy()
    labels[:10] = -1
    hist = vote_histograms(queries, feats, labels, len(LABELS), 3)
    assert hist.sum() == 3 * (len(feats) - 10)


def _query(m=3, qid="q1", seed=0):
    queries, _, _ = _data(seed)
    return LabelQuery.from_bytes(LabelQuery(qid, THUMB16, list(LABELS), queries, m).to_bytes())


def test_release_is_charged_at_sqrt_m_and_replayed_free(tmp_path):
    _, feats, codes = _data(0)
    labels = [LABELS[c] for c in codes]
    ledger = PrivacyLedger.open(tmp_path / "l.json", device_id="dev", budget_epsilon=3.0)
    query = _query(m=4)
    written = []
    votes, result = answer_label_query(
        query, THUMB16, feats, labels, ledger, epsilon=1.0, commit=written.append, rng=np.random.default_rng(0)
    )
    assert votes.sensitivity == pytest.approx(2.0) and votes.votes.shape == (query.n_queries, len(LABELS))
    assert votes.sigma == pytest.approx(calibrate_sigma(1.0, 1e-5, 2.0))
    assert result.charged_epsilon == pytest.approx(1.0, abs=1e-6)
    rel = ledger.releases()
    assert len(rel) == 1 and rel[0]["sensitivity"] == pytest.approx(2.0) and rel[0]["n_values"] == votes.votes.size
    assert written == [result.payload]
    again, rep = answer_label_query(query, THUMB16, feats, labels, ledger, epsilon=1.0)
    assert rep.repeated and rep.charged_epsilon == 0 and np.array_equal(again.votes, votes.votes)
    # the noise is real: the released counts are not the exact ones
    exact = vote_histograms(query.features, feats, codes, len(LABELS), 4)
    assert not np.allclose(votes.votes, exact)


def test_refused_beyond_budget_and_conflicting_ids(tmp_path):
    _, feats, codes = _data(0)
    labels = [LABELS[c] for c in codes]
    ledger = PrivacyLedger.open(tmp_path / "l.json", device_id="dev", budget_epsilon=1.2)
    answer_label_query(_query(qid="q1"), THUMB16, feats, labels, ledger, epsilon=1.0)
    before = (tmp_path / "l.json").read_bytes()
    committed = []
    with pytest.raises(PrivacyBudgetExceeded):
        answer_label_query(_query(qid="q2"), THUMB16, feats, labels, ledger, epsilon=1.0, commit=committed.append)
    assert committed == [] and (tmp_path / "l.json").read_bytes() == before
    other = _query(qid="q1", seed=5)  # same id, other content
    with pytest.raises(ProbeConflict):
        check_query_conflict(other, ledger)
    with pytest.raises(ProbeConflict):
        answer_label_query(other, THUMB16, feats, labels, ledger, epsilon=0.1)
    assert len(ledger.releases()) == 1


def test_votes_and_scores_compose_in_one_ledger(tmp_path):
    _, feats, codes = _data(0)
    ledger = PrivacyLedger.open(tmp_path / "l.json", device_id="dev", budget_epsilon=5.0)
    sigma_scores = calibrate_sigma(0.58, 1e-5, 1.0)
    ledger.release("probe-1:abc", sigma_scores, 1.0, 5, lambda: b"scores", lambda p: None)
    _, result = answer_label_query(_query(), THUMB16, feats, [LABELS[c] for c in codes], ledger, epsilon=2.0)
    sigma_votes = calibrate_sigma(2.0, 1e-5, math.sqrt(3))
    want = epsilon([(sigma_scores, 1.0), (sigma_votes, math.sqrt(3))], 1e-5)
    assert ledger.spent()[0] == pytest.approx(want)
    assert 2.0 < ledger.spent()[0] < 2.58  # composition is sub-additive, never below the larger part


def test_mismatches_are_refused_before_charging(tmp_path):
    _, feats, codes = _data(0)
    ledger = PrivacyLedger.open(tmp_path / "l.json", device_id="dev")
    with pytest.raises(MismatchError):
        answer_label_query(_query(), "f" * 64, feats, [LABELS[c] for c in codes], ledger, epsilon=1.0)
    with pytest.raises(MismatchError):
        answer_label_query(_query(), THUMB16, feats[:, :5], [LABELS[c] for c in codes], ledger, epsilon=1.0)
    with pytest.raises(MismatchError, match="none of this device's labels"):
        answer_label_query(_query(), THUMB16, feats, ["zz"] * len(feats), ledger, epsilon=1.0)
    assert ledger.releases() == []


def test_messages_round_trip_and_reject_bad_content():
    q = _query()
    assert decode_label_message(q.to_bytes()).features.shape == q.features.shape
    votes = LabelVotes(
        "q1",
        "dev",
        THUMB16,
        list(LABELS),
        np.ones((3, 4)),
        {"mechanism": "gaussian", "sigma": 2.0, "sensitivity": 1.0},
        {"epsilon": 1.0, "delta": 1e-5, "accountant": "gaussian"},
    )
    back = decode_label_message(votes.to_bytes())
    assert isinstance(back, LabelVotes) and back.sigma == 2.0 and np.array_equal(back.votes, votes.votes)
    bad = [
        lambda: LabelVotes("q1", "dev", THUMB16, list(LABELS), np.full((3, 4), np.nan), votes.noise, votes.privacy),
        lambda: LabelVotes("q1", "dev", THUMB16, list(LABELS), np.ones((3, 5)), votes.noise, votes.privacy),
        lambda: LabelVotes("q1", "dev", THUMB16, list(LABELS), np.ones((3, 4)), {"sigma": 0}, votes.privacy),
        lambda: LabelQuery("q", THUMB16, ["a", "a"], np.ones((2, 3))),
        lambda: LabelQuery("q", THUMB16, list(LABELS), np.ones((2, 3)), votes_per_sample=0),
        lambda: LabelQuery("q", THUMB16, list(LABELS), np.full((2, 3), np.inf)),
    ]
    for make in bad:
        with pytest.raises(MessageError):
            make().to_bytes()
    data = bytearray(q.to_bytes())
    data[-3] ^= 0xFF
    with pytest.raises(MessageError):
        decode_label_message(bytes(data))


def test_thumbnail_features_are_centred_unit_rows():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    f = thumbnail_features(imgs)
    assert f.shape == (5, 256)
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5) and np.allclose(f.mean(axis=1), 0, atol=1e-6)
    inverted = thumbnail_features(255 - imgs)
    assert np.allclose(inverted, -f, atol=1e-5)  # contrast inversion flips the sign


def test_cloud_combines_devices_and_keeps_only_confident_groups():
    from cloud.labelling.client import combine_votes, confident_labels, group_features

    q = _query()
    noise, privacy = {"mechanism": "gaussian", "sigma": 3.0, "sensitivity": 1.0}, {"epsilon": 1.0, "delta": 1e-5}
    a = np.zeros((q.n_queries, len(LABELS)))
    a[0] = [20, 0, 0, 0]  # clear lead: 20 votes over 0 (with sigma 5 for the sum, 4 sigmas)
    a[1] = [5, 4, 0, 0]  # no clear lead
    b = np.zeros_like(a)
    b[1, 1] = 3.0
    va = LabelVotes(q.id, "dev-a", THUMB16, list(LABELS), a, noise, privacy)
    vb = LabelVotes(q.id, "dev-b", THUMB16, list(LABELS), b, dict(noise, sigma=4.0), privacy)
    vs = combine_votes(q, [va, vb, va])  # dev-a twice: counted once
    assert vs.devices == ["dev-a", "dev-b"] and vs.sigma == pytest.approx(5.0)
    assert np.array_equal(vs.votes, a + b)
    codes, margin = confident_labels(vs.votes, vs.sigma, 2.0)
    assert codes[0] == 0 and margin[0] == pytest.approx(4.0)
    assert codes[1] == -1 and (codes[2:] == -1).all()
    other = LabelVotes("other-query", "dev-c", THUMB16, list(LABELS), a, noise, privacy)
    with pytest.raises(MismatchError):
        combine_votes(q, [other])
    x = np.random.default_rng(0).normal(size=(40, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cents, assign = group_features(x, 5)
    assert cents.shape == (5, 6) and assign.shape == (40,) and set(assign) <= set(range(5))
    same, ident = group_features(x, 0)
    assert np.array_equal(ident, np.arange(40)) and np.allclose(same, x)
