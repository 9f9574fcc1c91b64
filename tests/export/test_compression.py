"""The model the device gets back: teacher -> distilled student -> fp32/int8 ONNX and TFLite.

One real run through the CLIs (train-teacher, distill with export, predict) on the small
generated benchmark, then checks on what it wrote: parity of every fp32 runtime with torch,
the int8 gate for both runtimes, sizes, the device predictor, and refusals that write nothing.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from cloud import cli as cloud_cli
from cloud.errors import QualityGateError
from cloud.export.gate import ExportConfig, GateConfig, export_classifier, gate, runtime_logits
from cloud.pool.dataset import load_image_set
from cloud.sampling.selection import CSV_COLUMNS
from cloud.training.classifier import load_checkpoint, predict_logits
from device_sdk import cli as device_cli
from device_sdk.imagefolder import scan_image_folder
from device_sdk.predict import Predictor, evaluate

pytestmark = pytest.mark.slow

EPOCHS = 25
ARTIFACTS = ("student.onnx", "student.int8.onnx", "student.tflite", "student.int8.tflite")


@pytest.fixture(scope="module")
def shipped(digits_root, tmp_path_factory):
    """Teacher on the pool, student distilled on a selection CSV of the pool, all formats exported."""
    work = tmp_path_factory.mktemp("compression")
    selection = work / "sel.csv"
    with open(selection, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(
            [it.path, it.label, it.domain, 0, rank]
            for rank, it in enumerate(scan_image_folder(str(digits_root / "pool")))
        )
    teacher = work / "teacher.safetensors"
    fit = ["--width", "8", "--epochs", str(EPOCHS), "--batch-size", "32", "--lr", "0.01", "--threads", "2", "-q"]
    assert (
        cloud_cli.main(["train-teacher", str(digits_root / "pool"), "--out", str(teacher), "--arch", "small_cnn", *fit])
        == 0
    )
    out = work / "student"
    assert (
        cloud_cli.main(
            [
                "distill",
                "--selection",
                str(selection),
                "--teacher",
                str(teacher),
                "--out-dir",
                str(out),
                *fit,
                "--eval",
                str(digits_root / "devices"),
            ]
        )
        == 0
    )
    return work, out


@pytest.fixture(scope="module")
def evaluation(digits_root, shipped):
    _, out = shipped
    labels = load_checkpoint(str(out / "student.safetensors")).labels
    return load_image_set(scan_image_folder(str(digits_root / "devices")), label_names=labels)


def test_distill_writes_every_artifact_and_a_passing_report(shipped):
    _, out = shipped
    for name in ARTIFACTS:
        assert (out / name).is_file() and (out / f"{name}.json").is_file()
    report = json.loads((out / "student.report.json").read_text())
    for fmt in ("onnx", "tflite"):
        g = report["gate"][fmt]
        assert g["passed"] and g["agreement"] >= 0.98 and g["fp32_accuracy"] - g["int8_accuracy"] <= 0.01
        assert g["images"] == 320
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no staging left behind
    history = report["training"]["history"]
    assert len(history) == EPOCHS and all("val_acc" in row and "val_teacher_agreement" in row for row in history)


def test_student_learned_from_the_teacher(shipped, evaluation):
    """A real student: far above chance (0.1) on device images, and mostly agreeing with its teacher.

    Measured here: teacher 0.88, student 0.83, agreement 0.83 on the 320 device images."""
    work, out = shipped
    teacher, student = (
        load_checkpoint(str(work / "teacher.safetensors")),
        load_checkpoint(str(out / "student.safetensors")),
    )
    t_pred = predict_logits(teacher.model, teacher.inputs(evaluation.images)).argmax(1)
    s_pred = predict_logits(student.model, student.inputs(evaluation.images)).argmax(1)
    assert np.mean(s_pred == evaluation.labels) > 0.7
    assert np.mean(s_pred == t_pred) > 0.7  # chance agreement of two 10-class models is ~0.1
    assert student.role == "student" and teacher.role == "teacher"


@pytest.mark.parametrize("fmt,runtime", [("onnx", "onnxruntime"), ("tflite", "litert")])
def test_fp32_runtimes_match_torch(shipped, evaluation, fmt, runtime):
    _, out = shipped
    student = load_checkpoint(str(out / "student.safetensors"))
    images = evaluation.images[:40]
    expected = predict_logits(student.model, student.inputs(images))
    got = runtime_logits(str(out / f"student.{fmt}"), runtime, images)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_and_tflite_fp32_agree(shipped, evaluation):
    _, out = shipped
    images = evaluation.images[:40]
    np.testing.assert_allclose(
        runtime_logits(str(out / "student.onnx"), "onnxruntime", images),
        runtime_logits(str(out / "student.tflite"), "litert", images),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("fmt,runtime", [("onnx", "onnxruntime"), ("tflite", "litert")])
def test_int8_gate_measured_again_on_the_device_runtime(shipped, evaluation, fmt, runtime):
    """Recompute the gate from the files (not the report): agreement and accuracy drop hold."""
    _, out = shipped
    fp32 = runtime_logits(str(out / f"student.{fmt}"), runtime, evaluation.images)
    int8 = runtime_logits(str(out / f"student.int8.{fmt}"), runtime, evaluation.images)
    result = gate(fmt, fp32, int8, evaluation.labels, GateConfig())
    assert result.passed, result.failures
    assert os.path.getsize(out / f"student.int8.{fmt}") < 0.6 * os.path.getsize(out / f"student.{fmt}")


def test_gate_reports_which_number_failed():
    fp32 = np.eye(10)[np.arange(100) % 10]
    int8 = fp32.copy()
    int8[:3] = np.roll(int8[:3], 1, axis=1)  # 3 of 100 predictions flip, all of them correct before
    result = gate("onnx", fp32, int8, np.arange(100) % 10, GateConfig())
    assert not result.passed and result.agreement == pytest.approx(0.97)
    assert any("agreement 0.9700 < 0.98" in f for f in result.failures)
    assert any("3.00 points below" in f for f in result.failures)
    assert gate("onnx", fp32, fp32, -np.ones(100, dtype=np.int64), GateConfig()).passed  # unlabelled: agreement alone


def test_failed_gate_ships_nothing(shipped, evaluation, tmp_path):
    _, out = shipped
    student = load_checkpoint(str(out / "student.safetensors"))
    impossible = ExportConfig(formats=("onnx",), gate=GateConfig(max_accuracy_drop=-1.0))  # int8 would need +100 points
    with pytest.raises(QualityGateError, match="onnx int8 accuracy"):
        export_classifier(
            student, str(tmp_path / "dist"), evaluation.images, evaluation.images, evaluation.labels, impossible
        )
    assert os.listdir(tmp_path / "dist") == []


def test_export_cli_exits_with_the_gate_code(shipped, tmp_path, capsys):
    work, out = shipped
    code = cloud_cli.main(
        [
            "export",
            str(out / "student.safetensors"),
            "--selection",
            str(work / "sel.csv"),
            "--out-dir",
            str(tmp_path / "x"),
            "--formats",
            "onnx",
            "--min-agreement",
            "1.01",
            "-q",
        ]
    )
    assert code == QualityGateError.exit_code
    assert "error[quality_gate]:" in capsys.readouterr().err
    assert os.listdir(tmp_path / "x") == []


@pytest.mark.parametrize("name", ARTIFACTS)
def test_device_predictor_runs_every_artifact(shipped, evaluation, digits_root, name):
    _, out = shipped
    predictor = Predictor.open(str(out / name))
    items = scan_image_folder(str(digits_root / "devices"))[:24]
    predictions = predictor.predict_items(items)
    assert len(predictions) == 24 and all(p.label in predictor.labels and 0 < p.probability <= 1 for p in predictions)
    assert evaluate(predictions, predictor.labels).labelled == 24
    single = predictor.probabilities(evaluation.images[:1])
    assert single.shape == (1, 10) and abs(float(single.sum()) - 1.0) < 1e-5


def test_predict_cli_prints_accuracy_on_a_labelled_folder(shipped, digits_root, capsys):
    _, out = shipped
    folder = digits_root / "devices" / "lcd" / "test"
    assert device_cli.main(["predict", str(out / "student.int8.tflite"), "--folder", str(folder), "-q"]) == 0
    predictor = Predictor.open(str(out / "student.int8.tflite"))
    result = evaluate(predictor.predict_items(scan_image_folder(str(folder))), predictor.labels)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"accuracy {result.accuracy:.4f} ({result.correct}/40 labelled images; small_cnn int8 on litert)"
    ]
