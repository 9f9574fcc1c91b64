"""Fit the fixed raw-pixel branch of the encoder on the pool (``models.hybrid``; docs/sampling.md).

The branch is a PCA of the pool's average-pooled, normalised pixels: no labels, no domains, no
training. It is fitted on (a sample of) the same images, normalised the same way, as the learned
encoder, so the exported graph takes the device's preprocessed input unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from device_sdk.errors import InputError
from models.hybrid import HybridEncoder, PixelBranch

POOLED_SIZE = 16  # the pooled image is about 16 x 16 whatever the input size (2 x 2 pooling at 32 pixels)


def fit_pixel_branch(
    source,
    idx: np.ndarray,
    dim: int,
    sample: int = 5000,
    seed: int = 0,
    pooled_size: int = POOLED_SIZE,
    batch: int = 512,
) -> PixelBranch:
    """PCA (``dim`` components) of the pooled pixels of up to ``sample`` of the images ``idx``.

    ``source`` serves normalised image tensors by index (``cloud.training.data.batch_source``)."""
    idx = np.asarray(idx)
    if len(idx) < 2:
        raise InputError(f"the pixel branch needs at least 2 pool images; got {len(idx)}")
    if len(idx) > sample:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=sample, replace=False))
    rows, factor = [], 1
    for start in range(0, len(idx), batch):
        x = source.take(idx[start : start + batch])
        factor = max(1, int(x.shape[-1]) // pooled_size)
        rows.append((F.avg_pool2d(x, factor) if factor > 1 else x).flatten(1).double())
    h = torch.cat(rows)
    mean = h.mean(0)
    _, _, vt = torch.linalg.svd(h - mean, full_matrices=False)
    k = min(int(dim), vt.shape[0])
    if k < 1:
        raise InputError(f"pixel_dim must be >= 1; got {dim}")
    return PixelBranch(mean.float(), vt[:k].t().contiguous().float(), factor)


def with_pixel_branch(encoder: nn.Module, source, idx: np.ndarray, dim: int, weight: float, seed: int = 0) -> nn.Module:
    """``encoder`` with a pixel branch fitted on the images ``idx`` (weight 0: ``encoder`` itself)."""
    if weight <= 0:
        return encoder
    return HybridEncoder(encoder.eval(), fit_pixel_branch(source, idx, dim, seed=seed), weight).eval()
