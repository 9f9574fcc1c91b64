"""Helpers every ``ecos-cloud`` command group shares: threads, reading a pool at an input size."""

from __future__ import annotations

import argparse

from cloud.log import LOG
from device_sdk.clikit import positive_int, whole_number  # noqa: F401  (the cloud's commands take them from here)

seed = whole_number(0)  # an argparse type: a random seed (numpy refuses negative ones)


def unit_interval(text: str) -> float:
    """An argparse type: a number from 0 to 1 (a share), else a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a learning rate), else a usage error."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


STREAM_ABOVE_MB = 512  # --stream auto: decode into memory up to this many MB of pixels, else stream from disk


def _pool_data(args: argparse.Namespace):
    """The pool of ``args.pool`` (folder or manifest) at ``--input-size``: decoded in memory or streamed.

    The file list is scanned into files beside ``--out`` and mapped from them (cloud/pool/items.py:
    page cache, not the process's memory, whatever the pool's size; unlinked at once, nothing stays)."""
    import os

    from cloud.pool.dataset import decoded_bytes, default_preprocess, load_image_set, pool_set
    from cloud.pool.manifest import scan_pool

    out = getattr(args, "out", None)
    folder = os.path.dirname(os.path.abspath(out)) if out else None
    items = scan_pool(args.pool, compact=True, folder=folder)  # no Python object per file
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


def _log_streamed_unreadable(data) -> None:
    """Streamed training drops unreadable files from their batches, every epoch: say once which ones
    (the in-memory path says so when it decodes the pool)."""
    from cloud.pool.dataset import ImageSet

    unreadable = getattr(data, "unreadable", None)
    if isinstance(data, ImageSet) or unreadable is None or not unreadable.count:
        return
    reasons = dict(unreadable.examples)  # path -> reason: each file once, however many epochs met it
    more = "+" if len(unreadable.examples) >= unreadable.keep else ""
    LOG.warning(
        "streaming: %d%s unreadable file(s) skipped; first: %s",
        len(reasons),
        more,
        "; ".join(list(reasons.values())[:3]),
    )


def _sample_images(data, n: int, seed: int):
    """Up to ``n`` decoded pool images drawn at random (from memory, or decoded from disk when streaming)."""
    import numpy as np

    from cloud.pool.dataset import ImageSet, decode_batches
    from cloud.pool.items import item_paths

    if isinstance(data, ImageSet):
        return data.images
    pick = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    parts = [images[ok] for _, images, ok in decode_batches(data.preprocess, item_paths(data.items, pick), 256)]
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
