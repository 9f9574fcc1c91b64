"""``ecos-cloud`` train-encoder, index, probe, sample: the offline steps of the pool and the round."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from cloud.cli.common import (
    _add_input_options,
    _log_streamed_unreadable,
    _pool_data,
    _sample_images,
    _threads,
    positive_float,
    positive_int,
    seed,
    unit_interval,
)
from cloud.log import LOG
from cloud.sampling.ecos import EcosSampler
from cloud.training.encoder_config import EncoderConfig
from device_sdk.clikit import add_common
from device_sdk.fsutil import atomic_write_bytes


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from cloud.export.formats import export_onnx
    from cloud.tools.pipeline import encoder_meta
    from cloud.training.encoder import train_encoder
    from device_sdk.errors import UsageError
    from models.encoder import input_size_problem

    problem = input_size_problem(args.input_size)
    if problem:  # before the pool is read, not after it is decoded
        raise UsageError(f"--input-size: the encoder's {problem}")
    _threads(args)
    cfg = EncoderConfig(
        feature_dim=args.feature_dim,
        width=args.width,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        domain_weight=args.domain_weight,
        label_weight=args.label_weight,
        objective=args.objective,
        pixel_weight=args.pixel_weight,
        seed=args.seed,
    )
    data = _pool_data(args)
    LOG.info(
        "training encoder on %d images: %d labels, %d domains", len(data), len(data.label_names), len(data.domain_names)
    )
    encoder, report = train_encoder(data, cfg, workers=args.workers)
    _log_streamed_unreadable(data)
    meta = encoder_meta(cfg, data, report)
    digest = export_onnx(encoder, meta, args.out, output_name="features")
    print(
        f"encoder -> {args.out} (sha256 {digest[:16]}..., {os.path.getsize(args.out)} bytes); held-out 1-NN accuracy: "
        f"label {report['val_label_acc']:.3f}, domain {report['val_domain_acc']:.3f} (nan: the pool has none)"
    )
    if not args.no_tflite:
        from cloud.export.parity import calibration_images, export_encoder_tflite

        tflite = args.tflite or os.path.splitext(args.out)[0] + ".tflite"
        images = calibration_images(
            _sample_images(data, args.parity_images, args.seed), args.parity_images, seed=args.seed
        )
        LOG.info("exporting the encoder to TFLite and checking parity on %d pool images", len(images))
        parity = export_encoder_tflite(encoder, meta, args.out, tflite, images, seed=args.seed)
        print(
            f"encoder -> {tflite} (sha256 {parity.candidate_sha256[:16]}...); parity with the ONNX encoder on "
            f"{parity.n} images: max cosine distance {parity.max_cosine_distance:.1e}, same nearest centroid "
            f"{100 * parity.agreement:.1f}%; probes of indexes built with either accept both"
        )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from cloud.pool.index import build_index

    index = build_index(
        os.path.abspath(args.pool),  # absolute paths in the index and its selections: distill runs from anywhere
        args.encoder,
        k=args.k,
        iters=args.iters,
        seed=args.seed,
        cache_dir=args.cache_dir,
        threads=args.threads or os.cpu_count() or 1,
        workers=args.workers,
    )
    index.save(args.out)
    listing = args.out + ".unreadable.txt"
    if not index.unreadable.count and os.path.exists(listing):
        os.remove(listing)  # an earlier run's list: those files are readable, or gone from the pool, now
    if index.unreadable.count:
        atomic_write_bytes(
            listing,
            "".join(f"{reason}\n" for _, reason in index.unreadable.examples).encode("utf-8", "surrogateescape"),
        )
        print(
            f"{index.unreadable.count} unreadable file(s) left out; the first {len(index.unreadable.examples)} "
            f"-> {listing}"
        )
    probe = index.probe(
        codec=args.codec, max_distance=args.max_distance, radius_quantile=args.radius_quantile or None
    ).to_bytes()
    probe = _signed_probe(probe, args.signing_key)
    atomic_write_bytes(args.probe, probe)
    print(
        f"index -> {args.out} ({len(index.paths)} images, k={index.k}); probe {index.probe_id[:12]} -> {args.probe} "
        f"({len(probe)} bytes)"
    )
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from cloud.pool.index import PoolIndex

    probe = (
        PoolIndex.load(args.index)
        .probe(codec=args.codec, max_distance=args.max_distance, radius_quantile=args.radius_quantile or None)
        .to_bytes()
    )
    probe = _signed_probe(probe, args.signing_key)
    atomic_write_bytes(args.out, probe)
    print(f"probe -> {args.out} ({len(probe)} bytes)")
    return 0


def _signed_probe(payload: bytes, signing_key: Optional[str]) -> bytes:
    """The probe signed with the private key file ``signing_key``; unsigned (with a warning) without one."""
    if not signing_key:
        LOG.warning("probe not signed (no --signing-key): a device with a trust store refuses it")
        return payload
    from cloud.security.keys import SigningKey
    from device_sdk.protocol.round import Probe

    key = SigningKey.load(signing_key)
    LOG.info("probe signed with key %s", key.key_id)
    return Probe.from_bytes(payload).to_bytes(signer=key)


def cmd_sample(args: argparse.Namespace) -> int:
    from cloud.pool.index import PoolIndex
    from cloud.sampling.selection import (
        Plausibility,
        combine_scores,
        composition,
        load_scores,
        select,
        write_selection_csv,
    )

    if args.method == "ecos" and not args.scores:
        from device_sdk.errors import UsageError

        raise UsageError("--method ecos needs --scores: the scores files the devices wrote (random and kcenter do not)")
    index = PoolIndex.load(args.index)
    limits = Plausibility.for_round(args.max_epsilon, args.delta, args.max_samples)
    scores = combine_scores(
        index, load_scores(args.scores or []), radius_quantile=args.radius_quantile or 0.95, limits=limits
    )
    config = (
        {
            "threshold_sigmas": args.threshold_sigmas,
            "oversample": args.oversample,
            "coverage": bool(args.radius_quantile),
            "misfit_diversity": args.misfit_diversity,
        }
        if args.method == "ecos"
        else {}
    )
    picks = select(
        index, args.method, args.budget, scores, seed=args.seed, use_domains=not args.ignore_domains, **config
    )
    write_selection_csv(index, picks, args.out)
    mix = composition(index, picks)
    print(f"{args.method}: selected {len(picks)} of {len(index.paths)} pool images -> {args.out}")
    if set(mix) != {""}:  # a pool without domain folders has nothing to break down
        print("by domain: " + json.dumps(mix))
    return 0


def add_commands(sub) -> None:
    """train-encoder, index, probe, sample."""
    p = sub.add_parser(
        "train-encoder",
        help="train the feature encoder on the pool and export it to ONNX and TFLite",
        description="Train phi on POOL and export it as one ONNX file with its metadata, plus a .json "
        "sidecar with its sha256; then as TFLite (for devices with ai-edge-litert or "
        "tflite-runtime only), admitted only if its features match the ONNX ones on pool "
        "images (parity gate, else exit 13); both sidecars record the other's sha256 so "
        "probes accept either. No labels or domain folders are needed (contrastive "
        "learning on the images); where the pool has them (labels = image parent folders, "
        "domains = the levels above) they are used as extra signal.",
    )
    p.add_argument("pool", help="open-source pool: an image folder, or a CSV/Parquet manifest (path[,label,domain])")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--tflite", help="output .tflite path (default: --out with .tflite)")
    p.add_argument("--no-tflite", action="store_true", help="export ONNX only (probes then accept only that file)")
    p.add_argument(
        "--parity-images",
        type=int,
        default=512,
        help="pool images the TFLite parity gate compares on (default 512): max cosine distance <= 1e-3 "
        "and the same nearest centroid for >= 99%% of them",
    )
    enc = EncoderConfig()
    p.add_argument(
        "--feature-dim", type=int, default=enc.feature_dim, help=f"feature dimension d (default {enc.feature_dim})"
    )
    p.add_argument(
        "--width", type=positive_int, default=enc.width, help=f"channels of the first conv stage (default {enc.width})"
    )
    p.add_argument("--epochs", type=int, default=enc.epochs, help=f"training epochs (default {enc.epochs})")
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop after this many training batches in all, even mid-epoch (default 0: every epoch in full)",
    )
    p.add_argument("--batch-size", type=positive_int, default=enc.batch_size)
    p.add_argument("--lr", type=positive_float, default=enc.lr)
    p.add_argument(
        "--objective",
        choices=("auto", "contrastive", "supervised"),
        default=enc.objective,
        help="auto (default): contrastive learning on the pool's pixels, plus a domain head when the pool "
        "has domain folders (and a label head with --label-weight > 0); contrastive: pixels only; "
        "supervised: the heads only (the first version's encoder; needs labels or domains)",
    )
    p.add_argument(
        "--label-weight",
        type=float,
        default=enc.label_weight,
        help=f"weight of a label head's loss next to the contrastive one (default {enc.label_weight}: "
        "no label head; it blurs the domains ECOS must tell apart, see docs/sampling.md)",
    )
    p.add_argument(
        "--domain-weight",
        type=float,
        default=enc.domain_weight,
        help=f"weight of the domain head's loss (default {enc.domain_weight}; with --objective auto, 0 = no "
        "domain head)",
    )
    p.add_argument(
        "--pixel-weight",
        type=float,
        default=enc.pixel_weight,
        help=f"weight in the cosine of a fixed raw-pixel branch (a PCA of the pool's pixels, half of the feature "
        f"dimensions; default {enc.pixel_weight}; 0 = the learned features alone, see docs/sampling.md)",
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    _add_input_options(p)
    add_common(p)
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser(
        "index",
        help="encode and cluster the pool; write the index and the probe",
        description="Encode POOL with the ONNX encoder (cached), cluster with cosine k-means, write the "
        "index (.npz) and the probe message sent to devices.",
    )
    p.add_argument("pool", help="open-source pool: an image folder, or a CSV/Parquet manifest (path[,label,domain])")
    p.add_argument("--encoder", required=True, help="ONNX encoder from train-encoder")
    p.add_argument("--out", required=True, help="output index (.npz)")
    p.add_argument("--probe", required=True, help="output probe message")
    p.add_argument("--k", type=int, default=64, help="number of centroids K (default 64)")
    p.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--codec",
        choices=("float16", "int8", "float32"),
        default="float16",
        help="centroid compression (default float16)",
    )
    p.add_argument(
        "--max-distance", type=float, default=None, help="devices vote only within this cosine distance of a centroid"
    )
    _add_radius_quantile(p)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache folder (default: no cache); written in shards as it goes, so an interrupted "
        "run resumes where it stopped",
    )
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    _add_signing_key(p)
    add_common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("probe", help="write the probe of an existing index again (e.g. another codec)")
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--codec", choices=("float16", "int8", "float32"), default="float16")
    p.add_argument("--max-distance", type=float, default=None)
    _add_radius_quantile(p)
    _add_signing_key(p)
    add_common(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "sample",
        help="select exactly BUDGET pool images with ecos, random or kcenter",
        description="Select a proxy set from the index. ecos needs one or more --scores files (summed); "
        "random and kcenter ignore them. Writes CSV: path,label,domain,cluster,rank.",
    )
    p.add_argument("--index", required=True)
    p.add_argument("--scores", nargs="*", help="scores messages from devices (ecos)")
    p.add_argument("--method", default="ecos", help="ecos | random | kcenter (default ecos)")
    p.add_argument("--budget", type=int, required=True, help="number of images to select")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--threshold-sigmas", type=float, default=2.0, help="ecos: keep clusters scoring above this many noise sigmas"
    )
    p.add_argument(
        "--oversample", type=float, default=2.0, help="ecos: candidate pool per cluster, as a multiple of its quota"
    )
    p.add_argument(
        "--misfit-diversity",
        type=unit_interval,
        default=EcosSampler.misfit_diversity,
        metavar="M",
        help=f"ecos, pools with domain folders: when the votes fit none of the pool's domains (the device's "
        f"domain is most likely absent), up to this share of the budget goes to a uniform draw "
        f"(default {EcosSampler.misfit_diversity}; 0 = off; docs/sampling.md)",
    )
    p.add_argument(
        "--ignore-domains",
        action="store_true",
        help="ecos: do not use the pool's domain folders (by default, where the pool has two or more, the "
        "votes are spread over each cluster's domains and the draw keeps to the devices' domains when the "
        "votes fit them; docs/sampling.md)",
    )
    p.add_argument(
        "--radius-quantile",
        type=float,
        default=0.95,
        metavar="Q",
        help="ecos: the radius quantile the probe was made with (default 0.95, as `index`); the share of "
        "the devices' samples beyond it that the pool does not explain goes to a uniform draw. "
        "0 = ignore the far counts",
    )
    from cloud.serve.config import RoundConfig  # light (no numpy): the defaults of a daemon's round

    rounds = RoundConfig()
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=rounds.max_epsilon,
        help="refuse scores with less noise than a (max-epsilon, delta)-DP answer needs "
        f"(default {rounds.max_epsilon:g}; inf = any noise, for simulations)",
    )
    p.add_argument(
        "--delta", type=float, default=rounds.delta, help=f"delta of --max-epsilon (default {rounds.delta:g})"
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=rounds.max_samples,
        help="refuse counts that more samples than this per device would be needed to explain, and scale "
        f"each device's counts down to this L1 norm (default {rounds.max_samples:,}; docs/security.md)",
    )
    add_common(p)
    p.set_defaults(func=cmd_sample)


def _add_radius_quantile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--radius-quantile",
        type=float,
        default=0.95,
        metavar="Q",
        help="coverage: each centroid's radius holds this share of its own pool points; devices count "
        "samples outside every radius in one extra far bin, at no extra privacy cost (default 0.95; "
        "0 = no coverage, the first version's probe)",
    )


def _add_signing_key(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--signing-key",
        metavar="PRIVATE_KEY",
        help="sign the probe with this Ed25519 private key (e.g. <state_dir>/keys/cloud_ed25519.pem); "
        "devices with a trust store refuse unsigned probes",
    )
