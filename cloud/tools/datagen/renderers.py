"""Drawing one 32x32 RGB digit in one of six visual domains (the generator's renderers).

Each domain imitates one of the ECOS paper's Digits domains from what every machine has:
scikit-learn's bundled 8x8 handwritten digits, TrueType fonts and procedural drawing. Images are
composed on a 64x64 canvas and averaged down 2x2, which anti-aliases polygons and warped glyphs.
``digits`` writes whole data sets with these.

Over 400 lines on purpose: six domain renderers that share their geometry, colour and glyph
helpers.
"""

from __future__ import annotations

import colorsys
import glob
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from device_sdk.errors import InputError, UsageError

DOMAINS: Tuple[str, ...] = ("handwritten", "printed", "street", "mnistm", "synthetic", "lcd")
LABELS = tuple(range(10))
SIZE = 32
CANVAS = 2 * SIZE
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts")
_GLYPH_HEIGHT = 96


# --------------------------------------------------------------------------- geometry helpers


def _warp_matrix(
    src_center: Tuple[float, float],
    dst_center: Tuple[float, float],
    scale: Tuple[float, float],
    angle_deg: float = 0.0,
    shear: float = 0.0,
    perspective: Tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Forward 3x3 homography: scale, shear, rotate and tilt around ``src_center``, land on ``dst_center``."""
    a = np.deg2rad(angle_deg)
    to_origin = np.array([[1, 0, -src_center[0]], [0, 1, -src_center[1]], [0, 0, 1]], dtype=float)
    scaling = np.diag([scale[0], scale[1], 1.0])
    shearing = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [perspective[0], perspective[1], 1]], dtype=float)
    to_dst = np.array([[1, 0, dst_center[0]], [0, 1, dst_center[1]], [0, 0, 1]], dtype=float)
    return to_dst @ tilt @ rotation @ shearing @ scaling @ to_origin


def _warp(mask: Image.Image, forward: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """Apply a forward homography to an 'L' mask; returns a float ``size x size`` array in [0, 1]."""
    inverse = np.linalg.inv(forward)
    inverse /= inverse[2, 2]
    out = mask.transform((size, size), Image.PERSPECTIVE, tuple(inverse.flatten()[:8]), Image.BICUBIC)
    return np.asarray(out, dtype=np.float32) / 255.0


def _place(
    glyph: Image.Image,
    height: float,
    center: Tuple[float, float],
    angle: float = 0.0,
    shear: float = 0.0,
    aspect: float = 1.0,
    perspective: Tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Warp a tight glyph mask so it is ``height`` canvas pixels tall around ``center``."""
    s = height / glyph.height
    src = (glyph.width / 2.0, glyph.height / 2.0)
    return _warp(glyph, _warp_matrix(src, center, (s * aspect, s), angle, shear, perspective))


def _jitter(rng: np.random.Generator, spread: float) -> Tuple[float, float]:
    """A canvas centre moved by up to ``spread`` pixels in each direction."""
    dx, dy = rng.uniform(-spread, spread, 2)
    return (CANVAS / 2.0 + dx, CANVAS / 2.0 + dy)


# --------------------------------------------------------------------------- colour helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


@lru_cache(maxsize=None)
def _grid(size: int) -> np.ndarray:
    """Pixel coordinates scaled to [-0.5, 0.5], shared by every gradient of that size."""
    return np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5


def _gradient(rng: np.random.Generator, c0: np.ndarray, c1: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """A linear colour ramp from ``c0`` to ``c1`` in a random direction."""
    theta = rng.uniform(0, 2 * np.pi)
    y, x = _grid(size)
    t = np.clip(x * np.cos(theta) + y * np.sin(theta) + 0.5, 0.0, 1.0)[..., None]
    return c0 * (1 - t) + c1 * t


def _smooth_noise(rng: np.random.Generator, cells: int, size: int = CANVAS) -> np.ndarray:
    """Zero-mean colour noise of about ``cells`` blobs across, in [-1, 1]."""
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    fine = Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(fine, dtype=np.float32) / 127.5 - 1.0


def _noise(rng: np.random.Generator, sigma: float, shape: Tuple[int, ...]) -> np.ndarray:
    """Gaussian sensor/paper noise, in float32 to keep the per-image cost low."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _blend(background: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (RGB or an image) over ``background`` with coverage ``mask``."""
    m = mask[..., None]
    return background * (1.0 - m) + colour * m


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float RGB or grey image (values 0-255)."""
    if radius <= 0:
        return image
    mode = "RGB" if image.ndim == 3 else "L"
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode)
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _finish(canvas: np.ndarray) -> np.ndarray:
    """Average the 64x64 canvas down to the 32x32 uint8 RGB output."""
    small = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) * 0.25
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return np.repeat(small[..., None], 3, axis=2) if small.ndim == 2 else small


# --------------------------------------------------------------------------- glyph sources


@lru_cache(maxsize=1)
def _font_paths() -> Tuple[Optional[str], ...]:
    """DejaVu fonts where present, any TrueType font otherwise; ``None`` means Pillow's default."""
    for folder in _FONT_DIRS:
        found = sorted(glob.glob(os.path.join(folder, "**", "*.ttf"), recursive=True))
        # Math fonts map digits oddly and extra-light strokes vanish at 32 px.
        found = [p for p in found if "Math" not in p and "ExtraLight" not in p]
        if found:
            return tuple(found)
    return (None,)


def _bold_fonts() -> Tuple[Optional[str], ...]:
    bold = tuple(p for p in _font_paths() if p and "Bold" in os.path.basename(p))
    return bold or _font_paths()


def _load_font(path: Optional[str], size: int) -> ImageFont.ImageFont:
    if path is not None:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 only has the small bitmap font; _glyph scales it up.
        return ImageFont.load_default()


@lru_cache(maxsize=None)
def _glyph(font: Optional[str], label: int) -> Image.Image:
    """A digit's ink as a tight 'L' mask, ``_GLYPH_HEIGHT`` px tall whatever the font's size."""
    face = _load_font(font, _GLYPH_HEIGHT)
    canvas = Image.new("L", (4 * _GLYPH_HEIGHT, 4 * _GLYPH_HEIGHT), 0)
    ImageDraw.Draw(canvas).text((_GLYPH_HEIGHT, _GLYPH_HEIGHT), str(label), fill=255, font=face)
    ink = canvas.crop(canvas.getbbox())
    width = max(1, round(ink.width * _GLYPH_HEIGHT / ink.height))
    return ink.resize((width, _GLYPH_HEIGHT), Image.BICUBIC)


def _font_glyph(rng: np.random.Generator, label: int, fonts: Sequence[Optional[str]]) -> Image.Image:
    return _glyph(fonts[int(rng.integers(len(fonts)))], label)


def _digits_table() -> np.ndarray:
    """Rows of 64 pixels (0-16) plus the label, as scikit-learn ships them.

    The CSV is read straight from the installed package: importing scikit-learn costs seconds
    in every worker process, reading the file costs milliseconds. ``load_digits`` is the
    fallback should a scikit-learn release move the file.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the handwritten and mnistm domains need scikit-learn's bundled digits: "
            "pip install scikit-learn (an ecos-fleet dependency)"
        )
    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        return np.loadtxt(csv, delimiter=",", dtype=np.float32)
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.column_stack([data.data, data.target]).astype(np.float32)


@lru_cache(maxsize=1)
def _sklearn_digits() -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """scikit-learn's 1797 bundled 8x8 digits (0-16) and, per label, the indices of its images."""
    table = _digits_table()
    target = table[:, -1].astype(np.int64)
    return table[:, :-1].reshape(-1, 8, 8), tuple(np.flatnonzero(target == k) for k in LABELS)


@lru_cache(maxsize=None)
def _handwritten_glyph(index: int) -> Image.Image:
    """One 8x8 scan upsampled and blurred into a smooth ink-density map (80x80 + margin)."""
    images, _ = _sklearn_digits()
    small = Image.fromarray(np.pad(images[index] * (255.0 / 16.0), 1).astype(np.uint8), "L")
    return small.resize((100, 100), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))


# --------------------------------------------------------------------------- domain renderers


def _handwritten_mask(label: int, rng: np.random.Generator) -> np.ndarray:
    """A white-on-black handwritten stroke mask on the 64x64 canvas, in [0, 1].

    The smooth density map is thresholded after the random affine warp: moving the threshold
    makes strokes thinner or bolder, which is where most of the variety comes from.
    """
    _, by_label = _sklearn_digits()
    glyph = _handwritten_glyph(int(rng.choice(by_label[label])))
    density = _place(
        glyph,
        height=rng.uniform(46, 58),
        center=_jitter(rng, 4),
        angle=rng.uniform(-15, 15),
        shear=rng.uniform(-0.25, 0.25),
        aspect=rng.uniform(0.8, 1.15),
    )
    density /= max(float(density.max()), 1e-6)
    threshold, softness = rng.uniform(0.45, 0.7), rng.uniform(0.05, 0.12)
    return np.clip((density - threshold) / softness + 0.5, 0.0, 1.0)


def _render_handwritten(label: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST/USPS-like: grey strokes on black."""
    return _finish(_blur(_handwritten_mask(label, rng) * 255.0, rng.uniform(0.0, 0.8)))


def _render_printed(label: int, rng: np.random.Generator) -> np.ndarray:
    """Scanned-print-like: dark ink on off-white paper, nearly upright, slightly blurred."""
    paper = rng.uniform(205, 250) + rng.uniform(-8, 8, 3)
    ink = rng.uniform(0, 70) + rng.uniform(-10, 10, 3)
    mask = _place(
        _font_glyph(rng, label, _font_paths()),
        height=rng.uniform(34, 50),
        center=_jitter(rng, 5),
        angle=rng.uniform(-6, 6),
        aspect=rng.uniform(0.85, 1.15),
    )
    page = _blend(np.broadcast_to(paper, (CANVAS, CANVAS, 3)), ink, mask)
    page = page + _noise(rng, rng.uniform(1, 5), (CANVAS, CANVAS, 1))
    return _finish(_blur(page, rng.uniform(0.0, 1.0)))


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour whose brightness differs clearly from ``background``'s mean colour."""
    bg = _luma(background.reshape(-1, 3).mean(axis=0))
    value = rng.uniform(0.0, 0.25) if bg > 128 else rng.uniform(0.8, 1.0)
    return _hsv(rng.random(), rng.uniform(0.0, 0.8), value)


def _street_digits(label: int, rng: np.random.Generator) -> np.ndarray:
    """The centred digit plus neighbours cut at the borders, as on a house-number plate."""
    glyph = _font_glyph(rng, label, _bold_fonts())
    height, angle = rng.uniform(38, 56), rng.uniform(-8, 8)
    aspect = rng.uniform(0.75, 1.2)
    cx, cy = _jitter(rng, 3)
    mask = _place(glyph, height, (cx, cy), angle, aspect=aspect)
    half = 0.5 * height * aspect * glyph.width / glyph.height
    for side in (-1, 1):
        if rng.random() < 0.75:
            other = _font_glyph(rng, int(rng.integers(10)), _bold_fonts())
            other_half = 0.5 * height * aspect * other.width / other.height
            x = cx + side * (half + other_half + rng.uniform(1, 6))
            mask = np.maximum(mask, _place(other, height, (x, cy), angle, aspect=aspect))
    return mask


def _render_street(label: int, rng: np.random.Generator) -> np.ndarray:
    """SVHN-like: a photographed plate with uneven light, blur and sensor noise."""
    base = _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.95))
    scene = _gradient(rng, base, base * rng.uniform(0.6, 1.3)) + _smooth_noise(rng, 4) * rng.uniform(5, 30)
    scene = _blend(scene, _contrasting(rng, scene), _street_digits(label, rng))
    scene = _blur(scene, rng.uniform(0.8, 2.2))
    light = _gradient(rng, np.float32(rng.uniform(0.5, 0.9)), np.float32(rng.uniform(1.0, 1.3)))
    scene = scene * light + _noise(rng, rng.uniform(3, 10), scene.shape)
    return _finish(scene)


def _texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A colourful photo-like patch: random coloured plaids over blotchy noise, values 0-255."""
    y, x = _grid(size) + 0.5
    patch = np.broadcast_to(rng.uniform(40, 215, 3).astype(np.float32), (size, size, 3)).copy()
    for _ in range(int(rng.integers(2, 6))):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.5, 4.5), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)
        patch += wave[..., None] * rng.uniform(-50, 50, 3).astype(np.float32)
    patch += _smooth_noise(rng, int(rng.integers(3, 7)), size) * rng.uniform(20, 60)
    patch += _noise(rng, rng.uniform(2, 15), patch.shape)
    return np.clip(patch, 0, 255)


def _render_mnistm(label: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M-like: a handwritten digit that inverts a colour texture where it is drawn."""
    mask = _finish(_handwritten_mask(label, rng) * 255.0).astype(np.float32)
    return np.abs(_texture(rng) - mask).astype(np.uint8)


def _vivid(rng: np.random.Generator, hue: float) -> np.ndarray:
    return _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))


def _render_synthetic(label: int, rng: np.random.Generator) -> np.ndarray:
    """SynthDigits-like: flat saturated colours, outlines or drop shadows, strong tilt, no noise."""
    hue = rng.random()
    bg = _vivid(rng, hue)
    back = bg if rng.random() < 0.5 else _gradient(rng, bg, _vivid(rng, hue + rng.uniform(-0.15, 0.15)))
    fonts = _bold_fonts() if rng.random() < 0.6 else _font_paths()
    mask = _place(
        _font_glyph(rng, label, fonts),
        height=rng.uniform(32, 48),
        center=_jitter(rng, 5),
        angle=rng.uniform(-30, 30),
        shear=rng.uniform(-0.35, 0.35),
        aspect=rng.uniform(0.8, 1.25),
        perspective=tuple(rng.uniform(-0.006, 0.006, 2)),
    )
    fg = _vivid(rng, hue + rng.uniform(0.3, 0.7))
    effect = rng.random()
    if effect < 0.4:
        ring = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)))
        back = _blend(back, _vivid(rng, rng.random()) * rng.uniform(0.0, 1.0), ring.astype(np.float32) / 255.0)
    elif effect < 0.8:
        dx, dy = rng.integers(1, 5, 2)
        shadow = _blur(np.roll(mask, (int(dy), int(dx)), axis=(0, 1)) * 255.0, 1.5) / 255.0
        back = _blend(back, back * 0.25, shadow)
    return _finish(_blend(back, fg, mask))


# Segments a-g of a seven-segment display as (x0, y0, x1, y1) in a box 0.56 wide and 1 tall.
_SEG_W = 0.56
_SEGMENTS = {
    "a": (0, 0, 1, 0),
    "b": (1, 0, 1, 0.5),
    "c": (1, 0.5, 1, 1),
    "d": (0, 1, 1, 1),
    "e": (0, 0.5, 0, 1),
    "f": (0, 0, 0, 0.5),
    "g": (0, 0.5, 1, 0.5),
}
_LIT = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
_LCD_COLOURS = ((255, 40, 30), (60, 255, 90), (255, 170, 20), (40, 220, 255))


def _segment_polygon(seg: str, thick: float) -> np.ndarray:
    """Hexagonal segment outline in display units (x right, y down), inset so segments don't touch."""
    x0, y0, x1, y1 = _SEGMENTS[seg]
    h, gap = thick / 2.0, thick * 0.15
    inner_w = _SEG_W - thick
    p0 = np.array([h + x0 * inner_w, h + y0 * (1 - thick)])
    p1 = np.array([h + x1 * inner_w, h + y1 * (1 - thick)])
    u = (p1 - p0) / np.linalg.norm(p1 - p0)
    n = np.array([-u[1], u[0]])
    return np.array(
        [
            p0 + u * gap,
            p0 + u * (gap + h) + n * h,
            p1 - u * (gap + h) + n * h,
            p1 - u * gap,
            p1 - u * (gap + h) - n * h,
            p0 + u * (gap + h) - n * h,
        ]
    )


def _segments_mask(segments: str, thick: float, height: float, center: Tuple[float, float], slant: float) -> np.ndarray:
    """Draw the named segments, slanted like an italic display, on the canvas."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    for seg in segments:
        poly = _segment_polygon(seg, thick)
        x = center[0] + (poly[:, 0] - _SEG_W / 2 + slant * (0.5 - poly[:, 1])) * height
        y = center[1] + (poly[:, 1] - 0.5) * height
        draw.polygon([(float(a), float(b)) for a, b in zip(x, y)], fill=255)
    return np.asarray(image, dtype=np.float32) / 255.0


def _render_lcd(label: int, rng: np.random.Generator) -> np.ndarray:
    """Seven-segment display: glowing lit segments and faint unlit ones on a dark panel."""
    colour = np.array(_LCD_COLOURS[int(rng.integers(len(_LCD_COLOURS)))], dtype=np.float32) * rng.uniform(0.8, 1.0)
    panel = _gradient(rng, rng.uniform(5, 30, 3).astype(np.float32), rng.uniform(5, 40, 3).astype(np.float32))
    geometry = dict(
        thick=rng.uniform(0.1, 0.17), height=rng.uniform(40, 52), center=_jitter(rng, 4), slant=rng.uniform(0.0, 0.2)
    )
    lit = _segments_mask(_LIT[label], **geometry)
    unlit = _segments_mask("".join(s for s in "abcdefg" if s not in _LIT[label]), **geometry)
    glow = _blur(lit * 255.0, rng.uniform(2, 4)) / 255.0
    display = panel + colour * (unlit * rng.uniform(0.03, 0.08) + glow * rng.uniform(0.3, 0.7))[..., None]
    display = _blend(display, colour, lit) + _noise(rng, 2.0, display.shape)
    return _finish(display)


_RENDERERS = {
    "handwritten": _render_handwritten,
    "printed": _render_printed,
    "street": _render_street,
    "mnistm": _render_mnistm,
    "synthetic": _render_synthetic,
    "lcd": _render_lcd,
}


def check_domains(domains: Sequence[str]) -> Tuple[str, ...]:
    """Validate domain names (order kept, duplicates dropped)."""
    unknown = [d for d in domains if d not in _RENDERERS]
    if unknown:
        raise UsageError(f"unknown domain(s) {', '.join(unknown)}; valid domains: {', '.join(DOMAINS)}")
    if not domains:
        raise UsageError(f"no domain given; valid domains: {', '.join(DOMAINS)}")
    return tuple(dict.fromkeys(domains))


def render(domain: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """One ``32 x 32 x 3`` uint8 RGB image of digit ``label`` in ``domain``."""
    check_domains([domain])
    if label not in LABELS:
        raise UsageError(f"label must be a digit 0-9, got {label!r}")
    return _RENDERERS[domain](int(label), rng)
