"""FixMatch (cloud/training/semisup.py) on a tiny image set, and its place in the trainers registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.training.semisup import SemiSupConfig, strong_view, train_fixmatch, weak_view
from cloud.training.trainers import TrainerContext, get_trainer
from device_sdk.errors import InputError, UsageError


def _blobs(n: int, seed: int):
    """Two classes: a bright square in the top-left (0) or bottom-right (1) corner, random colours and noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.int64)
    for i, c in enumerate(y):
        oy, ox = (2, 2) if c == 0 else (18, 18)
        oy += rng.integers(-2, 3)
        ox += rng.integers(-2, 3)
        x[i, oy : oy + 12, ox : ox + 12] += rng.integers(120, 190, 3)
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_fixmatch_learns_from_few_labels_and_uses_pseudo_labels():
    torch.set_num_threads(1)
    x, y = _blobs(260, 0)
    test_x, test_y = _blobs(100, 1)
    labels = np.full(60, -1)
    labels[:6] = y[:6]  # 6 labelled of 60 in the selection; the rest unlabelled, plus 200 pool images
    cfg = SemiSupConfig(width=8, epochs=1, min_steps=60, batch_size=6, mu=4, threshold=0.9, seed=0)
    trained = train_fixmatch(x[:60], labels, ["tl", "br"], x[60:], cfg, test_x, test_y)
    rep = trained.report
    assert rep["labelled"] == 6 and rep["unlabelled"] == 254 and rep["steps"] == 60
    assert rep["eval_acc"] >= 0.9, rep
    assert max(h["mask"] for h in rep["history"]) > 0.0  # pseudo-labels passed the threshold and were trained on
    assert trained.role == "student" and trained.labels == ["tl", "br"]


def test_views_keep_shape_and_differ():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    w, s = weak_view(x, gen), strong_view(x, gen)
    assert w.shape == s.shape == x.shape
    assert not torch.allclose(w, s)


def test_bad_inputs():
    x, y = _blobs(10, 0)
    with pytest.raises(InputError):
        train_fixmatch(x, np.full(10, -1), ["a", "b"], x)
    with pytest.raises(UsageError):
        SemiSupConfig(threshold=0.0)


def test_registered_as_a_trainer(tmp_path):
    trainer = get_trainer(
        "semisup",
        TrainerContext(index_path=str(tmp_path / "none.npz"), cache_dir=str(tmp_path)),
        {"semisup": {"epochs": 2}},
    )
    assert trainer.cfg.epochs == 2
    with pytest.raises(UsageError):
        get_trainer("semisup", TrainerContext(index_path="x", cache_dir=str(tmp_path)), {"semisup": {"nope": 1}})
