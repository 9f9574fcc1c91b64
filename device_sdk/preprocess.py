"""The one definition of how an image file becomes a model input, shared by cloud and device.

A :class:`Preprocess` says, for one model: the input size and channels, how a picture of another
shape is fitted (``resize``), the resampling filter, whether the EXIF orientation is applied,
whether JPEGs may be decoded at a reduced scale first (``draft``), and the per-channel
normalisation. Every exported artifact records it (``ArtifactMeta.preprocess`` holds the
geometry and decoding keys; size, channels, mean and std are the artifact's ``input_shape``,
``mean`` and ``std``), and both the cloud's loaders and the device's scoring and prediction
decode through :meth:`Preprocess.decode` and :meth:`Preprocess.normalize`: the same file gives
the same tensor on both sides (tests/device/test_preprocess.py checks it).

Policies:

- ``resize="stretch"``: scale to exactly ``size`` (the aspect ratio is not kept; the first
  version's behaviour, what artifacts without a ``preprocess`` entry get).
- ``resize="center-crop"``: scale so that the shorter side fits, then cut the centre (what
  photo models expect; nothing is distorted, the edges of long pictures are lost).
- ``channels``: 3 = RGB, 1 = greyscale (``L``). Any other mode (palette, RGBA, CMYK, 16-bit) is
  converted by Pillow; an alpha channel is dropped.
- ``exif``: turn the picture upright as its EXIF orientation tag says (phone photos).
- ``draft``: let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, never below the
  target size (several times faster on large photos; the resize that follows does the rest).

Only the standard library, numpy and Pillow: the device imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import InputError

RESIZE_POLICIES = ("stretch", "center-crop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
CHANNEL_MODES = {1: "L", 3: "RGB"}
MIN_SIZE, MAX_SIZE = 1, 1 << 14
EXIF_ORIENTATION = 0x0112
# the keys of ArtifactMeta.preprocess, with what an artifact that has none gets (the first version)
LEGACY = {"resize": "stretch", "interpolation": "bilinear", "exif": False, "draft": False}
# what new artifacts get unless told otherwise
DEFAULTS = {"resize": "center-crop", "interpolation": "bilinear", "exif": True, "draft": True}


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image file into a model input (see the module docstring)."""

    size: Tuple[int, int] = (32, 32)  # (height, width)
    channels: int = 3
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.25, 0.25, 0.25)
    resize: str = DEFAULTS["resize"]
    interpolation: str = DEFAULTS["interpolation"]
    exif: bool = DEFAULTS["exif"]
    draft: bool = DEFAULTS["draft"]

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise InputError(f"preprocessing: {problem}")

    # ---- the metadata form ------------------------------------------------------------------

    def policy(self) -> Dict[str, Any]:
        """The keys an artifact stores in ``ArtifactMeta.preprocess``."""
        return {"resize": self.resize, "interpolation": self.interpolation, "exif": self.exif, "draft": self.draft}

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.size[0], self.size[1])

    @classmethod
    def from_meta(
        cls,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        policy: Optional[Dict[str, Any]] = None,
    ) -> "Preprocess":
        """The spec of an artifact; an empty or missing ``policy`` is the first version's (:data:`LEGACY`)."""
        keys = {**LEGACY, **{k: v for k, v in (policy or {}).items() if k in LEGACY}} if policy else dict(LEGACY)
        return cls(
            size=(int(input_shape[1]), int(input_shape[2])),
            channels=int(input_shape[0]),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            **keys,
        )

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> "Preprocess":
        return Preprocess(
            self.size, self.channels, tuple(mean), tuple(std), self.resize, self.interpolation, self.exif, self.draft
        )

    # ---- decoding ------------------------------------------------------------------------------

    def decode(self, path: str, strict: bool = False) -> np.ndarray:
        """One file -> ``H x W x C`` uint8; an unreadable file is an ``InputError`` naming it.

        With ``strict`` a picture of another size or mode is an error instead of being fitted.
        """
        from PIL import Image, UnidentifiedImageError

        mode = CHANNEL_MODES[self.channels]
        try:
            with Image.open(path) as im:
                if strict:
                    _check_strict(path, im, self.size, mode)
                orientation = _orientation(im) if self.exif else 1
                if self.draft and im.format == "JPEG":
                    h, w = self.size if orientation < 5 else self.size[::-1]
                    im.draft(mode if im.mode in ("RGB", "L") else None, (w, h))
                im.load()
                out = im if im.mode == mode else im.convert(mode)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
        if orientation != 1:
            out = _upright(out, orientation)
        out = self._fit(out)
        array = np.asarray(out, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array

    def decode_many(self, paths: Sequence[str], strict: bool = False) -> np.ndarray:
        """Many files -> one ``N x H x W x C`` uint8 array (the first unreadable file raises)."""
        out = np.empty((len(paths), self.size[0], self.size[1], self.channels), dtype=np.uint8)
        for i, p in enumerate(paths):
            out[i] = self.decode(p, strict=strict)
        return out

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, scaled to [0, 1] then standardised per channel."""
        return normalize(images, self.mean, self.std)

    def _fit(self, im):
        from PIL import Image

        h, w = self.size
        if (im.height, im.width) == (h, w):
            return im
        resample = getattr(Image.Resampling, self.interpolation.upper())
        if self.resize == "stretch":
            return im.resize((w, h), resample)
        scale = max(h / im.height, w / im.width)  # the shorter side fits; the longer one is cut
        crop_w, crop_h = w / scale, h / scale
        left, top = (im.width - crop_w) / 2, (im.height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        return im.resize((w, h), resample, box=box)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, scaled to [0, 1] then standardised per channel.

    The float32 arithmetic ``(v / 255 - mean) / std`` is done in place in the NCHW output, a few
    dozen images at a time so that each block stays in the CPU cache: the same bits as the
    per-pixel arithmetic, no float temporaries of the batch's size, about twice as fast as a
    256-entry lookup table (``benchmarks/bench_device_speed.py``).
    """
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4:
        x = images.astype(np.float32) / 255.0
        x = (x - mean32) / std32
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    n, h, w, c = images.shape
    if mean32.size not in (1, c) or std32.size not in (1, c):
        raise InputError(f"{c}-channel images need 1 or {c} mean and std values; got {mean32.size} and {std32.size}")
    m, s = mean32.reshape(1, -1, 1, 1), std32.reshape(1, -1, 1, 1)
    out = np.empty((n, c, h, w), dtype=np.float32)
    step = max(1, _NORMALIZE_BLOCK // max(1, h * w * c))
    for i in range(0, n, step):
        block = out[i : i + step]
        np.divide(images[i : i + step].transpose(0, 3, 1, 2), np.float32(255.0), out=block, dtype=np.float32)
        block -= m
        block /= s
    return out


_NORMALIZE_BLOCK = 1 << 17  # values per block (512 KB of float32): fits a Pi 4's L2 cache (1 MB)


def _check_strict(path: str, im, size: Tuple[int, int], mode: str) -> None:
    if (im.height, im.width) != tuple(size):
        raise InputError(f"{path}: image is {im.width}x{im.height}, model expects {size[1]}x{size[0]}")
    if im.mode != mode:
        raise InputError(f"{path}: image mode is {im.mode}, model expects {mode}")


def _orientation(im) -> int:
    if "exif" not in im.info:  # no EXIF block (most PNGs, many JPEGs): nothing to parse
        return 1
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a readable picture unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(im, orientation: int):
    from PIL import Image

    ops = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_270],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_90],
    }[orientation]
    for op in ops:
        im = im.transpose(op)
    return im


def _problem(p: Preprocess) -> Optional[str]:
    if p.channels not in CHANNEL_MODES:
        return f"channels must be 1 or 3 (got {p.channels!r})"
    if len(p.size) != 2 or not all(isinstance(v, int) and MIN_SIZE <= v <= MAX_SIZE for v in p.size):
        return f"size must be two integers in [{MIN_SIZE}, {MAX_SIZE}] (got {p.size!r})"
    if len(p.mean) != p.channels or len(p.std) != p.channels or not all(s > 0 for s in p.std):
        return f"mean and std must be {p.channels} numbers each, std > 0"
    if p.resize not in RESIZE_POLICIES:
        return f"resize must be one of {', '.join(RESIZE_POLICIES)} (got {p.resize!r})"
    if p.interpolation not in INTERPOLATIONS:
        return f"interpolation must be one of {', '.join(INTERPOLATIONS)} (got {p.interpolation!r})"
    if not isinstance(p.exif, bool) or not isinstance(p.draft, bool):
        return "exif and draft must be true or false"
    return None
