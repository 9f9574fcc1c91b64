"""``ecos-cloud`` train-teacher, distill, export: the teacher, the distilled student, int8 (docs/models.md)."""

from __future__ import annotations

import argparse
import os

from cloud.cli.common import (
    _add_input_options,
    _log_streamed_unreadable,
    _pool_data,
    _threads,
    positive_float,
    positive_int,
    seed,
)
from cloud.log import LOG
from device_sdk.clikit import add_common


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from cloud.training.classifier import TeacherConfig, save_checkpoint, train_teacher

    _threads(args)
    cfg = TeacherConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    data = _pool_data(args)
    LOG.info("training teacher %s on %d images, %d labels", cfg.arch, len(data), len(data.label_names))
    teacher = train_teacher(data, cfg, workers=args.workers)
    _log_streamed_unreadable(data)
    save_checkpoint(teacher, args.out)
    print(f"teacher {cfg.arch} -> {args.out}; held-out accuracy {teacher.report.get('val_acc', float('nan')):.3f}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from cloud.training.classifier import (
        DistillConfig,
        distill,
        load_checkpoint,
        load_selection,
        save_checkpoint,
        student_kwargs,
    )
    from models import get_model

    _threads(args)
    cfg = DistillConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        alpha=args.alpha,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    export_cfg = _export_config(args)  # a bad option fails before training, not after
    teacher = load_checkpoint(args.teacher)
    proxy = load_selection(args.selection, teacher.labels, preprocess=teacher.spec())
    evaluation = _eval_set(args, teacher, proxy)
    student = distill(get_model(cfg.arch, **student_kwargs(teacher, cfg)), teacher, proxy, cfg)
    checkpoint = os.path.join(args.out_dir, f"{args.name}.safetensors")
    save_checkpoint(student, checkpoint)
    print(f"student {cfg.arch} distilled on {len(proxy.images)} proxy images -> {checkpoint}")
    return _export_and_print(student, proxy.images, evaluation, args.out_dir, export_cfg)


def cmd_export(args: argparse.Namespace) -> int:
    from cloud.training.classifier import load_checkpoint, load_selection

    _threads(args)
    export_cfg = _export_config(args)
    trained = load_checkpoint(args.checkpoint)
    proxy = load_selection(args.selection, trained.labels, preprocess=trained.spec())
    return _export_and_print(trained, proxy.images, _eval_set(args, trained, proxy), args.out_dir, export_cfg)


def _export_config(args: argparse.Namespace):
    from cloud.export.gate import ExportConfig, GateConfig
    from cloud.export.quantize import QuantConfig

    quant = QuantConfig(
        calibration_size=args.calibration_size,
        quant_format=args.quant_format,
        per_channel=not args.per_tensor,
        reduce_range=not args.full_range,
        calibrate_method=args.calibrate_method,
    )
    gate = GateConfig(min_agreement=args.min_agreement, max_accuracy_drop=args.max_drop / 100.0)
    return ExportConfig(
        name=args.name, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()), quant=quant, gate=gate
    )


def _eval_set(args: argparse.Namespace, trained, proxy):
    """The gate's evaluation images: ``--eval FOLDER`` (labels from folder names), else the proxy set."""
    from cloud.pool.dataset import load_image_set
    from cloud.pool.manifest import scan_pool

    if not args.eval:
        return proxy
    return load_image_set(scan_pool(args.eval), label_names=trained.labels, preprocess=trained.spec())


def _export_and_print(trained, calib_images, evaluation, out_dir: str, cfg) -> int:
    from cloud.export.gate import export_classifier

    report = export_classifier(trained, out_dir, calib_images, evaluation.images, evaluation.labels, cfg)
    for key, info in sorted(report["files"].items()):
        print(f"{key:>12}: {info['path']} ({info['bytes']} bytes, sha256 {info['sha256'][:16]}...)")
    for fmt, g in report["gate"].items():
        print(
            f"gate {fmt}: int8/fp32 agreement {g['agreement']:.4f}, accuracy fp32 {g['fp32_accuracy']:.4f} -> "
            f"int8 {g['int8_accuracy']:.4f} on {g['images']} images: pass"
        )
    print(f"report -> {os.path.join(out_dir, cfg.name + '.report.json')}")
    return 0


def _add_model_commands(sub) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train a teacher classifier on the labelled pool (safetensors checkpoint)",
        description="Train a teacher (labels = image parent folders) on POOL; logs held-out accuracy per "
        "epoch; writes a safetensors checkpoint that also records arch, normalisation and labels.",
    )
    p.add_argument(
        "pool", help="labelled open-source pool: an image folder, or a CSV/Parquet manifest with a label column"
    )
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument(
        "--arch",
        default="resnet8",
        help="registered teacher architecture (default resnet8; resnet18_narrow for 64-224 pixel photos)",
    )
    p.add_argument("--width", type=positive_int, default=16, help="channels of the first stage (default 16)")
    _add_input_options(p)
    _add_fit_options(p, epochs=8, batch_size=128, lr=3e-3)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "distill",
        help="distil a teacher into a small student on a proxy set, then export fp32/int8 ONNX and TFLite",
        description="Train a student on the images of --selection (a CSV from 'ecos-cloud sample') with the "
        "teacher's soft targets and the CSV's labels; save DIR/NAME.safetensors; then export as "
        "'export' does. int8 is calibrated on the proxy set and must pass the gate.",
    )
    p.add_argument("--selection", required=True, help="selection CSV (path,label,domain,cluster,rank)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint from train-teacher")
    p.add_argument(
        "--arch",
        default="small_cnn",
        help="registered student architecture (default small_cnn; mobilenet_v3_small for 64-224 pixels); "
        "the input size and preprocessing are the teacher's",
    )
    p.add_argument("--width", type=positive_int, default=16, help="channels of the first stage (default 16)")
    p.add_argument(
        "--temperature", type=float, default=4.0, help="softmax temperature T of the soft targets (default 4)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.7, help="weight of the soft-target term; 1-alpha on hard labels (default 0.7)"
    )
    _add_fit_options(p, epochs=30, batch_size=64, lr=3e-3)
    _add_export_options(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "export",
        help="export a checkpoint to fp32 and int8 ONNX/TFLite behind the quality gate",
        description="Write DIR/NAME.onnx, NAME.int8.onnx, NAME.tflite, NAME.int8.tflite (each with its "
        "metadata and a .json sidecar) and NAME.report.json. int8 is calibrated on the "
        "--selection images; if an int8 model misses the gate nothing is written and the "
        "command fails with error[quality_gate].",
    )
    p.add_argument("checkpoint", help="checkpoint (.safetensors) from train-teacher or distill")
    p.add_argument(
        "--selection", required=True, help="proxy-set CSV: int8 calibration images (and gate images without --eval)"
    )
    _add_export_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    add_common(p)
    p.set_defaults(func=cmd_export)


def _add_fit_options(p: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"(default {batch_size})")
    p.add_argument("--lr", type=positive_float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="held out for the per-epoch validation log (default 0.1)"
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    add_common(p)


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True, help="output folder for the artifacts and the report")
    p.add_argument("--name", default="student", help="file name stem of the artifacts (default student)")
    p.add_argument("--eval", help="labelled image folder for the gate (default: the proxy set)")
    p.add_argument("--formats", default="onnx,tflite", help="comma-separated: onnx, tflite (default both)")
    p.add_argument(
        "--quant-format", choices=("QDQ", "QOperator"), default="QDQ", help="ONNX int8 graph format (default QDQ)"
    )
    p.add_argument(
        "--calibrate-method",
        choices=("MinMax", "Entropy", "Percentile"),
        default="MinMax",
        help="ONNX activation range calibration (default MinMax)",
    )
    p.add_argument(
        "--calibration-size", type=int, default=256, help="proxy images used to calibrate int8 (default 256)"
    )
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument(
        "--full-range", action="store_true", help="ONNX: 8-bit weights (default 7-bit reduce_range, safe without VNNI)"
    )
    p.add_argument(
        "--min-agreement", type=float, default=0.98, help="gate: int8/fp32 top-1 agreement at least (default 0.98)"
    )
    p.add_argument("--max-drop", type=float, default=1.0, help="gate: accuracy drop at most, in points (default 1.0)")
