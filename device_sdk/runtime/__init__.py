"""Inference runtimes for self-describing artifacts, and the metadata every artifact carries.

``load_model(path)`` returns a :class:`~device_sdk.runtime.base.Model` whose ``meta`` says how to
preprocess inputs and whose ``sha256`` identifies the artifact; ``Model.run`` takes uint8 NHWC
images and returns the first output as float32. Modules:

* ``base``: the ``Model`` interface and the registry of runtimes (``RuntimeSpec``, ``register_runtime``);
* ``onnx``: onnxruntime (``OnnxModel``); ``tflite``: ai-edge-litert and tflite-runtime (``TFLiteModel``);
* ``loader``: ``resolve_runtime`` and ``load_model`` (``runtime="auto"`` picks by file type);
* ``artifact``: ``ArtifactMeta``, the metadata; ``tflite_meta``: reading it from a TFLite flatbuffer.

The names below are importable from ``device_sdk.runtime``; each is loaded on first use, so
importing ``device_sdk.runtime.artifact`` alone stays cheap. No runtime package (onnxruntime,
LiteRT) is imported before a model is loaded with it.
"""

# public name -> module that defines it (PEP 562 lazy attributes)
_PUBLIC = {
    "Model": "device_sdk.runtime.base",
    "RuntimeSpec": "device_sdk.runtime.base",
    "register_runtime": "device_sdk.runtime.base",
    "OnnxModel": "device_sdk.runtime.onnx",
    "TFLiteModel": "device_sdk.runtime.tflite",
    "RUNTIMES": "device_sdk.runtime.loader",
    "load_model": "device_sdk.runtime.loader",
    "resolve_runtime": "device_sdk.runtime.loader",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'device_sdk.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
