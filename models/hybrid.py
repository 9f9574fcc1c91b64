"""A fixed raw-pixel branch next to the learned encoder, in one graph (one ONNX file for the device).

Contrastive features find what tells *images* apart; between grey handwritten domains that is
often stroke width, blur and the digit's scale and place in the frame, which the crop-zoom views
partly teach the encoder to ignore. Raw pixels keep all of them. :class:`PixelBranch` is a fixed
linear map fitted on the pool (average-pool, centre, project on the leading principal components,
unit norm); :class:`HybridEncoder` concatenates it with the learned features so the cosine between
two images is ``(1 - w) * cos_learned + w * cos_pixels``. Nothing in it is trained: the cloud fits
it once on the pool (``cloud.training.encoder.fit_pixel_branch``) and exports the whole module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PixelBranch(nn.Module):
    """``normalize((avg_pool(x, factor).flatten() - mean) @ projection)``: PCA of pooled pixels.

    ``mean`` (D,) and ``projection`` (D x p) are buffers (exported as constants), D being the
    number of pooled values of one input image."""

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor, factor: int):
        super().__init__()
        if projection.ndim != 2 or mean.shape != (projection.shape[0],):
            raise ValueError(f"mean {tuple(mean.shape)} and projection {tuple(projection.shape)} do not fit")
        if factor < 1:
            raise ValueError(f"factor must be >= 1; got {factor}")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("projection", projection.detach().float().clone())
        self.factor = int(factor)
        self.feature_dim = int(projection.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(x, self.factor) if self.factor > 1 else x
        return F.normalize((h.flatten(1) - self.mean) @ self.projection, dim=1)


class HybridEncoder(nn.Module):
    """Unit-norm ``[sqrt(1 - w) * encoder(x), sqrt(w) * pixels(x)]`` (both parts unit-norm)."""

    def __init__(self, encoder: nn.Module, pixels: PixelBranch, pixel_weight: float):
        super().__init__()
        if not 0.0 <= pixel_weight <= 1.0:
            raise ValueError(f"pixel_weight must lie in [0, 1]; got {pixel_weight!r}")
        self.encoder = encoder
        self.pixels = pixels
        self.pixel_weight = float(pixel_weight)
        self.feature_dim = int(encoder.feature_dim) + pixels.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (1.0 - self.pixel_weight) ** 0.5, self.pixel_weight**0.5
        learned = F.normalize(self.encoder(x), dim=1)
        return F.normalize(torch.cat([a * learned, b * self.pixels(x)], dim=1), dim=1)
