"""File sizes of the student in every format, by width: where int8 reaches a third of fp32.

Sizes do not depend on training, so the students are built with random weights (their batch-norm
statistics moved off the defaults by a few forward passes, as training would) and exported to
ONNX fp32, ONNX int8 (QDQ and QOperator) and TFLite fp32 and int8.

    python benchmarks/bench_model_sizes.py          # about a minute on 2 cores

Writes benchmarks/results/model_sizes.json and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.export.formats import export_onnx, export_tflite  # noqa: E402
from cloud.export.quantize import QuantConfig, calibration_batch, quantize_onnx, quantize_tflite  # noqa: E402
from cloud.training.classifier import Trained  # noqa: E402
from device_sdk.fsutil import atomic_write_text  # noqa: E402
from models import get_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENTS = (("small_cnn", 8), ("small_cnn", 16), ("small_cnn", 32))


def student(arch: str, width: int) -> Trained:
    import torch

    model = get_model(arch, num_classes=10, width=width).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return Trained(
        model.eval(), arch, {"num_classes": 10, "width": width}, (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)]
    )


def sizes(trained: Trained, images: np.ndarray) -> Dict[str, int]:
    meta = trained.meta()
    out = {"params": sum(p.numel() for p in trained.model.parameters())}
    with tempfile.TemporaryDirectory() as tmp:

        def path(name: str) -> str:
            return os.path.join(tmp, name)

        export_onnx(trained.model, meta, path("f.onnx"), output_name="logits")
        out["onnx_fp32"] = os.path.getsize(path("f.onnx"))
        for fmt in ("QDQ", "QOperator"):
            cfg = QuantConfig(quant_format=fmt)
            quantize_onnx(path("f.onnx"), path(f"{fmt}.onnx"), calibration_batch(images, meta, cfg), cfg)
            out[f"onnx_int8_{fmt}"] = os.path.getsize(path(f"{fmt}.onnx"))
        export_tflite(trained.model, meta, path("f.tflite"))
        quantize_tflite(trained.model, meta, path("q.tflite"), calibration_batch(images, meta, QuantConfig()))
        out["tflite_fp32"], out["tflite_int8"] = os.path.getsize(path("f.tflite")), os.path.getsize(path("q.tflite"))
    return out


def main() -> int:
    import torch

    torch.set_num_threads(2)
    images = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    rows = {f"{arch} w{width}": sizes(student(arch, width), images) for arch, width in STUDENTS}
    path = os.path.join(ROOT, "benchmarks", "results", "model_sizes.json")
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
    print("| student | params | ONNX fp32 | ONNX int8 QDQ | ONNX int8 QOperator | TFLite fp32 | TFLite int8 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        onnx = [f"{r[k]} ({r[k] / r['onnx_fp32']:.2f})" for k in ("onnx_int8_QDQ", "onnx_int8_QOperator")]
        print(
            f"| {name} | {r['params']} | {r['onnx_fp32']} | {' | '.join(onnx)} | {r['tflite_fp32']} | "
            f"{r['tflite_int8']} ({r['tflite_int8'] / r['tflite_fp32']:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
