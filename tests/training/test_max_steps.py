"""``--max-steps``: encoder training stops after that many batches in all, mid-epoch if need be."""

from __future__ import annotations

import numpy as np


def test_max_steps_cuts_training_short_on_a_streamed_pool(digits_root, monkeypatch):
    import torch

    import cloud.training.encoder as enc
    from cloud.pool.dataset import default_preprocess, pool_set
    from device_sdk.imagefolder import scan_image_folder

    torch.set_num_threads(1)
    items = scan_image_folder(str(digits_root / "pool"))[:120]
    data = pool_set(items, default_preprocess((64, 64)))  # streamed from disk, at 64 x 64
    calls = []
    real = enc.nt_xent
    monkeypatch.setattr(enc, "nt_xent", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = enc.EncoderConfig(feature_dim=8, width=8, epochs=3, batch_size=16, pixel_weight=0.0, objective="contrastive")
    # 108 training images = 7 batches an epoch
    enc.train_encoder(data, enc.EncoderConfig(**{**cfg.__dict__, "max_steps": 9}), workers=1)
    assert len(calls) == 9  # one full epoch and two batches of the second
    calls.clear()
    encoder, report = enc.train_encoder(data, cfg, workers=1)
    assert len(calls) == 21  # 0 = every epoch in full
    z = encoder.eval()(torch.zeros(2, 3, 64, 64))
    assert z.shape == (2, 8) and np.isfinite(report["train_seconds"])
