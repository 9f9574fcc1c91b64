"""Students: small classifiers distilled from a teacher and shipped to the device (int8).

``small_cnn`` is the default: plain conv/BN/ReLU stages quantise well to int8 in both ONNX
Runtime and LiteRT. ``mobilenet_v3_small_32`` is torchvision's MobileNetV3-Small with its
stem stride removed, so a 32x32 input keeps a 2x2 map at the end instead of vanishing to 1x1;
``mobilenet_v3_small`` is the unmodified layout (stem stride 2) for natural images of 64 to 224
pixels. All pool globally, so any input size works; ``in_channels`` 1 takes greyscale.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v3_small

from .registry import register_model


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Three stages of two 3x3 convolutions (32 -> 16 -> 8 -> 4), global pooling, one linear layer."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            _stage(in_channels, width),
            _stage(width, 2 * width),
            _stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_cnn", kind="student")
def small_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 3, input_size: int = 32) -> SmallCNN:
    """Small 6-conv CNN for 32x32 images; the default student (int8-friendly)."""
    return SmallCNN(num_classes, width=width, in_channels=in_channels)


def _mobilenet(num_classes: int, width: int, in_channels: int, stem_stride: int) -> nn.Module:
    model = mobilenet_v3_small(weights=None, num_classes=num_classes, width_mult=width / 16)
    stem = model.features[0][0]
    stem.stride = (stem_stride, stem_stride)
    if in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=stem_stride, padding=1, bias=False)
    return model


@register_model("mobilenet_v3_small_32", kind="student")
def mobilenet_v3_small_32(
    num_classes: int = 10, width: int = 8, in_channels: int = 3, input_size: int = 32
) -> nn.Module:
    """torchvision MobileNetV3-Small adapted to 32x32 inputs (stem stride 1), random init.

    ``width`` is the stem's channels, as for the other classifiers: 16 is torchvision's
    ``width_mult=1.0``, the default 8 is ``0.5``.
    """
    return _mobilenet(num_classes, width, in_channels, stem_stride=1)


@register_model("mobilenet_v3_small", kind="student")
def mobilenet_v3_small_64(
    num_classes: int = 10, width: int = 8, in_channels: int = 3, input_size: int = 96
) -> nn.Module:
    """torchvision MobileNetV3-Small as published (stem stride 2) for 64-224 pixels, random init; ``width`` as above."""
    return _mobilenet(num_classes, width, in_channels, stem_stride=2)
