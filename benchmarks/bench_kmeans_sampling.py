"""Benchmark the cloud's compress and sample steps at pool scale (the ECOS round's steps 1, 2 and 4; docs/sampling.md).

A synthetic pool of unit-norm features drawn from a mixture of blobs is clustered with
spherical k-means; a simulated device holding samples from a few of the blobs sends noisy
coverage counts; the ECOS sampler then picks the budget. Each stage is timed; the JSON keeps
the machine description next to the numbers so they can be compared across machines.

    python benchmarks/bench_kmeans_sampling.py            # 1M x 64, K = 256, budget 1000
    python benchmarks/bench_kmeans_sampling.py --points 100000 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.pool.clustering import spherical_kmeans  # noqa: E402
from cloud.sampling import PoolView, ScoreSet, get_sampler  # noqa: E402
from device_sdk.fsutil import atomic_write_text  # noqa: E402

T = TypeVar("T")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="pool size N")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension d")
    parser.add_argument("--blobs", type=int, default=300, help="mixture components of the synthetic pool")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.15,
        help="per-coordinate noise around a blob centre (0.15: blobs overlap, so all Lloyd rounds run)",
    )
    parser.add_argument("--k", type=int, default=256, help="k-means clusters K")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd rounds")
    parser.add_argument("--device-blobs", type=int, default=10, help="blobs the simulated device's data comes from")
    parser.add_argument("--device-points", type=int, default=5000, help="samples on the simulated device")
    parser.add_argument(
        "--sigma", type=float, default=8.0, help="Gaussian noise on each count (~epsilon 0.58 at delta 1e-5)"
    )
    parser.add_argument("--budget", type=int, default=1000, help="points ECOS selects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/kmeans_sampling.json")
    parser.add_argument("--docs", default="docs/results/kmeans_sampling.md", help="markdown table")
    return parser.parse_args()


def timed(seconds: Dict[str, Dict[str, float]], stage: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, recording wall and process CPU seconds: CPU well below wall x cores, or
    wall far above CPU, means other processes took the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds["wall"][stage] = round(time.perf_counter() - wall, 3)
    seconds["cpu"][stage] = round(time.process_time() - cpu, 3)
    return result


def unit_rows(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def synthetic_pool(args: argparse.Namespace, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N x d float32, unit rows), the blob of each point, and the blob centres."""
    centres = unit_rows(rng.standard_normal((args.blobs, args.dim), dtype=np.float32))
    blob = rng.integers(0, args.blobs, size=args.points)
    noise = rng.standard_normal((args.points, args.dim), dtype=np.float32)
    noise *= args.spread
    noise += centres[blob]
    return unit_rows(noise), blob, centres


def device_scores(
    args: argparse.Namespace, centres: np.ndarray, centroids: np.ndarray, rng: np.random.Generator
) -> ScoreSet:
    """What one device sends: the count of its samples nearest each centroid, plus noise."""
    blob = rng.integers(0, args.device_blobs, size=args.device_points)
    local = centres[blob] + args.spread * rng.standard_normal((args.device_points, args.dim), dtype=np.float32)
    counts = np.bincount((unit_rows(local) @ centroids.T).argmax(axis=1), minlength=len(centroids))
    return ScoreSet(counts + rng.normal(0.0, args.sigma, size=len(counts)), sigma=args.sigma)


def load_average() -> Optional[float]:
    """1-minute load average: other processes on a small machine skew the timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> Dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas_threads_env": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
        "load_average_1m_at_start": load_average(),
    }


def run(args: argparse.Namespace) -> Dict[str, object]:
    rng = np.random.default_rng(args.seed)
    info = machine()
    seconds: Dict[str, Dict[str, float]] = {"wall": {}, "cpu": {}}
    features, blob, centres = timed(seconds, "generate pool", lambda: synthetic_pool(args, rng))
    clusters = timed(seconds, "spherical k-means", lambda: spherical_kmeans(features, args.k, args.iters, args.seed))
    scores = timed(seconds, "device scores", lambda: device_scores(args, centres, clusters.centroids, rng))
    pool = PoolView(features=features, assign=clusters.assign, centroids=clusters.centroids)
    sampler = get_sampler("ecos")
    picks = timed(seconds, "ecos select", lambda: sampler.select(pool, args.budget, scores, rng))
    plan = sampler.plan(pool, args.budget, scores)
    info["load_average_1m_at_end"] = load_average()
    for kind in seconds.values():
        kind["compress + sample"] = round(kind["spherical k-means"] + kind["ecos select"], 3)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": info,
        "seconds": seconds,
        "kmeans": {
            "iterations": clusters.iterations,
            "converged": clusters.converged,
            "wall_seconds_per_round": round(seconds["wall"]["spherical k-means"] / (clusters.iterations + 1), 3),
            "mean_cosine": round(clusters.mean_cosine, 4),
            "cluster_size_min_max": [int(clusters.sizes.min()), int(clusters.sizes.max())],
        },
        "ecos": {
            "selected": int(len(picks)),
            "clusters_kept": int(plan.kept.sum()),
            "threshold": round(plan.threshold, 3),
            "fallback": plan.fallback,
            "fraction_from_device_blobs": round(float(np.mean(blob[picks] < args.device_blobs)), 4),
            "fraction_of_pool_from_device_blobs": round(float(np.mean(blob < args.device_blobs)), 4),
        },
    }


def table(report: Dict[str, object]) -> str:
    """The short markdown table that goes to docs/results."""
    config, m = report["config"], report["machine"]
    wall, cpu = report["seconds"]["wall"], report["seconds"]["cpu"]
    ecos = report["ecos"]
    lines = [
        "# k-means + ECOS sampling at scale",
        "",
        f"N={config['points']} d={config['dim']} K={config['k']} iters={config['iters']} budget={config['budget']}; "
        f"{m['cpu_count']} CPUs, load average {m['load_average_1m_at_start']} at start. "
        "Command: `python benchmarks/bench_kmeans_sampling.py`.",
        "",
        "| stage | wall s | cpu s |",
        "|---|---|---|",
    ]
    lines += [f"| {stage} | {wall[stage]:.2f} | {cpu[stage]:.2f} |" for stage in wall]
    lines += [
        "",
        f"ecos kept {ecos['clusters_kept']} clusters; {ecos['fraction_from_device_blobs']:.1%} of picks from the "
        f"device's blobs (pool: {ecos['fraction_of_pool_from_device_blobs']:.1%}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    report = run(args)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.docs, table(report))
    print(table(report))
    print(f"wrote {args.out} and {args.docs}")


if __name__ == "__main__":
    main()
