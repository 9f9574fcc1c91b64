"""``ecos-cloud``: the cloud's side of ECOS from the command line (offline mode).

    ecos-cloud train-encoder POOL --out encoder.onnx
    ecos-cloud index POOL --encoder encoder.onnx --out pool.index.npz --probe round.probe
    ecos-cloud sample --index pool.index.npz --scores dev1.scores [...] --method ecos --budget 1000 --out sel.csv
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from device_sdk.clikit import add_common, run_cli, setup_logging
from device_sdk.fsutil import atomic_write_bytes

from .log import LOG


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from .dataset import load_folder
    from .encoder_train import EncoderConfig, train_encoder
    from .export import export_onnx
    from .pipeline import encoder_meta

    _threads(args)
    cfg = EncoderConfig(feature_dim=args.feature_dim, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, domain_weight=args.domain_weight, seed=args.seed)
    data = load_folder(args.pool)
    LOG.info("training encoder on %d images: %d labels, %d domains", len(data.images), len(data.label_names), len(data.domain_names))
    encoder, report = train_encoder(data, cfg)
    digest = export_onnx(encoder, encoder_meta(cfg, data, report), args.out, output_name="features")
    print(f"encoder -> {args.out} (sha256 {digest[:16]}..., {os.path.getsize(args.out)} bytes); held-out 1-NN accuracy: "
          f"label {report['val_label_acc']:.3f}, domain {report['val_domain_acc']:.3f}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .index import build_index

    index = build_index(args.pool, args.encoder, k=args.k, iters=args.iters, seed=args.seed,
                        cache_dir=args.cache_dir, threads=args.threads or os.cpu_count() or 1)
    index.save(args.out)
    probe = index.probe(codec=args.codec, max_distance=args.max_distance).to_bytes()
    atomic_write_bytes(args.probe, probe)
    print(f"index -> {args.out} ({len(index.paths)} images, k={index.k}); probe {index.probe_id[:12]} -> {args.probe} ({len(probe)} bytes)")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .index import PoolIndex

    probe = PoolIndex.load(args.index).probe(codec=args.codec, max_distance=args.max_distance).to_bytes()
    atomic_write_bytes(args.out, probe)
    print(f"probe -> {args.out} ({len(probe)} bytes)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .index import PoolIndex
    from .selection import combine_scores, composition, load_scores, select, write_selection_csv

    index = PoolIndex.load(args.index)
    scores = combine_scores(index, load_scores(args.scores or []))
    config = {"threshold_sigmas": args.threshold_sigmas, "oversample": args.oversample} if args.method == "ecos" else {}
    picks = select(index, args.method, args.budget, scores, seed=args.seed, **config)
    write_selection_csv(index, picks, args.out)
    mix = composition(index, picks)
    print(f"{args.method}: selected {len(picks)} of {len(index.paths)} pool images -> {args.out}")
    print("by domain: " + json.dumps(mix))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecos-cloud", description="ECOS cloud side: encoder, pool index and probe, proxy-set sampling.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("train-encoder", help="train the feature encoder on the labelled pool and export it to ONNX",
                       description="Train phi on POOL (labels = image parent folders, domains = the levels above) and export "
                                   "it as one ONNX file with its metadata, plus a .json sidecar with its sha256.")
    p.add_argument("pool", help="open-source pool image folder")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--feature-dim", type=int, default=64, help="feature dimension d (default 64)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv stage (default 32)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--domain-weight", type=float, default=1.0, help="weight of the domain head's loss (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    add_common(p)
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("index", help="encode and cluster the pool; write the index and the probe",
                       description="Encode POOL with the ONNX encoder (cached), cluster with cosine k-means, write the "
                                   "index (.npz) and the probe message sent to devices.")
    p.add_argument("pool", help="open-source pool image folder")
    p.add_argument("--encoder", required=True, help="ONNX encoder from train-encoder")
    p.add_argument("--out", required=True, help="output index (.npz)")
    p.add_argument("--probe", required=True, help="output probe message")
    p.add_argument("--k", type=int, default=64, help="number of centroids K (default 64)")
    p.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", choices=("float16", "int8", "float32"), default="float16", help="centroid compression (default float16)")
    p.add_argument("--max-distance", type=float, default=None, help="devices vote only within this cosine distance of a centroid")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: no cache)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    add_common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("probe", help="write the probe of an existing index again (e.g. another codec)")
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--codec", choices=("float16", "int8", "float32"), default="float16")
    p.add_argument("--max-distance", type=float, default=None)
    add_common(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sample", help="select exactly BUDGET pool images with ecos, random or kcenter",
                       description="Select a proxy set from the index. ecos needs one or more --scores files (summed); "
                                   "random and kcenter ignore them. Writes CSV: path,label,domain,cluster,rank.")
    p.add_argument("--index", required=True)
    p.add_argument("--scores", nargs="*", help="scores messages from devices (ecos)")
    p.add_argument("--method", default="ecos", help="ecos | random | kcenter (default ecos)")
    p.add_argument("--budget", type=int, required=True, help="number of images to select")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold-sigmas", type=float, default=2.0, help="ecos: keep clusters scoring above this many noise sigmas")
    p.add_argument("--oversample", type=float, default=2.0, help="ecos: candidate pool per cluster, as a multiple of its quota")
    add_common(p)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(build_parser(), argv, lambda a: setup_logging(a.verbose, a.quiet))


if __name__ == "__main__":
    raise SystemExit(main())
