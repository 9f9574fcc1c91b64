"""Export PyTorch models to self-describing ONNX artifacts (one file, metadata inside)."""

from __future__ import annotations

import io
import json
import os

import onnx
import torch
from torch import nn

from device_sdk.fsutil import atomic_write_bytes, atomic_write_text, sha256_file
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta

OPSET = 17


def export_onnx(model: nn.Module, meta: ArtifactMeta, path: str, output_name: str = "output") -> str:
    """Write ``model`` to ``path`` as ONNX (dynamic batch) with ``meta`` embedded; returns sha256.

    Uses the TorchScript exporter (one self-contained file, stable on small CNNs); the
    metadata and a ``.json`` sidecar with the file's sha256 are written atomically.
    """
    model = model.eval()
    c, h, w = meta.input_shape
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, c, h, w),),
            buf,
            input_names=["image"],
            output_names=[output_name],
            dynamic_axes={"image": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = ArtifactMeta(**{**meta.__dict__, "opset": OPSET})
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    proto.producer_name = "ecos"
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    digest = sha256_file(path)
    write_sidecar(path, meta, digest)
    return digest


def write_sidecar(path: str, meta: ArtifactMeta, digest: str) -> None:
    doc = {
        "file": os.path.basename(path),
        "sha256": digest,
        "size": os.path.getsize(path),
        "meta": json.loads(meta.to_json()),
    }
    atomic_write_text(path + ".json", json.dumps(doc, indent=2, sort_keys=True) + "\n")


def export_tflite(model: nn.Module, meta: ArtifactMeta, path: str, quant_config=None) -> str:
    """Write ``model`` to ``path`` as a batch-1 TFLite flatbuffer with ``meta`` inside; returns sha256.

    litert-torch cannot convert a dynamic batch dimension, so the artifact takes one image at a
    time (the device runtime loops). ``quant_config`` is litert-torch's, for a PT2E-quantised
    ``model`` (see ``cloud.export.quantize``). The metadata goes into the flatbuffer's own metadata
    table under ``ecos`` (read on the device by ``device_sdk.runtime.tflite_meta``) and into the sidecar.
    """
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its progress lines would drown the log
    import litert_torch

    c, h, w = meta.input_shape
    with torch.no_grad():
        edge = litert_torch.convert(model, (torch.zeros(1, c, h, w),), quant_config=quant_config)
    atomic_write_bytes(path, tflite_with_metadata(edge.model_content(), meta))
    digest = sha256_file(path)
    write_sidecar(path, meta, digest)
    return digest


def tflite_with_metadata(flatbuffer: bytes, meta: ArtifactMeta) -> bytes:
    """Return ``flatbuffer`` with ``meta`` JSON added as the model metadata entry ``ecos``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    buffer = schema.BufferT()
    buffer.data = list(meta.to_json().encode("utf-8"))
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = META_KEY, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (META_KEY, META_KEY.encode())] + [entry]
    builder = flatbuffers.Builder(len(flatbuffer) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
