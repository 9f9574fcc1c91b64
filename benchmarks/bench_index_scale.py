"""Indexing a large pool: time, throughput against bare encoder inference, peak memory, resume.

    nice -n 10 .venv/bin/python benchmarks/bench_index_scale.py --sizes 10000 100000 1000000 --threads 2

Generates small JPEGs once under runs/bench_index/jpegs/ (48x48 noise-and-shape pictures, ~1-2 KB,
1,000 per folder; runs/ is not in git): the first 20,000 are drawn and encoded one by one, the
rest are byte copies of those (a million drawn pictures would take about an hour here; decoding,
encoding and caching cost the same whatever the picture, and the cache keys on path, size and
mtime, so every file is its own entry), exports a random-weight conv_encoder at 32x32 (throughput
depends on the graph, not the weights), and for each size runs, in a fresh process each:

- ``bare``: the encoder's ``run`` on decoded images already in memory (images/s, and CPU time per
  image over all the process's threads);
- ``index``: the pool as a CSV manifest of the first N files -> scan, stat, decode (``--workers``
  threads), encode (``--threads``), sharded cache, k-means (K=64): wall time, encode-phase images/s
  and its ratio to ``bare``, encode-phase CPU time per image, peak RSS of the process;
- ``resume``: the same again with the cache full: what a restart costs when nothing is left to do.

On a machine whose cores are all busy (this benchmark's threads, or other work), throughput follows
CPU time: the ratio of the two CPU times per image (bare / index) is then the most the ratio to
bare can be, and unlike wall time it hardly moves with the other work. Both are reported.

Writes benchmarks/results/index_scale.json and docs/results/index_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORK = os.path.join(ROOT, "runs", "bench_index")
PER_FOLDER = 1000


def generate(n: int, workers: int) -> str:
    """At least ``n`` JPEGs under WORK/jpegs (kept between runs); returns the folder."""
    from concurrent.futures import ProcessPoolExecutor

    folder = os.path.join(WORK, "jpegs")
    os.makedirs(folder, exist_ok=True)
    have = len(os.listdir(folder))
    need = (n + PER_FOLDER - 1) // PER_FOLDER
    if have < need:
        t0 = time.time()
        with ProcessPoolExecutor(workers) as pool:  # the drawn folders first: the copies read them
            list(pool.map(_write_folder, [(folder, f) for f in range(have, min(need, UNIQUE_FOLDERS))]))
            list(pool.map(_write_folder, [(folder, f) for f in range(max(have, UNIQUE_FOLDERS), need)], chunksize=8))
        print(f"generated {(need - have) * PER_FOLDER} JPEGs in {time.time() - t0:.0f}s", flush=True)
    return folder


UNIQUE_FOLDERS = 20  # folders of drawn pictures; later folders copy their bytes


def _write_folder(args) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    folder, f = args
    out = os.path.join(folder, f"{f:05d}")
    os.makedirs(out + ".tmp", exist_ok=True)
    if f >= UNIQUE_FOLDERS:
        src = os.path.join(folder, f"{f % UNIQUE_FOLDERS:05d}")
        for i in range(PER_FOLDER):
            with (
                open(os.path.join(src, f"{i:04d}.jpg"), "rb") as fi,
                open(os.path.join(out + ".tmp", f"{i:04d}.jpg"), "wb") as fo,
            ):
                fo.write(fi.read())
        os.replace(out + ".tmp", out)
        return
    rng = np.random.default_rng(f)
    for i in range(PER_FOLDER):
        a = np.clip(rng.integers(30, 220, 3) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
        x, y, r = rng.integers(8, 40, 3)
        ImageDraw.Draw(im).ellipse(
            (x - r // 2, y - r // 2, x + r // 2, y + r // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
        im.save(os.path.join(out + ".tmp", f"{i:04d}.jpg"), quality=80)
    os.replace(out + ".tmp", out)


def manifest(folder: str, n: int) -> str:
    path = os.path.join(WORK, f"pool-{n}.csv")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as fh:
            fh.write("path,label\n")
            for f in range((n + PER_FOLDER - 1) // PER_FOLDER):
                for i in range(min(PER_FOLDER, n - f * PER_FOLDER)):
                    fh.write(f"jpegs/{f:05d}/{i:04d}.jpg,c{f % 10}\n")
        os.replace(path + ".tmp", path)
    return path


def encoder(path: str) -> str:
    if not os.path.exists(path):
        import torch

        from cloud.export.formats import export_onnx
        from cloud.pool.dataset import default_preprocess
        from device_sdk.runtime.artifact import ArtifactMeta
        from models import get_model

        torch.manual_seed(0)
        spec = default_preprocess((32, 32))
        meta = ArtifactMeta(
            kind="encoder",
            arch="conv_encoder",
            input_shape=spec.input_shape,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            feature_dim=64,
            preprocess=spec.policy(),
        )
        export_onnx(get_model("conv_encoder", feature_dim=64, width=16).eval(), meta, path, output_name="features")
    return path


def child(args) -> None:
    """One measurement in this process; prints one JSON line."""
    import numpy as np

    from cloud.log import setup_logging
    from device_sdk.runtime import load_model

    setup_logging(False, False)
    model = load_model(args.encoder, threads=args.threads)
    if args.child == "bare":
        items = [f"{args.folder}/{f:05d}/{i:04d}.jpg" for f in range(2) for i in range(PER_FOLDER)][:2048]
        images = model.meta.preprocessing().decode_many(items)
        model.run(images[:256])
        t0, c0, n = time.perf_counter(), cpu_s(), 0
        while time.perf_counter() - t0 < args.seconds:
            for s in range(0, len(images), 256):
                model.run(images[s : s + 256])
            n += len(images)
        out = {"images_per_s": n / (time.perf_counter() - t0), "cpu_us_per_image": (cpu_s() - c0) / n * 1e6}
    else:
        from cloud.pool.clustering import spherical_kmeans
        from cloud.pool.features import encode_pool_checked
        from cloud.pool.manifest import scan_pool

        t0 = time.perf_counter()
        items = scan_pool(args.manifest)
        t1, c1 = time.perf_counter(), cpu_s()
        enc = encode_pool_checked(model, items, args.cache, batch=256, workers=args.workers, prune_missing=True)
        t2, c2 = time.perf_counter(), cpu_s()
        km = spherical_kmeans(enc.features, 64, iters=10, seed=0)
        t3 = time.perf_counter()
        assert np.isfinite(km.centroids).all()
        out = {
            "scan_s": t1 - t0,
            "encode_s": t2 - t1,
            "kmeans_s": t3 - t2,
            "total_s": t3 - t0,
            "encoded": enc.encoded,
            "cached": enc.cached,
            "unreadable": enc.unreadable.count,
            "encode_images_per_s": len(items) / (t2 - t1),
            "encode_cpu_us_per_image": (c2 - c1) / len(items) * 1e6,
        }
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out), flush=True)


def cpu_s() -> float:
    """CPU seconds this process has used so far, all its threads, user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def run_child(*extra: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"child failed: {' '.join(extra)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--threads", type=int, default=2, help="encoder threads")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--seconds", type=float, default=20.0, help="bare-encoder measuring time")
    ap.add_argument("--child", choices=("bare", "index"))
    ap.add_argument("--encoder")
    ap.add_argument("--manifest")
    ap.add_argument("--cache")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        return child(args)
    os.makedirs(WORK, exist_ok=True)
    folder = generate(max(args.sizes), os.cpu_count() or 1)
    enc = encoder(os.path.join(WORK, "encoder.onnx"))
    common = ["--threads", str(args.threads), "--workers", str(args.workers), "--encoder", enc]
    bare = run_child("--child", "bare", "--folder", folder, "--seconds", str(args.seconds), *common)
    print(f"bare encoder: {bare['images_per_s']:.0f} images/s", flush=True)
    rows = []
    for n in args.sizes:
        cache = os.path.join(WORK, f"cache-{n}")
        subprocess.run(["rm", "-rf", cache], check=True)
        m = manifest(folder, n)
        first = run_child("--child", "index", "--manifest", m, "--cache", cache, *common)
        again = run_child("--child", "index", "--manifest", m, "--cache", cache, *common)
        row = {
            "images": n,
            "index": first,
            "resume_full_cache": again,
            "ratio_to_bare": first["encode_images_per_s"] / bare["images_per_s"],
            "cpu_ratio": bare["cpu_us_per_image"] / first["encode_cpu_us_per_image"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        subprocess.run(["rm", "-rf", cache], check=True)
    from device_sdk.preprocess import fast_paths

    fast = fast_paths()
    decoder = "simplejpeg for plain JPEGs, Pillow for the rest" if fast.jpeg else f"Pillow ({fast.reason})"
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "decoder": decoder,
        "threads": args.threads,
        "workers": args.workers,
        "bare": bare,
        "rows": rows,
        "command": "nice -n 10 .venv/bin/python benchmarks/bench_index_scale.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "index_scale.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    lines = [
        "# Indexing a large pool (benchmarks/bench_index_scale.py)",
        "",
        f"`{result['command']}`; {os.cpu_count()} CPUs shared with other work; encoder conv_encoder 32x32, "
        f"64-d, {args.threads} ORT threads, {args.workers} decoding threads; 48x48 JPEGs listed in a CSV manifest "
        f"(the first {UNIQUE_FOLDERS * PER_FOLDER:,} drawn, the rest byte copies of them in their own files); "
        f"decoding: {decoder}; "
        f"bare encoder {bare['images_per_s']:.0f} images/s on decoded images, "
        f"{bare['cpu_us_per_image']:.1f} us of CPU per image. "
        "CPU per image: the encode phase's CPU time (all threads) over its images; CPU ratio: bare's over the "
        "index's, what the ratio to bare can reach when every core is busy.",
        "",
        "| images | index total (s) | encode phase (images/s) | ratio to bare | CPU per image (us) | CPU ratio "
        "| peak RSS (MB) | restart, all cached (s) | restart peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']:,} | {r['index']['total_s']:.0f} | {r['index']['encode_images_per_s']:.0f} | "
            f"{r['ratio_to_bare']:.2f} | {r['index']['encode_cpu_us_per_image']:.1f} | {r['cpu_ratio']:.2f} | "
            f"{r['index']['peak_rss_mb']:.0f} | {r['resume_full_cache']['total_s']:.0f} | "
            f"{r['resume_full_cache']['peak_rss_mb']:.0f} |"
        )
    os.makedirs(os.path.join(ROOT, "docs", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "docs", "results", "index_scale.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
