"""The feature encoder phi: the network both the cloud and the device run.

Its output is an L2-normalised ``feature_dim``-vector (the projection lives inside the
exported graph), so the device's features and the cloud's centroids share one cosine space.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .registry import register_model


def input_size_problem(input_size: int) -> str:
    """Why ``conv_encoder`` cannot take this input size ("" when it can)."""
    if input_size % 32 or not 32 <= input_size <= 512:
        return f"input_size must be a multiple of 32 in [32, 512]; got {input_size}"
    return ""


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 at 32 pixels), an MLP projection, unit-norm output.

    The flattened 4x4 map (not a global average) keeps layout and colour cues, which ECOS needs:
    the features must tell visual domains apart as well as content.

    With ``style_dim > 0`` the last ``style_dim`` of the ``feature_dim`` outputs are a *style*
    code: a projection of the per-channel mean and standard deviation of the first two stages'
    activations (the statistics style transfer uses), which ignore where things are and keep
    colour, stroke and texture. Content and style parts are normalised apart and weighted
    ``sqrt(1 - style_weight)`` : ``sqrt(style_weight)`` before the final unit norm, so the cosine
    between two images is ``(1 - style_weight) * cos_content + style_weight * cos_style``.
    """

    def __init__(
        self,
        feature_dim: int = 64,
        width: int = 32,
        in_channels: int = 3,
        input_size: int = 32,
        style_dim: int = 0,
        style_weight: float = 0.5,
    ):
        super().__init__()
        if not 0 <= style_dim < feature_dim:
            raise ValueError(f"style_dim must lie in 0..{feature_dim - 1}; got {style_dim}")
        w = width
        self.stage1 = nn.Sequential(_conv(in_channels, w), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv(w, 2 * w), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv(2 * w, 4 * w), nn.MaxPool2d(2))
        problem = input_size_problem(input_size)
        if problem:
            raise ValueError(problem)
        content_dim = feature_dim - style_dim
        # larger inputs: the last map (input_size / 8) is averaged down to the 4x4 of a 32-pixel input, so the
        # projection (and the layout cues it keeps) is the same size whatever the input size
        pool = [] if input_size == 32 else [nn.AdaptiveAvgPool2d(4)]
        self.project = nn.Sequential(
            *pool, nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, content_dim)
        )
        self.style = None
        if style_dim:
            self.style = nn.Sequential(
                nn.Linear(2 * (w + 2 * w), 128), nn.ReLU(inplace=True), nn.Linear(128, style_dim)
            )
        self.style_weight = float(style_weight)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.stage1(x)
        h2 = self.stage2(h1)
        content = self.project(self.stage3(h2))
        if self.style is None:
            return F.normalize(content, dim=1)
        stats = torch.cat([_moments(h1), _moments(h2)], dim=1)
        style = self.style(stats)
        a, b = (1.0 - self.style_weight) ** 0.5, self.style_weight**0.5
        return F.normalize(torch.cat([a * F.normalize(content, dim=1), b * F.normalize(style, dim=1)], dim=1), dim=1)


def _moments(h: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and standard deviation (N x 2C)."""
    mean = h.mean(dim=(2, 3))
    std = (h.pow(2).mean(dim=(2, 3)) - mean.pow(2)).clamp_min(1e-6).sqrt()
    return torch.cat([mean, std], dim=1)


@register_model("conv_encoder", kind="encoder")
def conv_encoder(
    feature_dim: int = 64,
    width: int = 32,
    input_size: int = 32,
    in_channels: int = 3,
    style_dim: int = 0,
    style_weight: float = 0.5,
) -> ConvEncoder:
    """Small CNN encoder (32 to 224 pixels, a multiple of 32; RGB or grey), unit-norm features (optional style code)."""
    return ConvEncoder(
        feature_dim=feature_dim,
        width=width,
        in_channels=in_channels,
        input_size=input_size,
        style_dim=style_dim,
        style_weight=style_weight,
    )
