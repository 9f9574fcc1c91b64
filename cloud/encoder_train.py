"""Train the feature encoder on the open-source pool (no pretrained weights exist here).

ECOS senses the device's distribution through the encoder, so its features must separate
visual *domains* as well as *content*. The encoder is trained with two cosine-classifier heads
on its unit-norm output: one for the class label (the image's folder name) and one for the
domain (the folder levels above it), when the pool has them. The heads are dropped at export.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from device_sdk.errors import InputError

from models import get_model

from .dataset import ImageSet
from .encoder_config import EncoderConfig
from .log import LOG


class CosineHead(nn.Module):
    """Logits = scale * cos(feature, class weight): keeps the classes apart on the sphere."""

    def __init__(self, dim: int, classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.1)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * z @ F.normalize(self.weight, dim=1).t()


def channel_stats(images: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))


def random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Random translations up to ``pad`` pixels (reflect padding, then a random crop)."""
    h, w = x.shape[2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def train_encoder(data: ImageSet, cfg: EncoderConfig = EncoderConfig()) -> Tuple[nn.Module, Dict[str, float]]:
    """Train and return ``(encoder, report)``; ``report`` holds 1-NN accuracies on held-out images."""
    use_labels, use_domains = len(data.label_names) > 1, len(data.domain_names) > 1
    if not (use_labels or use_domains):
        raise InputError("encoder training needs class folders (>= 2 labels) or domain folders above them")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = channel_stats(data.images)
    x_all = _to_tensor(data.images, mean, std)
    train_idx, val_idx = split_indices(len(data.images), cfg.val_fraction, cfg.seed)
    encoder = get_model(cfg.arch, feature_dim=cfg.feature_dim, width=cfg.width)
    heads = nn.ModuleDict()
    if use_labels:
        heads["label"] = CosineHead(cfg.feature_dim, len(data.label_names), cfg.scale)
    if use_domains:
        heads["domain"] = CosineHead(cfg.feature_dim, len(data.domain_names), cfg.scale)
    targets = {"label": torch.from_numpy(data.labels), "domain": torch.from_numpy(data.domains)}
    weights = {"label": 1.0, "domain": cfg.domain_weight}
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(steps, 1)))
    t0 = time.monotonic()
    for epoch in range(cfg.epochs):
        encoder.train()
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            z = encoder(random_shift(x_all[idx], gen))
            loss = sum(weights[k] * _masked_ce(head(z), targets[k][idx]) for k, head in heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, batches = total + float(loss.detach()), batches + 1
        report = evaluate_features(encoder, x_all, data, train_idx, val_idx)
        LOG.info("encoder epoch %d/%d: loss %.3f, held-out 1-NN label acc %.3f, domain acc %.3f (%.0fs)",
                 epoch + 1, cfg.epochs, total / max(batches, 1), report["val_label_acc"], report["val_domain_acc"], time.monotonic() - t0)
    encoder.eval()
    report.update({"mean": mean, "std": std, "train_seconds": time.monotonic() - t0})
    return encoder, report


def warmup_cosine(total: int, warmup: float = 0.1):
    """LR multiplier: linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    n_warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - n_warm) / max(1, total - n_warm))))

    return factor


def _masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    keep = target >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


def _to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    from device_sdk.imagefolder import normalize

    return torch.from_numpy(normalize(images, mean, std))


@torch.no_grad()
def embed(encoder: nn.Module, x: torch.Tensor, batch: int = 1024) -> np.ndarray:
    encoder.eval()
    return torch.cat([encoder(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def evaluate_features(encoder: nn.Module, x_all: torch.Tensor, data: ImageSet, train_idx: np.ndarray, val_idx: np.ndarray,
                      max_ref: int = 5000) -> Dict[str, float]:
    """Cosine 1-NN accuracy of held-out images' label and domain against training images."""
    if len(val_idx) == 0:
        return {"val_label_acc": float("nan"), "val_domain_acc": float("nan")}
    ref = train_idx[:max_ref]
    zr, zv = embed(encoder, x_all[ref]), embed(encoder, x_all[val_idx])
    nn_idx = ref[np.argmax(zv @ zr.T, axis=1)]
    return {"val_label_acc": _acc(data.labels, nn_idx, val_idx), "val_domain_acc": _acc(data.domains, nn_idx, val_idx)}


def _acc(codes: np.ndarray, pred_idx: np.ndarray, true_idx: np.ndarray) -> float:
    known = codes[true_idx] >= 0
    if not known.any():
        return float("nan")
    return float(np.mean(codes[pred_idx][known] == codes[true_idx][known]))
