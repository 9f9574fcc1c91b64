"""The paper's model-compression task on our data: distil one teacher into int8 students, one per
selection, and compare them on each device's test images.

One teacher is trained on the whole labelled pool (cached in the workdir). For every device
domain and budget, a small student is distilled on the ecos (epsilon 0.58), random, kcenter and
oracle selections written by ``benchmarks/eval_sampling.py``; each student is quantised to int8
ONNX (calibrated on its own selection) and its accuracy on ``devices/<domain>/test`` is measured
through the device runtime. One student is exported to all four formats (ONNX and TFLite, fp32
and int8) for sizes and single-image, one-thread latency.

    python benchmarks/eval_sampling.py --workdir runs/eval            # writes the selections first
    python benchmarks/bench_compression.py --workdir runs/eval        # full
    python benchmarks/bench_compression.py --workdir runs/eval --quick

Writes ``--out`` JSON (default benchmarks/results/compression.json), docs/results/compression.md
and docs/results/compression.png (``compression-quick.*`` with ``--quick``). The full run took
19.5 min here (2 cores, teacher cached; the teacher is about 10 min more the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.export.formats import export_onnx  # noqa: E402
from cloud.export.gate import ExportConfig, GateConfig, export_classifier, gate, runtime_logits  # noqa: E402
from cloud.export.quantize import QuantConfig, calibration_batch, quantize_onnx  # noqa: E402
from cloud.log import LOG, setup_logging  # noqa: E402
from cloud.pool.dataset import ImageSet, load_image_set  # noqa: E402
from cloud.training.classifier import (
    DistillConfig,
    TeacherConfig,
    Trained,
    accuracy,
    distill,
    load_checkpoint,
    load_selection,
    predict_logits,
    save_checkpoint,
    train_teacher,
)
from device_sdk.fsutil import atomic_write_text  # noqa: E402
from device_sdk.imagefolder import scan_image_folder  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from models import get_model  # noqa: E402

METHODS = {
    "ecos": "ecos-b{b}-eps0.58.csv",
    "random": "random-b{b}-eps0.csv",
    "kcenter": "kcenter-b{b}-eps0.csv",
    "oracle": "oracle-b{b}.csv",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="eval_sampling.py's workdir (data/, selections/)")
    p.add_argument("--quick", action="store_true", help="smoke run: two domains, budget 500, few epochs")
    p.add_argument("--budgets", default="500,1000")
    p.add_argument(
        "--domains", default="all", help="comma-separated device domains (default: every one with selections)"
    )
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--student-epochs", type=int, default=25)
    p.add_argument("--student-width", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", help="JSON (default benchmarks/results/compression.json; compression-quick.json with --quick)"
    )
    p.add_argument(
        "--docs", default=os.path.join(ROOT, "docs", "results"), help="folder for the .md and .png (same stem as --out)"
    )
    args = p.parse_args()
    stem = "compression-quick" if args.quick else "compression"
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{stem}.json")
    return args


def get_teacher(workdir: str, cfg: TeacherConfig, limit: Optional[int]) -> Trained:
    """Train once per config; later runs load the cached checkpoint."""
    path = os.path.join(
        workdir, "compression", f"teacher-{cfg.arch}-w{cfg.width}-e{cfg.epochs}-n{limit or 'all'}.safetensors"
    )
    if os.path.exists(path):
        LOG.info("teacher: cached %s", path)
        return load_checkpoint(path)
    items = scan_image_folder(os.path.join(workdir, "data", "pool"))
    if limit:
        items = [items[i] for i in np.sort(np.random.default_rng(0).permutation(len(items))[:limit])]
    teacher = train_teacher(load_image_set(items), cfg)
    save_checkpoint(teacher, path)
    return teacher


def student_accuracy(
    student: Trained, proxy: ImageSet, test: ImageSet, quant: QuantConfig, latency_repeats: int = 0
) -> Dict[str, Any]:
    """fp32 and int8 accuracy through onnxruntime (the artifacts the device would run)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "s.onnx"), os.path.join(tmp, "s.int8.onnx")
        export_onnx(student.model, student.meta(), fp32, output_name="logits")
        quantize_onnx(fp32, int8, calibration_batch(proxy.images, student.meta(), quant), quant)
        fp32_logits = runtime_logits(fp32, "onnxruntime", test.images)
        int8_logits = runtime_logits(int8, "onnxruntime", test.images)
        extra = (
            {"int8_bytes": os.path.getsize(int8), "int8_latency_ms": latency_ms(int8, test.images[:1], latency_repeats)}
            if latency_repeats
            else {}
        )
    g = gate("onnx", fp32_logits, int8_logits, test.labels, GateConfig())
    return {
        "fp32": accuracy(fp32_logits, test.labels),
        "int8": accuracy(int8_logits, test.labels),
        "agreement": g.agreement,
        "gate_passed": g.passed,
        **extra,
    }


QUANT_VARIANTS = {
    "QDQ per-channel reduce_range (default)": QuantConfig(),
    "QOperator per-channel reduce_range": QuantConfig(quant_format="QOperator"),
    "QDQ per-channel full range": QuantConfig(reduce_range=False),
    "QDQ per-tensor reduce_range": QuantConfig(per_channel=False),
    "QDQ per-channel reduce_range, Percentile": QuantConfig(calibrate_method="Percentile"),
    "QDQ per-channel reduce_range, int8 head": QuantConfig(float_head=False),
}


def quant_variants(student: Trained, proxy: ImageSet, test: ImageSet, repeats: int) -> Dict[str, Dict[str, Any]]:
    """The ONNX int8 settings side by side on one student: agreement, accuracy, size, latency."""
    return {
        name: student_accuracy(student, proxy, test, cfg, latency_repeats=repeats)
        for name, cfg in QUANT_VARIANTS.items()
    }


def latency_ms(path: str, image: np.ndarray, repeats: int) -> float:
    model = load_model(path, threads=1)
    for _ in range(10):
        model.run(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.run(image)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def formats_table(student: Trained, proxy: ImageSet, test: ImageSet, repeats: int) -> Dict[str, Any]:
    """All four artifacts of one student: bytes, gate numbers and one-thread single-image latency."""
    with tempfile.TemporaryDirectory() as tmp:
        report = export_classifier(
            student,
            tmp,
            proxy.images,
            test.images,
            test.labels,
            ExportConfig(gate=GateConfig(min_agreement=0.0, max_accuracy_drop=1.0)),
        )
        rows = {
            key: {"bytes": info["bytes"], "latency_ms": latency_ms(info["path"], test.images[:1], repeats)}
            for key, info in report["files"].items()
        }
    return {"files": rows, "gate": report["gate"], "fp32_max_abs_diff_vs_torch": report["fp32_max_abs_diff_vs_torch"]}


def run(args: argparse.Namespace, publish: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    budgets = [500] if args.quick else [int(b) for b in args.budgets.split(",")]
    sel_root = os.path.join(args.workdir, "selections")
    devices = os.path.join(args.workdir, "data", "devices")
    domains = sorted(os.listdir(devices)) if args.domains == "all" else args.domains.split(",")
    domains = domains[:2] if args.quick else domains
    t_cfg = TeacherConfig(arch="resnet8", width=16, epochs=3 if args.quick else args.teacher_epochs, lr=5e-3)
    s_cfg = DistillConfig(
        width=args.student_width, epochs=6 if args.quick else args.student_epochs, batch_size=32, lr=5e-3
    )
    quant = QuantConfig()
    t0 = time.monotonic()
    teacher = get_teacher(args.workdir, t_cfg, 3000 if args.quick else None)
    rows: List[Dict[str, Any]] = []
    formats: Optional[Dict[str, Any]] = None

    def result(done: bool) -> Dict[str, Any]:
        return {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
            "quick": args.quick,
            "complete": done,
            "teacher_config": asdict(t_cfg),
            "student_config": asdict(s_cfg),
            "quant_config": asdict(quant),
            "teacher_report": {k: v for k, v in teacher.report.items() if k != "history"},
            "rows": rows,
            "summary": summarise(rows),
            "formats": formats,
            "total_seconds": time.monotonic() - t0,
        }

    for domain in domains:
        test = load_image_set(scan_image_folder(os.path.join(devices, domain, "test")), label_names=teacher.labels)
        teacher_acc = accuracy(predict_logits(teacher.model, teacher.inputs(test.images)), test.labels)
        for budget in budgets:
            for method, pattern in METHODS.items():
                csv_path = os.path.join(sel_root, domain, pattern.format(b=budget))
                if not os.path.exists(csv_path):
                    LOG.warning("missing selection %s: skipped", csv_path)
                    continue
                proxy = load_selection(csv_path, teacher.labels)
                start = time.monotonic()
                student = distill(
                    get_model(s_cfg.arch, num_classes=len(teacher.labels), width=s_cfg.width), teacher, proxy, s_cfg
                )
                acc = student_accuracy(student, proxy, test, quant)
                rows.append(
                    {
                        "domain": domain,
                        "budget": budget,
                        "method": method,
                        "teacher": teacher_acc,
                        "seconds": time.monotonic() - start,
                        **acc,
                    }
                )
                LOG.info(
                    "%s b=%d %s: int8 %.3f fp32 %.3f (teacher %.3f)",
                    domain,
                    budget,
                    method,
                    acc["int8"],
                    acc["fp32"],
                    teacher_acc,
                )
                if formats is None and method == "ecos":
                    repeats = 50 if args.quick else 300
                    formats = {
                        **formats_table(student, proxy, test, repeats),
                        "onnx_int8_variants": quant_variants(student, proxy, test, repeats),
                    }
                publish(result(done=False))  # a long run that is stopped keeps what it measured
    return result(done=True)


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Mean int8 accuracy over domains, per budget and method (and the teacher's)."""
    out: Dict[str, Dict[str, float]] = {}
    for budget in sorted({r["budget"] for r in rows}):
        sub = [r for r in rows if r["budget"] == budget]
        means = {
            m: float(np.mean([r["int8"] for r in sub if r["method"] == m]))
            for m in METHODS
            if any(r["method"] == m for r in sub)
        }
        means["teacher"] = float(np.mean(list({r["domain"]: r["teacher"] for r in sub}.values())))
        out[str(budget)] = means
    return out


def write_markdown(result: Dict[str, Any], path: str, command: str) -> None:
    status = (
        " (quick smoke run)" if result["quick"] else "" if result["complete"] else " (partial: the run was still going)"
    )
    lines = [
        "# Model compression on the generated Digits benchmark",
        "",
        f"Command: `{command}`{status}; "
        f"{result['total_seconds'] / 60:.1f} min on {result['machine']['cpus']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads.",
        "",
        f"Teacher: {result['teacher_config']['arch']} (width {result['teacher_config']['width']}, "
        f"{result['teacher_config']['epochs']} epochs) "
        "on the whole labelled pool, held-out accuracy "
        f"{100 * result['teacher_report'].get('val_acc', float('nan')):.1f}%. "
        f"Students: {result['student_config']['arch']} (width {result['student_config']['width']}, "
        f"{result['student_config']['epochs']} epochs, "
        f"T={result['student_config']['temperature']:g}, alpha={result['student_config']['alpha']:g}) distilled on "
        "each selection, "
        "quantised to int8 ONNX (QDQ) calibrated on that selection.",
        "",
        "int8 student accuracy (%, ONNX Runtime) on each device's test images; teacher = the fp32 teacher on the "
        "same images.",
        "",
        "| domain | budget | ecos | random | kcenter | oracle | teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for domain, budget in sorted({(r["domain"], r["budget"]) for r in result["rows"]}):
        by = {r["method"]: r for r in result["rows"] if r["domain"] == domain and r["budget"] == budget}
        cells = [f"{100 * by[m]['int8']:.1f}" if m in by else "-" for m in METHODS]
        lines.append(
            f"| {domain} | {budget} | " + " | ".join(cells) + f" | {100 * next(iter(by.values()))['teacher']:.1f} |"
        )
    for budget, means in result["summary"].items():
        lines.append(
            f"| **mean** | {budget} | "
            + " | ".join(f"**{100 * means[m]:.1f}**" if m in means else "-" for m in METHODS)
            + f" | {100 * means['teacher']:.1f} |"
        )
    passed = [r["gate_passed"] for r in result["rows"]]
    lines += [
        "",
        f"int8 gate (agreement >= 0.98 and accuracy drop <= 1 point vs fp32, on the device's test images) passed "
        f"for {sum(passed)} of {len(passed)} students.",
    ]
    if result["formats"]:
        lines += [
            "",
            "One ecos student in every format (single image, one thread, median):",
            "",
            "| artifact | bytes | latency (ms) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['bytes']} | {v['latency_ms']:.3f} |" for k, v in sorted(result["formats"]["files"].items())
        ]
        lines += [
            "",
            "ONNX int8 settings on the same student (agreement with fp32 and accuracy on the device's test images):",
            "",
            "| setting | agreement | int8 acc | fp32 acc | bytes | latency (ms) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['agreement']:.4f} | {100 * v['int8']:.1f} | {100 * v['fp32']:.1f} | {v['int8_bytes']} | "
            f"{v['int8_latency_ms']:.3f} |"
            for k, v in result["formats"]["onnx_int8_variants"].items()
        ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(result["summary"])
    names = list(METHODS) + ["teacher"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(
            [j + i * width for j in range(len(budgets))],
            [100 * result["summary"][b].get(name, np.nan) for b in budgets],
            width,
            label=name,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"budget {b}" for b in budgets])
    ax.set_ylabel("mean int8 student accuracy on device test (%)")
    ax.set_title("Distilled int8 students by proxy-set sampler")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    setup_logging()
    command = "python benchmarks/bench_compression.py " + " ".join(sys.argv[1:])

    def publish(result: Dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        stem = os.path.splitext(os.path.basename(args.out))[0]
        write_markdown(result, os.path.join(args.docs, f"{stem}.md"), command)
        plot(result, os.path.join(args.docs, f"{stem}.png"))

    result = run(args, publish)
    publish(result)
    print(json.dumps({"summary": result["summary"], "total_seconds": result["total_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
