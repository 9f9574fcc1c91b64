"""From an index and devices' scores to a proxy set written as CSV.

Scores files are checked against the index (same probe, same encoder, same K) and counted once
per device: a device that answered twice (the same replayed message) is not counted twice.
Scores of several devices are summed (a fleet-level proxy set); the noise of the sum has
sigma = sqrt(sum of sigma_i^2).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np

from device_sdk.errors import MismatchError
from device_sdk.fsutil import atomic_write_text
from device_sdk.messages import Scores
from device_sdk.wire import read_file

from .index import PoolIndex
from .log import LOG
from .sampling import PoolView, ScoreSet, get_sampler

CSV_COLUMNS = ("path", "label", "domain", "cluster", "rank")


def load_scores(paths: Sequence[str]) -> List[Scores]:
    return [Scores.from_envelope(read_file(p, "scores"), p) for p in paths]


def combine_scores(index: PoolIndex, answers: Sequence[Scores], radius_quantile: float = 0.95) -> Optional[ScoreSet]:
    """Sum the devices' noisy scores after checking each one belongs to this index."""
    if not answers:
        return None
    per_device: Dict[str, Scores] = {}
    for s in answers:
        if s.probe_id != index.probe_id:
            raise MismatchError(f"scores from device {s.device_id} answer probe {s.probe_id[:12]}..., this index's probe is {index.probe_id[:12]}...")
        if s.encoder_sha256 != index.encoder_sha256:
            raise MismatchError(f"scores from device {s.device_id} were computed with encoder {s.encoder_sha256[:12]}..., not {index.encoder_sha256[:12]}...")
        if s.k != index.k:
            raise MismatchError(f"scores from device {s.device_id} have {s.k} values, the index has k={index.k}")
        if s.device_id in per_device:
            LOG.warning("device %s answered more than once; counting it once", s.device_id)
            continue
        per_device[s.device_id] = s
    total = np.sum([s.scores for s in per_device.values()], axis=0)
    sigma = math.sqrt(sum(s.sigma ** 2 for s in per_device.values()))
    fars = [s.far for s in per_device.values()]
    far = float(sum(fars)) if all(f is not None for f in fars) else None
    if far is None and any(f is not None for f in fars):
        LOG.warning("some devices reported coverage (far counts) and some did not; ignoring coverage")
    return ScoreSet(scores=total.astype(np.float64), sigma=sigma, far=far, radius_quantile=radius_quantile)


def select(index: PoolIndex, method: str, budget: int, scores: Optional[ScoreSet], seed: int = 0, **config) -> np.ndarray:
    sampler = get_sampler(method, **config)
    pool = PoolView(features=index.features, assign=index.assign, centroids=index.centroids)
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
