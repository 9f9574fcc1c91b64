"""``ecos-cloud``: the cloud's side of ECOS from the command line (offline mode).

    ecos-cloud train-encoder POOL --out encoder.onnx     (and encoder.tflite, parity-checked)
    ecos-cloud index POOL --encoder encoder.onnx --out pool.index.npz --probe round.probe
    ecos-cloud sample --index pool.index.npz --scores dev1.scores [...] --method ecos --budget 1000 --out sel.csv
    ecos-cloud train-teacher POOL --out teacher.safetensors
    ecos-cloud distill --selection sel.csv --teacher teacher.safetensors --out-dir student/ [--eval FOLDER]
    ecos-cloud export student/student.safetensors --selection sel.csv --out-dir student/

and the daemon (online mode, over MQTT; see docs/operations.md):

    ecos-cloud serve --config cloud.toml
    ecos-cloud round --config cloud.toml DEVICE [DEVICE ...] [--fleet] [--wait SECONDS]
    ecos-cloud status --config cloud.toml
    ecos-cloud keys show|next|promote|update|revoke [KEY_ID] --config cloud.toml   (signing keys, docs/security.md)

and the broker's security (TLS, one identity per device, topic ACL; see cloud/security/brokerconf.py):

    ecos-cloud broker-config --dir ecos-broker --mode certificate --hostname broker.example.com
    ecos-cloud enroll DEVICE_ID --dir ecos-broker [--rotate | --revoke]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

from cloud.labelling.cli import add_commands as add_labelling_commands
from cloud.log import LOG
from cloud.security.brokerconf import add_commands as add_broker_commands
from cloud.training.encoder_config import EncoderConfig
from device_sdk.clikit import add_common, run_cli, setup_logging
from device_sdk.fsutil import atomic_write_bytes


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


STREAM_ABOVE_MB = 512  # --stream auto: decode into memory up to this many MB of pixels, else stream from disk


def _pool_data(args: argparse.Namespace):
    """The pool of ``args.pool`` (folder or manifest) at ``--input-size``: decoded in memory or streamed."""
    from cloud.pool.dataset import decoded_bytes, default_preprocess, load_image_set, pool_set
    from cloud.pool.manifest import scan_pool

    items = scan_pool(args.pool)
    spec = default_preprocess((args.input_size, args.input_size), args.channels, resize=args.resize)
    size_mb = decoded_bytes(len(items), spec) / 2**20
    if args.stream == "on" or (args.stream == "auto" and size_mb > STREAM_ABOVE_MB):
        LOG.info(
            "streaming %d images from disk at %dx%d (%.0f MB decoded would not be held)",
            len(items),
            args.input_size,
            args.input_size,
            size_mb,
        )
        return pool_set(items, spec)
    return load_image_set(items, preprocess=spec, workers=args.workers)


def _sample_images(data, n: int, seed: int):
    """Up to ``n`` decoded pool images drawn at random (from memory, or decoded from disk when streaming)."""
    import numpy as np

    from cloud.pool.dataset import ImageSet, decode_batches

    if isinstance(data, ImageSet):
        return data.images
    pick = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    parts = [images[ok] for _, images, ok in decode_batches(data.preprocess, [data.items[i].path for i in pick], 256)]
    return np.concatenate(parts)


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-size",
        type=int,
        default=32,
        metavar="PIXELS",
        help="model input height and width (default 32; 32 to 224, a multiple of 32 for conv_encoder); "
        "recorded in the artifact, the device decodes to it",
    )
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 = RGB (default), 1 = greyscale")
    p.add_argument(
        "--resize",
        choices=("center-crop", "stretch"),
        default="center-crop",
        help="how a picture of another shape is fitted: scale the shorter side and cut the centre "
        "(default), or stretch to the square (device_sdk/preprocess.py)",
    )
    p.add_argument(
        "--stream",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"stream images from disk each epoch instead of decoding the pool into memory (auto: when "
        f"the decoded pool would exceed {STREAM_ABOVE_MB} MB)",
    )
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from cloud.export.formats import export_onnx
    from cloud.tools.pipeline import encoder_meta
    from cloud.training.encoder import train_encoder

    _threads(args)
    cfg = EncoderConfig(
        feature_dim=args.feature_dim,
        width=args.width,
        epochs=args.epochs,
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
        args.pool,
        args.encoder,
        k=args.k,
        iters=args.iters,
        seed=args.seed,
        cache_dir=args.cache_dir,
        threads=args.threads or os.cpu_count() or 1,
        workers=args.workers,
    )
    index.save(args.out)
    if index.unreadable.count:
        listing = args.out + ".unreadable.txt"
        atomic_write_bytes(listing, "".join(f"{reason}\n" for _, reason in index.unreadable.examples).encode())
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
        }
        if args.method == "ecos"
        else {}
    )
    picks = select(index, args.method, args.budget, scores, seed=args.seed, **config)
    write_selection_csv(index, picks, args.out)
    mix = composition(index, picks)
    print(f"{args.method}: selected {len(picks)} of {len(index.paths)} pool images -> {args.out}")
    print("by domain: " + json.dumps(mix))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecos-cloud",
        description=(
            "ECOS cloud side: encoder, pool index and probe, proxy-set sampling, teacher/student training "
            "and export, and the MQTT daemon."
        ),
    )
    sub = parser.add_subparsers(metavar="COMMAND")

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
        "--width", type=int, default=enc.width, help=f"channels of the first conv stage (default {enc.width})"
    )
    p.add_argument("--epochs", type=int, default=enc.epochs, help=f"training epochs (default {enc.epochs})")
    p.add_argument("--batch-size", type=int, default=enc.batch_size)
    p.add_argument("--lr", type=float, default=enc.lr)
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
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--codec",
        choices=("float16", "int8", "float32"),
        default="float16",
        help="centroid compression (default float16)",
    )
    p.add_argument(
        "--max-distance", type=float, default=None, help="devices vote only within this cosine distance of a centroid"
    )
    p.add_argument(
        "--radius-quantile",
        type=float,
        default=0.95,
        metavar="Q",
        help="coverage: each centroid's radius holds this share of its own pool points; devices count "
        "samples outside every radius in one extra far bin, at no extra privacy cost (default 0.95; "
        "0 = no coverage, the first version's probe)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache folder (default: no cache); written in shards as it goes, so an interrupted "
        "run resumes where it stopped",
    )
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    p.add_argument(
        "--signing-key",
        metavar="PRIVATE_KEY",
        help="sign the probe with this Ed25519 private key (e.g. <state_dir>/keys/cloud_ed25519.pem); "
        "devices with a trust store refuse unsigned probes",
    )
    add_common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("probe", help="write the probe of an existing index again (e.g. another codec)")
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--codec", choices=("float16", "int8", "float32"), default="float16")
    p.add_argument("--max-distance", type=float, default=None)
    p.add_argument(
        "--radius-quantile",
        type=float,
        default=0.95,
        metavar="Q",
        help="coverage: each centroid's radius holds this share of its own pool points; devices count "
        "samples outside every radius in one extra far bin, at no extra privacy cost (default 0.95; "
        "0 = no coverage, the first version's probe)",
    )
    p.add_argument(
        "--signing-key",
        metavar="PRIVATE_KEY",
        help="sign the probe with this Ed25519 private key (e.g. <state_dir>/keys/cloud_ed25519.pem); "
        "devices with a trust store refuse unsigned probes",
    )
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold-sigmas", type=float, default=2.0, help="ecos: keep clusters scoring above this many noise sigmas"
    )
    p.add_argument(
        "--oversample", type=float, default=2.0, help="ecos: candidate pool per cluster, as a multiple of its quota"
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
    _add_daemon_commands(sub)
    _add_model_commands(sub)
    _add_key_commands(sub)
    add_broker_commands(sub, add_common)
    add_labelling_commands(sub, add_common)
    return parser


# ---- the daemon: serve, submit a round, show state ----------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from cloud.serve.config import load_config
    from cloud.serve.daemon import build_daemon
    from cloud.serve.eventlog import setup_structured_logging

    cfg = load_config(args.config)
    setup_structured_logging(cfg.log_format, args.verbose, args.quiet)
    daemon = build_daemon(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    daemon.serve_forever()
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from cloud.pool.index import PoolIndex
    from cloud.serve.config import load_config, require_index
    from cloud.serve.daemon import create_round
    from cloud.serve.store import open_store

    cfg = load_config(args.config)
    store = open_store(cfg.store.database)
    r = create_round(
        store,
        cfg,
        PoolIndex.load(require_index(cfg)),
        args.devices,
        args.fleet,
        budget=args.budget,
        method=args.method,
        collect_seconds=args.collect_seconds,
        task=args.task,
        labels=[v.strip() for v in args.labels.split(",") if v.strip()] if args.labels else None,
    )
    print(f"round {r.round_id} ({r.kind}: {', '.join(r.devices)}) queued; the daemon picks it up within a second")
    if not args.wait:
        return 0
    end = time.monotonic() + args.wait
    while not r.state.terminal and time.monotonic() < end:
        time.sleep(0.5)
        r = store.get_round(r.round_id)
    print(_round_line(r))
    return 0 if r.state.value == "done" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from cloud.serve.config import load_config
    from cloud.serve.store import open_store

    store = open_store(load_config(args.config).store.database)
    rounds, devices = store.list_rounds()[-args.last :], store.list_devices()
    if args.json:
        print(
            json.dumps(
                {
                    "rounds": [dict(r.__dict__, state=r.state.value) for r in rounds],
                    "devices": [d.__dict__ for d in devices],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    for d in devices:
        print(f"device {d.device_id:<24} {d.state:<8} model={json.dumps(d.model)}")
    for r in rounds:
        print(_round_line(r))
    return 0


def _round_line(r) -> str:
    detail = r.error or ", ".join(
        f"{dev}: {x.get('state')} acc={x.get('accuracy')}" for dev, x in r.result.get("deliveries", {}).items()
    )
    return f"round {r.round_id} {r.kind:<6} {r.state.value:<10} devices={','.join(r.devices)} {detail}"


def _add_daemon_commands(sub) -> None:
    config_help = "cloud.toml (see docs/operations.md; ECOS_CLOUD_* variables override it)"
    p = sub.add_parser(
        "serve",
        help="run the daemon: MQTT rounds, training, signed delivery, metrics",
        description="Connect to the broker, resume unfinished rounds from the state database, run new "
        "ones (submitted with 'ecos-cloud round'), serve Prometheus metrics. SIGTERM stops it.",
    )
    p.add_argument("--config", help=config_help)
    add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "round",
        help="queue a round for the daemon (one device, or a fleet with --fleet)",
        description="Write a new round into the daemon's state database; the running daemon probes the "
        "devices, samples, trains and delivers. Options default to [rounds] of the config.",
    )
    p.add_argument("devices", nargs="+", metavar="DEVICE", help="device id(s)")
    p.add_argument("--config", help=config_help)
    p.add_argument("--fleet", action="store_true", help="one model for all DEVICEs from their summed scores")
    p.add_argument("--budget", type=int, help="images to select from the pool")
    p.add_argument("--method", help="ecos | random | kcenter (random and kcenter do not ask the devices)")
    p.add_argument("--collect-seconds", type=float, help="deadline for the devices' answers")
    p.add_argument(
        "--task",
        choices=("compression", "manual"),
        help="manual: selective manual labelling; the round waits in 'labelling' until 'ecos-cloud round-labels' "
        "imports the proxy set's labels (needs --labels and a [trainer] named semisup; docs/tasks.md)",
    )
    p.add_argument("--labels", help="manual: comma-separated label names the labellers choose from")
    p.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait for the round to finish; exit 1 if it fails"
    )
    add_common(p)
    p.set_defaults(func=cmd_round)

    p = sub.add_parser("status", help="show devices and recent rounds from the daemon's state database")
    p.add_argument("--config", help=config_help)
    p.add_argument("--last", type=int, default=20, help="rounds to show (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_status)


# ---- models: teacher, distillation, int8 export (docs/models.md) ----------------------------------


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
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
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
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
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
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"(default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="held out for the per-epoch validation log (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0)
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


# ---- signing keys: rotation and revocation (docs/security.md) ------------------------------------


def _keyring(args: argparse.Namespace, create: bool = False):
    from cloud.security.keys import KeyRing
    from cloud.serve.config import load_config

    keys_dir = args.keys_dir or load_config(args.config).store.key_dir
    return KeyRing(keys_dir, create=create)


def _print_ring(ring, as_json: bool = False) -> None:
    info = ring.describe()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>18}: {', '.join(value) if isinstance(value, list) else value}")


def cmd_keys(args: argparse.Namespace) -> int:
    action = args.action
    if action == "revoke" and not args.key_id:
        from device_sdk.errors import UsageError

        raise UsageError("keys revoke needs the KEY_ID to revoke")
    ring = _keyring(args, create=action in ("show", "next"))
    if action == "next":
        key = ring.new_next()
        print(
            f"next key {key.key_id}: {ring.next_public_key_path}. Devices learn it from the key update the daemon "
            "sends before each probe (restart the daemon), or from 'ecos-cloud keys update --out FILE'. Promote it "
            "once every device lists it in its status."
        )
    elif action == "promote":
        old = ring.current.key_id
        key = ring.promote()
        print(
            f"{key.key_id} is now the current key (restart the daemon to sign with it); {old} is retired under "
            f"{ring.directory / 'retired'}. Revoke {old} once no delivery signed with it is in flight."
        )
    elif action == "revoke":
        ring.revoke(args.key_id)
        print(f"{args.key_id} revoked (serial {ring.serial}); devices refuse it once they have the next key update")
    elif action == "update":
        update = ring.key_update()
        if update is None:
            print("nothing to send: no next key and no revocation yet (serial 0)")
            return 0
        if not args.out:
            from device_sdk.errors import UsageError

            raise UsageError(
                "keys update needs --out FILE (apply it with 'ecos-device keys --config device.toml --apply FILE')"
            )
        payload = update.to_bytes()
        atomic_write_bytes(args.out, payload)
        print(
            f"key update {update.serial} (keys {', '.join(k['key_id'] for k in update.keys)}; revoked "
            f"{', '.join(update.revoked) or 'none'}; signed by {update.key_id}) -> {args.out} ({len(payload)} bytes)"
        )
        return 0
    _print_ring(ring, args.json)
    return 0


def _add_key_commands(sub) -> None:
    p = sub.add_parser(
        "keys",
        help="the signing keys: show, make the next one, promote it, revoke, write a key update",
        description="show: the current and next key ids, revocations. next: make the next key pair "
        "(a rotation's first step). promote: the next key becomes the current one. revoke "
        "KEY_ID: devices refuse that key once they have the next key update. update --out "
        "FILE: the signed key update for 'ecos-device keys --apply' (the daemon sends it "
        "before every probe by itself). See docs/security.md for the whole procedure.",
    )
    p.add_argument("action", choices=("show", "next", "promote", "revoke", "update"))
    p.add_argument("key_id", nargs="?", metavar="KEY_ID", help="revoke: the key id to revoke")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="cloud.toml: the keys live in its [store] keys_dir (default <state_dir>/keys)")
    where.add_argument("--keys-dir", help="the keys folder itself")
    p.add_argument("--out", help="update: where to write the key update message")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_keys)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(build_parser(), argv, lambda a: setup_logging(a.verbose, a.quiet))


if __name__ == "__main__":
    raise SystemExit(main())
