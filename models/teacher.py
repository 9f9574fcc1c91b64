"""Teachers: larger classifiers trained on the whole labelled pool, then distilled.

``resnet8``/``resnet20``: ResNets for 32x32 inputs in the CIFAR style (three stages of basic
blocks at 32, 16 and 8 pixels, global average pooling). Depth is ``6n + 2``; ``width`` sets the
first stage's channels. ``resnet18_narrow``: the ImageNet ResNet-18 layout (four stages of two
basic blocks, widths ``w, 2w, 4w, 8w``) for natural images of 64 to 224 pixels, with a stem that
downsamples by 2 (by 4 from 128 pixels on), at a fraction of torchvision's width (64 there).
All pool globally, so any input size works; ``in_channels`` 1 takes greyscale.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual path (1x1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet32(nn.Module):
    """CIFAR-style ResNet: ``blocks`` basic blocks per stage, widths ``w, 2w, 4w``."""

    def __init__(self, num_classes: int = 10, blocks: int = 1, width: int = 16, in_channels: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
        for stage in range(3):
            cout = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNet18Narrow(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks) with widths ``w, 2w, 4w, 8w`` and a stem sized to the input."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3, input_size: int = 96):
        super().__init__()
        stem = [
            nn.Conv2d(in_channels, width, 3, stride=2 if input_size >= 64 else 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if input_size >= 128:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        layers, cin = stem, width
        for stage in range(4):
            cout = width * 2**stage
            for b in range(2):
                layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resnet8", kind="teacher")
def resnet8(num_classes: int = 10, width: int = 16, in_channels: int = 3, input_size: int = 32) -> ResNet32:
    """ResNet-8 for 32x32 images (one basic block per stage); quick to train on a CPU."""
    return ResNet32(num_classes, blocks=1, width=width, in_channels=in_channels)


@register_model("resnet20", kind="teacher")
def resnet20(num_classes: int = 10, width: int = 16, in_channels: int = 3, input_size: int = 32) -> ResNet32:
    """ResNet-20 for 32x32 images (three basic blocks per stage), the CIFAR classic."""
    return ResNet32(num_classes, blocks=3, width=width, in_channels=in_channels)


@register_model("resnet18_narrow", kind="teacher")
def resnet18_narrow(
    num_classes: int = 10, width: int = 16, in_channels: int = 3, input_size: int = 96
) -> ResNet18Narrow:
    """ResNet-18 layout at reduced width for natural images of 64-224 pixels (stem by input size)."""
    return ResNet18Narrow(num_classes, width=width, in_channels=in_channels, input_size=input_size)
