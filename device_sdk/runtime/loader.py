"""Choose the runtime for an artifact and load it: ``resolve_runtime`` and ``load_model``.

``runtime="auto"`` picks by file type: onnxruntime for ``.onnx``; for ``.tflite`` the first
installed of ai-edge-litert and tflite-runtime (the armv7 fallback), in registration order.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

# the runtimes register themselves on import (onnx first, then litert before tflite-runtime)
import device_sdk.runtime.onnx  # noqa: F401
import device_sdk.runtime.tflite  # noqa: F401
from device_sdk.errors import ArtifactError, RuntimeUnavailable, UsageError
from device_sdk.runtime.base import FORMATS, RUNTIME_REGISTRY, Model

RUNTIMES: Tuple[str, ...] = tuple(RUNTIME_REGISTRY.choices())  # ("auto", "onnxruntime", "litert", "tflite-runtime")


def artifact_format(path: str) -> str:
    """``"tflite"`` for a TFLite flatbuffer (its file identifier), else ``"onnx"``."""
    with open(path, "rb") as fh:
        return "tflite" if fh.read(8)[4:8] == b"TFL3" else "onnx"


def resolve_runtime(path: str, runtime: str = "auto") -> str:
    """The runtime that will run ``path``: the one named, or for ``auto`` the first installed that fits."""
    spec = None if runtime == "auto" else RUNTIME_REGISTRY.get(runtime)  # an unknown name: UsageError
    fmt = artifact_format(path)
    if spec is None:
        fitting = [s for _, s in RUNTIME_REGISTRY.items() if s.format == fmt]
        if len(fitting) == 1:
            return fitting[0].name  # the only choice: loading it says what to install if it is missing
        installed = [s for s in fitting if s.installed()]
        if not installed:
            raise RuntimeUnavailable(
                f"no {FORMATS[fmt]} runtime installed for {path}: " + " or ".join(s.hint for s in fitting)
            )
        return installed[0].name
    if spec.format != fmt:
        kind = "a TFLite" if fmt == "tflite" else "an ONNX"
        raise UsageError(f"{path} is {kind} model; runtime {runtime!r} cannot run it")
    return runtime


def load_model(path: str, runtime: str = "auto", threads: int = 1, expected_sha256: Optional[str] = None) -> Model:
    """Load an artifact with the runtime its file type calls for (``auto``) or the one named."""
    if not os.path.isfile(path):
        raise ArtifactError(f"model file not found: {path}")
    model = RUNTIME_REGISTRY.get(resolve_runtime(path, runtime)).load(path, threads)
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        raise ArtifactError(
            f"{path}: sha256 {model.sha256[:12]}... does not match the expected {expected_sha256[:12]}..."
        )
    return model
