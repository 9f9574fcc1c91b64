"""Inference runtimes for self-describing artifacts (ONNX through onnxruntime).

``load_model(path)`` returns a ``Model`` whose ``meta`` says how to preprocess inputs and whose
``sha256`` identifies the artifact; ``Model.run`` takes uint8 NHWC images and returns the first
output as float32. The runtime package is imported lazily so that a device which only has one
runtime installed never needs the other.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .artifact import META_KEY, ArtifactMeta
from .errors import ArtifactError, MismatchError, RuntimeUnavailable
from .fsutil import sha256_file
from .imagefolder import normalize


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
            raise RuntimeUnavailable("onnxruntime is not installed (pip install 'ecos[onnx]')") from None
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


def load_model(path: str, runtime: str = "auto", threads: int = 1, expected_sha256: Optional[str] = None) -> Model:
    """Load an artifact with the runtime its file type calls for (``auto``) or the one named."""
    if not os.path.isfile(path):
        raise ArtifactError(f"model file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if runtime == "auto":
        runtime = "onnxruntime" if ext == ".onnx" else "tflite"
    if runtime != "onnxruntime":
        raise RuntimeUnavailable(f"runtime {runtime!r} is not supported for {path} (available: onnxruntime)")
    model = OnnxModel(path, threads=threads)
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        raise ArtifactError(f"{path}: sha256 {model.sha256[:12]}... does not match the expected {expected_sha256[:12]}...")
    return model
