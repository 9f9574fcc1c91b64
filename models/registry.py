"""A name -> builder registry, in the spirit of torchvision.models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from device_sdk.registry import Registry

KINDS = ("encoder", "teacher", "student")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    builder: Callable
    doc: str


MODELS: Registry[ModelInfo] = Registry("model")


def register_model(name: str, kind: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``builder`` as model ``name`` of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def wrap(builder: Callable) -> Callable:
        summary = (builder.__doc__ or "").strip().split("\n")[0]
        MODELS.register(name, ModelInfo(name, kind, builder, summary))
        return builder

    return wrap


def model_info(name: str) -> ModelInfo:
    return MODELS.get(name)


def get_model(name: str, **kwargs):
    """Build the registered model ``name`` with ``kwargs``."""
    return model_info(name).builder(**kwargs)


def list_models(kind: Optional[str] = None) -> List[str]:
    return [name for name, info in MODELS.items() if kind is None or info.kind == kind]
