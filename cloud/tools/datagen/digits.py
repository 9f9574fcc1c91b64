"""Procedural 32x32 RGB digit images in six visual domains, for the ECOS Digits benchmark.

No data set can be downloaded where ECOS is built and tested, so the multi-domain Digits
benchmark of the ECOS paper (MNIST, USPS, SVHN, SynthDigits, MNIST-M) is imitated here from
what every machine has: scikit-learn's bundled 8x8 handwritten digits, TrueType fonts and
procedural drawing. The domains differ in colour statistics, texture and stroke style, which is
what a domain-aware sampler has to cope with, while the digit itself stays readable.

Every image is drawn from its own random stream keyed by ``(seed, domain, split, index)``, so a
run is reproducible byte for byte and does not depend on the number of worker processes or on
which subset of domains is generated.

Images are composed on a 64x64 canvas and averaged down 2x2, which anti-aliases polygons and
warped glyphs for free.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import numbers
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from cloud.tools.datagen.renderers import CANVAS, DOMAINS, LABELS, SIZE, check_domains, render  # noqa: F401  (re-exported)
from device_sdk.errors import UsageError
from device_sdk.fsutil import atomic_write_text

LOG = logging.getLogger("ecos.datagen")

GENERATOR = "ecos-make-digits"
GENERATOR_VERSION = "1.0"
LAYOUTS = ("flat", "benchmark")
# Hidden so that ``scan_image_folder(out)`` of a flat layout never takes it for an image.
PREVIEW_NAME = ".preview.png"
PREVIEW_ROWS = 2
CHUNK = 200
_SPLIT_KEYS = {"pool": 0, "local": 1, "test": 2}

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- writing data sets


def image_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of chunking, worker count and domain subset."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8")), _SPLIT_KEYS[split], index])


def label_of(index: int) -> int:
    """Labels cycle 0-9 along the index, so any count is balanced to within one image."""
    return index % 10


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive images of one domain and split, written by one worker."""

    domain: str
    split: str
    folder: str
    prefix: str
    seed: int
    start: int
    stop: int


def _write_chunk(chunk: _Chunk) -> Tuple[str, int]:
    """Render and save one chunk (runs in a worker); returns ``(domain, images written)``."""
    for index in range(chunk.start, chunk.stop):
        label = label_of(index)
        image = render(chunk.domain, label, image_rng(chunk.seed, chunk.domain, chunk.split, index))
        path = os.path.join(chunk.folder, str(label), f"{chunk.prefix}_{label}_{index:05d}.png")
        # Level 1: these tiny noisy images barely compress, and level 6 doubles the encode time.
        Image.fromarray(image, "RGB").save(path, format="PNG", compress_level=1)
    return chunk.domain, chunk.stop - chunk.start


def _splits(
    layout: str, domain: str, per_domain: int, device_local: int, device_test: int
) -> List[Tuple[str, str, str, int]]:
    """``(split, folder relative to out, file prefix, count)`` for one domain."""
    if layout == "flat":
        return [("pool", domain, domain, per_domain)]
    device = f"devices/{domain}"
    return [
        ("pool", f"pool/{domain}", f"{domain}_pool", per_domain),
        ("local", f"{device}/local", f"{domain}_local", device_local),
        ("test", f"{device}/test", f"{domain}_test", device_test),
    ]


def _plan(
    out: Path, layout: str, domains: Sequence[str], seed: int, counts: Sequence[int]
) -> Tuple[List[_Chunk], Dict]:
    """Create the label folders and cut the work into chunks; also returns the per-split counts."""
    chunks: List[_Chunk] = []
    table: Dict[str, Dict[str, Dict[str, int]]] = {}
    for domain in domains:
        table[domain] = {}
        for split, rel, prefix, n in _splits(layout, domain, *counts):
            table[domain][split] = {str(k): len(range(k, n, 10)) for k in LABELS}
            for k in LABELS:
                (out / rel / str(k)).mkdir(parents=True, exist_ok=True)
            chunks += [
                _Chunk(domain, split, str(out / rel), prefix, seed, s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)
            ]
    return chunks, table


def _is_earlier_output(out: Path) -> bool:
    try:
        return json.loads((out / "dataset.json").read_text("utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix with existing files: stale images from a bigger run would corrupt the set."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    ours = _is_earlier_output(out)
    if not overwrite or not ours:
        hint = "pass --overwrite to replace it" if ours else "it was not written by ecos-make-digits"
        raise UsageError(f"output folder {out} is not empty ({hint}); choose a new folder")
    for name in ("pool", "devices", "dataset.json", PREVIEW_NAME) + DOMAINS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _count(name: str, value: int, minimum: int = 0) -> int:
    """An integer argument as a plain ``int`` (numpy integers too), or a ``UsageError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _run_chunks(chunks: List[_Chunk], workers: int, progress: Optional[ProgressFn]) -> None:
    """Write every chunk, in worker processes when there is more than one worker."""
    total = sum(c.stop - c.start for c in chunks)
    left = {d: sum(1 for c in chunks if c.domain == d) for d in dict.fromkeys(c.domain for c in chunks)}
    done = 0

    def finished(domain: str, n: int) -> None:
        nonlocal done
        done += n
        left[domain] -= 1
        if left[domain] == 0:
            LOG.info("domain %s: done", domain)
        if progress is not None:
            progress(done, total)

    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            finished(*_write_chunk(chunk))
        return
    with multiprocessing.get_context().Pool(min(workers, len(chunks))) as pool:
        for result in pool.imap_unordered(_write_chunk, chunks):
            finished(*result)


def save_preview(
    path: "os.PathLike[str] | str", domains: Sequence[str], seed: int, rows: int = PREVIEW_ROWS, zoom: int = 3
) -> None:
    """A grid of 10 digit columns by ``rows`` rows per domain: the first pool images of each domain."""
    cell, margin = SIZE * zoom, 100
    sheet = Image.new("RGB", (margin + 10 * cell, len(domains) * rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for d, domain in enumerate(domains):
        draw.text((6, (d * rows + 0.5 * rows) * cell - 6), domain, fill=(0, 0, 0))
        for r in range(rows):
            for k in LABELS:
                index = r * 10 + k
                image = render(domain, label_of(index), image_rng(seed, domain, "pool", index))
                tile = Image.fromarray(image, "RGB").resize((cell, cell), Image.NEAREST)
                sheet.paste(tile, (margin + k * cell, (d * rows + r) * cell))
    sheet.save(path, format="PNG")


def _write_manifest(out: Path, summary: Dict) -> None:
    atomic_write_text(out / "dataset.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


def generate(
    out_dir: "os.PathLike[str] | str",
    per_domain: int = 2000,
    domains: Sequence[str] = DOMAINS,
    seed: int = 0,
    layout: str = "benchmark",
    device_local: int = 300,
    device_test: int = 300,
    workers: int = 1,
    progress: Optional[ProgressFn] = None,
    overwrite: bool = False,
) -> Dict:
    """Write a digits data set under ``out_dir`` and return its summary (also saved as ``dataset.json``).

    ``flat``: ``<out>/<domain>/<label>/<domain>_<label>_<idx>.png``, ``per_domain`` per domain.
    ``benchmark``: the cloud's pool ``<out>/pool/<domain>/<label>/`` and, per domain, one
    simulated device with ``devices/<domain>/local/<label>/`` and ``devices/<domain>/test/<label>/``.
    The flat images are the benchmark's pool images. ``progress(done, total)`` is called after
    every chunk of images. The same seed gives byte-identical files whatever ``workers`` is.
    """
    domains = check_domains([domains] if isinstance(domains, str) else list(domains))
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    per_domain, seed = _count("per-domain", per_domain), _count("seed", seed)
    device_local, device_test = _count("device-local", device_local), _count("device-test", device_test)
    workers = _count("workers", workers, minimum=1)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    started = time.monotonic()
    chunks, table = _plan(out, layout, domains, seed, (per_domain, device_local, device_test))
    summary = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "layout": layout,
        "seed": seed,
        "image_size": [SIZE, SIZE],
        "labels": [str(k) for k in LABELS],
        "domains": list(domains),
        "per_domain": per_domain,
        "device_local": device_local if layout == "benchmark" else 0,
        "device_test": device_test if layout == "benchmark" else 0,
        "counts": table,
        "total_images": sum(c.stop - c.start for c in chunks),
    }
    # Written first as incomplete, so an interrupted run can still be replaced with --overwrite.
    _write_manifest(out, dict(summary, complete=False))
    _run_chunks(chunks, workers, progress)
    save_preview(out / PREVIEW_NAME, domains, seed)
    summary["complete"] = True
    _write_manifest(out, summary)
    LOG.info("wrote %d images to %s in %.1fs", summary["total_images"], out, time.monotonic() - started)
    return dict(summary, out_dir=str(out), preview=str(out / PREVIEW_NAME), seconds=time.monotonic() - started)
