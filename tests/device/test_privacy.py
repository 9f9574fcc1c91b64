"""Device-side privacy: accountants checked against dp-accounting, and the persistent ledger."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from device_sdk.errors import MessageError, PrivacyBudgetExceeded, UsageError
from device_sdk.privacy.accounting import DEFAULT_RDP_ORDERS, calibrate_sigma, epsilon, gaussian_delta, gaussian_noise
from device_sdk.privacy.ledger import PrivacyLedger

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod  # noqa: E402

SIGMAS = (0.8, 2.0, 5.0, 10.0)
DELTAS = (1e-5, 1e-6)
COMPOSITIONS = [[(s, 1.0)] for s in SIGMAS] + [
    [(0.8, 1.0), (2.0, 1.0), (5.0, 1.0)],  # three different sigmas
    [(5.0, 1.0)] * 10,  # ten equal releases
    [(4.0, 2.0), (3.0, 1.0)],  # sensitivity other than 1
]
PLD_INTERVAL = 1e-4  # dp-accounting's default value_discretization_interval


@functools.lru_cache(maxsize=None)
def _pld(releases):
    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    acc.compose(_event(releases))
    return acc


def _event(releases):
    return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(noise_multiplier=s / se) for s, se in releases])


# ---- accountants -------------------------------------------------------------------------


def test_reference_values():
    assert epsilon([(5.0, 1.0)], 1e-5) == pytest.approx(0.7255, abs=5e-5)
    assert epsilon([(5.0, 1.0)], 1e-5, accountant="rdp") == pytest.approx(0.7945, abs=5e-5)
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([], 1e-5, accountant="rdp") == 0.0


def test_default_orders_match_dp_accounting():
    assert list(DEFAULT_RDP_ORDERS) == [float(a) for a in rdp_mod.DEFAULT_RDP_ORDERS]


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("releases", COMPOSITIONS, ids=lambda r: f"{len(r)}x{r[0][0]}")
def test_gaussian_matches_pld(releases, delta):
    pld = _pld(tuple(releases)).get_epsilon(delta)  # composed once, asked at both deltas
    ours = epsilon(releases, delta)
    # The pessimistic PLD rounds every privacy-loss value up by less than one interval, so over
    # k composed mechanisms it overestimates epsilon by at most k * interval, never under.
    assert ours <= pld + 1e-12
    assert pld - ours <= len(releases) * PLD_INTERVAL
    assert ours == pytest.approx(pld, rel=1e-3)


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("releases", COMPOSITIONS, ids=lambda r: f"{len(r)}x{r[0][0]}")
def test_rdp_matches_rdp_accountant(releases, delta):
    acc = RdpAccountant()
    acc.compose(_event(releases))
    assert epsilon(releases, delta, accountant="rdp") == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    # the exact accountant is never looser than RDP
    assert epsilon(releases, delta) <= epsilon(releases, delta, accountant="rdp")


@pytest.mark.parametrize(
    "sd,eps",
    [
        (5.0, 0.7),
        (0.05, 50.0),
        (0.05, 300.0),
        (0.8, 30.0),
        (0.5, 40.0),
        (1000.0, 0.004),
        (1e4, 1e-4),
        (1.0, 0.0),
    ],
)
def test_gaussian_delta_matches_analytic(sd, eps):
    # far tails included: no overflow of exp(eps), no 0 - 0 underflow
    ref = GaussianPrivacyLoss(sd).get_delta_for_epsilon(eps)
    assert gaussian_delta(eps, 1.0 / sd) == pytest.approx(ref, rel=1e-9)


def test_composition_is_one_gaussian():
    # mu = sqrt(sum mu_i^2): 4 releases at sigma 2 cost what one release at sigma 1 costs
    assert epsilon([(2.0, 1.0)] * 4, 1e-5) == pytest.approx(epsilon([(1.0, 1.0)], 1e-5), rel=1e-12)
    assert epsilon([(2.0, 1.0)], 1e-5) == pytest.approx(epsilon([(4.0, 2.0)], 1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["gaussian", "rdp"])
@pytest.mark.parametrize("eps", [0.1, 0.58, 1.0, 2.0, 8.0])
def test_calibrate_sigma_round_trip(eps, accountant):
    sigma = calibrate_sigma(eps, 1e-5, accountant=accountant)
    assert epsilon([(sigma, 1.0)], 1e-5, accountant) <= eps
    assert epsilon([(sigma, 1.0)], 1e-5, accountant) == pytest.approx(eps, rel=1e-6)
    # smallest: a slightly smaller sigma breaks the target
    assert epsilon([(sigma * (1 - 1e-6), 1.0)], 1e-5, accountant) > eps
    # sensitivity scales sigma linearly
    assert calibrate_sigma(eps, 1e-5, sensitivity=3.0, accountant=accountant) == pytest.approx(3.0 * sigma, rel=1e-9)


def test_calibrate_sigma_reference():
    assert epsilon([(calibrate_sigma(0.7255217508577961, 1e-5), 1.0)], 1e-5) <= 0.7255217508577961
    assert calibrate_sigma(0.7255217508577961, 1e-5) == pytest.approx(5.0, rel=1e-6)
    assert calibrate_sigma(0.7945220325371031, 1e-5, accountant="rdp") == pytest.approx(
        5.0, rel=1e-3
    )  # RDP epsilon is piecewise (order grid): sigma is only near 5


def test_bad_arguments():
    with pytest.raises(UsageError):
        epsilon([(0.0, 1.0)], 1e-5)
    with pytest.raises(UsageError):
        epsilon([(1.0, 1.0)], 0.0)
    with pytest.raises(UsageError):
        epsilon([(1.0, 1.0)], 1e-5, accountant="moments")
    with pytest.raises(UsageError):
        calibrate_sigma(-1.0, 1e-5)


def test_gaussian_noise():
    a = gaussian_noise(20000, 3.0, rng=np.random.default_rng(0))
    assert a.dtype == np.float64 and a.shape == (20000,)
    assert abs(a.mean()) < 0.1 and a.std() == pytest.approx(3.0, rel=0.03)
    assert np.array_equal(gaussian_noise(5, 1.0, rng=7), gaussian_noise(5, 1.0, rng=7))
    # default: OS entropy, two calls differ
    assert not np.array_equal(gaussian_noise(5, 1.0), gaussian_noise(5, 1.0))
    with pytest.raises(UsageError):
        gaussian_noise(3, 0.0)


# ---- ledger ------------------------------------------------------------------------------


def _release(ledger, key, sigma=5.0, payload=b"msg", out=None):
    calls = {"produce": 0}

    def produce():
        calls["produce"] += 1
        return payload if payload is not None else os.urandom(16)

    def commit(data):
        if out is not None:
            Path(out).write_bytes(data)

    res = ledger.release(key, sigma, 1.0, 4, produce, commit)
    return res, calls["produce"]


def test_ledger_charges_and_persists(tmp_path):
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.open(path, device_id="dev-1", budget_epsilon=2.0)
    assert led.spent() == (0.0, 1e-5)
    assert led.would_spend(5.0) == pytest.approx(epsilon([(5.0, 1.0)], 1e-5))
    res, n = _release(led, "probe-1", out=tmp_path / "out.bin")
    assert n == 1 and not res.repeated and res.payload == b"msg"
    assert res.charged_epsilon == pytest.approx(0.7255217508577961)
    assert res.spent_epsilon == pytest.approx(0.7255217508577961)
    assert (tmp_path / "out.bin").read_bytes() == b"msg"
    res2, _ = _release(led, "probe-2", sigma=10.0)
    both = epsilon([(5.0, 1.0), (10.0, 1.0)], 1e-5)
    assert res2.spent_epsilon == pytest.approx(both)
    assert res2.charged_epsilon == pytest.approx(both - res.spent_epsilon)

    again = PrivacyLedger.open(path)  # reopen: same budget, same releases
    assert again.spent()[0] == pytest.approx(both)
    assert again.remaining_epsilon() == pytest.approx(2.0 - both)
    assert again.lookup("probe-1") == b"msg" and again.lookup("nope") is None
    s = again.summary()
    assert s["device_id"] == "dev-1" and s["releases"] == 2 and s["accountant"] == "gaussian"
    assert s["budget_epsilon"] == 2.0 and s["spent_epsilon"] == pytest.approx(both)
    recs = again.releases()
    assert recs[0]["key"] == "probe-1" and recs[0]["n_values"] == 4
    assert recs[0]["mechanism"] == "gaussian" and recs[0]["time_utc"].endswith("Z")
    json.loads(path.read_text())  # plain JSON


def test_repeat_costs_nothing_and_returns_same_bytes(tmp_path):
    led = PrivacyLedger.open(tmp_path / "l.json")
    first, _ = _release(led, "p", payload=None)  # random payload: a repeat must not redraw
    spent = led.spent()[0]
    out = tmp_path / "out.bin"
    second, n = _release(led, "p", payload=None, out=out)
    assert n == 0 and second.repeated and second.charged_epsilon == 0.0
    assert second.payload == first.payload and out.read_bytes() == first.payload
    assert second.spent_epsilon == pytest.approx(spent) and led.spent()[0] == spent
    assert len(led.releases()) == 1


def test_refusal_leaves_everything_unchanged(tmp_path):
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path, budget_epsilon=1.0)
    _release(led, "a")  # 0.7255
    before = path.read_bytes()
    out = tmp_path / "out.bin"
    with pytest.raises(PrivacyBudgetExceeded) as info:
        _release(led, "b", out=out)
    msg = str(info.value)
    after = epsilon([(5.0, 1.0)] * 2, 1e-5)
    assert "0.7255" in msg and f"{after:.4f}" in msg and "budget 1" in msg
    assert path.read_bytes() == before and not out.exists()
    # produce is never called when refused
    with pytest.raises(PrivacyBudgetExceeded):
        led.release("b", 5.0, 1.0, 4, lambda: pytest.fail("produce called"), lambda p: None)
    # a cheaper release still fits
    res, _ = _release(led, "c", sigma=20.0)
    assert res.spent_epsilon <= 1.0


def test_commit_failure_rolls_back(tmp_path):
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path)
    _release(led, "a")
    before = path.read_bytes()

    def bad_commit(payload):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        led.release("b", 5.0, 1.0, 4, lambda: b"xx", bad_commit)
    assert path.read_bytes() == before
    assert led.lookup("b") is None
    # a failing produce also leaves nothing behind
    with pytest.raises(RuntimeError):
        led.release("b", 5.0, 1.0, 4, lambda: (_ for _ in ()).throw(RuntimeError("x")), lambda p: None)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"kind": "other"}',
        None,  # valid ledger with a release whose sigma is a string
    ],
)
def test_corrupt_ledger_is_an_error(tmp_path, text):
    path = tmp_path / "l.json"
    led = PrivacyLedger.open(path)
    _release(led, "a")
    if text is None:
        state = json.loads(path.read_text())
        state["releases"][0]["sigma"] = "5"
        text = json.dumps(state)
    path.write_text(text)
    with pytest.raises(MessageError, match="l.json"):
        PrivacyLedger.open(path)
    with pytest.raises(MessageError):
        led.spent()
    with pytest.raises(MessageError):
        _release(led, "b")
    assert path.read_text() == text  # never reset


def test_budget_mismatch_on_reopen(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger.open(path, device_id="d", budget_epsilon=2.0, budget_delta=1e-6)
    with pytest.raises(UsageError):
        PrivacyLedger.open(path, budget_epsilon=3.0)
    with pytest.raises(UsageError):
        PrivacyLedger.open(path, budget_delta=1e-5)
    with pytest.raises(UsageError):
        PrivacyLedger.open(path, accountant="rdp")
    with pytest.raises(UsageError):
        PrivacyLedger.open(path, device_id="other")
    assert PrivacyLedger.open(path, budget_epsilon=2.0, device_id="d").budget == (2.0, 1e-6)
    led = PrivacyLedger.open(path, budget_epsilon=3.0, accountant="rdp", allow_budget_change=True)
    assert led.budget == (3.0, 1e-6) and led.accountant == "rdp"
    assert len(json.loads(path.read_text())["budget_changes"]) == 1


def _racer(path, prefix, n, queue):
    led = PrivacyLedger(path)
    ok = 0
    for i in range(n):
        try:
            led.release(f"{prefix}-{i}", 5.0, 1.0, 4, lambda: os.urandom(8), lambda p: None)
            ok += 1
        except PrivacyBudgetExceeded:
            pass
    queue.put(ok)


def test_processes_racing_never_exceed_budget(tmp_path):
    path = tmp_path / "l.json"
    # sigma 5 composed k times is sigma 5/sqrt(k); find how many fit under epsilon 2
    budget = 2.0
    fit = max(k for k in range(1, 50) if epsilon([(5.0, 1.0)] * k, 1e-5) <= budget)
    PrivacyLedger.open(path, budget_epsilon=budget)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(path), f"w{j}", fit, queue)) for j in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    total = sum(queue.get(timeout=5) for _ in procs)
    led = PrivacyLedger.open(path)
    assert total == fit == len(led.releases())
    assert led.spent()[0] <= budget
