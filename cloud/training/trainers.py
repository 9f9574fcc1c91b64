"""The training stage of a round behind a small interface, so the daemon does not care how.

``Trainer.train(selection_csv, device_id, workdir)`` turns a proxy-set selection into one
deployable artifact (an ONNX file with its metadata) and a report. The daemon runs it in a
worker thread and persists its result; a trainer must therefore write its outputs atomically
and may be called again for the same round after a crash (it starts over).

``distill`` (the default) is the paper's model-compression task: a teacher trained once on the
whole labelled pool (cached on disk, shared by every round), a student distilled from it on the
selection, then static int8 quantisation calibrated on the selection and an acceptance gate
against fp32 (cloud/training/classifier.py, cloud/export/gate.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Type

from cloud.errors import QualityGateError
from cloud.log import LOG
from device_sdk.errors import UsageError
from device_sdk.imagefolder import ImageItem
from device_sdk.registry import Registry

ProgressFn = Callable[[int, int, str], None]  # (done, total, what is happening)
PRECISIONS = ("int8", "fp32")
GATE_POLICIES = ("fp32", "fail")


@dataclass(frozen=True)
class TrainResult:
    artifact_path: str
    report: Dict[str, Any]


@dataclass(frozen=True)
class TrainerContext:
    """What every trainer may use: the pool index it samples from and a folder for caches."""

    index_path: str
    cache_dir: str
    threads: int = 2


class Trainer(ABC):
    name: ClassVar[str]

    @abstractmethod
    def train(
        self,
        selection_csv: str,
        device_id: str,
        workdir: str,
        progress: Optional[ProgressFn] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> TrainResult:
        """Train on the images ``selection_csv`` lists; write the artifact under ``workdir``.

        ``labels``: the round's label names (a labelling round passes them; other rounds do not): the model's
        classes, in this order, whichever of them the selection's labels happen to use.
        """


TRAINERS: Registry[Type[Trainer]] = Registry("trainer")


def register_trainer(cls: Type[Trainer]) -> Type[Trainer]:
    return TRAINERS.register(cls)


def get_trainer(name: str, context: TrainerContext, options: Optional[Dict[str, Any]] = None) -> Trainer:
    """The trainer ``name`` built with ``options`` (from ``[trainer.options]`` of cloud.toml)."""
    cls = TRAINERS.get(name)
    try:
        inspect.signature(cls).bind(context, **(options or {}))
    except TypeError as exc:
        raise UsageError(f"[trainer.options] for {name!r}: {exc}") from None
    return cls(context, **(options or {}))


def _typed(cls: type, values: Dict[str, Any], what: str) -> Any:
    try:
        return cls(**values)
    except TypeError as exc:
        raise UsageError(
            f"[trainer.options.{what}]: {exc}; valid keys: {', '.join(cls.__dataclass_fields__)}"
        ) from None


# _import_order: onnxruntime.quantization appends onnxruntime/transformers to sys.path, whose
# "models" folder then shadows this project's ``models`` package if that is not imported yet.
# So cloud.training.classifier (which imports ``models``) is imported before cloud.export.gate/cloud.quantize.


@register_trainer
class DistillTrainer(Trainer):
    """Teacher (cached) -> student distilled on the selection -> gated int8 artifact.

    Options (``[trainer.options]``): ``teacher`` (TeacherConfig fields), ``student``
    (DistillConfig fields), ``quant`` (QuantConfig fields), ``gate`` (GateConfig fields),
    ``precision`` ("int8" or "fp32": which of the two exported files is shipped), ``format``
    ("onnx" or "tflite"), ``on_gate_failure``, and the models' input: ``input_size`` (pixels, square;
    default 32), ``channels`` (3 or 1) and ``resize`` ("center-crop" or "stretch"), which the
    teacher, the student and the shipped artifact share (docs/byod.md). The int8 file is shipped only if it passes the
    gate against its fp32 twin on the proxy set (cloud/export/gate.py). If it fails, the device gets
    the fp32 model instead (``on_gate_failure = "fp32"``, the default: a device is better served
    by a larger correct model than by none) or the round fails (``"fail"``); either way the
    report says why.
    """

    name = "distill"

    def __init__(
        self,
        context: TrainerContext,
        teacher: Optional[Dict[str, Any]] = None,
        student: Optional[Dict[str, Any]] = None,
        quant: Optional[Dict[str, Any]] = None,
        gate: Optional[Dict[str, Any]] = None,
        precision: str = "int8",
        format: str = "onnx",
        on_gate_failure: str = "fp32",
        input_size: int = 32,
        channels: int = 3,
        resize: str = "center-crop",
    ):
        from cloud.export.gate import RUNTIME_FORMATS, ExportConfig, GateConfig
        from cloud.export.quantize import QuantConfig
        from cloud.training.classifier import DistillConfig, TeacherConfig  # before .compress: see _import_order above

        if precision not in PRECISIONS or format not in RUNTIME_FORMATS or on_gate_failure not in GATE_POLICIES:
            raise UsageError(
                f"[trainer.options] precision must be one of {', '.join(PRECISIONS)}, format one of "
                f"{', '.join(RUNTIME_FORMATS)}, on_gate_failure one of {', '.join(GATE_POLICIES)}; "
                f"got {precision!r}, {format!r}, {on_gate_failure!r}"
            )
        self.context, self.precision, self.format, self.on_gate_failure = context, precision, format, on_gate_failure
        self.teacher_cfg = _typed(TeacherConfig, teacher or {}, "teacher")
        self.student_cfg = _typed(DistillConfig, student or {}, "student")
        self.export_cfg = ExportConfig(
            name="student",
            formats=(format,),
            quant=_typed(QuantConfig, quant or {}, "quant"),
            gate=_typed(GateConfig, gate or {}, "gate"),
        )
        from cloud.pool.dataset import default_preprocess

        if isinstance(input_size, bool) or not isinstance(input_size, int) or not 8 <= input_size <= 512:
            raise UsageError(
                f"[trainer.options] input_size must be a whole number of pixels, 8..512; got {input_size!r}"
            )
        if channels not in (1, 3) or resize not in ("center-crop", "stretch"):
            raise UsageError(
                "[trainer.options] channels must be 1 or 3 and resize center-crop or stretch; "
                f"got {channels!r}, {resize!r}"
            )
        self.input = (input_size, channels, resize)
        self.preprocess = default_preprocess((input_size, input_size), channels, resize=resize)
        self._teacher = None
        self._lock = threading.Lock()

    def teacher(self):
        """The teacher for this pool and config: from the cache, else trained and cached."""
        from cloud.pool.index import PoolIndex
        from cloud.training.classifier import load_checkpoint, save_checkpoint, train_teacher

        with self._lock:
            if self._teacher is not None:
                return self._teacher
            index = PoolIndex.load(self.context.index_path)
            keyed = [asdict(self.teacher_cfg), index.probe_id]
            if self.input != (32, 3, "center-crop"):  # the key of a 32x32 RGB teacher stays what it was
                keyed.append(list(self.input))
            key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
            path = os.path.join(self.context.cache_dir, f"teacher-{key[:16]}.safetensors")
            if os.path.exists(path):
                self._teacher = load_checkpoint(path)
                return self._teacher
            LOG.info("training the teacher on the %d-image pool (cached in %s)", len(index.paths), path)
            self._teacher = train_teacher(_pool_images(index, self.preprocess), self.teacher_cfg)
            save_checkpoint(self._teacher, path)
            return self._teacher

    def train(
        self,
        selection_csv: str,
        device_id: str,
        workdir: str,
        progress: Optional[ProgressFn] = None,
        labels: Optional[Sequence[str]] = None,  # not used: the student's classes are the teacher's
    ) -> TrainResult:
        from cloud.export.gate import export_classifier
        from cloud.training.classifier import distill, load_selection, student_kwargs
        from models import get_model

        steps = _Steps(progress, 3)
        steps.step("teacher")
        teacher = self.teacher()
        steps.step("distil")
        data = load_selection(selection_csv, teacher.labels, preprocess=teacher.spec())
        cfg = self.student_cfg
        trained = distill(get_model(cfg.arch, **student_kwargs(teacher, cfg)), teacher, data, cfg)
        steps.step("export, int8 and gate")
        try:
            report = export_classifier(trained, workdir, data.images, data.images, data.labels, self.export_cfg)
            path, precision, gate = (
                report["files"][f"{self.format}_{self.precision}"]["path"],
                self.precision,
                report["gate"],
            )
        except QualityGateError as err:
            if self.on_gate_failure == "fail":
                raise
            LOG.warning('%s; shipping the fp32 model instead (on_gate_failure = "fp32")', err)
            path, precision, gate = self._export_fp32(trained, workdir), "fp32", {"failed": str(err)}
        return TrainResult(
            path,
            {
                "student": {k: v for k, v in trained.report.items() if k != "history"},
                "teacher_val_acc": teacher.report.get("val_acc"),
                "gate": gate,
                "precision": precision,
                "format": self.format,
                "bytes": os.path.getsize(path),
                "proxy_images": len(data.images),
            },
        )

    def _export_fp32(self, trained, workdir: str) -> str:
        from cloud.export.formats import export_onnx, export_tflite

        path = os.path.join(workdir, f"student.fp32.{self.format}")
        if self.format == "onnx":
            export_onnx(trained.model, trained.meta(), path, output_name="logits")
        else:
            export_tflite(trained.model, trained.meta(), path)
        return path


def _pool_images(index, preprocess=None):
    """The labelled pool as an ImageSet at the trainer's input (decoded once per teacher)."""
    from cloud.pool.dataset import load_image_set

    items = [ImageItem(str(p), str(label), str(d)) for p, label, d in zip(index.paths, index.labels, index.domains)]
    return load_image_set(items, preprocess=preprocess)


class _Steps:
    """Reports coarse progress of a multi-step job through ``progress(done, total, note)``."""

    def __init__(self, progress: Optional[ProgressFn], total: int):
        self.progress, self.total, self.done = progress, total, 0

    def step(self, note: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, note)
        self.done += 1


# Trainers defined in other modules register themselves when imported (torch stays lazy there too).
from cloud.training import semisup as _semisup  # noqa: E402,F401  ("semisup": FixMatch, the labelling tasks)
