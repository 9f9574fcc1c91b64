"""Plausibility of scores, measured: honest answers never refused, forged ones refused or bounded.

    python benchmarks/bench_plausibility.py            # about 40 s on one core

Honest answers are what ``device_sdk.device.answer_probe`` sends: a histogram of n samples over
K bins plus the far bin, plus N(0, sigma^2) per bin, for n up to the cap and sigma from the
round's minimum up. Forged answers are each attack class of docs/security.md. For each, the share
refused by ``cloud.sampling.selection.check_plausible`` (defaults of ``[rounds]`` unless said), and for the
forgeries that pass, the largest L1 change they make to a fleet sum after ``clip_contribution``.

Writes benchmarks/results/plausibility.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.errors import ImplausibleScores  # noqa: E402
from cloud.sampling.selection import Plausibility, check_plausible, clip_contribution  # noqa: E402
from device_sdk.protocol.round import Scores  # noqa: E402


def scores(values: np.ndarray, sigma: float, far=None, sensitivity: float = 1.0) -> Scores:
    return Scores(
        "p",
        "d",
        "e" * 64,
        np.asarray(values, dtype=np.float64),
        float(sigma),
        sensitivity,
        far=None if far is None else float(far),
    )


def verdict(s: Scores, limits: Plausibility) -> str:
    try:
        check_plausible(s, limits)
        return "accepted"
    except ImplausibleScores as err:
        return err.check


def honest(rng: np.random.Generator, k: int, limits: Plausibility, n_answers: int) -> dict:
    out, refused = Counter(), []
    cap = limits.max_samples
    for i in range(n_answers):
        n = int(rng.choice([0, 1, 40, 300, 5000, cap // 2, cap]))
        bins = k + 1
        if i % 3 == 0:
            counts = np.zeros(bins)
            counts[rng.integers(bins)] = n  # a device whose samples all fall in one cluster
        else:
            counts = rng.multinomial(n, rng.dirichlet(np.full(bins, 0.3))).astype(float)
        sigma = limits.min_sigma * float(rng.choice([1.0, 2.0, 10.0, 100.0]))
        noisy = counts + rng.normal(0.0, sigma, bins)
        v = verdict(scores(noisy[:k], sigma, far=noisy[k] if i % 2 else None), limits)
        out[v] += 1
        if v != "accepted":
            refused.append({"n": n, "sigma": sigma, "check": v})
    return {"answers": n_answers, "verdicts": dict(out), "refused_examples": refused[:5]}


def forged(rng: np.random.Generator, k: int, limits: Plausibility, per_class: int) -> dict:
    cap, lo = limits.max_samples, limits.min_sigma
    classes = {
        "the issue's attack: 1e6 per count, sigma 0": lambda: scores(np.full(k, 1e6), 0.0),
        "1e6 per count with enough declared noise": lambda: scores(np.full(k, 1e6), lo),
        "one count of 1e6 (a cluster pushed)": lambda: scores(np.r_[1e6, np.zeros(k - 1)], lo),
        "far count of 1e6 (coverage pushed)": lambda: scores(np.zeros(k), lo, far=1e6),
        "counts below -6 sigma (clusters suppressed)": lambda: scores(-rng.uniform(7, 50, k) * lo, lo),
        "each count plausible, sum beyond the cap": lambda: scores(np.full(k, cap / k + 2 * lo), lo),
        "noise below the round's (sigma 0.5 x minimum)": lambda: scores(rng.normal(0, 1, k), lo * 0.5),
        "sensitivity 0.01 (noise that protects nothing)": lambda: scores(rng.normal(0, 1, k), lo, sensitivity=0.01),
        "NaN or infinity": lambda: scores(np.r_[np.nan, np.zeros(k - 1)], lo),
        "sigma above the cap (says nothing)": lambda: scores(np.zeros(k), cap * 2.0),
        "random vectors in [-1e4, 1e6]": lambda: scores(rng.uniform(-1e4, 1e6, k), float(rng.uniform(lo, 50))),
        "largest within the bounds, huge declared sigma": lambda: scores(
            np.r_[cap + 5.9 * cap * 0.9, np.full(k - 1, -5.9 * cap * 0.9 / np.sqrt(k))], cap * 0.9
        ),
    }
    out = {}
    for name, make in classes.items():
        verdicts, worst = Counter(), 0.0
        for _ in range(per_class):
            s = make()
            v = verdict(s, limits)
            verdicts[v] += 1
            if v == "accepted":
                c = clip_contribution(s, cap)
                worst = max(worst, float(np.abs(c.scores).sum() + (abs(c.far) if c.far is not None else 0.0)))
        out[name] = {
            "tried": per_class,
            "refused": per_class - verdicts["accepted"],
            "checks": dict(verdicts),
            "max_l1_change_of_a_sum_when_accepted": worst if verdicts["accepted"] else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--honest", type=int, default=100_000)
    p.add_argument("--forged", type=int, default=200, help="per attack class")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "plausibility.json"))
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    report = {"k": args.k, "seed": args.seed}
    for name, limits in (
        ("defaults (max_epsilon 5, max_samples 100000)", Plausibility.for_round()),
        ("strict (max_epsilon 0.58, max_samples 10000)", Plausibility.for_round(0.58, 1e-5, 10_000)),
    ):
        started = time.perf_counter()
        report[name] = {
            "min_sigma": limits.min_sigma,
            "max_samples": limits.max_samples,
            "honest": honest(rng, args.k, limits, args.honest),
            "forged": forged(rng, args.k, limits, args.forged),
        }
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
    s = scores(np.zeros(args.k), 1.0, far=0.0)
    started = time.perf_counter()
    for _ in range(20_000):
        check_plausible(s, Plausibility.for_round())
    report["check_microseconds"] = round((time.perf_counter() - started) / 20_000 * 1e6, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
