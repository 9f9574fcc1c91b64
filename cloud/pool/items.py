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

Given a ``folder`` (:class:`ItemListBuilder`, :func:`cloud.pool.manifest.scan_pool`), the builder
writes those arrays to flat files in a private folder under it as the items come (a 64K-item
buffer), and the list maps them read-only (:func:`mapped_array`): they live in the page cache,
file-backed memory the kernel can drop and read again, not in the process's own (anonymous)
memory, which then holds no per-file bytes of the list at all. On POSIX each file is unlinked as
soon as it is mapped (its blocks are freed when the mapping goes) and the private folder removed,
so nothing is left behind once the scan is done, even if the process is later killed (a scan
killed midway leaves its ``.ecos-items-*`` folder); elsewhere the list stays in memory.
The folder should be on a disk, not a tmpfs (whose pages are swap-backed, not reclaimable).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from array import array
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from device_sdk.imagefolder import ImageItem

_SEPARATORS = "/" + (os.sep if os.sep != "/" else "") + (os.altsep or "")


def _split(path: str) -> int:
    """Where the file name starts: after the last path separator (the folder part is kept as written)."""
    return max(path.rfind(s) for s in _SEPARATORS) + 1


CAN_MAP = os.name == "posix"  # a mapped file can be unlinked at once (elsewhere the list stays in memory)
_FLUSH = 1 << 16  # items buffered before a write


def mapped_array(path: str, dtype, mode: str = "r") -> np.ndarray:
    """The flat binary file ``path`` mapped as a 1-D ``dtype`` array, then unlinked (see the module docstring).

    ``mode`` "r" maps it read-only; "c" copy-on-write (writable: pages written become the process's
    own, the others stay file-backed; what :func:`torch.from_numpy` needs without a warning)."""
    if os.path.getsize(path) == 0:  # mmap cannot map an empty file
        os.unlink(path)
        return np.zeros(0, dtype=dtype)
    out = np.memmap(path, dtype=dtype, mode=mode)
    os.unlink(path)
    return out


class _SpillFolder:
    """A private folder for the files of one list, removed when done (or when the owner is collected)."""

    def __init__(self, parent: str):
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=".ecos-items-", dir=parent)
        self.remove = weakref.finalize(self, shutil.rmtree, self.path, True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def spill_array(folder: str, chunks: Iterable[np.ndarray], dtype, mode: str = "r") -> np.ndarray:
    """The concatenation of ``chunks`` written to a file under ``folder`` and mapped (:func:`mapped_array`)."""
    spill = _SpillFolder(folder)
    try:
        with open(spill.file("array"), "wb") as fh:
            for chunk in chunks:
                fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        return mapped_array(spill.file("array"), dtype, mode)
    finally:
        spill.remove()


class _Codes:
    """Strings to int32 codes, first come first coded."""

    def __init__(self) -> None:
        self.index: Dict[str, int] = {}
        self.names: List[str] = []
        self.codes = array("i")
        self.total = 0  # codes added, written ones included

    def add(self, value: str) -> None:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.names)
            self.names.append(value)
        self.codes.append(code)
        self.total += 1


class ItemListBuilder:
    """Appends items one at a time without keeping them (see :meth:`ItemList.from_items`).

    With ``folder`` (and on POSIX) the arrays go to files under it as they fill, and :meth:`build`
    gives a list mapped from them (see the module docstring); else they are kept in memory."""

    def __init__(self, folder: Optional[str] = None) -> None:
        self._folders, self._labels, self._domains = _Codes(), _Codes(), _Codes()
        self._names = bytearray()
        self._ends = array("q", [0])  # the offsets: 0, then each name's end
        self._written = 0  # name bytes already written
        self.folder = folder if CAN_MAP else None
        self._spill = _SpillFolder(folder) if self.folder else None
        self._files = (
            {k: open(self._spill.file(k), "wb") for k in ("names", "offsets", "folders", "labels", "domains")}
            if self._spill
            else {}
        )

    def add(self, path: str, label: str = "", domain: str = "") -> None:
        cut = _split(path)
        self._folders.add(path[:cut])
        self._names += path[cut:].encode("utf-8", "surrogateescape")
        self._ends.append(self._written + len(self._names))
        self._labels.add(label)
        self._domains.add(domain)
        if self._files and len(self._ends) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered items to the files and empty the buffers."""
        files = self._files
        files["names"].write(self._names)
        files["offsets"].write(self._ends.tobytes())
        for key, codes in (("folders", self._folders), ("labels", self._labels), ("domains", self._domains)):
            files[key].write(codes.codes.tobytes())
            codes.codes = array("i")
        self._written += len(self._names)
        self._names, self._ends = bytearray(), array("q")

    def __len__(self) -> int:
        return self._folders.total

    def build(self) -> "ItemList":
        if self._files:
            try:
                self._flush()
            finally:  # closed even when the last write fails (no room): discard() then removes the files
                for fh in self._files.values():
                    fh.close()
            f = self._spill.file
            try:
                out = ItemList(
                    memoryview(mapped_array(f("names"), np.uint8)),
                    mapped_array(f("offsets"), np.int64),
                    mapped_array(f("folders"), np.int32),
                    self._folders.names,
                    mapped_array(f("labels"), np.int32),
                    self._labels.names,
                    mapped_array(f("domains"), np.int32),
                    self._domains.names,
                    folder=self.folder,
                )
            finally:
                self._spill.remove()  # the files are unlinked once mapped: only the empty folder is left
            self.__init__()
            return out
        out = ItemList(
            bytes(self._names),
            np.frombuffer(self._ends, dtype=np.int64).copy(),
            np.frombuffer(self._folders.codes, dtype=np.int32).copy(),
            self._folders.names,
            np.frombuffer(self._labels.codes, dtype=np.int32).copy(),
            self._labels.names,
            np.frombuffer(self._domains.codes, dtype=np.int32).copy(),
            self._domains.names,
        )
        self.__init__()  # the builder's copies are no longer needed
        return out

    def discard(self) -> None:
        """Close and remove the files of an unfinished list."""
        for fh in self._files.values():
            fh.close()
        if self._spill:
            self._spill.remove()
        self._files, self._spill = {}, None


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
        folder: Optional[str] = None,
    ):
        # names: the UTF-8 bytes (bytes, or a memoryview of a mapped file); folder: where the arrays
        # were mapped from (None: in memory), where arrays made from the list go too (cloud.pool.dataset)
        self.folder = folder
        self._names, self._offsets = names, offsets
        self._folder_codes, self._folders = folder_codes, folders
        self.label_codes, self.label_values = label_codes, labels
        self.domain_codes, self.domain_values = domain_codes, domains

    @classmethod
    def from_items(cls, items: Iterable[ImageItem], folder: Optional[str] = None) -> "ItemList":
        """``items`` as an ItemList (itself if one already), its arrays mapped from files under ``folder`` if given."""
        if isinstance(items, ItemList):
            return items
        builder = ItemListBuilder(folder)
        try:
            for it in items:
                builder.add(it.path, it.label, it.domain)
        except BaseException:
            builder.discard()
            raise
        return builder.build()

    @property
    def mapped(self) -> bool:
        """Whether the arrays are mapped from (unlinked) files rather than held in memory."""
        return isinstance(self._offsets, np.memmap)

    def __len__(self) -> int:
        return len(self._folder_codes)

    def path(self, i: int) -> str:
        return self.paths([i])[0]

    def paths(self, rows: Optional[Union[Sequence[int], np.ndarray]] = None) -> List[str]:
        """The path strings of ``rows`` (all rows by default), in that order."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        names, folders = self._names, self._folders
        return [
            folders[c] + str(names[s:e], "utf-8", "surrogateescape")
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
    """``paths[start:stop]`` of ``items`` taken in ``order``, decoded on demand (what :func:`decode_batches` reads).

    ``order`` is one array of rows, or a list of them (the epoch's batches) read as their
    concatenation without making it: a slice takes only the pieces it covers."""

    def __init__(self, items: Sequence[ImageItem], order):
        # the parts stay as given (arrays or tensors) and are read as arrays a slice at a time: an array
        # object per batch of an epoch would cost more than the rows themselves
        self.items = items
        self.parts = list(order) if isinstance(order, (list, tuple)) else [np.asarray(order).reshape(-1)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The rows at positions ``start`` to ``stop`` of the (virtual) concatenation."""
        first = max(int(np.searchsorted(self.starts, start, side="right")) - 1, 0)
        pieces = []
        for k in range(first, len(self.parts)):
            lo = self.starts[k]
            if lo >= stop:
                break
            pieces.append(np.asarray(self.parts[k][max(start - lo, 0) : stop - lo]).reshape(-1))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return item_paths(self.items, self.rows(start, max(start, stop)))
        n = len(self)
        i = int(i)
        if i < -n or i >= n:
            raise IndexError("PathView index out of range")
        i %= n
        return item_paths(self.items, self.rows(i, i + 1))[0]


def item_paths(items: Sequence[ImageItem], rows: Union[Sequence[int], np.ndarray]) -> List[str]:
    """The paths of ``items[rows]``: decoded from an :class:`ItemList`, read from a plain list."""
    if isinstance(items, ItemList):
        return items.paths(rows)
    return [items[int(i)].path for i in rows]
