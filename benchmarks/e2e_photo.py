"""One ECOS round at 96x96 on photo-like JPEGs of varied sizes, through the real command lines.

    nice -n 10 .venv/bin/python benchmarks/e2e_photo.py

No downloads. The pool is built from what the environment has:

- ``china``, ``flower``: the two real photographs bundled with scikit-learn
  (``sklearn.datasets.load_sample_images``), cut into random crops of 96-160 x 96-160 pixels
  (zoom 0.6-2x, brightness and per-channel colour jitter), each with one real handwritten digit
  (scikit-learn's 8x8 ``load_digits``, upscaled to 45-70% of the crop, a contrasting colour,
  alpha-blended) drawn on it. The label is the digit;
- ``printed``, ``street``: the project's generated 32x32 digits (cloud/tools/datagen) upscaled
  to 96-160 pixels.

Pool digits come from ``load_digits`` rows 0-1199, the device's from rows 1200-1796 (other
writers' handwriting); photo crops are drawn independently. The pool is written as JPEG files
(quality 75-95) listed in a CSV manifest (path,label,domain). One device holds ``flower`` pictures:
an unlabelled folder it scores and a labelled test folder.

Steps (each a subprocess of the installed CLIs, ``--input-size 96``):
train-encoder -> index -> ecos-device score -> sample (ecos and random) -> train-teacher ->
distill (one student per selection, int8 exported and gated on the device's test images) ->
export (the ECOS student again, standalone) -> ecos-device predict on the test folder (int8 ONNX).
Records the device domain's share of each selection, accuracies, times, artifact sizes and the input
shape / preprocessing in each artifact's metadata. Writes benchmarks/results/e2e_photo.json and
docs/results/e2e_photo.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOMAINS = ("china", "flower", "printed", "street")
DEVICE_DOMAIN = "flower"


def _photos():
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images()
    return {os.path.splitext(os.path.basename(f))[0]: im for f, im in zip(imgs.filenames, imgs.images)}


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(int)


def photo_digit(photo: np.ndarray, glyph: np.ndarray, rng: np.random.Generator):
    """A random jittered crop of ``photo`` with the 8x8 ``glyph`` (0..1) drawn on it; PIL image."""
    from PIL import Image

    w, h = (int(v) for v in rng.integers(96, 161, 2))
    zoom = float(rng.uniform(0.6, 2.0))
    cw, ch = min(photo.shape[1], int(w * zoom)), min(photo.shape[0], int(h * zoom))
    x0, y0 = int(rng.integers(0, photo.shape[1] - cw + 1)), int(rng.integers(0, photo.shape[0] - ch + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)
    a = np.asarray(crop).astype(np.float32)
    a = a * rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, 3)
    side = int(min(w, h) * rng.uniform(0.45, 0.7))
    mask = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)) / 255.0
    gx, gy = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    region = a[gy : gy + side, gx : gx + side]
    light = region.mean() < 110
    ink = rng.uniform(200, 255, 3) if light else rng.uniform(0, 50, 3)
    alpha = np.clip(mask * 1.3, 0, 1)[..., None]
    a[gy : gy + side, gx : gx + side] = region * (1 - alpha) + ink * alpha
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def generated_digit(domain: str, label: int, rng: np.random.Generator):
    from PIL import Image

    from cloud.tools.datagen.renderers import render

    w, h = (int(v) for v in rng.integers(96, 161, 2))
    return Image.fromarray(render(domain, label, rng)).resize((w, h), Image.BICUBIC)


def build(work: str, per_domain: int, local: int, test: int, seed: int) -> dict:
    """Pool JPEGs + manifest, the device's folders; returns counts."""
    photos = _photos()
    glyphs, targets = _digits()
    rng = np.random.default_rng(seed)
    pool_rows, sizes = [], []

    def one(domain: str, rows_from: np.ndarray, rng: np.random.Generator):
        i = int(rng.choice(rows_from))
        label = int(targets[i])
        if domain in photos:
            return photo_digit(photos[domain], glyphs[i], rng), label
        return generated_digit(domain, int(rng.integers(0, 10)), rng), None

    pool_rows_idx, device_rows_idx = np.arange(0, 1200), np.arange(1200, len(targets))
    for domain in DOMAINS:
        os.makedirs(os.path.join(work, "pool", domain), exist_ok=True)
        for k in range(per_domain):
            r = np.random.default_rng([seed, DOMAINS.index(domain), k])
            if domain in photos:
                im, label = one(domain, pool_rows_idx, r)
            else:
                label = int(r.integers(0, 10))
                im = generated_digit(domain, label, r)
            rel = f"pool/{domain}/{k:05d}.jpg"
            im.save(os.path.join(work, rel), quality=int(r.integers(75, 96)))
            pool_rows.append((rel, label, domain))
            sizes.append(im.size)
    with open(os.path.join(work, "pool.csv"), "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["path", "label", "domain"])
        wr.writerows(pool_rows)
    for split, n in (("local", local), ("test", test)):
        for k in range(n):
            r = np.random.default_rng([seed, 99, 0 if split == "local" else 1, k])
            im, label = one(DEVICE_DOMAIN, device_rows_idx, r)
            folder = os.path.join(work, "device", split, *([str(label)] if split == "test" else []))
            os.makedirs(folder, exist_ok=True)
            im.save(os.path.join(folder, f"{k:05d}.jpg"), quality=int(r.integers(75, 96)))
    del rng
    wh = np.array(sizes)
    return {
        "pool": len(pool_rows),
        "per_domain": per_domain,
        "device_local": local,
        "device_test": test,
        "width_range": [int(wh[:, 0].min()), int(wh[:, 0].max())],
        "height_range": [int(wh[:, 1].min()), int(wh[:, 1].max())],
        "pool_bytes": sum(os.path.getsize(os.path.join(work, p)) for p, _, _ in pool_rows),
    }


def sh(name: str, cmd, times: dict, log, check: bool = True) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    times[name] = round(time.monotonic() - t0, 1)
    log.write(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}\n(rc {res.returncode}, {times[name]} s)\n\n")
    log.flush()
    print(f"[{name}] rc {res.returncode} in {times[name]} s: {res.stdout.strip().splitlines()[-1:]}", flush=True)
    if check and res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def share(selection: str) -> float:
    with open(selection) as fh:
        rows = list(csv.DictReader(fh))
    return sum(r["domain"] == DEVICE_DOMAIN for r in rows) / max(len(rows), 1)


def meta_of(path: str) -> dict:
    from device_sdk.runtime import load_model

    m = load_model(path).meta
    return {"input_shape": list(m.input_shape), "preprocess": m.preprocess, "bytes": os.path.getsize(path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "e2e_photo"))
    ap.add_argument("--per-domain", type=int, default=700)
    ap.add_argument("--local", type=int, default=400)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--encoder-epochs", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md-only", action="store_true", help="rewrite the markdown from the JSON of the last run")
    args = ap.parse_args()
    if args.md_only:
        with open(os.path.join(ROOT, "benchmarks", "results", "e2e_photo.json")) as fh:
            return write_md(json.load(fh))
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    times: dict = {}
    t0 = time.monotonic()
    data = build(w, args.per_domain, args.local, args.test, args.seed)
    times["build_pool"] = round(time.monotonic() - t0, 1)
    print(f"pool: {json.dumps(data)} in {times['build_pool']} s", flush=True)
    bindir = os.path.dirname(sys.executable)
    cloud, device = os.path.join(bindir, "ecos-cloud"), os.path.join(bindir, "ecos-device")
    th = ["--threads", str(args.threads)]
    p = lambda *parts: os.path.join(w, *parts)  # noqa: E731
    log = open(p("commands.log"), "w")
    sh(
        "train-encoder",
        [
            cloud,
            "train-encoder",
            p("pool.csv"),
            "--input-size",
            "96",
            "--epochs",
            str(args.encoder_epochs),
            "--out",
            p("enc.onnx"),
            "--no-tflite",
            "--seed",
            str(args.seed),
            *th,
        ],
        times,
        log,
    )
    sh(
        "index",
        [
            cloud,
            "index",
            p("pool.csv"),
            "--encoder",
            p("enc.onnx"),
            "--out",
            p("pool.index.npz"),
            "--probe",
            p("round.probe"),
            "--k",
            "32",
            "--cache-dir",
            p("cache"),
            "--workers",
            "2",
            *th,
        ],
        times,
        log,
    )
    sh(
        "device-score",
        [
            device,
            "score",
            p("device", "local"),
            "--encoder",
            p("enc.onnx"),
            "--probe",
            p("round.probe"),
            "--out",
            p("dev.scores"),
            "--ledger",
            p("ledger.json"),
            "--epsilon",
            "1.0",
            "--device-id",
            "pi-flower",
            *th,
        ],
        times,
        log,
    )
    sel = {}
    for method in ("ecos", "random"):
        sel[method] = p(f"sel_{method}.csv")
        extra = ["--scores", p("dev.scores")] if method == "ecos" else []
        sh(
            f"sample-{method}",
            [
                cloud,
                "sample",
                "--index",
                p("pool.index.npz"),
                *extra,
                "--method",
                method,
                "--budget",
                str(args.budget),
                "--out",
                sel[method],
                "--seed",
                str(args.seed),
            ],
            times,
            log,
        )
    sh(
        "train-teacher",
        [
            cloud,
            "train-teacher",
            p("pool.csv"),
            "--arch",
            "resnet18_narrow",
            "--input-size",
            "96",
            "--epochs",
            str(args.teacher_epochs),
            "--out",
            p("teacher.safetensors"),
            "--seed",
            str(args.seed),
            *th,
        ],
        times,
        log,
    )
    results = {}
    for method in ("ecos", "random"):
        out = p(f"student_{method}")
        res = sh(
            f"distill-{method}",
            [
                cloud,
                "distill",
                "--selection",
                sel[method],
                "--teacher",
                p("teacher.safetensors"),
                "--arch",
                "mobilenet_v3_small",
                "--epochs",
                str(args.student_epochs),
                "--out-dir",
                out,
                "--eval",
                p("device", "test"),
                "--formats",
                "onnx",
                "--seed",
                str(args.seed),
                *th,
            ],
            times,
            log,
            check=False,
        )
        results[method] = {"share_device_domain": share(sel[method]), "distill_rc": res.returncode}
        if res.returncode == 0:
            rep = json.load(open(os.path.join(out, "student.report.json")))
            results[method]["gate"] = rep.get("gate")
            pr = sh(
                f"predict-{method}",
                [
                    device,
                    "predict",
                    os.path.join(out, "student.int8.onnx"),
                    "--folder",
                    p("device", "test"),
                    "--json",
                    *th,
                ],
                times,
                log,
            )
            results[method]["device_int8_accuracy"] = json.loads(pr.stdout)["accuracy"]
            results[method]["artifacts"] = {
                f: meta_of(os.path.join(out, f)) for f in ("student.onnx", "student.int8.onnx")
            }
    sh(
        "export-ecos",
        [
            cloud,
            "export",
            p("student_ecos", "student.safetensors"),
            "--selection",
            sel["ecos"],
            "--out-dir",
            p("export_ecos"),
            "--eval",
            p("device", "test"),
            "--formats",
            "onnx",
            *th,
        ],
        times,
        log,
        check=False,
    )
    tex = sh(
        "export-teacher",
        [
            cloud,
            "export",
            p("teacher.safetensors"),
            "--selection",
            sel["random"],
            "--out-dir",
            p("teacher_export"),
            "--name",
            "teacher",
            "--eval",
            p("device", "test"),
            "--formats",
            "onnx",
            *th,
        ],
        times,
        log,
        check=False,
    )
    teacher = {"export_rc": tex.returncode, "export_message": (tex.stdout + tex.stderr).strip().splitlines()[-3:]}
    if os.path.exists(p("teacher_export", "teacher.int8.onnx")):
        pr = sh(
            "predict-teacher",
            [
                device,
                "predict",
                p("teacher_export", "teacher.int8.onnx"),
                "--folder",
                p("device", "test"),
                "--json",
                *th,
            ],
            times,
            log,
        )
        teacher |= {
            "device_int8_accuracy": json.loads(pr.stdout)["accuracy"],
            "artifact": meta_of(p("teacher_export", "teacher.int8.onnx")),
        }
    encoder = meta_of(p("enc.onnx"))
    probe_bytes = os.path.getsize(p("round.probe"))
    ledger = json.load(open(p("ledger.json")))
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "args": vars(args),
        "data": data,
        "times_s": times,
        "total_s": round(time.monotonic() - t0, 1),
        "encoder": encoder,
        "probe_bytes": probe_bytes,
        "ledger": ledger,
        "teacher": teacher,
        "students": results,
        "export_ecos_rc": int(os.path.exists(p("export_ecos", "student.int8.onnx"))),
        "command": "nice -n 10 .venv/bin/python benchmarks/e2e_photo.py " + " ".join(sys.argv[1:]),
    }
    with open(os.path.join(ROOT, "benchmarks", "results", "e2e_photo.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    write_md(result)


def write_md(r: dict) -> None:
    d, t = r["data"], r["times_s"]
    lines = [
        "# One round at 96x96 on photo-like JPEGs (benchmarks/e2e_photo.py)",
        "",
        f"`{r['command']}`; {r['machine']['cpus']} CPUs shared with other work (load average at the end "
        f"{r['machine']['load_average_at_end'][0]:.1f}); every step is the installed CLI at `--input-size 96` "
        "(the exact commands are in runs/e2e_photo/commands.log).",
        "",
        f"Pool: {d['pool']:,} JPEGs ({d['pool_bytes'] / 2**20:.1f} MB), {d['per_domain']} per domain in 4 domains: "
        "crops of scikit-learn's two bundled photographs (`china`, `flower`) with a real handwritten digit drawn "
        "on each, and the generated `printed` and `street` digits upscaled; widths "
        f"{d['width_range'][0]}-{d['width_range'][1]}, heights {d['height_range'][0]}-{d['height_range'][1]} px; "
        f"CSV manifest. Device: {d['device_local']} unlabelled `flower` pictures it scores (epsilon 1) and "
        f"{d['device_test']} labelled test pictures (other writers' digits, other crops). Budget "
        f"{r['args']['budget']} images.",
        "",
        "| selection | share from the device's domain | student int8 accuracy on the device (predict) "
        "| gate fp32 / int8 accuracy | int8 ONNX size (KB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, s in r["students"].items():
        if "device_int8_accuracy" in s:
            g = s["gate"]["onnx"] if "onnx" in (s.get("gate") or {}) else {}
            lines.append(
                f"| {m} | {100 * s['share_device_domain']:.0f}% | {100 * s['device_int8_accuracy']:.1f}% | "
                f"{100 * g.get('fp32_accuracy', np.nan):.1f}% / {100 * g.get('int8_accuracy', np.nan):.1f}% | "
                f"{s['artifacts']['student.int8.onnx']['bytes'] / 1024:.0f} |"
            )
        else:
            lines.append(f"| {m} | {100 * s['share_device_domain']:.0f}% | distill failed (rc {s['distill_rc']}) | | |")
    if "device_int8_accuracy" in r["teacher"]:
        lines.append(
            f"| (teacher, whole pool, resnet18_narrow) | | {100 * r['teacher']['device_int8_accuracy']:.1f}% | | "
            f"{r['teacher']['artifact']['bytes'] / 1024:.0f} |"
        )
    else:
        lines.append(
            "| (teacher, whole pool, resnet18_narrow) | | not shipped: "
            + " ".join(r["teacher"].get("export_message", []))
            + " | | |"
        )
    enc = r["encoder"]
    lines += [
        "",
        f"Artifact metadata: encoder input_shape {enc['input_shape']}, preprocess {json.dumps(enc['preprocess'])}; "
        + "; ".join(
            f"{m} student int8 input_shape {s['artifacts']['student.int8.onnx']['input_shape']}"
            for m, s in r["students"].items()
            if "artifacts" in s
        )
        + f". Encoder {enc['bytes'] / 1024:.0f} KB, probe {r['probe_bytes']} bytes.",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in t.items()]
    lines += [f"| total | {r['total_s']:.0f} |", ""]
    with open(os.path.join(ROOT, "docs", "results", "e2e_photo.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
