"""The runtime interface: a loaded ``Model`` and the registry of runtimes that load them.

A runtime is a :class:`RuntimeSpec` registered under its name (``onnxruntime``, ``litert``,
``tflite-runtime``): the file format it runs, the module it needs (imported only when a model
is loaded, so a device with one runtime installed never needs the others), an install hint and
a loader that returns a :class:`Model`. ``device_sdk/runtime/onnx.py`` and ``tflite.py``
register the three the project ships; ``device_sdk/runtime/loader.py`` picks one for a file
(``resolve_runtime``) and loads it (``load_model``). A new runtime is one more module that
subclasses ``Model`` and calls :func:`register_runtime` (docs/architecture.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from device_sdk.errors import MismatchError, RuntimeUnavailable
from device_sdk.imagefolder import normalize
from device_sdk.registry import Registry
from device_sdk.runtime.artifact import ArtifactMeta

FORMATS = {"onnx": "ONNX", "tflite": "TFLite"}  # the artifact file formats, as messages name them


class Model(ABC):
    """A loaded artifact: metadata, identity and a ``run`` method.

    ``meta`` says how to preprocess inputs, ``sha256`` identifies the file; ``run`` takes uint8
    NHWC images and returns the model's first output as float32. A runtime implements
    :meth:`_infer` on images already checked and normalised.
    """

    runtime = "base"

    def __init__(self, path: str, meta: ArtifactMeta, sha256: str):
        self.path, self.meta, self.sha256 = path, meta, sha256

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        expected = self.meta.image_size + (self.meta.channels,)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise MismatchError(
                f"expected uint8 images of shape (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        return normalize(images, self.meta.mean, self.meta.std)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self.preprocess(images))

    @abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray:
        """The runtime's own inference on normalised float32 NCHW input; float32 output."""


@dataclass(frozen=True)
class RuntimeSpec:
    """One inference runtime: ``name`` (what ``--runtime`` takes), the ``format`` it runs (a key of
    ``FORMATS``), the ``module`` it imports, how to install it (``hint``) and ``load(path, threads)``."""

    name: str
    format: str
    module: str
    hint: str
    load: Callable[[str, int], Model]

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"runtime {self.name!r}: format must be one of {', '.join(FORMATS)}")

    def installed(self) -> bool:
        try:
            __import__(self.module)
        except ImportError:
            return False
        return True

    def unavailable(self) -> RuntimeUnavailable:
        return RuntimeUnavailable(f"{self.name} is not installed ({self.hint})")


# Registration order is the preference of runtime="auto" among the runtimes of one format.
RUNTIME_REGISTRY: Registry[RuntimeSpec] = Registry("runtime", ordered=True, also=("auto",))


def register_runtime(spec: RuntimeSpec) -> RuntimeSpec:
    return RUNTIME_REGISTRY.register(spec)
