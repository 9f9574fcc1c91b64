"""Semi-supervised training for the labelling tasks: FixMatch on a labelled proxy set plus the unlabelled pool.

FixMatch (Sohn et al. 2020): each step takes a batch of labelled images (weakly augmented,
cross-entropy on their labels) and ``mu`` times as many unlabelled ones, each seen twice: a weak
view whose prediction, where its confidence reaches ``threshold``, becomes a pseudo-label, and a
strong view trained towards that pseudo-label (weight ``lambda_u``). Here:

- weak view: a random shift of up to 2 pixels (digits keep their class; no flips);
- strong view: a shift of up to 4 pixels, random brightness and contrast, the colour channels in a
  random order, a 12x12 cutout and Gaussian pixel noise (RandAugment's spirit, batched on tensors);
- one forward pass over labelled + weak + strong (BatchNorm sees one batch, as in the paper);
- AdamW with a warm-up/cosine schedule over ``steps`` (default: enough for ``epochs`` passes over
  the labelled set, at least ``min_steps``).

The labelled proxy set comes from human labellers (selective manual labelling) or from the
device's private vote (automated client labelling, cloud/labelling/client.py). The trained model is
the small student: ``SemiSupTrainer`` (registered as trainer ``semisup``) then quantises, gates and
exports it like the distillation trainer. torch is imported inside the functions, so that
registering the trainer stays light for the daemon and the CLI.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from cloud.errors import QualityGateError
from cloud.log import LOG
from cloud.training.trainers import ProgressFn, Trainer, TrainerContext, TrainResult, _Steps, _typed, register_trainer
from device_sdk.errors import InputError, UsageError
from device_sdk.imagefolder import ImageItem


@dataclass(frozen=True)
class SemiSupConfig:
    arch: str = "small_cnn"
    width: int = 16
    epochs: int = 30  # passes over the labelled set (sets the number of steps)
    min_steps: int = 200
    batch_size: int = 64
    mu: int = 3  # unlabelled images per labelled one in a step
    threshold: float = 0.95  # confidence a weak view needs for its pseudo-label to count
    lambda_u: float = 1.0
    lr: float = 3e-3
    weight_decay: float = 5e-4
    max_unlabelled: int = 6000  # pool images drawn as the unlabelled set (0 = supervised only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.mu < 0 or self.min_steps < 0 or not self.lr > 0:
            raise UsageError("epochs and batch_size must be >= 1, mu and min_steps >= 0, lr > 0")
        if not 0.0 < self.threshold <= 1.0 or self.lambda_u < 0 or self.max_unlabelled < 0:
            raise UsageError(
                f"threshold must be in (0, 1], lambda_u >= 0, max_unlabelled >= 0 (got {self.threshold}, "
                f"{self.lambda_u}, {self.max_unlabelled})"
            )

    def steps(self, labelled: int) -> int:
        return max(self.min_steps, self.epochs * math.ceil(labelled / self.batch_size))


def weak_view(x, gen):
    from cloud.training.encoder import random_shift

    return random_shift(x, gen, pad=2)


def strong_view(x, gen, cutout: int = 12, noise: float = 0.1):
    """Shift (4 px), brightness/contrast, channel order, cutout and noise; per image where it is cheap."""
    import torch

    from cloud.training.encoder import permute_channels, random_shift

    n, _, h, w = x.shape
    x = random_shift(x, gen, pad=4)
    u = torch.rand(n, 4, generator=gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.5 + u[:, 0]).view(n, 1, 1, 1)
    brightness = (u[:, 1] - 0.5).view(n, 1, 1, 1)
    x = (x - mean) * contrast + mean + brightness
    x = permute_channels(x, gen)
    cy = (u[:, 2] * h).long().view(n, 1, 1)
    cx = (u[:, 3] * w).long().view(n, 1, 1)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = ((ys - cy).abs() <= cutout // 2) & ((xs - cx).abs() <= cutout // 2)
    x = x.masked_fill(box.unsqueeze(1), 0.0)
    return x + noise * torch.randn(x.shape, generator=gen)


def fixmatch_loop(
    model,
    xl,
    yl,
    xu,
    weak: Callable,
    strong: Callable,
    cfg: SemiSupConfig,
    gen,
    evaluate: Optional[Callable[[], Dict[str, float]]] = None,
    what: str = "fixmatch",
) -> List[Dict[str, float]]:
    """The FixMatch optimisation itself, on tensors: ``xl``/``yl`` labelled, ``xu`` unlabelled (or None).

    ``weak(x, gen)`` and ``strong(x, gen)`` make the two views (images here; the benchmark passes
    feature-space views). Returns one log row every ~10 s and at the end.
    """
    import torch
    from torch.nn import functional as F

    from cloud.training.encoder import warmup_cosine

    steps = cfg.steps(len(xl))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    nl = min(cfg.batch_size, len(xl))
    nu = cfg.mu * nl if xu is not None and len(xu) and cfg.lambda_u > 0 else 0
    history: List[Dict[str, float]] = []
    t0, last_log = time.monotonic(), time.monotonic()
    order_l, pos = torch.randperm(len(xl), generator=gen), 0
    sums = {"loss": 0.0, "loss_u": 0.0, "mask": 0.0}
    n = 0
    model.train()
    for step in range(steps):
        if pos + nl > len(xl):
            order_l, pos = torch.randperm(len(xl), generator=gen), 0
        idx = order_l[pos : pos + nl]
        pos += nl
        xb = weak(xl[idx], gen)
        if nu:
            ub = xu[torch.randint(0, len(xu), (nu,), generator=gen)]
            logits = model(torch.cat([xb, weak(ub, gen), strong(ub, gen)]))
            logit_l, logit_w, logit_s = logits[:nl], logits[nl : nl + nu], logits[nl + nu :]
            with torch.no_grad():
                conf, pseudo = torch.softmax(logit_w.detach(), dim=1).max(dim=1)
                mask = (conf >= cfg.threshold).float()
            loss_u = (F.cross_entropy(logit_s, pseudo, reduction="none") * mask).mean()
        else:
            logit_l = model(xb)
            loss_u, mask = logit_l.sum() * 0.0, torch.zeros(1)
        loss = F.cross_entropy(logit_l, yl[idx]) + cfg.lambda_u * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums["loss"] += float(loss.detach())
        sums["loss_u"] += float(loss_u.detach())
        sums["mask"] += float(mask.mean())
        n += 1
        if time.monotonic() - last_log > 10 or step == steps - 1:
            row = {"step": step + 1, **{k: v / n for k, v in sums.items()}, "seconds": time.monotonic() - t0}
            if evaluate is not None:
                row.update(evaluate())
                model.train()
            history.append(row)
            LOG.info(
                "%s step %d/%d: %s",
                what,
                step + 1,
                steps,
                ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("step", "seconds"))
                + f" ({row['seconds']:.0f}s)",
            )
            sums, n, last_log = dict.fromkeys(sums, 0.0), 0, time.monotonic()
    model.eval()
    return history


def train_fixmatch(
    images: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    unlabelled: np.ndarray,
    cfg: SemiSupConfig = SemiSupConfig(),
    eval_images: Optional[np.ndarray] = None,
    eval_labels: Optional[np.ndarray] = None,
):
    """Train ``cfg.arch`` from scratch on images; ``labels`` are codes, -1 = unlabelled (uint8 NHWC).

    Images of ``images`` without a label join the unlabelled set. Returns a
    ``cloud.training.classifier.Trained`` (role ``student``) whose report holds the logged loss,
    the share of unlabelled images above the threshold (``mask``) and, with ``eval_*``, accuracy.
    """
    import torch

    from cloud.training.classifier import Trained, predict_logits
    from cloud.training.encoder import channel_stats
    from models import get_model

    labels = np.asarray(labels, dtype=np.int64)
    known = labels >= 0
    if len(label_names) < 2 or known.sum() < 2:
        raise InputError(
            f"semi-supervised training needs at least 2 labelled images and 2 label names "
            f"(got {int(known.sum())} and {len(label_names)})"
        )
    pool_u = np.concatenate([images[~known], unlabelled]) if len(unlabelled) else images[~known]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = channel_stats(np.concatenate([images, pool_u[:5000]]) if len(pool_u) else images)
    kwargs = {"num_classes": len(label_names), "width": cfg.width}
    trained = Trained(get_model(cfg.arch, **kwargs), cfg.arch, kwargs, mean, std, list(label_names), role="student")
    xl, yl = trained.inputs(images[known]), torch.from_numpy(labels[known])
    xu = trained.inputs(pool_u) if len(pool_u) and cfg.mu > 0 and cfg.lambda_u > 0 else None
    evaluate = None
    if eval_images is not None and eval_labels is not None:
        x_eval = trained.inputs(eval_images)

        def evaluate() -> Dict[str, float]:
            return {"eval_acc": float(np.mean(predict_logits(trained.model, x_eval).argmax(1) == eval_labels))}

    history = fixmatch_loop(trained.model, xl, yl, xu, weak_view, strong_view, cfg, gen, evaluate)
    trained.report = {
        "config": asdict(cfg),
        "labelled": int(known.sum()),
        "unlabelled": int(len(pool_u)),
        "steps": cfg.steps(len(xl)),
        "history": history,
        **{k: v for k, v in history[-1].items() if k != "step"},
    }
    return trained


@register_trainer
class SemiSupTrainer(Trainer):
    """FixMatch on the selection's labelled rows plus unlabelled pool images -> gated int8 artifact.

    The selection CSV's ``label`` column holds the labels bought (``ecos-cloud import-labels``) or
    voted (``ecos-cloud apply-votes``); empty labels are unlabelled. Options (``[trainer.options]``):
    ``semisup`` (SemiSupConfig fields), ``labels`` (the label names; default: those in the CSV; a labelling
    round's own labels, passed to ``train``, take their place),
    ``quant``/``gate`` (as the distillation trainer), ``format`` and ``on_gate_failure``.
    """

    name = "semisup"

    def __init__(
        self,
        context: TrainerContext,
        semisup: Optional[Dict[str, Any]] = None,
        labels: Optional[List[str]] = None,
        quant: Optional[Dict[str, Any]] = None,
        gate: Optional[Dict[str, Any]] = None,
        format: str = "onnx",
        on_gate_failure: str = "fp32",
    ):
        from cloud.export.gate import RUNTIME_FORMATS, ExportConfig, GateConfig
        from cloud.export.quantize import QuantConfig
        from cloud.training.classifier import TeacherConfig  # noqa: F401  (import order: see trainers._import_order)

        if format not in RUNTIME_FORMATS or on_gate_failure not in ("fp32", "fail"):
            raise UsageError(
                f"[trainer.options] format must be one of {', '.join(RUNTIME_FORMATS)} and on_gate_failure "
                f"fp32 or fail; got {format!r}, {on_gate_failure!r}"
            )
        self.context, self.format, self.on_gate_failure = context, format, on_gate_failure
        self.cfg = _typed(SemiSupConfig, semisup or {}, "semisup")
        self.labels = list(labels) if labels else None
        self.export_cfg = ExportConfig(
            name="student",
            formats=(format,),
            quant=_typed(QuantConfig, quant or {}, "quant"),
            gate=_typed(GateConfig, gate or {}, "gate"),
        )

    def train(
        self,
        selection_csv: str,
        device_id: str,
        workdir: str,
        progress: Optional[ProgressFn] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> TrainResult:
        from cloud.export.gate import export_classifier

        names = list(labels) if labels else self.labels  # a labelling round's own labels come first
        if labels and self.labels and list(labels) != self.labels:
            LOG.warning("the round's labels replace [trainer.options] labels for this training (they differ)")
        steps = _Steps(progress, 3)
        steps.step("load")
        data, unlabelled = load_semisup_data(selection_csv, self.context.index_path, names, self.cfg)
        steps.step("fixmatch")
        trained = train_fixmatch(data.images, data.labels, data.label_names, unlabelled, self.cfg)
        steps.step("export, int8 and gate")
        known = data.labels >= 0
        try:
            report = export_classifier(
                trained, workdir, data.images, data.images[known], data.labels[known], self.export_cfg
            )
            path, precision, gate = report["files"][f"{self.format}_int8"]["path"], "int8", report["gate"]
        except QualityGateError as err:
            if self.on_gate_failure == "fail":
                raise
            from cloud.export.formats import export_onnx, export_tflite

            LOG.warning('%s; shipping the fp32 model instead (on_gate_failure = "fp32")', err)
            path = os.path.join(workdir, f"student.fp32.{self.format}")
            (
                export_onnx(trained.model, trained.meta(), path, output_name="logits")
                if self.format == "onnx"
                else export_tflite(trained.model, trained.meta(), path)
            )
            precision, gate = "fp32", {"failed": str(err)}
        return TrainResult(
            path,
            {
                "semisup": {k: v for k, v in trained.report.items() if k != "history"},
                "gate": gate,
                "precision": precision,
                "format": self.format,
                "bytes": os.path.getsize(path),
                "proxy_images": len(data.images),
            },
        )


def load_semisup_data(
    selection_csv: str, index_path: Optional[str], labels: Optional[Sequence[str]], cfg: SemiSupConfig
):
    """The selection (labels coded, '' = -1) and up to ``cfg.max_unlabelled`` other pool images of the index."""
    from cloud.pool.dataset import load_image_set
    from cloud.training.classifier import _read_selection_rows

    items = _read_selection_rows(selection_csv)
    missing = [it.path for it in items if not os.path.isfile(it.path)]
    if missing:
        raise InputError(
            f"{selection_csv}: {len(missing)} of {len(items)} selected images do not exist; first: {missing[0]}"
        )
    names = list(labels) if labels else sorted({it.label for it in items if it.label})
    unknown = sorted({it.label for it in items if it.label and it.label not in names})
    if unknown:
        raise InputError(f"{selection_csv}: labels not among the label names: {', '.join(unknown[:10])}")
    data = load_image_set(items, label_names=names)
    unlabelled = np.zeros((0, *data.images.shape[1:]), np.uint8)
    if index_path and cfg.max_unlabelled:
        from cloud.pool.index import PoolIndex

        index = PoolIndex.load(index_path)
        chosen = {it.path for it in items}
        rest = [str(p) for p in index.paths if str(p) not in chosen]
        rng = np.random.default_rng(cfg.seed)
        take = rng.choice(len(rest), size=min(cfg.max_unlabelled, len(rest)), replace=False) if rest else []
        unlabelled = load_image_set([ImageItem(rest[i], "", "") for i in take]).images
    LOG.info(
        "semi-supervised data: %d labelled, %d unlabelled in the selection, %d unlabelled pool images",
        int((data.labels >= 0).sum()),
        int((data.labels < 0).sum()),
        len(unlabelled),
    )
    return data, unlabelled
