"""Settings of encoder training, importable without torch (the CLI builds its --help from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    arch: str = "conv_encoder"
    feature_dim: int = 64
    width: int = 16
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    domain_weight: float = 1.0
    scale: float = 16.0  # temperature of the cosine heads
    val_fraction: float = 0.1
    seed: int = 0
