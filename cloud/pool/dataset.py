"""Labelled image folders loaded into memory for training (cloud side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from device_sdk.imagefolder import ImageItem, load_images, scan_image_folder

from cloud.log import LOG, Progress


@dataclass
class ImageSet:
    """Images as uint8 NHWC plus integer label and domain codes (``-1`` where unknown)."""

    items: List[ImageItem]
    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    label_names: List[str]
    domain_names: List[str]


def _codes(values: Sequence[str], names: Sequence[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64)


def load_image_set(items: List[ImageItem], size=(32, 32), label_names=None, domain_names=None, batch: int = 2048) -> ImageSet:
    """Decode ``items``; label/domain vocabularies default to the sorted names present."""
    label_names = list(label_names) if label_names is not None else sorted({it.label for it in items if it.label})
    domain_names = list(domain_names) if domain_names is not None else sorted({it.domain for it in items if it.domain})
    images = np.empty((len(items), size[0], size[1], 3), dtype=np.uint8)
    progress = Progress("decoding images", len(items))
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        images[start : start + len(chunk)] = load_images([it.path for it in chunk], size)
        progress.update(len(chunk))
    LOG.debug("loaded %d images, %d labels, %d domains", len(items), len(label_names), len(domain_names))
    return ImageSet(items, images, _codes([it.label for it in items], label_names),
                    _codes([it.domain for it in items], domain_names), label_names, domain_names)


def load_folder(root: str, size=(32, 32)) -> ImageSet:
    return load_image_set(scan_image_folder(root), size)
