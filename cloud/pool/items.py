"""A pool's file list in a few numpy arrays: what streamed training keeps per file.

A list of :class:`~device_sdk.imagefolder.ImageItem` costs some 300 bytes a file in Python
objects (the item, its path string, its label string); at 1,000,000 files that is more than the
training itself needs. :class:`ItemList` holds the same items as

* each path's folder as a code into a list of the pool's folders (int32), and its file name as
  UTF-8 bytes in one buffer with int64 offsets;
* label and domain as codes into the lists of the names seen (int32),

about 30 bytes a file plus the file name, and gives back equal :class:`ImageItem` objects (same
path string, label and domain) when indexed or iterated, so it stands in for the list. Paths are
decoded only for the rows asked for (:meth:`ItemList.paths`, one batch at a time when streaming).
"""

from __future__ import annotations

import os
from array import array
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from device_sdk.imagefolder import ImageItem

_SEPARATORS = "/" + (os.sep if os.sep != "/" else "") + (os.altsep or "")


def _split(path: str) -> int:
    """Where the file name starts: after the last path separator (the folder part is kept as written)."""
    return max(path.rfind(s) for s in _SEPARATORS) + 1


class _Codes:
    """Strings to int32 codes, first come first coded."""

    def __init__(self) -> None:
        self.index: Dict[str, int] = {}
        self.names: List[str] = []
        self.codes = array("i")

    def add(self, value: str) -> None:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.names)
            self.names.append(value)
        self.codes.append(code)


class ItemListBuilder:
    """Appends items one at a time without keeping them (see :meth:`ItemList.from_items`)."""

    def __init__(self) -> None:
        self._folders, self._labels, self._domains = _Codes(), _Codes(), _Codes()
        self._names = bytearray()
        self._ends = array("q")

    def add(self, path: str, label: str = "", domain: str = "") -> None:
        cut = _split(path)
        self._folders.add(path[:cut])
        self._names += path[cut:].encode("utf-8", "surrogateescape")
        self._ends.append(len(self._names))
        self._labels.add(label)
        self._domains.add(domain)

    def __len__(self) -> int:
        return len(self._ends)

    def build(self) -> "ItemList":
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64) if len(self._ends) else []
        out = ItemList(
            bytes(self._names),
            offsets,
            np.frombuffer(self._folders.codes, dtype=np.int32).copy(),
            self._folders.names,
            np.frombuffer(self._labels.codes, dtype=np.int32).copy(),
            self._labels.names,
            np.frombuffer(self._domains.codes, dtype=np.int32).copy(),
            self._domains.names,
        )
        self.__init__()  # the builder's copies are no longer needed
        return out


class ItemList(Sequence[ImageItem]):
    """A read-only sequence of :class:`ImageItem` stored compactly (see the module docstring)."""

    def __init__(
        self,
        names: bytes,
        offsets: np.ndarray,
        folder_codes: np.ndarray,
        folders: List[str],
        label_codes: np.ndarray,
        labels: List[str],
        domain_codes: np.ndarray,
        domains: List[str],
    ):
        self._names, self._offsets = names, offsets
        self._folder_codes, self._folders = folder_codes, folders
        self.label_codes, self.label_values = label_codes, labels
        self.domain_codes, self.domain_values = domain_codes, domains

    @classmethod
    def from_items(cls, items: Iterable[ImageItem]) -> "ItemList":
        if isinstance(items, ItemList):
            return items
        builder = ItemListBuilder()
        for it in items:
            builder.add(it.path, it.label, it.domain)
        return builder.build()

    def __len__(self) -> int:
        return len(self._folder_codes)

    def path(self, i: int) -> str:
        return self.paths([i])[0]

    def paths(self, rows: Optional[Union[Sequence[int], np.ndarray]] = None) -> List[str]:
        """The path strings of ``rows`` (all rows by default), in that order."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        names, folders = self._names, self._folders
        return [
            folders[c] + names[s:e].decode("utf-8", "surrogateescape")
            for c, s, e in zip(
                self._folder_codes[rows].tolist(), self._offsets[rows].tolist(), self._offsets[rows + 1].tolist()
            )
        ]

    def labels(self) -> List[str]:
        return [self.label_values[c] for c in self.label_codes.tolist()]

    def domains(self) -> List[str]:
        return [self.domain_values[c] for c in self.domain_codes.tolist()]

    def take(self, rows: Union[Sequence[int], np.ndarray]) -> "ItemList":
        """The items of ``rows`` (indices, or a boolean mask), in that order."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64, copy=False)
        starts, ends = self._offsets[rows], self._offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # every byte of the kept names: its source position is its row's start plus its place in the name
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        names = np.frombuffer(self._names, dtype=np.uint8)[np.repeat(starts, lengths) + within].tobytes()
        return ItemList(
            names,
            offsets,
            self._folder_codes[rows],
            self._folders,
            self.label_codes[rows],
            self.label_values,
            self.domain_codes[rows],
            self.domain_values,
        )

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        i = int(i)
        if i < -n or i >= n:
            raise IndexError("ItemList index out of range")
        i %= n
        return ImageItem(self.path(i), self.label_values[self.label_codes[i]], self.domain_values[self.domain_codes[i]])

    def __iter__(self) -> Iterator[ImageItem]:
        for start in range(0, len(self), 4096):
            rows = range(start, min(start + 4096, len(self)))
            labels = self.label_codes[start : rows.stop].tolist()
            domains = self.domain_codes[start : rows.stop].tolist()
            for path, label, domain in zip(self.paths(rows), labels, domains):
                yield ImageItem(path, self.label_values[label], self.domain_values[domain])

    def __eq__(self, other) -> bool:
        if isinstance(other, (ItemList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"ItemList({len(self)} items)"

    def nbytes(self) -> int:
        """Bytes held by the buffer and arrays (the lists of folders, labels and domains aside)."""
        arrays = (self._offsets, self._folder_codes, self.label_codes, self.domain_codes)
        return len(self._names) + int(sum(a.nbytes for a in arrays))


class PathView:
    """``paths[start:stop]`` of ``items`` taken in ``order``, decoded on demand (what :func:`decode_batches` reads)."""

    def __init__(self, items: Sequence[ImageItem], order: Union[Sequence[int], np.ndarray]):
        self.items, self.order = items, np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return item_paths(self.items, self.order[i])
        return item_paths(self.items, self.order[i : i + 1])[0]


def item_paths(items: Sequence[ImageItem], rows: Union[Sequence[int], np.ndarray]) -> List[str]:
    """The paths of ``items[rows]``: decoded from an :class:`ItemList`, read from a plain list."""
    if isinstance(items, ItemList):
        return items.paths(rows)
    return [items[int(i)].path for i in rows]
