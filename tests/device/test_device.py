"""answer_probe: the device's release path, with a real encoder, probe and ledger."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device_sdk.device import answer_probe
from device_sdk.errors import MismatchError, PrivacyBudgetExceeded, ProbeConflict, UsageError
from device_sdk.imagefolder import scan_image_folder
from device_sdk.privacy.accounting import epsilon
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.runtime import load_model
from device_sdk.scoring import coverage_counts, encode_items


@pytest.fixture()
def setup(pool_index, encoder_path, digits_root, tmp_path):
    index, _ = pool_index
    model = load_model(str(encoder_path))
    feats = encode_items(model, scan_image_folder(digits_root / "devices" / "street" / "local"))
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id="dev-1", budget_epsilon=1.5)
    return index.probe(), model, feats, ledger


def test_release_is_noisy_counts_and_charged(setup):
    probe, model, feats, ledger = setup
    scores, res = answer_probe(probe, model, feats, ledger, epsilon=0.58, rng=np.random.default_rng(0))
    counts = coverage_counts(feats, probe.centroids)
    assert scores.device_id == "dev-1" and scores.probe_id == probe.probe_id and scores.k == probe.k
    assert scores.epsilon == pytest.approx(0.58, abs=1e-6) and res.charged_epsilon == pytest.approx(0.58, abs=1e-6)
    residual = scores.scores - counts
    assert np.all(residual != 0) and abs(residual.std() - scores.sigma) < 0.5 * scores.sigma
    assert ledger.spent()[0] == pytest.approx(epsilon([(scores.sigma, 1.0)], 1e-5))


def test_repeated_probe_is_free_and_identical(setup):
    probe, model, feats, ledger = setup
    first, _ = answer_probe(probe, model, feats, ledger, epsilon=0.58)
    again, res = answer_probe(probe, model, feats, ledger, epsilon=0.58)
    assert res.repeated and res.charged_epsilon == 0.0
    np.testing.assert_array_equal(first.scores, again.scores)
    changed = dataclasses.replace(probe, centroids=probe.centroids[::-1].copy())
    spent = ledger.spent()[0]
    with pytest.raises(ProbeConflict):  # a reused id with new content is refused, never charged (issue 8)
        answer_probe(changed, model, feats, ledger, epsilon=0.58)
    assert ledger.spent()[0] == spent and len(ledger.releases()) == 1


def test_refusals_charge_nothing(setup):
    probe, model, feats, ledger = setup
    foreign = dataclasses.replace(probe, encoder_sha256="f" * 64)
    with pytest.raises(MismatchError, match="made for encoder"):
        answer_probe(foreign, model, feats, ledger, epsilon=0.58)
    with pytest.raises(PrivacyBudgetExceeded):
        answer_probe(probe, model, feats, ledger, epsilon=2.0)
    with pytest.raises(UsageError):
        answer_probe(probe, model, feats, ledger, epsilon=0.5, sigma=3.0)

    def failing_commit(payload):
        raise OSError("disk full")

    with pytest.raises(OSError):
        answer_probe(probe, model, feats, ledger, epsilon=0.58, commit=failing_commit)
    assert ledger.spent()[0] == 0.0 and ledger.releases() == []
