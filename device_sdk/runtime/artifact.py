"""Self-describing model artifacts: the metadata every exported model carries.

The metadata (architecture, input shape, normalisation, labels, feature dimension, opset, ...)
is stored inside the ONNX file as the custom metadata entry ``ecos`` (JSON), so the device never
guesses preprocessing. The artifact's identity is the sha256 of the file's bytes, computed by
whoever loads it (a file cannot contain its own hash); a ``<file>.json`` sidecar written next
to it repeats the metadata with that sha256 for people and for transfer manifests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from device_sdk.errors import ArtifactError, InputError
from device_sdk.preprocess import Preprocess
from device_sdk.protocol.envelope import parse_json

META_KEY = "ecos"
REQUIRED = ("kind", "arch", "input_shape", "mean", "std")


@dataclass(frozen=True)
class ArtifactMeta:
    """What a runtime needs to feed a model correctly and to know what it returns."""

    kind: str  # "encoder" | "classifier"
    arch: str
    input_shape: Tuple[int, int, int]  # (channels, height, width), layout NCHW
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    feature_dim: Optional[int] = None
    labels: List[str] = field(default_factory=list)
    domains: List[str] = field(default_factory=list)
    opset: Optional[int] = None
    precision: str = "fp32"
    extra: Dict[str, Any] = field(default_factory=dict)
    # how a file is fitted and decoded (device_sdk/preprocess.py: resize, interpolation, exif, draft);
    # empty in artifacts made before it existed, which are read with the first version's rule (stretch, RGB)
    preprocess: Dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> Tuple[int, int]:
        return (int(self.input_shape[1]), int(self.input_shape[2]))

    @property
    def channels(self) -> int:
        return int(self.input_shape[0])

    def preprocessing(self) -> Preprocess:
        """The preprocessing this model was trained with, shared by the cloud and the device."""
        try:
            return Preprocess.from_meta(self.input_shape, self.mean, self.std, self.preprocess)
        except InputError as exc:
            raise ArtifactError(f"artifact {self.arch}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: Any, source: str = "artifact") -> "ArtifactMeta":
        """Parse metadata JSON; any defect (of syntax, type or range) is an ``ArtifactError``."""
        raw = parse_json(text, f"{source}: metadata", ArtifactError)
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: metadata is not a JSON object")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ArtifactError(f"{source}: metadata lacks {', '.join(missing)}")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        problem = _problem(known)
        if problem is not None:
            raise ArtifactError(f"{source}: malformed metadata ({problem})")
        return cls(
            **{
                **known,
                "input_shape": tuple(known["input_shape"]),
                "mean": tuple(known["mean"]),
                "std": tuple(known["std"]),
            }
        )


MAX_INPUT_DIM = 1 << 14


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _problem(meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the known fields of parsed metadata, or None."""
    shape, mean, std = meta["input_shape"], meta["mean"], meta["std"]
    if not _is_text(meta["kind"], 64) or not _is_text(meta["arch"], 128):
        return "kind and arch must be short strings"
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v, 1, MAX_INPUT_DIM) for v in shape):
        return f"input_shape must be 3 integers in [1, {MAX_INPUT_DIM}] (channels, height, width)"
    for name, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or len(values) != shape[0] or not all(_is_number(v) for v in values):
            return f"{name} must be {shape[0]} numbers, one per channel of input_shape"
    for name in ("feature_dim", "opset"):
        if meta.get(name) is not None and not _is_int(meta[name], 1, (1 << 31) - 1):
            return f"{name} must be null or a positive integer"
    for name in ("labels", "domains"):
        if not isinstance(meta.get(name, []), list) or not all(isinstance(v, str) for v in meta.get(name, [])):
            return f"{name} must be a list of strings"
    if not _is_text(meta.get("precision", "fp32"), 32):
        return "precision must be a short string"
    if not isinstance(meta.get("extra", {}), dict):
        return "extra must be an object"
    return _preprocess_problem(meta)


def _preprocess_problem(meta: Dict[str, Any]) -> Optional[str]:
    policy = meta.get("preprocess", {})
    if not isinstance(policy, dict):
        return "preprocess must be an object"
    if not policy:
        return None
    try:
        Preprocess.from_meta(meta["input_shape"], meta["mean"], meta["std"], policy)
    except (InputError, TypeError, ValueError) as exc:
        return str(exc)[:200]
    return None
