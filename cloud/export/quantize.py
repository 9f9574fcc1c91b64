"""int8 post-training quantisation for both runtimes, calibrated on the proxy set.

ONNX: onnxruntime's static quantisation, fed by a ``CalibrationDataReader`` over proxy images.
TFLite: PyTorch 2 export quantisation (PT2E) with litert-torch's quantiser, calibrated on the
same images, then converted. The calibration images are the proxy set because it is the
cloud's best picture of the device's data: activation ranges are set where the device's inputs
will fall. The settings are a typed ``QuantConfig``; defaults were chosen by measurement
(docs/models.md).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np
import onnx
import torch
from torch import nn

# isort: off
# ``models`` first: importing onnxruntime.quantization puts onnxruntime/transformers on sys.path,
# whose own "models" folder would otherwise shadow this project's package.
import models  # noqa: F401
from onnxruntime.quantization import CalibrationDataReader  # noqa: E402
# isort: on

from cloud.export.formats import export_tflite, write_sidecar
from device_sdk.errors import ArtifactError, UsageError
from device_sdk.fsutil import atomic_write_bytes, sha256_file
from device_sdk.imagefolder import normalize
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta

FORMATS = ("QDQ", "QOperator")
CALIBRATION = ("MinMax", "Entropy", "Percentile")
ACTIVATIONS = ("uint8", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """Static int8 settings. ``reduce_range`` (7-bit weights) avoids the u8*s8 saturation of
    x86 CPUs without VNNI (docs/toolchain.md, trap 2); ``per_channel`` keeps small conv layers
    accurate. TFLite's PT2E path is always symmetric int8, per channel as configured."""

    calibration_size: int = 256
    quant_format: str = "QDQ"
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: str = "uint8"
    calibrate_method: str = "MinMax"
    float_head: bool = True  # keep the layer that writes the output in float: 8-bit logits flip near-ties
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (("quant_format", FORMATS), ("calibrate_method", CALIBRATION), ("activation_type", ACTIVATIONS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"QuantConfig.{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})"
                )
        if self.calibration_size < 1:
            raise UsageError(f"QuantConfig.calibration_size must be >= 1 (got {self.calibration_size})")


def calibration_batch(images: np.ndarray, meta: ArtifactMeta, cfg: QuantConfig) -> np.ndarray:
    """Up to ``cfg.calibration_size`` images, drawn at random, preprocessed as the device will."""
    if len(images) == 0:
        raise UsageError("int8 calibration needs at least one image")
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(len(images))[: cfg.calibration_size]
    return normalize(images[np.sort(pick)], meta.mean, meta.std)


def _int8_meta(meta: ArtifactMeta, cfg: QuantConfig, runtime: str) -> ArtifactMeta:
    extra = {**meta.extra, "quantization": {"runtime": runtime, **asdict(cfg)}}
    return ArtifactMeta(**{**meta.__dict__, "precision": "int8", "extra": extra})


# ---- ONNX ------------------------------------------------------------------------------------


def quantize_onnx(fp32_path: str, out_path: str, calib: np.ndarray, cfg: QuantConfig = QuantConfig()) -> str:
    """Statically quantise the fp32 ONNX artifact ``fp32_path``; ``calib`` is preprocessed NCHW float32.

    Writes ``out_path`` (metadata re-embedded with precision ``int8``) and its sidecar; returns sha256.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(fp32_path)
    meta = _int8_meta(_onnx_meta(proto, fp32_path), cfg, "onnxruntime")
    head = [n.name for n in proto.graph.node if proto.graph.output[0].name in n.output] if cfg.float_head else []
    act = QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "int8.onnx")
        try:
            quantize_static(
                fp32_path,
                raw,
                _CalibrationReader(proto.graph.input[0].name, calib),
                quant_format=getattr(QuantFormat, cfg.quant_format),
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=act,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, cfg.calibrate_method),
                nodes_to_exclude=head,
            )
        except Exception as exc:  # onnxruntime's quantiser fails with plain Python errors on graphs it cannot handle
            raise ArtifactError(
                f"{fp32_path}: onnxruntime cannot quantise it as {cfg.quant_format} "
                f"({exc.__class__.__name__}: {exc}); QDQ handles more graphs"
            ) from None
        quantized = onnx.load(raw)
    del quantized.metadata_props[:]
    entry = quantized.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    atomic_write_bytes(out_path, quantized.SerializeToString())
    digest = sha256_file(out_path)
    write_sidecar(out_path, meta, digest)
    return digest


def _onnx_meta(proto: onnx.ModelProto, source: str) -> ArtifactMeta:
    text = {p.key: p.value for p in proto.metadata_props}.get(META_KEY)
    if text is None:
        raise ArtifactError(f"{source}: no ECOS metadata in the model")
    return ArtifactMeta.from_json(text, source)


class _CalibrationReader(CalibrationDataReader):
    """Feeds the calibration images to onnxruntime's calibrator in small batches."""

    def __init__(self, input_name: str, calib: np.ndarray, batch: int = 32):
        self._batches = self._iterate(input_name, calib, batch)

    @staticmethod
    def _iterate(name: str, calib: np.ndarray, batch: int) -> Iterator[dict]:
        for start in range(0, len(calib), batch):
            yield {name: np.ascontiguousarray(calib[start : start + batch], dtype=np.float32)}

    def get_next(self) -> Optional[dict]:
        return next(self._batches, None)


# ---- TFLite ----------------------------------------------------------------------------------


def quantize_tflite(
    model: nn.Module, meta: ArtifactMeta, out_path: str, calib: np.ndarray, cfg: QuantConfig = QuantConfig()
) -> str:
    """PT2E static int8 (symmetric, per channel per ``cfg``) of ``model``, converted to TFLite.

    The int8 model's input (and output, unless ``float_head`` keeps the linear layers in
    float) is an int8 tensor with a scale and zero point; the device runtime quantises the
    preprocessed image and dequantises the output from those.
    """
    from litert_torch.quantize import pt2e_quantizer as pt2e
    from litert_torch.quantize.quant_config import QuantConfig as LiteRtQuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e.PT2EQuantizer().set_global(pt2e.get_symmetric_quantization_config(is_per_channel=cfg.per_channel))
    if cfg.float_head:
        # Every nn.Linear stays float (in our classifiers: the head). set_module_name refuses None,
        # and the type filter compares the type *names* that torch.export records.
        quantizer.set_module_type(f"{nn.Linear.__module__}.{nn.Linear.__qualname__}", None)
    c, h, w = meta.input_shape
    sample = (torch.zeros(1, c, h, w),)
    graph = torch.export.export(model.eval(), sample).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for image in torch.from_numpy(np.ascontiguousarray(calib, dtype=np.float32)):
            prepared(image[None])
    quantized = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
    return export_tflite(
        quantized, _int8_meta(meta, cfg, "litert"), out_path, quant_config=LiteRtQuantConfig(pt2e_quantizer=quantizer)
    )
