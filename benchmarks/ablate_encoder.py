"""Which encoder lets ECOS find a device's domain in a pool with no domain folders and no labels?

For each encoder variant (training objective and view augmentations, see EncoderConfig), train
on the pool's pixels only (labels and domains hidden), embed the pool, cluster it (K=64), and
measure: held-out-free 1-NN domain accuracy of pool points (3,000 queries), mean domain purity
of the clusters, and the share from the device's own domain of an ECOS selection (B=600, one
noisy answer per device at epsilon 0.58, sigma 6.137) with and without purity weighting. A
raw-pixel PCA baseline (2x2-pooled pixels, 64 components) is included. Single seed: the spread
of the share between seeds is a few points (see eval_pools for seeded results).

    python benchmarks/ablate_encoder.py --data runs/pools-gen/data               # every variant
    python benchmarks/ablate_encoder.py --data runs/pools-gen/data --variants default pca

Writes benchmarks/results/ablate_encoder.json and docs/results/ablate_encoder.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.log import setup_logging  # noqa: E402
from cloud.pool.clustering import spherical_kmeans  # noqa: E402
from cloud.pool.dataset import load_folder, load_image_set  # noqa: E402
from cloud.sampling import PoolView, ScoreSet, get_sampler  # noqa: E402
from cloud.training.encoder_config import EncoderConfig  # noqa: E402
from device_sdk.imagefolder import scan_image_folder  # noqa: E402
from device_sdk.scoring import coverage_counts  # noqa: E402

SIGMA = 6.137  # epsilon 0.58, delta 1e-5, exact Gaussian accountant
OLD = dict(max_zoom=2.0, pixel_weight=0.0)  # the views and features of the first contrastive default
FIRST = dict(max_shift=0.125, min_zoom=0.8, max_zoom=1.15, permute_channels=False, pixel_weight=0.0)  # first try
VARIANTS: Dict[str, Dict] = {
    "contrastive, small views": FIRST,
    "contrastive, small views, T=0.1": {**FIRST, "temperature": 0.1},
    "contrastive, small views, T=0.5": {**FIRST, "temperature": 0.5},
    "contrastive, crops": dict(OLD, permute_channels=False),
    "contrastive, crops, style code 0.3": dict(OLD, permute_channels=False, style_dim=16, style_weight=0.3),
    "contrastive, crops, style code 0.6": dict(OLD, permute_channels=False, style_dim=16, style_weight=0.6),
    "contrastive, crops, channel shuffle, style code 0.3": dict(OLD, style_dim=16, style_weight=0.3),
    "contrastive, crops, channel shuffle": OLD,  # the default before the pixel branch
    "crops, channel shuffle, pixels 0.3": dict(max_zoom=2.0),
    "less zoom (1-1.3), channel shuffle": dict(pixel_weight=0.0),
    "default": {},  # less zoom, channel shuffle, pixel branch 0.3 (32 of the 64 dimensions)
    "default, pixels 0.5": dict(pixel_weight=0.5),
    "pca": None,
}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def featurizer(variant: str, pool, threads: int):
    """A function images -> unit features, trained on the pool with labels and domains hidden."""
    import torch

    from cloud.training.encoder import _to_tensor, embed, train_encoder

    if VARIANTS[variant] is None:

        def pixels(images):
            x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
            return torch.nn.functional.avg_pool2d(x, 2).reshape(len(x), -1).numpy()

        p = pixels(pool.images)
        mean = p.mean(0)
        _, _, vt = np.linalg.svd(p[::3] - mean, full_matrices=False)
        return lambda images: _unit((pixels(images) - mean) @ vt[:64].T), 0.0
    torch.set_num_threads(threads)
    hidden = dataclasses.replace(
        pool, labels=np.full(len(pool.items), -1), label_names=[], domains=np.full(len(pool.items), -1), domain_names=[]
    )
    t0 = time.time()
    encoder, report = train_encoder(hidden, EncoderConfig(**VARIANTS[variant]))
    return lambda images: embed(encoder, _to_tensor(images, report["mean"], report["std"])), time.time() - t0


def measure(variant: str, data_root: str, budget: int, threads: int, seed: int) -> Dict:
    pool = load_folder(os.path.join(data_root, "pool"))
    domains = np.array([it.domain for it in pool.items])
    feat, seconds = featurizer(variant, pool, threads)
    features = feat(pool.images)
    km = spherical_kmeans(features, 64, seed=seed)
    pv = PoolView(features, km.assign.astype(np.int32), km.centroids.astype(np.float32))
    queries = np.random.default_rng(seed).choice(len(features), 3000, replace=False)
    sim = features[queries] @ features.T
    sim[np.arange(len(queries)), queries] = -9.0
    knn = float(np.mean(domains[sim.argmax(1)] == domains[queries]))
    purity = float(
        np.mean(
            [
                np.unique(domains[km.assign == k], return_counts=True)[1].max() / (km.assign == k).sum()
                for k in range(64)
                if (km.assign == k).any()
            ]
        )
    )
    rng = np.random.default_rng(seed)
    shares: Dict[str, Dict[str, float]] = {"purity weighted": {}, "score only": {}}
    for d in sorted(os.listdir(os.path.join(data_root, "devices"))):
        local = load_image_set(scan_image_folder(os.path.join(data_root, "devices", d, "local")))
        noisy = coverage_counts(feat(local.images), pv.centroids) + rng.normal(0, SIGMA, 64)
        for name, power in (("purity weighted", 2.0), ("score only", 0.0)):
            picks = get_sampler("ecos", purity_power=power).select(
                pv, budget, ScoreSet(noisy, SIGMA), np.random.default_rng(seed)
            )
            shares[name][d] = float(np.mean(domains[picks] == d))
    return {
        "variant": variant,
        "config": VARIANTS[variant],
        "budget": budget,
        "train_seconds": seconds,
        "knn_domain_acc": knn,
        "cluster_purity": purity,
        "share": shares,
        "mean_share": {k: float(np.mean(list(v.values()))) for k, v in shares.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a benchmark folder (pool/<domain>/<label>, devices/<domain>/local)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="V")
    p.add_argument("--budget", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output names (e.g. _real for another benchmark)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/ablate_encoder<tag>.json)")
    p.add_argument("--docs", default="docs/results")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the rows of the variants not run from the existing JSON result (same data and budget)",
    )
    args = p.parse_args(argv)
    args.out = args.out or f"benchmarks/results/ablate_encoder{args.tag}.json"
    setup_logging()
    rows: List[Dict] = []
    if args.keep and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        rows = [r for r in old["rows"] if r["variant"] not in args.variants and r.get("budget", 600) == args.budget]
    for v in args.variants:
        rows.append(measure(v, args.data, args.budget, args.threads, args.seed))
        print(json.dumps({k: rows[-1][k] for k in ("variant", "knn_domain_acc", "cluster_purity", "mean_share")}))
    command = " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "command": command}, fh, indent=1)
    lines = [
        "# Encoder ablation: a pool with neither labels nor domain folders",
        "",
        f"`python benchmarks/ablate_encoder.py {command}`; "
        f"B={args.budget}, K=64, epsilon 0.58, seed {args.seed} (one noisy answer per device).",
        "",
        "| encoder | 1-NN domain acc | cluster purity | ECOS share (purity weighted) | ECOS share (score only) | "
        "train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['knn_domain_acc']:.3f} | {r['cluster_purity']:.3f} | "
            f"{r['mean_share']['purity weighted']:.3f} | {r['mean_share']['score only']:.3f} | "
            f"{r['train_seconds']:.0f} |"
        )
    os.makedirs(args.docs, exist_ok=True)
    with open(os.path.join(args.docs, f"ablate_encoder{args.tag}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
