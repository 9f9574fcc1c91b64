"""Speed and size of the device's side and of indexing (issue 2's speed checks).

- device scoring of N 32x32 images on one thread, end to end (scan folder, decode, encode,
  count, noise, ledger, write), against bare onnxruntime inference on the same decoded images;
  peak memory of the scoring process;
- pool indexing throughput (decode + encode, no cache) against bare inference;
- bytes of the probe (float16 and int8 centroids) and of the scores message for K, d.

    python benchmarks/bench_device.py --workdir runs/eval   # needs data/ and encoder.onnx there

Writes benchmarks/results/device.json and docs/results/device.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_sdk.imagefolder import load_images, scan_image_folder  # noqa: E402
from device_sdk.protocol.round import Probe, Scores  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bare_inference(encoder: str, images: np.ndarray, threads: int, batch: int = 256) -> float:
    model = load_model(encoder, threads=threads)
    x = model.preprocess(images)
    return best_of(lambda: [model._infer(x[i : i + batch]) for i in range(0, len(x), batch)])


def scoring_run(encoder: str, folder: str, probe_path: str, workdir: str) -> dict:
    """One real ``ecos-device score`` process; wall time and peak RSS from the child."""
    ledger = os.path.join(workdir, "bench-ledger.json")
    out = os.path.join(workdir, "bench.scores")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ecos-device"),
        "score",
        folder,
        "--encoder",
        encoder,
        "--probe",
        probe_path,
        "--out",
        out,
        "--ledger",
        ledger,
        "--sigma",
        "6",
        "--budget-epsilon",
        "1000",
        "--threads",
        "1",
        "-q",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    for p in (ledger, out, ledger + ".lock"):
        if os.path.exists(p):
            os.unlink(p)
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def in_process_scoring(encoder: str, items, probe: Probe, images: np.ndarray = None) -> float:
    """The same work as the CLI minus interpreter start-up: decode, encode, count, noise, ledger.

    With ``images`` (already decoded, as an app holding camera frames would have them) the
    decoding step is skipped.
    """
    from device_sdk.device import answer_probe
    from device_sdk.privacy.ledger import PrivacyLedger
    from device_sdk.scoring import encode_items

    model = load_model(encoder, threads=1)

    def once():
        feats = encode_items(model, items) if images is None else model.run(images)
        with tempfile.TemporaryDirectory() as tmp:
            ledger = PrivacyLedger.open(os.path.join(tmp, "l.json"), budget_epsilon=1000)
            answer_probe(probe, model, feats, ledger, sigma=6.0)

    return best_of(once)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, default=1000, help="images scored (default 1000)")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/device.json")
    p.add_argument("--docs", default="docs/results/device.md")
    args = p.parse_args(argv)
    encoder = os.path.join(args.workdir, "encoder.onnx")
    items = scan_image_folder(os.path.join(args.workdir, "data", "pool"))[::7][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "device")
        for it in items:  # a device folder of exactly n images (hard links: no copy cost)
            dst = os.path.join(folder, it.label, os.path.basename(it.path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(it.path, dst)
        model = load_model(encoder)
        probe = Probe(
            "bench", model.sha256, _unit(np.random.default_rng(0).normal(size=(args.k, model.meta.feature_dim)))
        )
        probe_path = os.path.join(tmp, "p.probe")
        with open(probe_path, "wb") as fh:
            fh.write(probe.to_bytes())
        images = load_images([it.path for it in items], (32, 32))
        res = {
            "n_images": len(items),
            "bare_inference_1thread_s": bare_inference(encoder, images, 1),
            "decode_only_s": best_of(lambda: load_images([it.path for it in items], (32, 32))),
            "scoring_in_process_1thread_s": in_process_scoring(encoder, items, probe),
            "scoring_decoded_images_1thread_s": in_process_scoring(encoder, items, probe, images),
            "scoring_cli_1thread": scoring_run(encoder, folder, probe_path, tmp),
        }
    res["ratio_scoring_to_bare"] = res["scoring_in_process_1thread_s"] / res["bare_inference_1thread_s"]
    res["ratio_decoded_scoring_to_bare"] = res["scoring_decoded_images_1thread_s"] / res["bare_inference_1thread_s"]
    threads = os.cpu_count() or 1
    pool_items = scan_image_folder(os.path.join(args.workdir, "data", "pool"))[:4000]
    pool_images = load_images([it.path for it in pool_items], (32, 32))
    idx_model = load_model(encoder, threads=threads)
    from device_sdk.scoring import encode_items

    res["index_encode_images_per_s"] = len(pool_items) / best_of(lambda: encode_items(idx_model, pool_items, 512), 2)
    res["bare_inference_images_per_s"] = len(pool_items) / bare_inference(encoder, pool_images, threads, 512)
    res["index_threads"] = threads
    res["bytes"] = message_sizes(args.k, args.d)
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    write_markdown(res, args)
    print(json.dumps(res, indent=1))
    return 0


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def message_sizes(k: int, d: int) -> dict:
    c = _unit(np.random.default_rng(0).normal(size=(k, d)))
    out = {
        f"probe_{codec}": len(Probe("x" * 32, "e" * 64, c, codec).to_bytes())
        for codec in ("float16", "int8", "float32")
    }
    out["scores"] = len(
        Scores("x" * 32, "device-0001", "e" * 64, np.zeros(k), sigma=6.1, epsilon=0.58, delta=1e-5).to_bytes()
    )
    out.update(k=k, d=d)
    return out


def write_markdown(res: dict, args) -> None:
    b = res["bytes"]
    cli = res["scoring_cli_1thread"]
    lines = [
        "# Device scoring, indexing and message sizes",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs. "
        f"Command: `python benchmarks/bench_device.py --workdir {args.workdir}` (encoder from the sampling benchmark).",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| bare onnxruntime inference, {res['n_images']} images, 1 thread | {res['bare_inference_1thread_s']:.3f} s |",
        f"| PNG decoding of the same images | {res['decode_only_s']:.3f} s |",
        "| device scoring in process (decode, encode, count, noise, ledger), 1 thread | "
        f"{res['scoring_in_process_1thread_s']:.3f} s |",
        f"| ratio scoring / bare inference | {res['ratio_scoring_to_bare']:.2f}x |",
        "| device scoring of already-decoded images (an app's frames), 1 thread | "
        f"{res['scoring_decoded_images_1thread_s']:.3f} s |",
        f"| ratio decoded-image scoring / bare inference | {res['ratio_decoded_scoring_to_bare']:.2f}x |",
        f"| `ecos-device score` process, wall (incl. interpreter start-up) | {cli['wall_s']:.2f} s |",
        f"| `ecos-device score` peak RSS | {cli['peak_rss_mb']:.0f} MB |",
        f"| pool indexing (decode + encode), {res['index_threads']} threads | {res['index_encode_images_per_s']:.0f} "
        "images/s |",
        f"| bare inference, {res['index_threads']} threads | {res['bare_inference_images_per_s']:.0f} images/s |",
        f"| probe, K={b['k']}, d={b['d']}, float16 | {b['probe_float16']} bytes |",
        f"| probe, int8 + per-row scale | {b['probe_int8']} bytes |",
        f"| scores message, K={b['k']} | {b['scores']} bytes |",
    ]
    os.makedirs(os.path.dirname(args.docs), exist_ok=True)
    with open(args.docs, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
