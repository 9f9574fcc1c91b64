"""From an index and devices' scores to a proxy set written as CSV.

Scores files are checked against the index (same probe, same encoder, same K) and counted once
per device: a device that answered twice (the same replayed message) is not counted twice.
Scores of several devices are summed (a fleet-level proxy set); the noise of the sum has
sigma = sqrt(sum of sigma_i^2).

Plausibility (docs/security.md, "Plausibility of scores"): with ``limits`` (the daemon's rounds
and ``ecos-cloud sample`` always pass them) each answer must pass :func:`check_plausible`, and each
device's vector (its K counts and its far count) is scaled down to an L1 norm of at most
``limits.max_samples`` before the sum, so one device moves a fleet sum by at most that much.
Without ``limits`` (simulations, noise-free benchmarks) answers are summed as they are.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import numpy as np

from cloud.errors import ImplausibleScores
from cloud.log import LOG
from cloud.pool.index import PoolIndex
from cloud.sampling import PoolView, ScoreSet, get_sampler
from cloud.serve.config import RoundConfig
from device_sdk.errors import MismatchError, UsageError
from device_sdk.fsutil import atomic_write_text
from device_sdk.privacy.accounting import DEFAULT_BUDGET_DELTA, calibrate_sigma
from device_sdk.protocol.envelope import read_file
from device_sdk.protocol.round import Scores

CSV_COLUMNS = ("path", "label", "domain", "cluster", "rank")


def load_scores(paths: Sequence[str]) -> List[Scores]:
    return [Scores.from_envelope(read_file(p, "scores"), p) for p in paths]


# [rounds] defaults: max_epsilon 5 per answer is more than a device's whole default budget (3), so it refuses only
# what no default device sends; max_samples 100,000 per device and answer is generous for an edge device's folder
DEFAULT_MAX_EPSILON = RoundConfig.max_epsilon
DEFAULT_MAX_SAMPLES = RoundConfig.max_samples
TAIL_SIGMAS = 6.0  # an honest noisy count lies this far beyond its true value with probability ~2e-9


@lru_cache(maxsize=64)
def _min_sigma(max_epsilon: float, delta: float) -> float:
    return 0.0 if math.isinf(max_epsilon) else calibrate_sigma(max_epsilon, delta)


@dataclass(frozen=True)
class Plausibility:
    """What an honest answer to a round looks like; build it with :meth:`for_round`.

    ``min_sigma``: the noise one answer at the round's ``max_epsilon`` and ``delta`` needs (the
    count vector has L2 sensitivity 1, so sigma alone fixes the answer's epsilon);
    ``max_samples``: the most samples one device may have counted in one answer (each sample
    votes once, in one of the K bins or the far bin).
    """

    min_sigma: float = 0.0
    max_samples: int = DEFAULT_MAX_SAMPLES
    tail_sigmas: float = TAIL_SIGMAS

    @classmethod
    def for_round(
        cls,
        max_epsilon: float = DEFAULT_MAX_EPSILON,
        delta: float = DEFAULT_BUDGET_DELTA,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> "Plausibility":
        """Limits of a round that accepts answers which are (``max_epsilon``, ``delta``)-DP (inf: any noise)."""
        try:
            max_epsilon, delta, max_samples = float(max_epsilon), float(delta), int(max_samples)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"bad plausibility limits {max_epsilon!r}, {delta!r}, {max_samples!r}") from None
        if not (max_epsilon > 0 and 0 < delta < 1 and max_samples >= 1):
            raise UsageError(
                f"need max_epsilon > 0, 0 < delta < 1 and max_samples >= 1, got {max_epsilon}, {delta}, {max_samples}"
            )
        return cls(_min_sigma(max_epsilon, delta), max_samples)


def check_plausible(s: Scores, limits: Plausibility) -> None:
    """Refuse (:class:`ImplausibleScores`, with the failed ``check``) scores no honest device sends.

    In order: every number finite (``not_finite``); sensitivity 1, since each sample votes once
    (``sensitivity``); sigma at least ``min_sigma`` (``noise_too_low``) and at most
    ``max_samples`` (``noise_too_high``: such an answer says nothing); every count, the far count
    included, within ``[-t*sigma, max_samples + t*sigma]`` (``count_range``); their sum within
    ``[-t*sigma*sqrt(n), max_samples + t*sigma*sqrt(n)]`` for n values (``total``), t = 6.
    An honest answer of at most ``max_samples`` samples fails a range check with probability
    about 2e-9 per value.
    """
    who = f"scores from device {s.device_id[:64]!r}"
    values = np.asarray(s.scores, dtype=np.float64).ravel()
    if s.far is not None:
        values = np.append(values, float(s.far))

    def refuse(check: str, why: str) -> None:
        raise ImplausibleScores(f"{who} refused ({check}): {why}", check)

    if not (math.isfinite(s.sigma) and math.isfinite(s.sensitivity) and np.all(np.isfinite(values))):
        refuse("not_finite", "sigma, sensitivity and every count must be finite numbers")
    if s.sensitivity != 1.0:
        refuse("sensitivity", f"sensitivity {s.sensitivity:g}; each sample votes once, so it is 1")
    if s.sigma < limits.min_sigma * (1 - 1e-12):
        refuse("noise_too_low", f"noise sigma {s.sigma:.6g} is below the {limits.min_sigma:.6g} this round asks for")
    cap, tail = float(limits.max_samples), limits.tail_sigmas * s.sigma
    if s.sigma > cap:
        refuse("noise_too_high", f"noise sigma {s.sigma:.6g} is above max_samples={limits.max_samples}")
    lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if lo < -tail or hi > cap + tail:
        refuse(
            "count_range",
            f"counts from {lo:.6g} to {hi:.6g}; {limits.max_samples} samples with noise sigma "
            f"{s.sigma:.6g} give [{-tail:.6g}, {cap + tail:.6g}]",
        )
    total, spread = float(values.sum()), tail * math.sqrt(max(1, len(values)))
    if total < -spread or total > cap + spread:
        refuse(
            "total",
            f"counts sum to {total:.6g}; {limits.max_samples} samples with noise sigma {s.sigma:.6g} "
            f"give [{-spread:.6g}, {cap + spread:.6g}]",
        )


def clip_contribution(s: Scores, max_samples: int) -> Scores:
    """``s`` with its counts (the far count included) scaled down to an L1 norm of at most ``max_samples``."""
    norm = float(np.abs(s.scores).sum()) + (abs(s.far) if s.far is not None else 0.0)
    if norm <= max_samples:
        return s
    scale = max_samples / norm
    LOG.warning(
        "scores from device %s clipped: L1 norm %.6g scaled down to max_samples=%d", s.device_id[:64], norm, max_samples
    )
    return replace(s, scores=s.scores * scale, far=None if s.far is None else s.far * scale)


def combine_scores(
    index: PoolIndex, answers: Sequence[Scores], radius_quantile: float = 0.95, limits: Optional[Plausibility] = None
) -> Optional[ScoreSet]:
    """Sum the devices' noisy scores after checking each one belongs to this index.

    With ``limits``, each answer must be plausible (else :class:`ImplausibleScores`) and is
    clipped to ``limits.max_samples`` (see the module docstring).
    """
    if not answers:
        return None
    per_device: Dict[str, Scores] = {}
    for s in answers:
        if s.probe_id != index.probe_id:
            raise MismatchError(
                f"scores from device {s.device_id} answer probe {s.probe_id[:12]}..., this index's probe is "
                f"{index.probe_id[:12]}..."
            )
        if s.encoder_sha256 != index.encoder_sha256:
            raise MismatchError(
                f"scores from device {s.device_id} were computed with encoder {s.encoder_sha256[:12]}..., not "
                f"{index.encoder_sha256[:12]}..."
            )
        if s.k != index.k:
            raise MismatchError(f"scores from device {s.device_id} have {s.k} values, the index has k={index.k}")
        if s.device_id in per_device:
            LOG.warning("device %s answered more than once; counting it once", s.device_id)
            continue
        if limits is not None:
            check_plausible(s, limits)
            s = clip_contribution(s, limits.max_samples)
        per_device[s.device_id] = s
    total = np.sum([s.scores for s in per_device.values()], axis=0)
    sigma = math.sqrt(sum(s.sigma**2 for s in per_device.values()))
    fars = [s.far for s in per_device.values()]
    far = float(sum(fars)) if all(f is not None for f in fars) else None
    if far is None and any(f is not None for f in fars):
        LOG.warning("some devices reported coverage (far counts) and some did not; ignoring coverage")
    return ScoreSet(scores=total.astype(np.float64), sigma=sigma, far=far, radius_quantile=radius_quantile)


def select(
    index: PoolIndex,
    method: str,
    budget: int,
    scores: Optional[ScoreSet],
    seed: int = 0,
    use_domains: bool = True,
    **config,
) -> np.ndarray:
    """``budget`` pool indices picked by sampler ``method``. The pool's domain folders (the index's
    ``domains``) are shown to the sampler unless ``use_domains`` is False (benchmarks whose index
    keeps the true domains of a pool that is meant to have none)."""
    sampler = get_sampler(method, **config)
    pool = PoolView(
        features=index.features,
        assign=index.assign,
        centroids=index.centroids,
        groups=PoolView.group_ids(index.domains) if use_domains else None,
    )
    return sampler.select(pool, budget, scores, np.random.default_rng(seed))


def write_selection_csv(index: PoolIndex, picks: np.ndarray, path: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rank, i in enumerate(picks):
        writer.writerow([index.paths[i], index.labels[i], index.domains[i], int(index.assign[i]), rank])
    atomic_write_text(path, buf.getvalue())


def composition(index: PoolIndex, picks: np.ndarray) -> Dict[str, int]:
    """How many picks come from each domain (folder level above the label)."""
    return dict(Counter(str(d) for d in index.domains[picks]).most_common())
