"""The feature encoder phi: the network both the cloud and the device run.

Its output is an L2-normalised ``feature_dim``-vector (the projection lives inside the
exported graph), so the device's features and the cloud's centroids share one cosine space.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .registry import register_model


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4), an MLP projection, unit-norm output.

    The flattened 4x4 map (not a global average) keeps layout and colour cues, which ECOS needs:
    the features must tell visual domains apart as well as content.
    """

    def __init__(self, feature_dim: int = 64, width: int = 32, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv(in_channels, w), nn.MaxPool2d(2),
            _conv(w, 2 * w), nn.MaxPool2d(2),
            _conv(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        flat = 4 * w * (input_size // 8) ** 2
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(inplace=True), nn.Linear(256, feature_dim))
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.body(x)), dim=1)


@register_model("conv_encoder", kind="encoder")
def conv_encoder(feature_dim: int = 64, width: int = 32, input_size: int = 32) -> ConvEncoder:
    """Small CNN encoder for 32x32 RGB images, unit-norm features."""
    return ConvEncoder(feature_dim=feature_dim, width=width, input_size=input_size)
