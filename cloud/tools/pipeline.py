"""Reusable steps of the offline pipeline, each skipped when its output already exists.

The demo and the benchmarks share these so that a work folder can be re-used between runs:
data -> encoder -> index. Each step writes its outputs atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from cloud.log import LOG
from cloud.training.encoder_config import EncoderConfig
from device_sdk.runtime.artifact import ArtifactMeta


@dataclass(frozen=True)
class PipelineConfig:
    per_domain: int = 2000
    device_local: int = 300
    device_test: int = 300
    domains: Optional[Sequence[str]] = None
    seed: int = 0
    feature_dim: int = EncoderConfig.feature_dim
    width: int = EncoderConfig.width
    epochs: int = EncoderConfig.epochs
    k: int = 64


def ensure_dataset(workdir: str, cfg: PipelineConfig) -> str:
    """Generate the multi-domain digits benchmark under ``workdir/data`` unless present."""
    from cloud.tools.datagen.digits import DOMAINS, generate

    root = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(root, "dataset.json")):
        LOG.info("generating digits benchmark under %s", root)
        generate(
            root,
            per_domain=cfg.per_domain,
            domains=cfg.domains or DOMAINS,
            seed=cfg.seed,
            layout="benchmark",
            device_local=cfg.device_local,
            device_test=cfg.device_test,
            workers=os.cpu_count() or 1,
        )
    return root


def ensure_encoder(workdir: str, pool_root: str, cfg: PipelineConfig) -> str:
    """Train and export the encoder to ``workdir/encoder.onnx`` unless present."""
    from cloud.export.formats import export_onnx
    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import train_encoder

    path = os.path.join(workdir, "encoder.onnx")
    if not os.path.exists(path):
        data = load_folder(pool_root)
        enc_cfg = EncoderConfig(feature_dim=cfg.feature_dim, width=cfg.width, epochs=cfg.epochs, seed=cfg.seed)
        encoder, report = train_encoder(data, enc_cfg)
        export_onnx(encoder, encoder_meta(enc_cfg, data, report), path, output_name="features")
    return path


def encoder_meta(cfg, data, report) -> ArtifactMeta:
    """The metadata an exported encoder carries (what the device needs to preprocess)."""
    return ArtifactMeta(
        kind="encoder",
        arch=cfg.arch,
        input_shape=data.preprocess.input_shape,
        mean=report["mean"],
        std=report["std"],
        preprocess=data.preprocess.policy(),
        feature_dim=cfg.feature_dim,
        labels=data.label_names,
        domains=data.domain_names,
        extra={
            "config": dict(cfg.__dict__),
            "val_label_acc": _finite_or_none(report["val_label_acc"]),
            "val_domain_acc": _finite_or_none(report["val_domain_acc"]),
        },
    )


def _finite_or_none(value: float):
    """Metadata is strict JSON: an accuracy the pool cannot measure (no labels / domains) is null."""
    return value if math.isfinite(value) else None


def ensure_index(workdir: str, pool_root: str, encoder_path: str, cfg: PipelineConfig):
    """Encode and cluster the pool into ``workdir/pool.index.npz`` unless present."""
    from cloud.pool.index import PoolIndex, build_index

    path = os.path.join(workdir, "pool.index.npz")
    if os.path.exists(path):
        return PoolIndex.load(path)
    index = build_index(
        pool_root,
        encoder_path,
        k=cfg.k,
        seed=cfg.seed,
        cache_dir=os.path.join(workdir, "cache"),
        threads=os.cpu_count() or 1,
    )
    index.save(path)
    return index
