"""Mini-batches for training: from images decoded in memory, or streamed from disk.

:func:`batch_source` picks: an :class:`~cloud.pool.dataset.ImageSet` (decoded) is served from one
normalised tensor, as the first version did; a :class:`~cloud.pool.dataset.PoolSet` (files only)
is decoded batch by batch by ``workers`` threads, one batch ahead of the training step, so memory
holds a few batches whatever the pool's size. Files that fail to decode are dropped from their
batch and counted in the set's ``unreadable``.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cloud.pool.dataset import ImageSet, PoolSet, decode_batches
from cloud.pool.items import PathView, item_paths
from device_sdk.preprocess import normalize


class Batches(Sequence[torch.Tensor]):
    """The first ``count`` (default all) batches of ``size`` rows of ``rows`` (the last may be shorter).

    Each batch is a view of ``rows`` made when asked for: a list of an epoch's batches would hold a
    tensor object per batch, some 500 bytes each, more than the rows themselves."""

    def __init__(self, rows: torch.Tensor, size: int, count: Optional[int] = None):
        total = -(-len(rows) // size)
        self.size, self.count = size, total if count is None else max(0, min(count, total))
        self.rows = rows[: self.count * size]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.count))]
        k = int(k)
        if k < -self.count or k >= self.count:
            raise IndexError("batch index out of range")
        k %= self.count
        return self.rows[k * self.size : (k + 1) * self.size]


class InMemory:
    """Batches cut from one normalised tensor of the whole (decoded) set."""

    streaming = False

    def __init__(self, x: torch.Tensor):
        self.x = x

    def batches(self, chunks: Sequence[torch.Tensor]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in chunks:
            yield idx, self.x[idx]

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return self.x[torch.as_tensor(idx)]


class Streaming:
    """Batches decoded from disk on demand (``workers`` threads, one batch ahead)."""

    streaming = True

    def __init__(self, data: PoolSet, mean: Sequence[float], std: Sequence[float], workers: int = 2):
        self.data, self.mean, self.std, self.workers = data, mean, std, workers

    def batches(self, chunks: Sequence[torch.Tensor]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if not len(chunks):
            return
        # decode_batches needs one batch size: feed it the chunks' concatenation and cut it again; the
        # concatenation is read in place (PathView: the epoch's rows of Batches, else the list of chunks),
        # never made, and the paths are decoded from the item list a batch at a time, never listed whole
        rows = chunks.rows if isinstance(chunks, Batches) else list(chunks)
        paths = PathView(self.data.items, rows)
        for (_, images, ok), idx in zip(
            decode_batches(self.data.preprocess, paths, len(chunks[0]), self.workers, self.data.unreadable), chunks
        ):
            keep = torch.from_numpy(ok)
            yield idx[keep], torch.from_numpy(normalize(images[ok], self.mean, self.std))

    def take(self, idx: np.ndarray) -> torch.Tensor:
        out: List[torch.Tensor] = []
        for _, images, _ in decode_batches(self.data.preprocess, item_paths(self.data.items, idx), 256, self.workers):
            out.append(torch.from_numpy(normalize(images, self.mean, self.std)))
        return torch.cat(out) if out else torch.zeros((0, self.data.preprocess.channels) + self.data.preprocess.size)


_SLICE = 1 << 16  # rows a slice when ordering an epoch in place


def epoch_order(train_idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """``train_idx`` in a random order drawn from ``gen``: one epoch's rows.

    The permutation is drawn as int32 where the rows fit (the same draws and values as int64, half
    the memory) and turned into the rows in place; the result has ``train_idx``'s dtype."""
    small = len(train_idx) < 2**31
    perm = torch.randperm(len(train_idx), generator=gen, dtype=torch.int32 if small else torch.int64)
    rows = perm.numpy()
    if rows.dtype != train_idx.dtype:
        return torch.from_numpy(train_idx)[perm]
    # in place, a slice at a time (numpy's index copy stays small, so the allocator can give it back)
    for start in range(0, len(rows), _SLICE):
        rows[start : start + _SLICE] = train_idx[rows[start : start + _SLICE]]
    return perm


def batch_source(data: PoolSet, mean: Sequence[float], std: Sequence[float], workers: int = 2):
    if isinstance(data, ImageSet):
        return InMemory(torch.from_numpy(normalize(data.images, mean, std)))
    return Streaming(data, mean, std, workers)


def channel_stats_streaming(data: PoolSet, sample: int = 2000, seed: int = 0, workers: int = 2):
    """Per-channel mean and std (on the [0, 1] scale) from up to ``sample`` files drawn at random."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(data.items))[:sample])
    c = data.preprocess.channels
    total, total_sq, n = np.zeros(c), np.zeros(c), 0
    for _, images, ok in decode_batches(data.preprocess, item_paths(data.items, pick), 256, workers):
        x = images[ok].reshape(-1, c).astype(np.float64) / 255.0
        total, total_sq, n = total + x.sum(0), total_sq + (x**2).sum(0), n + len(x)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)
