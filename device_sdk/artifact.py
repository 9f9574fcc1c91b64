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

from .errors import ArtifactError

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

    @property
    def image_size(self) -> Tuple[int, int]:
        return (int(self.input_shape[1]), int(self.input_shape[2]))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "artifact") -> "ArtifactMeta":
        try:
            raw = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{source}: metadata is not valid JSON ({exc})") from None
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ArtifactError(f"{source}: metadata lacks {', '.join(missing)}")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            meta = cls(**known)
            shape = tuple(int(v) for v in meta.input_shape)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: malformed metadata ({exc})") from None
        if len(shape) != 3 or len(meta.mean) != shape[0] or len(meta.std) != shape[0]:
            raise ArtifactError(f"{source}: input_shape/mean/std do not agree ({shape}, {meta.mean}, {meta.std})")
        return cls(**{**known, "input_shape": shape, "mean": tuple(meta.mean), "std": tuple(meta.std)})
