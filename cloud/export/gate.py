"""From a trained classifier to the artifacts the device gets: fp32 and int8, ONNX and TFLite.

Every int8 artifact must pass an acceptance gate against its own runtime's fp32 artifact on
an evaluation set: top-1 agreement >= 0.98 and accuracy drop <= 1 point. The numbers are
measured through the device SDK's runtimes (the code the device runs), not through torch.
Artifacts are built in a staging folder next to the output folder and moved in only when
every gate passes, so a failed gate leaves nothing behind that could be shipped by mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Tuple

import numpy as np

from cloud.errors import QualityGateError
from cloud.export.formats import export_onnx, export_tflite
from cloud.export.quantize import QuantConfig, calibration_batch, quantize_onnx, quantize_tflite
from cloud.log import LOG
from cloud.training.classifier import Trained, accuracy, predict_logits
from device_sdk.errors import UsageError
from device_sdk.fsutil import atomic_write_text
from device_sdk.runtime import load_model

RUNTIME_FORMATS = {"onnx": ("onnxruntime", ".onnx"), "tflite": ("litert", ".tflite")}


@dataclass(frozen=True)
class GateConfig:
    """The acceptance gate of an int8 model against its fp32 twin on the evaluation set."""

    min_agreement: float = 0.98
    max_accuracy_drop: float = 0.01  # absolute: 0.01 = one percentage point


@dataclass(frozen=True)
class ExportConfig:
    name: str = "student"
    formats: Tuple[str, ...] = ("onnx", "tflite")
    quant: QuantConfig = field(default_factory=QuantConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in RUNTIME_FORMATS]
        if bad or not self.formats:
            raise UsageError(
                f"formats must be a non-empty subset of {', '.join(RUNTIME_FORMATS)} (got {', '.join(self.formats)})"
            )


@dataclass(frozen=True)
class GateResult:
    format: str
    images: int
    agreement: float
    fp32_accuracy: float
    int8_accuracy: float
    failures: Tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def gate(fmt: str, fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray, cfg: GateConfig) -> GateResult:
    """Compare int8 with fp32 predictions; ``failures`` names each number that missed its bound."""
    agreement = float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1)))
    fp32_acc, int8_acc = accuracy(fp32_logits, labels), accuracy(int8_logits, labels)
    failures = []
    if agreement < cfg.min_agreement:
        failures.append(f"{fmt} int8/fp32 top-1 agreement {agreement:.4f} < {cfg.min_agreement}")
    if fp32_acc - int8_acc > cfg.max_accuracy_drop:  # NaN (no labels) compares False: agreement alone decides
        failures.append(
            f"{fmt} int8 accuracy {int8_acc:.4f} is {100 * (fp32_acc - int8_acc):.2f} points below fp32 "
            f"{fp32_acc:.4f} (max {100 * cfg.max_accuracy_drop:g})"
        )
    return GateResult(fmt, len(labels), agreement, fp32_acc, int8_acc, tuple(failures))


def runtime_logits(path: str, runtime: str, images: np.ndarray, threads: int = 1, batch: int = 256) -> np.ndarray:
    """Logits of an artifact through the device SDK's runtime, for uint8 NHWC ``images``."""
    model = load_model(path, runtime=runtime, threads=threads)
    return np.concatenate([model.run(images[i : i + batch]) for i in range(0, len(images), batch)])


def export_classifier(
    trained: Trained,
    out_dir: str,
    calib_images: np.ndarray,
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    cfg: ExportConfig = ExportConfig(),
) -> Dict[str, Any]:
    """Write ``<name>{,.int8}.{onnx,tflite}`` and ``<name>.report.json`` into ``out_dir``, gate passed.

    ``calib_images`` (uint8 NHWC, the proxy set) calibrates int8; ``eval_images``/``eval_labels``
    (labels ``-1`` where unknown) judge it. Raises ``QualityGateError`` naming every failed number.
    """
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{cfg.name}.", dir=out_dir)
    try:
        report = _build(trained, staging, calib_images, eval_images, eval_labels, cfg)
        failures = [f for g in report["gate"].values() for f in g["failures"]]
        if failures:
            raise QualityGateError("int8 model not shipped: " + "; ".join(failures))
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["files"] = {
        k: {**v, "path": os.path.join(out_dir, os.path.basename(v["path"]))} for k, v in report["files"].items()
    }
    atomic_write_text(
        os.path.join(out_dir, f"{cfg.name}.report.json"), json.dumps(report, indent=2, sort_keys=True) + "\n"
    )
    return report


def _build(
    trained: Trained,
    folder: str,
    calib_images: np.ndarray,
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    cfg: ExportConfig,
) -> Dict[str, Any]:
    meta = trained.meta()
    calib = calibration_batch(calib_images, meta, cfg.quant)
    torch_logits = predict_logits(trained.model, trained.inputs(eval_images))
    files: Dict[str, Dict[str, Any]] = {}
    gates: Dict[str, Dict[str, Any]] = {}
    parity: Dict[str, float] = {}
    for fmt in cfg.formats:
        runtime, ext = RUNTIME_FORMATS[fmt]
        fp32, int8 = (os.path.join(folder, f"{cfg.name}{tag}{ext}") for tag in ("", ".int8"))
        LOG.info("exporting %s: fp32 and int8 (calibrated on %d proxy images)", fmt, len(calib))
        if fmt == "onnx":
            files[f"{fmt}_fp32"] = _describe(fp32, export_onnx(trained.model, meta, fp32, output_name="logits"))
            files[f"{fmt}_int8"] = _describe(int8, quantize_onnx(fp32, int8, calib, cfg.quant))
        else:
            files[f"{fmt}_fp32"] = _describe(fp32, export_tflite(trained.model, meta, fp32))
            files[f"{fmt}_int8"] = _describe(int8, quantize_tflite(trained.model, meta, int8, calib, cfg.quant))
        fp32_logits = runtime_logits(fp32, runtime, eval_images)
        parity[fmt] = float(np.max(np.abs(fp32_logits - torch_logits))) if len(torch_logits) else 0.0
        result = gate(fmt, fp32_logits, runtime_logits(int8, runtime, eval_images), eval_labels, cfg.gate)
        gates[fmt] = {**asdict(result), "passed": result.passed}
        LOG.info(
            "%s gate: agreement %.4f, accuracy fp32 %.4f -> int8 %.4f: %s",
            fmt,
            result.agreement,
            result.fp32_accuracy,
            result.int8_accuracy,
            "pass" if result.passed else "FAIL",
        )
    return {
        "name": cfg.name,
        "arch": trained.arch,
        "labels": trained.labels,
        "eval_images": int(len(eval_images)),
        "torch_accuracy": accuracy(torch_logits, eval_labels),
        "fp32_max_abs_diff_vs_torch": parity,
        "gate": gates,
        "gate_config": asdict(cfg.gate),
        "quant_config": asdict(cfg.quant),
        "files": files,
        "training": trained.report,
    }


def _describe(path: str, digest: str) -> Dict[str, Any]:
    return {"path": path, "sha256": digest, "bytes": os.path.getsize(path)}


def size_ratio(report: Dict[str, Any], fmt: str) -> float:
    """int8 size / fp32 size of one format in an export report."""
    return report["files"][f"{fmt}_int8"]["bytes"] / report["files"][f"{fmt}_fp32"]["bytes"]
