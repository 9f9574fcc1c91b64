"""How the encoder and K shape ECOS's selection (no classifier training: selection share only).

1. K sweep: with the benchmark's encoder, cluster the pool with K in {16, ..., 256} and report,
   averaged over domains as the device, the share of an ecos selection (epsilon 0.58, delta
   1e-5, budget B) that comes from the device's domain, and the probe's size on the wire.
2. Encoder ablation: the same share (K=64) and held-out 1-NN domain/label accuracy for an
   encoder trained with the label head only vs label + domain heads (the default).

    python benchmarks/bench_encoder_k.py --workdir runs/eval

Writes benchmarks/results/encoder_k.json and docs/results/encoder_k.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.export.formats import export_onnx  # noqa: E402
from cloud.log import LOG, setup_logging  # noqa: E402
from cloud.pool.clustering import spherical_kmeans  # noqa: E402
from cloud.pool.dataset import load_folder  # noqa: E402
from cloud.pool.features import encode_pool  # noqa: E402
from cloud.sampling import PoolView, ScoreSet, get_sampler  # noqa: E402
from cloud.tools.pipeline import encoder_meta  # noqa: E402
from cloud.training.encoder import EncoderConfig, train_encoder  # noqa: E402
from device_sdk.imagefolder import scan_image_folder  # noqa: E402
from device_sdk.privacy.accounting import calibrate_sigma  # noqa: E402
from device_sdk.protocol.round import Probe  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import coverage_counts, encode_items  # noqa: E402


def mean_share(features, domains, device_feats, k, budget, eps, seed=0) -> float:
    km = spherical_kmeans(features, k, iters=20, seed=seed)
    sigma = calibrate_sigma(eps, 1e-5)
    rng = np.random.default_rng(seed)
    pool = PoolView(features=features, assign=km.assign, centroids=km.centroids)
    shares = []
    for domain, feats in device_feats.items():
        noisy = coverage_counts(feats, km.centroids) + rng.normal(0, sigma, k)
        picks = get_sampler("ecos").select(pool, budget, ScoreSet(noisy, sigma), np.random.default_rng(seed))
        shares.append(float(np.mean(domains[picks] == domain)))
    return float(np.mean(shares))


def encode_all(encoder_path, data_root):
    model = load_model(encoder_path, threads=os.cpu_count() or 1)
    items = scan_image_folder(os.path.join(data_root, "pool"))
    feats = encode_pool(model, items)
    domains = np.array([it.domain for it in items])
    device = {
        d: encode_items(model, scan_image_folder(os.path.join(data_root, "devices", d, "local")))
        for d in sorted(set(domains))
    }
    return feats, domains, device


def one_nn(feats, domains, labels, n_val=2000, seed=0):
    perm = np.random.default_rng(seed).permutation(len(feats))
    val, ref = perm[:n_val], perm[n_val : n_val + 8000]
    nn_ = ref[np.argmax(feats[val] @ feats[ref].T, axis=1)]
    return float(np.mean(domains[nn_] == domains[val])), float(np.mean(labels[nn_] == labels[val]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="work folder of benchmarks/eval_sampling.py (data/, encoder.onnx)")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--budget", type=int, default=1000)
    p.add_argument("--epsilon", type=float, default=0.58)
    p.add_argument("--out", default="benchmarks/results/encoder_k.json")
    p.add_argument("--docs", default="docs/results/encoder_k.md")
    args = p.parse_args(argv)
    setup_logging()
    data_root = os.path.join(args.workdir, "data")
    feats, domains, device = encode_all(os.path.join(args.workdir, "encoder.onnx"), data_root)
    labels = np.array([it.label for it in scan_image_folder(os.path.join(data_root, "pool"))])
    res = {"k_sweep": [], "encoders": {}, "budget": args.budget, "epsilon": args.epsilon}
    for k in args.ks:
        share = mean_share(feats, domains, device, k, args.budget, args.epsilon)
        size = len(Probe("x" * 32, "e" * 64, np.ones((k, feats.shape[1]), np.float32)).to_bytes())
        res["k_sweep"].append({"k": k, "share": share, "probe_bytes": size})
        LOG.info("K=%d: share %.3f, probe %d bytes", k, share, size)
    res["encoders"]["label+domain heads"] = {
        "share_k64": mean_share(feats, domains, device, 64, args.budget, args.epsilon),
        **dict(zip(("nn_domain_acc", "nn_label_acc"), one_nn(feats, domains, labels))),
    }
    meta = load_model(os.path.join(args.workdir, "encoder.onnx")).meta
    cfg = EncoderConfig(**{**meta.extra["config"], "domain_weight": 0.0})
    data = load_folder(os.path.join(data_root, "pool"))
    data.domains[:] = -1  # the label-only encoder never sees domains
    encoder, report = train_encoder(data, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "label_only.onnx")
        export_onnx(encoder, encoder_meta(cfg, data, report), path, output_name="features")
        f2, d2, dev2 = encode_all(path, data_root)
    res["encoders"]["label head only"] = {
        "share_k64": mean_share(f2, d2, dev2, 64, args.budget, args.epsilon),
        **dict(zip(("nn_domain_acc", "nn_label_acc"), one_nn(f2, d2, labels))),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [
        "# Encoder and K: what they do to ECOS's selection",
        "",
        f"Command: `python benchmarks/bench_encoder_k.py --workdir {args.workdir}`; ecos at epsilon {args.epsilon}, "
        f"delta 1e-5, budget {args.budget}; share = fraction of the selection from the device's domain, mean over "
        "the six domains.",
        "",
        "| K | share | probe bytes (float16) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['k']} | {r['share']:.3f} | {r['probe_bytes']} |" for r in res["k_sweep"]]
    lines += ["", "| encoder | share (K=64) | held-out 1-NN domain acc | 1-NN label acc |", "|---|---|---|---|"]
    lines += [
        f"| {n} | {v['share_k64']:.3f} | {v['nn_domain_acc']:.3f} | {v['nn_label_acc']:.3f} |"
        for n, v in res["encoders"].items()
    ]
    os.makedirs(os.path.dirname(args.docs), exist_ok=True)
    with open(args.docs, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
