"""The ONNX runtime: onnxruntime on the CPU, metadata from the model's ``custom_metadata_map``."""

from __future__ import annotations

import numpy as np

from device_sdk.errors import ArtifactError
from device_sdk.fsutil import sha256_file
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta
from device_sdk.runtime.base import Model, RuntimeSpec, register_runtime


class OnnxModel(Model):
    runtime = "onnxruntime"

    def __init__(self, path: str, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ONNXRUNTIME.unavailable() from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: with threads > 1 (the cloud's indexing)
        # spinning took the CPU the decoding threads need (10,000 JPEGs on 2 cores: 1,850 images/s
        # and 6.1 s of CPU without it, 1,560 and 8.5 s with it; benchmarks/bench_index_scale.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


ONNXRUNTIME = register_runtime(
    RuntimeSpec(
        "onnxruntime",
        "onnx",
        "onnxruntime",
        "pip install 'ecos-fleet-device[onnx]'",
        lambda path, threads: OnnxModel(path, threads=threads),
    )
)
