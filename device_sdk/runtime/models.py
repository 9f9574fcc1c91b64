"""Inference runtimes for self-describing artifacts: ONNX (onnxruntime) and TFLite (LiteRT).

``load_model(path)`` returns a ``Model`` whose ``meta`` says how to preprocess inputs and whose
``sha256`` identifies the artifact; ``Model.run`` takes uint8 NHWC images and returns the first
output as float32. The runtime package is imported lazily so that a device which only has one
runtime installed never needs the other. ``runtime="auto"`` picks by file type: onnxruntime for
``.onnx``; for ``.tflite`` ai-edge-litert if installed, else tflite-runtime (the armv7 fallback).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Tuple

import numpy as np

from device_sdk.runtime.artifact import META_KEY, ArtifactMeta
from device_sdk.errors import ArtifactError, MismatchError, RuntimeUnavailable, UsageError
from device_sdk.fsutil import sha256_file
from device_sdk.imagefolder import normalize
from device_sdk.runtime.tflite_meta import read_tflite_metadata

RUNTIMES = ("auto", "onnxruntime", "litert", "tflite-runtime")
_TFLITE_RUNTIMES = {
    "litert": ("ai_edge_litert.interpreter",
               "pip install 'ecos-fleet-device[litert]' (ai-edge-litert; 64-bit Linux, macOS, Windows)"),
    "tflite-runtime": ("tflite_runtime.interpreter",
                       "pip install 'ecos-fleet-device[tflite]' (tflite-runtime with numpy < 2, e.g. armv7 Pi OS)"),
}


class Model:
    """A loaded artifact: metadata, identity and a ``run`` method."""

    runtime = "base"

    def __init__(self, path: str, meta: ArtifactMeta, sha256: str):
        self.path, self.meta, self.sha256 = path, meta, sha256

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        expected = self.meta.image_size + (3,)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise MismatchError(f"expected uint8 images of shape (N, {expected[0]}, {expected[1]}, 3), got {images.dtype} {images.shape}")
        return normalize(images, self.meta.mean, self.meta.std)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self.preprocess(images))

    def _infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class OnnxModel(Model):
    runtime = "onnxruntime"

    def __init__(self, path: str, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("onnxruntime is not installed (pip install 'ecos-fleet-device[onnx]')") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        text = sess.get_modelmeta().custom_metadata_map.get(META_KEY)
        if text is None:
            raise ArtifactError(f"{path}: no ECOS metadata in the model (was it exported by ecos-cloud?)")
        super().__init__(path, ArtifactMeta.from_json(text, path), sha256_file(path))
        self._sess = sess
        self._input = sess.get_inputs()[0].name

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._sess.run(None, {self._input: x})[0], dtype=np.float32)


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
        super().__init__(path, ArtifactMeta.from_json(text.decode("utf-8", "replace"), path), hashlib.sha256(data).hexdigest())
        self.runtime = runtime
        try:
            self._interp = interpreter_cls(model_content=data, num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{path}: {runtime} cannot load it ({str(exc).splitlines()[0]})") from None
        self._in, self._out = self._interp.get_input_details()[0], self._interp.get_output_details()[0]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for one in x:
            self._interp.set_tensor(self._in["index"], _quantize(one[None], self._in["dtype"], self._in["quantization"]))
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
    module, hint = _TFLITE_RUNTIMES[runtime]
    try:
        return __import__(module, fromlist=["Interpreter"]).Interpreter
    except ImportError:
        raise RuntimeUnavailable(f"{runtime} is not installed ({hint})") from None


def resolve_runtime(path: str, runtime: str = "auto") -> str:
    """The runtime that will run ``path``: the one named, or for ``auto`` the first installed that fits."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    tflite = _is_tflite(path)
    if runtime == "auto":
        if not tflite:
            return "onnxruntime"
        installed = [name for name, (module, _) in _TFLITE_RUNTIMES.items() if _importable(module)]
        if not installed:
            raise RuntimeUnavailable(f"no TFLite runtime installed for {path}: " + " or ".join(h for _, h in _TFLITE_RUNTIMES.values()))
        return installed[0]
    if tflite != (runtime != "onnxruntime"):
        kind = "a TFLite" if tflite else "an ONNX"
        raise UsageError(f"{path} is {kind} model; runtime {runtime!r} cannot run it")
    return runtime


def _is_tflite(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8)[4:8] == b"TFL3"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def load_model(path: str, runtime: str = "auto", threads: int = 1, expected_sha256: Optional[str] = None) -> Model:
    """Load an artifact with the runtime its file type calls for (``auto``) or the one named."""
    if not os.path.isfile(path):
        raise ArtifactError(f"model file not found: {path}")
    runtime = resolve_runtime(path, runtime)
    model = OnnxModel(path, threads=threads) if runtime == "onnxruntime" else TFLiteModel(path, runtime, threads=threads)
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        raise ArtifactError(f"{path}: sha256 {model.sha256[:12]}... does not match the expected {expected_sha256[:12]}...")
    return model
