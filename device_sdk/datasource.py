"""Where the agent's private images come from: a folder, or pictures the app already holds in memory.

The agent scores a probe against every image its :class:`DataSource` gives at that moment. Three
sources come with the SDK:

* :class:`FolderSource` - the image files under a folder (``[data] local``; the default);
* :class:`CallableSource` - a function of the app that returns its current images as arrays;
* :class:`FrameBuffer` - a rolling buffer of the last ``capacity`` frames, which the app fills
  from its camera loop with :meth:`FrameBuffer.append` (thread-safe; nothing is written to disk).

An app can bring its own: any object with ``key()`` and ``batches(spec, batch)`` (see
:class:`DataSource`). Frames are ``H x W x 3`` (or ``H x W``) uint8 arrays of any size: they are
fitted to the encoder's input exactly as image files are (``Preprocess``: size, resize policy,
channels), so a frame and the same picture saved as a PNG give the same features.

Privacy does not depend on the source: each image votes once, whatever the source, so the
scores keep sensitivity 1 and the ledger charges the same.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import InputError
from device_sdk.imagefolder import scan_image_folder
from device_sdk.preprocess import Preprocess

LOG = logging.getLogger("ecos.device")

__all__ = ["DataSource", "FolderSource", "CallableSource", "FrameBuffer", "fit_frames"]


class DataSource:
    """What the agent needs from a source of private images (subclass it or duck-type it).

    ``key()`` names the current content: the agent reuses the features it computed for the same
    key (return None to have them computed anew for every probe). ``batches(spec, batch)`` yields
    uint8 ``N x H x W x C`` arrays already fitted to ``spec`` (the encoder's ``Preprocess``), at most
    ``batch`` images each. Both are called on the agent's worker thread.
    """

    def key(self) -> Optional[Hashable]:
        """A hashable name of the current content; equal keys mean equal images (None: not cacheable)."""
        return None

    def batches(self, spec: Preprocess, batch: int) -> Iterator[np.ndarray]:  # pragma: no cover - abstract
        """The current images as uint8 ``N x H x W x C`` arrays fitted to ``spec``, ``batch`` at most each."""
        raise NotImplementedError


class FolderSource(DataSource):
    """The image files under ``folder`` (any layout), re-scanned for every probe.

    The key is every file's path and modification time: features are reused until a file is
    added, removed or changed.
    """

    def __init__(self, folder: "os.PathLike[str] | str") -> None:
        self.folder = os.fspath(folder)

    def key(self) -> Hashable:
        items = scan_image_folder(self.folder)
        return ("folder", tuple((it.path, _mtime(it.path)) for it in items))

    def batches(self, spec: Preprocess, batch: int) -> Iterator[np.ndarray]:
        """The readable images; unreadable files (damaged, empty, still being written) are skipped with a warning."""
        from device_sdk.scoring import log_unreadable

        items = scan_image_folder(self.folder)
        unreadable: List[Tuple[str, str]] = []
        for start in range(0, len(items), batch):
            paths = [it.path for it in items[start : start + batch]]
            images, _ = spec.decode_readable(paths, unreadable)
            if len(images):
                yield images
        log_unreadable(LOG, self.folder, unreadable)

    def __repr__(self) -> str:
        return f"FolderSource({self.folder!r})"


def _mtime(path: str) -> Optional[int]:
    """A file's modification time; None for one that cannot be read (a broken link, a file just removed)."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class CallableSource(DataSource):
    """The images ``fn()`` returns: one ``N x H x W x 3`` uint8 array or a sequence of ``H x W x 3`` frames.

    Called once per probe, on the agent's worker thread; ``fn`` must return a snapshot the app
    will not change while it is being encoded.
    """

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def batches(self, spec: Preprocess, batch: int) -> Iterator[np.ndarray]:
        frames = self.fn()
        for start in range(0, len(frames), batch):
            yield fit_frames(frames[start : start + batch], spec)


class FrameBuffer(DataSource):
    """A thread-safe rolling buffer of the last ``capacity`` frames the app has seen.

    ``append(frame)`` (any thread, e.g. the camera loop) keeps a private copy and drops the
    oldest frame when full; the agent encodes a snapshot taken under the lock, so appends never
    wait for an encoding. Frames are stored as given (any size) and fitted when encoded.
    """

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise InputError(f"a frame buffer holds at least one frame, not {capacity}")
        self.capacity = int(capacity)
        self._frames: "deque[np.ndarray]" = deque(maxlen=self.capacity)
        self._lock = threading.Lock()
        self._generation = 0  # bumped by every change: the key of the content

    def append(self, frame: np.ndarray) -> None:
        """Add one ``H x W x 3`` (or ``H x W``) uint8 frame; it is copied."""
        frame = _check_frame(frame)
        with self._lock:
            self._frames.append(frame)
            self._generation += 1

    def extend(self, frames: Iterable[np.ndarray]) -> None:
        """Add several frames (copied) in one step."""
        checked = [_check_frame(f) for f in frames]
        with self._lock:
            self._frames.extend(checked)
            self._generation += 1

    def clear(self) -> None:
        """Drop every frame (e.g. when the scene the app watches changes for good)."""
        with self._lock:
            self._frames.clear()
            self._generation += 1

    def snapshot(self) -> List[np.ndarray]:
        """The frames held now, oldest first (the arrays are the buffer's own: do not modify them)."""
        with self._lock:
            return list(self._frames)

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def key(self) -> Hashable:
        with self._lock:
            return ("frames", id(self), self._generation)

    def batches(self, spec: Preprocess, batch: int) -> Iterator[np.ndarray]:
        frames = self.snapshot()
        for start in range(0, len(frames), batch):
            yield fit_frames(frames[start : start + batch], spec)


def _check_frame(frame: Any) -> np.ndarray:
    a = np.asarray(frame)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) or 0 in a.shape:
        raise InputError(f"a frame must be an H x W x 3 (or H x W) uint8 array, got {a.dtype} {a.shape}")
    return np.array(a, copy=True)


def fit_frames(frames: Sequence[np.ndarray], spec: Preprocess) -> np.ndarray:
    """Frames of any size -> one uint8 ``N x H x W x C`` array fitted as ``spec`` fits image files."""
    h, w = spec.size
    out = np.empty((len(frames), h, w, spec.channels), dtype=np.uint8)
    for i, frame in enumerate(frames):
        a = _check_frame(frame) if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 else frame
        if a.shape[:2] == (h, w) and a.ndim == 3 and a.shape[2] == spec.channels:
            out[i] = a
            continue
        out[i] = _fit_one(a, spec)
    return out


def _fit_one(a: np.ndarray, spec: Preprocess) -> np.ndarray:
    from PIL import Image

    from device_sdk.preprocess import CHANNEL_MODES

    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    im = Image.fromarray(a)
    mode = CHANNEL_MODES[spec.channels]
    if im.mode != mode:
        im = im.convert(mode)
    array = np.asarray(spec._fit(im), dtype=np.uint8)  # the same fitting as a decoded file
    return array[:, :, None] if array.ndim == 2 else array


def encode_source(
    model: Any, source: Any, batch: int = 256, progress: Optional[Callable[[int], None]] = None
) -> np.ndarray:
    """Features of every image ``source`` gives now, encoded by ``model`` in batches; ``progress(done)``."""
    spec = model.meta.preprocessing()
    outs: List[np.ndarray] = []
    done = 0
    for images in source.batches(spec, batch):
        outs.append(model.run(images))
        done += len(images)
        if progress is not None:
            progress(done)
    return np.concatenate(outs) if outs else np.zeros((0, model.meta.feature_dim or 0), np.float32)
