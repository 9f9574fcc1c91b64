"""Read any image folder: the class label is the name of an image's parent folder.

Layout understood (any depth)::

    root/<meta levels...>/<label>/<image>

Folder levels between ``root`` and the label folder are kept as ``domain`` metadata (joined
with ``/``). Images directly inside ``root`` are unlabelled (label ``""``). Files whose
extension is not an image extension are ignored; a file with an image extension that cannot be
decoded is an ``InputError`` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import InputError
from device_sdk.preprocess import LEGACY, Preprocess, normalize  # noqa: F401  (normalize: re-exported)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageItem:
    """One image of a folder: its path as given, its label and the folder levels above it."""

    path: str
    label: str
    domain: str


def scan_image_folder(root: "os.PathLike[str] | str") -> List[ImageItem]:
    """List the images under ``root`` in a stable (sorted) order."""
    items = list(iter_image_folder(root))
    if not items:
        raise no_images_error(root)
    return items


def no_images_error(root: "os.PathLike[str] | str") -> InputError:
    """The error for a folder that holds no image (shared with the cloud's compact scan)."""
    return InputError(f"no images found in {os.fspath(root)} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")


def iter_image_folder(root: "os.PathLike[str] | str") -> Iterator[ImageItem]:
    """The images of :func:`scan_image_folder` one at a time (none is an empty iteration, not an error)."""
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        if os.path.exists(root_s):
            raise InputError(f"{root_s} is a file, not an image folder (give the folder that holds the images)")
        raise InputError(f"image folder not found: {root_s}")
    for dirpath, dirnames, filenames in os.walk(root_s):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root_s)
        parts = [] if rel == "." else Path(rel).parts
        label = parts[-1] if parts else ""
        domain = "/".join(parts[:-1])
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            yield ImageItem(os.path.join(dirpath, name), label, domain)


def load_image(path: str, size: Tuple[int, int], strict: bool = False) -> np.ndarray:
    """Decode one image to an ``H x W x 3`` uint8 RGB array of the given ``(height, width)``.

    The first version's fitting (stretch, no EXIF turn); a model's own rule is
    ``ArtifactMeta.preprocessing()`` (device_sdk/preprocess.py), which this delegates to.
    With ``strict`` an image of another size or mode is an error instead of being resized or converted.
    """
    return _legacy(size).decode(path, strict=strict)


def load_images(
    paths: Sequence[str], size: Tuple[int, int], strict: bool = False, unreadable: Optional[list] = None
) -> np.ndarray:
    """Decode many images into one ``N x H x W x 3`` uint8 array (as :func:`load_image`); the first
    unreadable file raises, or, with an ``unreadable`` list, is skipped and ``(path, reason)`` appended."""
    if unreadable is not None and not strict:
        return _legacy(size).decode_readable(paths, unreadable)[0]
    return _legacy(size).decode_many(paths, strict=strict)


def _legacy(size: Tuple[int, int]) -> Preprocess:
    return Preprocess(size=(int(size[0]), int(size[1])), channels=3, **LEGACY)


def batched(seq: Sequence, batch_size: int) -> Iterator[Tuple[int, Sequence]]:
    """Yield ``(start, chunk)`` pairs over ``seq``."""
    for start in range(0, len(seq), batch_size):
        yield start, seq[start : start + batch_size]
