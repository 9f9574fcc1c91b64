"""Settings of encoder training, importable without torch (the CLI builds its --help from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    arch: str = "conv_encoder"
    feature_dim: int = 64
    width: int = 16
    style_dim: int = 0  # outputs given to the style code (models/encoder.py); 0 = none
    style_weight: float = 0.5
    epochs: int = 5
    max_steps: int = 0  # stop after this many optimiser steps in all (0 = every epoch in full)
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    objective: str = "auto"  # auto: contrastive + labels/domains when present; contrastive; supervised
    # weight of the label head next to the contrastive loss; 0 by default: a label head pulls the features
    # towards content and blurs the domains ECOS must tell apart (measured in docs/sampling.md)
    label_weight: float = 0.0
    domain_weight: float = 1.0
    temperature: float = 0.2  # of the contrastive loss
    # contrastive views (docs/sampling.md has the ablation): shift as a fraction of the image, zoom
    # range (> 1 crops in), and a random RGB channel order (hue alone must not identify an image)
    max_shift: float = 0.25
    min_zoom: float = 1.0
    max_zoom: float = 1.3  # 2.0 erased the scale that tells grey handwritten domains apart (docs/sampling.md)
    permute_channels: bool = True
    # fixed raw-pixel branch (models/hybrid.py, docs/sampling.md): the last pixel_dim of the feature_dim outputs
    # are a PCA of the pool's pooled pixels, weighted pixel_weight in the cosine (0 = the learned encoder alone)
    pixel_weight: float = 0.3
    pixel_dim: int = 0  # 0: half of feature_dim
    scale: float = 16.0  # temperature of the cosine heads
    val_fraction: float = 0.1
    seed: int = 0
