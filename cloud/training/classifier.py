"""Train the teacher on the labelled pool and distil it into a small student on a proxy set.

The paper's model-compression task: a large teacher learns from the whole labelled open-source
pool; a small student learns from the teacher's soft targets (temperature ``T``, KL divergence)
plus the hard labels where the proxy set has them, on the ECOS selection only. The student is
what gets quantised and shipped.

The teacher's soft targets are computed once, on the un-augmented proxy images, and reused for
every shifted copy: a digit moved by three pixels keeps its class, and this halves the cost
of an epoch on a CPU (the teacher never runs inside the training loop).

Checkpoints are safetensors (tensors and a JSON string, nothing executable); the JSON carries
the architecture, its arguments, the input normalisation and the label names, so a checkpoint
alone rebuilds the model.

Over 400 lines on purpose: teacher training, distillation and checkpoints share one training
loop, one augmentation and one checkpoint format.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.log import LOG
from cloud.pool.dataset import ImageSet, PoolSet, load_image_set
from cloud.training.data import Batches, InMemory, batch_source, epoch_order
from cloud.training.encoder import pool_stats, random_shift, shape_kwargs, split_indices, warmup_cosine
from device_sdk.errors import ArtifactError, InputError, MismatchError, UsageError
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.imagefolder import ImageItem, normalize
from device_sdk.preprocess import Preprocess
from device_sdk.runtime.artifact import ArtifactMeta
from models import get_model

CHECKPOINT_FORMAT = 1
INPUT_SHAPE = (3, 32, 32)  # of checkpoints made before the input size was a parameter
MAX_STREAMED_VAL = 2000  # held-out images scored per epoch when the pool is streamed from disk


@dataclass(frozen=True)
class FitConfig:
    """What every supervised training run here shares."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UsageError(
                f"epochs and batch_size must be >= 1 and lr > 0 (got {self.epochs}, {self.batch_size}, {self.lr})"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")


@dataclass(frozen=True)
class TeacherConfig(FitConfig):
    arch: str = "resnet8"
    width: int = 16


@dataclass(frozen=True)
class DistillConfig(FitConfig):
    arch: str = "small_cnn"
    width: int = 16
    epochs: int = 30
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target (KL) term; 1 - alpha goes to the hard labels

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"temperature must be > 0 and alpha in [0, 1] (got {self.temperature}, {self.alpha})")


@dataclass
class Trained:
    """A trained classifier and everything needed to rebuild, evaluate and export it."""

    model: nn.Module
    arch: str
    arch_kwargs: Dict[str, Any]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    labels: List[str]
    role: str = "teacher"  # what this model is for here, whatever its architecture
    report: Dict[str, Any] = field(default_factory=dict)
    input_shape: Tuple[int, int, int] = INPUT_SHAPE  # (channels, height, width)
    policy: Dict[str, Any] = field(default_factory=dict)  # Preprocess.policy(); empty = the first version's

    def spec(self) -> Preprocess:
        """How files are decoded for this model (and, once exported, on the device)."""
        return Preprocess.from_meta(self.input_shape, self.mean, self.std, self.policy)

    def meta(self, precision: str = "fp32", **extra: Any) -> ArtifactMeta:
        return ArtifactMeta(
            kind="classifier",
            arch=self.arch,
            input_shape=tuple(self.input_shape),
            mean=tuple(self.mean),
            std=tuple(self.std),
            labels=list(self.labels),
            precision=precision,
            extra={"role": self.role, "arch_kwargs": self.arch_kwargs, **extra},
            preprocess=dict(self.policy),
        )

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> the normalised float tensor this model was trained on."""
        return torch.from_numpy(normalize(images, self.mean, self.std))


# ---- data ------------------------------------------------------------------------------------


def load_selection(
    csv_path: str, label_names: List[str], size: Tuple[int, int] = (32, 32), preprocess: Preprocess | None = None
) -> ImageSet:
    """Decode the images a selection CSV names (as ``preprocess`` says), with labels coded against ``label_names``.

    Every path is checked before any image is decoded (a training run must not die half-way),
    and labels the teacher does not know are refused: the student's outputs are the teacher's.
    An empty label means "unlabelled": that image gets the soft targets only.
    """
    items = _read_selection_rows(csv_path)
    missing = [it.path for it in items if not os.path.isfile(it.path)]
    if missing:
        raise InputError(
            f"{csv_path}: {len(missing)} of {len(items)} selected images do not exist; first: {missing[0]}"
        )
    unknown = sorted({it.label for it in items if it.label and it.label not in label_names})
    if unknown:
        raise MismatchError(
            f"{csv_path}: labels unknown to the teacher: {', '.join(unknown)} (teacher knows {', '.join(label_names)})"
        )
    return load_image_set(items, size, label_names=label_names, preprocess=preprocess)


def _read_selection_rows(csv_path: str) -> List[ImageItem]:
    try:
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:  # paths: any bytes
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"cannot read selection {csv_path}: {exc.strerror}") from None
    if not rows or "path" not in rows[0]:
        raise InputError(
            f"{csv_path}: not a selection CSV (needs a header with at least 'path'; columns "
            "path,label,domain,cluster,rank)"
        )
    return [ImageItem(r["path"], (r.get("label") or "").strip(), (r.get("domain") or "").strip()) for r in rows]


# ---- training --------------------------------------------------------------------------------


def train_teacher(data: PoolSet, cfg: TeacherConfig = TeacherConfig(), workers: int = 2) -> Trained:
    """Train ``cfg.arch`` on the labelled pool; logs held-out accuracy after every epoch.

    ``data`` decoded in memory (:class:`ImageSet`) or as files (:class:`PoolSet`, streamed from disk by
    ``workers`` threads: memory bounded by a few batches whatever the pool's size).
    """
    if len(data.label_names) < 2 or not (data.labels >= 0).any():
        raise InputError("teacher training needs a labelled pool with at least 2 class folders")
    torch.manual_seed(cfg.seed)
    mean, std = pool_stats(data, cfg.seed, workers)
    kwargs = {"num_classes": len(data.label_names), "width": cfg.width, **shape_kwargs(data.preprocess)}
    trained = Trained(
        get_model(cfg.arch, **kwargs),
        cfg.arch,
        kwargs,
        mean,
        std,
        list(data.label_names),
        input_shape=data.preprocess.input_shape,
        policy=data.preprocess.policy(),
    )
    source, y = batch_source(data, mean, std, workers), torch.from_numpy(data.labels)
    train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed)
    train_idx = train_idx[data.labels[train_idx] >= 0]
    if source.streaming:
        val_idx = val_idx[:MAX_STREAMED_VAL]

    def loss(idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(trained.model(xb), y[idx])

    def validate() -> Dict[str, float]:
        if not len(val_idx):
            return {}
        return {"val_acc": accuracy(predict_logits(trained.model, source.take(val_idx)), data.labels[val_idx])}

    trained.report = {
        "config": asdict(cfg),
        "history": _fit(trained.model, source, train_idx, loss, validate, cfg, "teacher"),
    }
    trained.report.update(trained.report["history"][-1])
    return trained


def distill(student: nn.Module, teacher: Trained, data: ImageSet, cfg: DistillConfig = DistillConfig()) -> Trained:
    """Distil ``teacher`` into ``student`` on the proxy set ``data`` (labels coded as the teacher's).

    ``student`` must be ``cfg.arch`` built with ``num_classes`` and ``cfg.width`` (so that its
    checkpoint rebuilds it). Logs held-out accuracy (where labels exist) and agreement with the
    teacher after each epoch.
    """
    if data.label_names != teacher.labels:
        raise MismatchError(f"proxy set labels {data.label_names} are not coded as the teacher's {teacher.labels}")
    if len(data.images) < 2:
        raise InputError(f"distillation needs at least 2 proxy images (got {len(data.images)})")
    torch.manual_seed(cfg.seed)
    x, y = teacher.inputs(data.images), torch.from_numpy(data.labels)
    soft = torch.from_numpy(predict_logits(teacher.model, x))
    train_idx, val_idx = split_indices(len(x), cfg.val_fraction, cfg.seed)
    kwargs = student_kwargs(teacher, cfg)
    _check_same_shape(
        student, get_model(cfg.arch, **kwargs), f"{cfg.arch}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    )
    trained = Trained(
        student,
        cfg.arch,
        kwargs,
        teacher.mean,
        teacher.std,
        list(teacher.labels),
        role="student",
        input_shape=teacher.input_shape,
        policy=dict(teacher.policy),
    )

    def loss(idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student(xb), soft[idx], y[idx], cfg.temperature, cfg.alpha)

    def validate() -> Dict[str, float]:
        if not len(val_idx):
            return {}
        logits = predict_logits(student, x[val_idx])
        return {
            "val_acc": accuracy(logits, data.labels[val_idx]),
            "val_teacher_agreement": float(np.mean(logits.argmax(1) == soft[val_idx].numpy().argmax(1))),
        }

    trained.report = {
        "config": asdict(cfg),
        "proxy_images": len(x),
        "labelled": int((data.labels >= 0).sum()),
        "history": _fit(student, InMemory(x), train_idx, loss, validate, cfg, "student"),
    }
    trained.report.update(trained.report["history"][-1])
    return trained


def student_kwargs(teacher: Trained, cfg: DistillConfig) -> Dict[str, Any]:
    """The registry arguments of ``cfg.arch`` as a student of ``teacher`` (same classes, same input)."""
    return {"num_classes": len(teacher.labels), "width": cfg.width, **shape_kwargs(teacher.spec())}


def _check_same_shape(model: nn.Module, reference: nn.Module, name: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in reference.state_dict().items()}:
        raise UsageError(f"the student passed is not {name}; build it with models.get_model")


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al.: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``.

    ``T^2`` keeps the soft term's gradients on the scale of the hard term's; images without a
    label (``-1``) contribute the soft term only.
    """
    soft = (
        F.kl_div(
            F.log_softmax(logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    keep = labels >= 0
    hard = F.cross_entropy(logits[keep], labels[keep]) if bool(keep.any()) else logits.sum() * 0.0
    return alpha * soft + (1.0 - alpha) * hard


def _fit(
    model: nn.Module,
    source,
    train_idx: np.ndarray,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    validate: Callable[[], Dict[str, float]],
    cfg: FitConfig,
    what: str,
) -> List[Dict[str, float]]:
    """AdamW + warm-up/cosine schedule over shifted mini-batches; returns one log row per epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(steps, 1)))
    history, t0 = [], time.monotonic()
    for epoch in range(cfg.epochs):
        model.train()
        order = epoch_order(train_idx, gen)
        total = 0.0
        chunks = Batches(order, cfg.batch_size)
        for idx, xb in source.batches(chunks):
            if not len(idx):
                continue
            loss = loss_fn(idx, random_shift(xb, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch + 1, "loss": total / max(len(order), 1), **validate(), "seconds": time.monotonic() - t0}
        history.append(row)
        LOG.info(
            "%s epoch %d/%d: %s",
            what,
            epoch + 1,
            cfg.epochs,
            ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds"))
            + f" ({row['seconds']:.0f}s)",
        )
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    model.eval()
    if len(x) == 0:
        return np.zeros((0, 0), np.float32)
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy over the labelled rows (``label >= 0``); NaN when there are none."""
    known = labels >= 0
    if len(logits) == 0 or not known.any():
        return float("nan")
    return float(np.mean(logits[known].argmax(1) == labels[known]))


# ---- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(trained: Trained, path: str) -> None:
    """safetensors: the weights plus a JSON header that rebuilds the model; written atomically."""
    from safetensors.torch import save

    header = {
        "format": CHECKPOINT_FORMAT,
        "arch": trained.arch,
        "arch_kwargs": trained.arch_kwargs,
        "role": trained.role,
        "mean": list(trained.mean),
        "std": list(trained.std),
        "labels": trained.labels,
        "report": trained.report,
        "input_shape": list(trained.input_shape),
        "preprocess": trained.policy,
    }
    tensors = {k: v.detach().contiguous() for k, v in trained.model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"ecos": json.dumps(header)}))


def load_checkpoint(path: str) -> Trained:
    """Rebuild a model saved by ``save_checkpoint``; any defect is a typed error naming ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    try:
        tensors = load(data)
        header = json.loads(_safetensors_metadata(data).get("ecos", "null"))
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not an ECOS checkpoint (no 'ecos' header of format {CHECKPOINT_FORMAT})")
    model = get_model(header["arch"], **header["arch_kwargs"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit {header['arch']} ({str(exc).splitlines()[0]})") from None
    trained = Trained(
        model.eval(),
        header["arch"],
        header["arch_kwargs"],
        tuple(header["mean"]),
        tuple(header["std"]),
        list(header["labels"]),
        header.get("role", "teacher"),
        header.get("report", {}),
        tuple(header.get("input_shape", INPUT_SHAPE)),
        dict(header.get("preprocess") or {}),
    )
    try:
        trained.spec()
    except InputError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return trained


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (the format: u64 header length, JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
