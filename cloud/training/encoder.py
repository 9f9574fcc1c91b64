"""Train the feature encoder on the open-source pool (no pretrained weights exist here).

ECOS senses the device's distribution through the encoder, so its features must separate
visual *domains* (style: colour, stroke, texture, background) as well as *content*. A scraped
pool has no domain folders and often no labels, so the core objective needs neither:
contrastive instance discrimination (NT-Xent, SimCLR-style) between two *geometric* views of
each image (shift, a mild crop-zoom of at most 1.3x so that scale survives, small rotation) whose
colour channels are put in a random order. No colour jitter, greyscale, blur or texture
augmentation: to tell two images apart the encoder must keep the style cues ECOS needs (texture,
stroke, saturation, brightness, background), and the channel shuffle only takes away one image's
particular hue as an identity.

Labels (the image's folder name) and domains (the folder levels above it) are extra signal
when the pool has them: one cosine-classifier head each on the unit-norm output, dropped at
export. ``EncoderConfig.objective`` picks ``auto`` (contrastive + whatever metadata exists),
``contrastive`` (ignore the metadata) or ``supervised`` (the heads alone, the first version).

Next to the learned features, half of the output dimensions are a fixed raw-pixel branch (a PCA of
the pool's average-pooled pixels, ``cloud.training.pixels``, weight ``pixel_weight`` in the cosine):
raw pixels keep the stroke width, blur and scale that tell grey handwritten domains apart. Both
live in one module, so the device still runs one exported graph. A pool with domain folders trains a
domain head instead and gets no pixel branch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.log import LOG
from cloud.pool.dataset import ImageSet, PoolSet
from cloud.training.data import Batches, batch_source, channel_stats_streaming, epoch_order
from cloud.training.encoder_config import EncoderConfig
from cloud.training.pixels import with_pixel_branch
from device_sdk.errors import InputError
from models import get_model


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
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0  # NHWC: 3 channels, or 1 (greyscale)
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))


def random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Random translations up to ``pad`` pixels (reflect padding, then a random crop)."""
    h, w = x.shape[2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)`` rows of ``n``: a permutation drawn from ``seed``, cut at ``val_fraction``.

    int32 where the rows fit (the same draws and rows as ``rng.permutation(n)``, half the memory)."""
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def random_views(
    x: torch.Tensor, gen: torch.Generator, shift: float = 0.125, scale=(0.8, 1.15), degrees: float = 12.0
) -> torch.Tensor:
    """One random geometric view per image (batched affine warp: shift, zoom, rotation).

    Pixel values are only resampled, never recoloured (see the module docstring)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen)
    zoom = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    angle = (u[:, 1] * 2 - 1) * math.radians(degrees)
    tx, ty = (u[:, 2] * 2 - 1) * 2 * shift, (u[:, 3] * 2 - 1) * 2 * shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def permute_channels(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shuffle the colour channels of each image at random.

    Hue alone then no longer identifies an image, so the contrastive loss must rely on what a
    domain shares (texture, stroke, saturation, brightness, background) rather than on one
    image's particular colour. Training applies it to normalised tensors, so a grey image stays
    grey only up to the difference between the pool's per-channel means and deviations (small
    for most pools)."""
    if x.shape[1] != 3:
        return x
    perm = _PERMUTATIONS[torch.randint(0, len(_PERMUTATIONS), (x.shape[0],), generator=gen)]
    return torch.gather(x, 1, perm[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's contrastive loss: each view must pick its partner among the 2N - 1 others."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def encoder_kwargs(cfg: EncoderConfig, preprocess=None) -> Dict[str, object]:
    """The registry arguments that build this configuration's encoder (for the input of ``preprocess``)."""
    kwargs: Dict[str, object] = {"feature_dim": learned_dim(cfg), "width": cfg.width}
    kwargs.update(shape_kwargs(preprocess))
    if cfg.style_dim:
        kwargs.update(style_dim=cfg.style_dim, style_weight=cfg.style_weight)
    return kwargs


def learned_dim(cfg: EncoderConfig) -> int:
    """Outputs of the trained network: ``feature_dim`` less those of the pixel branch, when there is one."""
    if cfg.pixel_weight <= 0:
        return cfg.feature_dim
    if not 0 < cfg.pixel_weight < 1:
        raise InputError(f"pixel_weight must lie in [0, 1); got {cfg.pixel_weight!r}")
    if not 1 <= pixel_dim(cfg) < cfg.feature_dim:
        raise InputError(
            f"pixel_dim must lie in 1..{cfg.feature_dim - 1} (feature_dim {cfg.feature_dim}); got {pixel_dim(cfg)}"
        )
    return cfg.feature_dim - pixel_dim(cfg)


def pixel_dim(cfg: EncoderConfig) -> int:
    """Outputs of the pixel branch: ``cfg.pixel_dim``, or half of ``feature_dim`` when that is 0."""
    return cfg.pixel_dim or cfg.feature_dim // 2


def shape_kwargs(preprocess) -> Dict[str, object]:
    """``input_size``/``in_channels`` registry arguments where the input is not 32x32 RGB.

    Old checkpoints lack them."""
    kwargs: Dict[str, object] = {}
    if preprocess is not None and preprocess.size != (32, 32):
        if preprocess.size[0] != preprocess.size[1]:
            raise InputError(f"models take square inputs; got {preprocess.size[1]}x{preprocess.size[0]}")
        kwargs["input_size"] = preprocess.size[0]
    if preprocess is not None and preprocess.channels != 3:
        kwargs["in_channels"] = preprocess.channels
    return kwargs


def pool_stats(data: PoolSet, seed: int = 0, workers: int = 2):
    """Per-channel mean and std: over every image of a decoded set, else over a sample of the files."""
    return (
        channel_stats(data.images)
        if isinstance(data, ImageSet)
        else channel_stats_streaming(data, seed=seed, workers=workers)
    )


def objectives(data: PoolSet, cfg: EncoderConfig) -> Tuple[bool, bool, bool]:
    """``(contrastive, labels, domains)``: which losses train this encoder on this pool."""
    if cfg.objective not in ("auto", "contrastive", "supervised"):
        raise InputError(f"unknown encoder objective {cfg.objective!r}; use auto, contrastive or supervised")
    has_labels, has_domains = len(data.label_names) > 1, len(data.domain_names) > 1
    if cfg.objective == "contrastive":
        return True, False, False
    if cfg.objective == "supervised":
        if not (has_labels or has_domains):
            raise InputError(
                "supervised encoder training needs class folders (>= 2 labels) or domain folders above "
                "them; use the default objective (auto) for an unlabelled pool"
            )
        return False, has_labels, has_domains
    return True, has_labels and cfg.label_weight > 0, has_domains and cfg.domain_weight > 0


def train_encoder(
    data: PoolSet, cfg: EncoderConfig = EncoderConfig(), workers: int = 2
) -> Tuple[nn.Module, Dict[str, float]]:
    """Train and return ``(encoder, report)``; ``report`` holds 1-NN accuracies on held-out images.

    ``data`` decoded in memory (:class:`ImageSet`) or as files (:class:`PoolSet`: streamed from disk,
    ``workers`` decoding threads, memory bounded by a few batches whatever the pool's size).
    """
    use_contrastive, use_labels, use_domains = objectives(data, cfg)
    if len(data) < 2:
        raise InputError(f"encoder training needs at least 2 pool images; got {len(data)}")
    if use_domains and cfg.pixel_weight > 0:
        # with a domain head the learned features already separate the pool's domains; the pixel branch
        # would only dilute them (docs/sampling.md): it serves pools without domain folders
        LOG.info(
            "pool has domain folders: no pixel branch (pixel_weight %.2f applies to pools without)", cfg.pixel_weight
        )
        cfg = dataclasses.replace(cfg, pixel_weight=0.0)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = pool_stats(data, cfg.seed, workers)
    source = batch_source(data, mean, std, workers)
    train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed)
    encoder = get_model(cfg.arch, **encoder_kwargs(cfg, data.preprocess))
    heads = nn.ModuleDict()
    if use_labels:
        heads["label"] = CosineHead(learned_dim(cfg), len(data.label_names), cfg.scale)
    if use_domains:
        heads["domain"] = CosineHead(learned_dim(cfg), len(data.domain_names), cfg.scale)
    targets = {"label": torch.from_numpy(data.labels), "domain": torch.from_numpy(data.domains)}
    weights = {"label": cfg.label_weight if use_contrastive else 1.0, "domain": cfg.domain_weight}
    LOG.info(
        "encoder objective: %s",
        " + ".join(
            [n for n, on in (("contrastive", use_contrastive), ("labels", use_labels), ("domains", use_domains)) if on]
        ),
    )
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    if cfg.max_steps > 0:
        steps = min(steps, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(steps, 1)))
    t0, done = time.monotonic(), 0
    for epoch in range(cfg.epochs):
        if done >= steps:
            break
        encoder.train()
        order = epoch_order(train_idx, gen)
        total, batches = 0.0, 0
        chunks = Batches(order, cfg.batch_size, steps - done)  # --max-steps: the last epoch may be cut short
        for idx, xb in source.batches(chunks):
            if len(idx) < 2:
                continue
            if use_contrastive:
                views = random_views(torch.cat([xb, xb]), gen, cfg.max_shift, (cfg.min_zoom, cfg.max_zoom))
                if cfg.permute_channels:
                    views = permute_channels(views, gen)
                z_both = encoder(views)
                z, z2 = z_both[: len(idx)], z_both[len(idx) :]
                loss = nt_xent(z, z2, cfg.temperature)
            else:
                z = encoder(random_shift(xb, gen))
                loss = z.sum() * 0.0
            for k, head in heads.items():
                loss = loss + weights[k] * _masked_ce(head(z), targets[k][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, batches = total + float(loss.detach()), batches + 1
        done += len(chunks)
        report = evaluate_features(encoder, source, data, train_idx, val_idx)
        LOG.info(
            "encoder epoch %d/%d: loss %.3f, held-out 1-NN label acc %.3f, domain acc %.3f (%.0fs)",
            epoch + 1,
            cfg.epochs,
            total / max(batches, 1),
            report["val_label_acc"],
            report["val_domain_acc"],
            time.monotonic() - t0,
        )
    encoder.eval()
    if cfg.pixel_weight > 0:  # the fixed raw-pixel branch, fitted on the training images (models/hybrid.py)
        encoder = with_pixel_branch(encoder, source, train_idx, pixel_dim(cfg), cfg.pixel_weight, cfg.seed)
        report = evaluate_features(encoder, source, data, train_idx, val_idx)
        LOG.info(
            "encoder with a %d-d pixel branch (weight %.2f): held-out 1-NN label acc %.3f, domain acc %.3f",
            pixel_dim(cfg),
            cfg.pixel_weight,
            report["val_label_acc"],
            report["val_domain_acc"],
        )
    report.update({"mean": mean, "std": std, "pixel_weight": cfg.pixel_weight, "train_seconds": time.monotonic() - t0})
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


def evaluate_features(
    encoder: nn.Module, source, data: PoolSet, train_idx: np.ndarray, val_idx: np.ndarray, max_ref: int = 5000
) -> Dict[str, float]:
    """Cosine 1-NN accuracy of held-out images' label and domain against training images.

    Streamed from disk, at most 2,000 of each are embedded (decoded a batch at a time)."""
    if len(val_idx) == 0:
        return {"val_label_acc": float("nan"), "val_domain_acc": float("nan")}
    if source.streaming:
        max_ref, val_idx = min(max_ref, 2000), val_idx[:2000]
    ref = train_idx[:max_ref]
    zr, zv = _embed_rows(encoder, source, ref), _embed_rows(encoder, source, val_idx)
    nn_idx = ref[np.argmax(zv @ zr.T, axis=1)]
    return {"val_label_acc": _acc(data.labels, nn_idx, val_idx), "val_domain_acc": _acc(data.domains, nn_idx, val_idx)}


def _embed_rows(encoder: nn.Module, source, idx: np.ndarray, batch: int = 512) -> np.ndarray:
    return (
        np.concatenate([embed(encoder, source.take(idx[i : i + batch])) for i in range(0, len(idx), batch)])
        if len(idx)
        else np.zeros((0, 0), np.float32)
    )


def _acc(codes: np.ndarray, pred_idx: np.ndarray, true_idx: np.ndarray) -> float:
    known = codes[true_idx] >= 0
    if not known.any():
        return float("nan")
    return float(np.mean(codes[pred_idx][known] == codes[true_idx][known]))
