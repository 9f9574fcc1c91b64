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

Decoding speed: :meth:`Preprocess.decode_batch` (what ``decode_many`` and the cloud's pool indexing
use) reads each file at once, decodes JPEGs with simplejpeg (libjpeg-turbo, without the GIL) when
that optional package is installed, and fits a batch of same-sized pictures with two Pillow resize
calls instead of one per picture. Both shortcuts are used only where they give Pillow's exact bytes:
simplejpeg only for plain JPEGs (YCbCr or greyscale, no EXIF block when ``exif`` is on, not MPO) at
the scale Pillow's ``draft`` would pick, anything else or any warning goes to Pillow; each process
checks simplejpeg against Pillow once on pictures it makes (:func:`fast_paths`), and the batched
fit against Pillow's own once per geometry. ``ECOS_JPEG_DECODER=pillow`` turns both off. Per 48x48
JPEG fitted to 32x32 on one core: about 0.10 ms through Pillow alone, 0.04 to 0.05 ms this way
(docs/results/index_scale.md).

Only the standard library, numpy and Pillow (simplejpeg optional): the device imports this.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
        if not strict and fast_paths().jpeg:
            array = self._decode_fast(path)
            if array is not None:
                return self._fit_one(array)
        return self._decode_pillow(path, strict)

    def decode_many(self, paths: Sequence[str], strict: bool = False) -> np.ndarray:
        """Many files -> one ``N x H x W x C`` uint8 array (the first unreadable file raises)."""
        if strict:
            out = np.empty((len(paths), self.size[0], self.size[1], self.channels), dtype=np.uint8)
            for i, p in enumerate(paths):
                out[i] = self.decode(p, strict=True)
            return out
        images, _, failed = self.decode_batch(paths)
        if failed:
            raise InputError(failed[0][1])
        return images

    def decode_readable(self, paths: Sequence[str], unreadable: List[Tuple[str, str]]) -> Tuple[np.ndarray, np.ndarray]:
        """Many files -> ``(images, ok)``: the readable files' images only, and which of ``paths`` they
        are; each unreadable file is skipped and its ``(path, reason)`` appended to ``unreadable``."""
        images, ok, failed = self.decode_batch(paths)
        unreadable.extend((paths[i], reason) for i, reason in sorted(failed))
        return (images if ok.all() else images[ok]), ok

    def decode_batch(self, paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, str]]]:
        """Many files -> ``(images, ok, failed)``: ``N x H x W x C`` uint8, which rows decoded, and
        ``(row, reason)`` of each unreadable file (its row stays zero). Never raises for a bad file.

        The same bytes as :meth:`decode` file by file, faster (see the module docstring): the plain
        JPEGs are read and their headers parsed, then decoded by simplejpeg into one buffer per
        decoded size and fitted together, in rounds of at most ``_ROUND_BYTES`` (file bytes and
        decoded bytes each), so that memory stays bounded whatever the pictures.
        """
        images = np.zeros((len(paths), self.size[0], self.size[1], self.channels), dtype=np.uint8)
        ok = np.zeros(len(paths), dtype=bool)
        failed: List[Tuple[int, str]] = []
        sj = fast_paths().simplejpeg
        bands = 4 if self.channels == 3 else 1  # RGBX: Pillow maps it without a copy
        from PIL import Image

        limit = Image.MAX_IMAGE_PIXELS

        def pillow(i: int) -> None:
            try:
                images[i] = self._decode_pillow(paths[i])
            except InputError as exc:
                failed.append((i, str(exc)))
            else:
                ok[i] = True

        def run(plans: Dict[Tuple[int, int], list]) -> None:
            for shape, members in plans.items():
                buffer = np.empty((len(members), shape[0], shape[1], bands), dtype=np.uint8)
                rows: List[int] = []
                for i, (data, colorspace, options, _) in members:
                    try:
                        out = sj.decode_jpeg(data, colorspace=colorspace, buffer=buffer[len(rows)], **options)
                    except Exception:  # noqa: BLE001 - damaged or unusual: Pillow decides (and names the error)
                        out = None
                    if out is not None and out.shape[:2] == shape:
                        rows.append(i)
                    else:
                        pillow(i)
                if rows:
                    images[rows] = self._fit_many(buffer[: len(rows)])
                    ok[rows] = True
            plans.clear()

        plans: Dict[Tuple[int, int], list] = {}
        held = decoded = 0
        for i, path in enumerate(paths):
            plan = self._jpeg_plan(path, sj, "RGBX", limit) if sj is not None else None
            if plan is None:
                pillow(i)
                continue
            plans.setdefault(plan[3], []).append((i, plan))
            held += len(plan[0])
            decoded += plan[3][0] * plan[3][1] * bands
            if held >= _ROUND_BYTES or decoded >= _ROUND_BYTES:
                run(plans)
                held = decoded = 0
        run(plans)
        return images, ok, failed

    def _decode_pillow(self, path, strict: bool = False) -> np.ndarray:
        """The reference decoding (a path or a binary file object), fitted."""
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
                src = _eight_bit(im) if im.mode.startswith("I;16") else im
                out = src if src.mode == mode else src.convert(mode)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
        if orientation != 1:
            out = _upright(out, orientation)
        out = self._fit(out)
        array = np.asarray(out, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array

    def _decode_fast(self, path: str) -> Optional[np.ndarray]:
        """The file decoded by simplejpeg, not yet fitted (``h x w x C`` uint8) with exactly the bytes
        Pillow gives; ``None`` wherever Pillow must decide."""
        plan = self._jpeg_plan(path, fast_paths().simplejpeg)
        return None if plan is None else self._decode_planned(plan, fast_paths().simplejpeg)

    def _jpeg_plan(self, source, sj, rgb: str = "RGB", limit: Optional[int] = -1):
        """How simplejpeg decodes this file (a path or its bytes) as Pillow would, before fitting:
        ``(data, colorspace, options, (h, w))``; ``None`` wherever Pillow must decide (not a plain
        JPEG, unreadable, or anything Pillow treats its own way). ``rgb`` names the 3-channel output;
        ``limit`` is Pillow's ``MAX_IMAGE_PIXELS`` (-1: look it up)."""
        if limit == -1:
            from PIL import Image

            limit = Image.MAX_IMAGE_PIXELS
        if sj is None:
            return None
        if isinstance(source, bytes):
            data = source
        else:
            try:
                data = _read(source)
            except OSError:
                return None  # Pillow names the error
        if data[:3] != b"\xff\xd8\xff" or b"MPF\x00" in data:  # not a JPEG; MPO: Pillow's own rules
            return None
        if self.exif and b"Exif\x00\x00" in data:  # may carry an orientation: Pillow reads it
            return None
        try:
            h, w, space, _ = sj.decode_jpeg_header(data)
        except Exception:  # noqa: BLE001 - anything odd is Pillow's to judge
            return None
        if space == "Gray":
            colorspace = "GRAY" if self.channels == 1 else rgb  # Pillow: "L", then convert repeats it
        elif space == "YCbCr" and (self.channels == 3 or self.draft):  # draft("L") asks libjpeg for the Y plane
            colorspace = "GRAY" if self.channels == 1 else rgb
        else:  # CMYK, YCCK, RGB-coded, or Pillow's own RGB -> L conversion
            return None
        if limit and h * w > limit:  # Pillow's decompression-bomb warning or error
            return None
        s, options = 1, {}
        if self.draft:  # the scale JpegImageFile.draft picks: 1/8, 1/4 or 1/2 while both sides stay >= the target
            scale = min(w // self.size[1], h // self.size[0])
            s = 8 if scale >= 8 else 4 if scale >= 4 else 2 if scale >= 2 else 1
        if s > 1:
            options = {"min_height": -(-h // s), "min_width": -(-w // s)}
            if _turbojpeg_eighths(h, w, options["min_height"], options["min_width"]) * s != 8:
                return None  # libjpeg-turbo would pick another factor (tiny pictures): Pillow decodes it
        return data, colorspace, options, (-(-h // s), -(-w // s))

    @staticmethod
    def _decode_planned(plan, sj) -> Optional[np.ndarray]:
        data, colorspace, options, shape = plan
        try:
            array = sj.decode_jpeg(data, colorspace=colorspace, **options)  # strict: a warning raises
        except Exception:  # noqa: BLE001 - damaged or unusual: Pillow decides (and names the error)
            return None
        return array if array.shape[:2] == shape else None

    def _fit_one(self, array: np.ndarray) -> np.ndarray:
        """One ``h x w x C`` uint8 picture (C = the model's channels) fitted, through :meth:`_fit`."""
        from PIL import Image

        if array.shape[:2] == tuple(self.size):
            return array
        out = np.asarray(self._fit(Image.fromarray(array[:, :, 0] if self.channels == 1 else array)))
        return out[:, :, None] if out.ndim == 2 else out

    def _fit_many(self, arrays: np.ndarray) -> np.ndarray:
        """``N x h x w x B`` uint8 pictures of one size (B = 1, 3, or 4 for RGBX) fitted: the bytes of
        :meth:`_fit_one` on each, ``N x H x W x C``.

        Pillow resizes in two passes, one along rows and one along columns, with a uint8 picture in
        between; which pass comes first depends on the Pillow version and the geometry. Each pass of
        all N pictures at once (stacked one under the other for the horizontal pass, side by side for
        the vertical one) is the same arithmetic as N calls. The order is found once per geometry by
        comparing both with Pillow's own result on random pictures; where neither matches (or for
        ``nearest``, an affine transform in Pillow) the pictures are fitted one by one.
        """
        n, h, w, bands = arrays.shape
        c = self.channels
        if (h, w) == tuple(self.size):
            return arrays[..., :c]
        order = self._fit_order(h, w, bands) if n > 1 and self.interpolation != "nearest" else None
        if order is None:
            return np.stack([self._fit_one(np.ascontiguousarray(a[..., :c])) for a in arrays])
        return self._fit_passes(arrays, order)[..., :c]

    def _fit_order(self, h: int, w: int, bands: int) -> Optional[str]:
        key = (h, w, bands, self.size, self.channels, self.resize, self.interpolation)
        order = _FIT_ORDER.get(key, "?")
        if order == "?":
            probe = np.random.default_rng(h * 65537 + w).integers(0, 256, (2, h, w, bands), dtype=np.uint8)
            c = self.channels
            reference = np.stack([self._fit_one(np.ascontiguousarray(a[..., :c])) for a in probe])
            order = next(
                (o for o in ("hv", "vh") if np.array_equal(self._fit_passes(probe, o)[..., :c], reference)), None
            )
            if len(_FIT_ORDER) >= 4096:
                _FIT_ORDER.clear()
            _FIT_ORDER[key] = order
        return order

    def _fit_passes(self, arrays: np.ndarray, order: str) -> np.ndarray:
        """Both resize passes over a whole batch, horizontal first (``hv``) or vertical first (``vh``)."""
        from PIL import Image

        n, h, w, bands = arrays.shape
        th, tw = self.size
        resample = getattr(Image.Resampling, self.interpolation.upper())
        left, top, right, bottom = self._box(h, w)
        x = arrays
        for axis in order:
            _, h, w, _ = x.shape
            if axis == "h" and (tw != w or left or right != w):
                im = _pil(x.reshape(n * h, w, bands))  # one under the other: rows stay apart
                out = _array(im.resize((tw, n * h), resample, box=(left, 0, right, n * h)), bands)
                x = out.reshape(n, h, tw, bands)
            elif axis == "v" and (th != h or top or bottom != h):
                im = _pil(np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(h, n * w, bands))  # side by side
                out = _array(im.resize((n * w, th), resample, box=(0, top, n * w, bottom)), bands)
                x = out.reshape(th, n, w, bands).transpose(1, 0, 2, 3)
        return x

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
        return im.resize((w, h), resample, box=self._box(im.height, im.width))

    def _box(self, height: int, width: int) -> Tuple[float, float, float, float]:
        """The source rectangle a ``height x width`` picture is fitted from (all of it, or its centre)."""
        if self.resize == "stretch":
            return (0, 0, width, height)
        h, w = self.size
        scale = max(h / height, w / width)  # the shorter side fits; the longer one is cut
        crop_w, crop_h = w / scale, h / scale
        # clamped: rounding can put an edge a hair outside the picture, which Pillow refuses
        left, top = max(0.0, (width - crop_w) / 2), max(0.0, (height - crop_h) / 2)
        return (left, top, min(width, left + crop_w), min(height, top + crop_h))


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


def _eight_bit(im):
    """A 16-bit grey picture (``I;16``, ``I;16B``, ...) as 8-bit ``L``, scaled by 257 (Pillow's own
    conversion clips at 255, which turns almost every pixel white)."""
    from PIL import Image

    wide = np.asarray(im).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")


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


def _read(path: str) -> bytes:
    """A file's bytes in one go (cheaper than a Python file object for the small files of a pool)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


_ROUND_BYTES = 32 << 20  # file bytes, and decoded bytes, that one decode_batch round holds at most


def _pil(array: np.ndarray):
    """An ``h x w x B`` uint8 array as a Pillow image: L (B=1) and RGBX (B=4) share its memory."""
    from PIL import Image

    h, w, bands = array.shape
    if bands == 3:
        return Image.fromarray(array)
    mode = "L" if bands == 1 else "RGBX"
    return Image.frombuffer(mode, (w, h), np.ascontiguousarray(array), "raw", mode, 0, 1)


def _array(im, bands: int) -> np.ndarray:
    return np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(im.height, im.width, bands)


def _turbojpeg_eighths(h: int, w: int, min_h: int, min_w: int) -> int:
    """The n of the n/8 scale simplejpeg asks libjpeg-turbo for, given these minimum sizes (its own search:
    the smallest of 1/8, 2/8, ... 7/8 that keeps both sides at least that large, else 8/8)."""
    for n in range(1, 8):
        if -(-w * n // 8) >= min_w and -(-h * n // 8) >= min_h:
            return n
    return 8


@dataclass(frozen=True)
class FastPaths:
    """Which decoding shortcuts this process uses (see the module docstring)."""

    simplejpeg: Any = None  # the module, when installed, enabled and giving Pillow's bytes here
    reason: str = ""  # why the JPEG shortcut is off

    @property
    def jpeg(self) -> bool:
        return self.simplejpeg is not None


_FAST: Optional[FastPaths] = None
_FIT_ORDER: Dict[tuple, Optional[str]] = {}  # geometry -> the order of Pillow's resize passes ("hv", "vh", None)
_FAST_LOCK = threading.Lock()
DECODER_ENV = "ECOS_JPEG_DECODER"  # "pillow": no shortcut, Pillow file by file


def fast_paths(refresh: bool = False) -> FastPaths:
    """The shortcuts this process may take, checked once against Pillow on pictures made here."""
    global _FAST
    if _FAST is None or refresh:
        with _FAST_LOCK:
            if _FAST is None or refresh:
                _FAST = _check_fast_paths()
    return _FAST


def _check_fast_paths() -> FastPaths:
    if os.environ.get(DECODER_ENV, "").strip().lower() == "pillow":
        return FastPaths(reason=f"{DECODER_ENV}=pillow")
    try:
        import simplejpeg
    except ImportError:
        return FastPaths(reason="simplejpeg not installed")
    try:
        same = _simplejpeg_matches(simplejpeg)
    except Exception as exc:  # noqa: BLE001 - a shortcut that cannot be checked is not taken
        return FastPaths(reason=f"simplejpeg check failed ({exc.__class__.__name__}: {exc})")
    if not same:
        return FastPaths(reason="simplejpeg does not give Pillow's bytes with these libraries")
    return FastPaths(simplejpeg=simplejpeg)


def _test_jpegs() -> List[bytes]:
    """Small JPEGs of the kinds the shortcut takes: each chroma subsampling, greyscale, progressive,
    odd sizes, and photos large enough for draft scales 1/2, 1/4 and 1/8."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(12)
    out = []
    for (h, w), options in [
        ((37, 45), {"subsampling": 2}),
        ((37, 45), {"subsampling": 1}),
        ((37, 45), {"subsampling": 0}),
        ((41, 30), {"subsampling": 2, "progressive": True}),
        ((150, 203), {"subsampling": 2}),
        ((300, 270), {"subsampling": 2, "quality": 95}),
    ]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
        for mode in ("RGB", "L"):
            buf = io.BytesIO()
            im.convert(mode).save(buf, "JPEG", **options)
            out.append(buf.getvalue())
    return out


def _simplejpeg_matches(simplejpeg) -> bool:
    """simplejpeg's decoding equals Pillow's for every test picture and a few policies (before fitting)."""
    specs = [
        Preprocess(size=(32, 32), channels=3),
        Preprocess(size=(16, 16), channels=1, mean=(0.5,), std=(0.25,)),
        Preprocess(size=(24, 40), channels=3, draft=False),
        Preprocess(size=(32, 32), channels=1, mean=(0.5,), std=(0.25,), draft=True, exif=False),
    ]
    for data in _test_jpegs():
        for spec in specs:
            plan = spec._jpeg_plan(data, simplejpeg)
            fast = None if plan is None else spec._decode_planned(plan, simplejpeg)
            if fast is None:
                continue
            if not np.array_equal(spec._fit_one(fast), spec._decode_pillow(io.BytesIO(data))):
                return False
            if plan[1] == "RGB":  # what decode_batch asks for: the same values with a fourth byte
                rgbx = simplejpeg.decode_jpeg(data, colorspace="RGBX", **plan[2])
                if not np.array_equal(rgbx[..., :3], fast):
                    return False
    return True


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
