"""Pool images for training (cloud side): decoded into memory, or listed for streaming from disk.

Both decode through the model's :class:`~device_sdk.preprocess.Preprocess` (the rule the device
uses too). A file that cannot be decoded is counted, named in the log and left out, never fatal
(:class:`Unreadable` keeps the list).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from cloud.log import LOG, Progress
from cloud.pool.items import ItemList, spill_array
from device_sdk.imagefolder import ImageItem, scan_image_folder
from device_sdk.preprocess import DEFAULTS, Preprocess


def default_preprocess(size: Tuple[int, int] = (32, 32), channels: int = 3, **policy) -> Preprocess:
    """A new model's preprocessing: ``DEFAULTS`` fitting (centre crop, EXIF, JPEG draft), stats filled in later."""
    return Preprocess(
        size=(int(size[0]), int(size[1])),
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        **{**DEFAULTS, **policy},
    )


@dataclass
class Unreadable:
    """Files that could not be decoded: how many times one was met (``count``), and the first ``keep``
    different ones with the reason (a file met again, as streamed training does every epoch, is
    listed once)."""

    count: int = 0
    examples: List[Tuple[str, str]] = field(default_factory=list)
    keep: int = 100
    listed: Set[str] = field(default_factory=set, repr=False)

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < self.keep and path not in self.listed:
            self.listed.add(path)
            self.examples.append((path, reason))

    def log(self, what: str) -> None:
        if self.count:
            LOG.warning(
                "%s: %d unreadable file(s) skipped; first: %s",
                what,
                self.count,
                "; ".join(reason for _, reason in self.examples[:3]),
            )


@dataclass
class PoolSet:
    """Pool images as files, with integer label and domain codes (``-1`` where unknown); nothing decoded.

    ``items`` is an :class:`~cloud.pool.items.ItemList` when made by :func:`pool_set`; any sequence
    of :class:`ImageItem` works."""

    items: Sequence[ImageItem]
    labels: np.ndarray
    domains: np.ndarray
    label_names: List[str]
    domain_names: List[str]
    preprocess: Preprocess = field(default_factory=default_preprocess)
    unreadable: Unreadable = field(default_factory=Unreadable)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ImageSet(PoolSet):
    """A :class:`PoolSet` decoded into memory: ``images`` is uint8 NHWC."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 32, 32, 3), np.uint8))


def _item_codes(
    codes: np.ndarray, values: Sequence[str], names: Sequence[str], folder: Optional[str] = None
) -> np.ndarray:
    """An :class:`ItemList`'s own codes (into ``values``) recoded into ``names`` (``-1`` where absent).

    With ``folder`` (a mapped list's) the result is written there a chunk at a time and mapped
    copy-on-write, like the list's own arrays (cloud/pool/items.py), instead of held in memory."""
    index = {n: i for i, n in enumerate(names)}
    lookup = np.array([index.get(v, -1) for v in values] or [-1], dtype=np.int64)
    if folder is None:
        return lookup[codes]
    step = 1 << 16  # small temporaries: the allocator gives them back
    return spill_array(folder, (lookup[codes[s : s + step]] for s in range(0, len(codes), step)), np.int64, "c")


def pool_set(
    items: Sequence[ImageItem], preprocess: Optional[Preprocess] = None, label_names=None, domain_names=None
) -> PoolSet:
    """``items`` with their codes; label/domain vocabularies default to the sorted names present.

    The items are kept as an :class:`~cloud.pool.items.ItemList` (a few numpy arrays, not a Python
    object per file: what streaming from a pool of millions of files needs)."""
    items = ItemList.from_items(items)
    if label_names is None:
        label_names = sorted(v for v in items.label_values if v)
    if domain_names is None:
        domain_names = sorted(v for v in items.domain_values if v)
    return PoolSet(
        items,
        _item_codes(items.label_codes, items.label_values, label_names, items.folder),
        _item_codes(items.domain_codes, items.domain_values, domain_names, items.folder),
        list(label_names),
        list(domain_names),
        preprocess or default_preprocess(),
    )


def decode_batches(
    spec: Preprocess, paths: Sequence[str], batch: int = 256, workers: int = 1, unreadable: Optional[Unreadable] = None
) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, images, ok)`` per batch of ``paths``: uint8 NHWC and which rows decoded.

    Each batch is cut into ``workers`` parts decoded at once by :meth:`Preprocess.decode_batch`
    (simplejpeg and Pillow release the GIL while decoding and resizing); the next batch is decoded
    while the caller works on this one. An unreadable file leaves its row zero, ``ok`` False, and
    is recorded in ``unreadable``.
    """
    workers = max(1, int(workers))
    shape = (spec.size[0], spec.size[1], spec.channels)

    def submit(start: int):
        chunk = paths[start : start + batch]
        step = -(-len(chunk) // workers)
        return chunk, [(s, pool.submit(spec.decode_batch, chunk[s : s + step])) for s in range(0, len(chunk), step)]

    def collect(chunk, parts):
        images = np.empty((len(chunk), *shape), dtype=np.uint8)
        ok = np.empty(len(chunk), dtype=bool)
        failed = []
        for s, future in parts:
            part, part_ok, part_failed = future.result()
            images[s : s + len(part)], ok[s : s + len(part)] = part, part_ok
            failed += [(chunk[s + i], reason) for i, reason in part_failed]
        return images, ok, failed

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        starts = list(range(0, len(paths), batch))
        pending = submit(starts[0]) if starts else None
        for n, start in enumerate(starts):
            images, ok, failed = collect(*pending)
            pending = submit(starts[n + 1]) if n + 1 < len(starts) else None
            for path, error in failed:
                if unreadable is not None:
                    unreadable.add(path, error)
            yield start, images, ok
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_image_set(
    items: Sequence[ImageItem],
    size=(32, 32),
    label_names=None,
    domain_names=None,
    batch: int = 2048,
    preprocess: Optional[Preprocess] = None,
    workers: int = 1,
) -> ImageSet:
    """Decode ``items`` into memory (unreadable files left out, counted in ``unreadable``).

    ``preprocess`` (default: :func:`default_preprocess` at ``size``) fits each file.
    """
    spec = preprocess or default_preprocess(size)
    base = pool_set(items, spec, label_names, domain_names)
    images = np.empty((len(items), spec.size[0], spec.size[1], spec.channels), dtype=np.uint8)
    keep = np.zeros(len(items), dtype=bool)
    progress = Progress("decoding images", len(items))
    for start, chunk, ok in decode_batches(spec, base.items.paths(), batch, workers, base.unreadable):
        images[start : start + len(chunk)] = chunk
        keep[start : start + len(chunk)] = ok
        progress.update(len(chunk))
    base.unreadable.log("decoding images")
    if not keep.all():
        images = images[keep]
        base.items = base.items.take(keep)
        base.labels, base.domains = base.labels[keep], base.domains[keep]
    LOG.debug("loaded %d images, %d labels, %d domains", len(base.items), len(base.label_names), len(base.domain_names))
    return ImageSet(
        base.items, base.labels, base.domains, base.label_names, base.domain_names, spec, base.unreadable, images
    )


def load_folder(root: str, size=(32, 32), preprocess: Optional[Preprocess] = None) -> ImageSet:
    return load_image_set(scan_image_folder(root), size, preprocess=preprocess)


def decoded_bytes(n: int, spec: Preprocess) -> int:
    """Memory the decoded uint8 images of ``n`` files take."""
    return n * spec.size[0] * spec.size[1] * spec.channels
