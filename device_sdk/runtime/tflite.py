"""The TFLite runtimes: ai-edge-litert (LiteRT) and tflite-runtime (the armv7 fallback) share one model class."""

from __future__ import annotations

import hashlib
import threading
from typing import Tuple

import numpy as np

from device_sdk.errors import ArtifactError, UsageError
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta
from device_sdk.runtime.base import RUNTIME_REGISTRY, Model, RuntimeSpec, register_runtime
from device_sdk.runtime.tflite_meta import read_tflite_metadata


class TFLiteModel(Model):
    """A batch-1 TFLite artifact; batches are run one image at a time.

    Metadata comes from the flatbuffer's own ``ecos`` entry. An int8 model takes and returns
    int8 tensors: the preprocessed image is quantised, the output dequantised, with the
    scale and zero point the model declares.
    """

    def __init__(self, path: str, runtime: str = "litert", threads: int = 1):
        interpreter_cls = _tflite_interpreter(runtime)
        with open(path, "rb") as fh:
            data = fh.read()
        text = read_tflite_metadata(data, path).get(META_KEY)
        if text is None:
            raise ArtifactError(f"{path}: no ECOS metadata in the model (was it exported by ecos-cloud?)")
        super().__init__(
            path, ArtifactMeta.from_json(text.decode("utf-8", "replace"), path), hashlib.sha256(data).hexdigest()
        )
        self.runtime = runtime
        try:
            self._interp = interpreter_cls(model_content=data, num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{path}: {runtime} cannot load it ({str(exc).splitlines()[0]})") from None
        self._in, self._out = self._interp.get_input_details()[0], self._interp.get_output_details()[0]
        self._lock = threading.Lock()  # an interpreter is not thread-safe: one invoke at a time (app and agent threads)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._infer_locked(x)

    def _infer_locked(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for one in x:
            self._interp.set_tensor(
                self._in["index"], _quantize(one[None], self._in["dtype"], self._in["quantization"])
            )
            self._interp.invoke()
            outs.append(_dequantize(self._interp.get_tensor(self._out["index"]), self._out["quantization"]))
        return np.concatenate(outs) if outs else np.zeros((0,) + tuple(self._out["shape"][1:]), np.float32)


def _quantize(x: np.ndarray, dtype: type, quant: Tuple[float, int]) -> np.ndarray:
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    scale, zero = quant
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, quant: Tuple[float, int]) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        return y.astype(np.float32)
    scale, zero = quant
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _tflite_interpreter(runtime: str):
    spec = RUNTIME_REGISTRY.get(runtime)
    if spec.format != "tflite":
        raise UsageError(f"runtime {runtime!r} does not run TFLite models")
    try:
        return __import__(spec.module, fromlist=["Interpreter"]).Interpreter
    except ImportError:
        raise spec.unavailable() from None


# litert first: runtime="auto" prefers it when both are installed.
for _name, _module, _hint in (
    (
        "litert",
        "ai_edge_litert.interpreter",
        "pip install 'ecos-fleet-device[litert]' (ai-edge-litert; 64-bit Linux, macOS, Windows)",
    ),
    (
        "tflite-runtime",
        "tflite_runtime.interpreter",
        "pip install 'ecos-fleet-device[tflite]' (tflite-runtime with numpy < 2, e.g. armv7 Pi OS)",
    ),
):
    register_runtime(
        RuntimeSpec(_name, "tflite", _module, _hint, lambda path, threads, _n=_name: TFLiteModel(path, _n, threads))
    )
