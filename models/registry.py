"""A name -> builder registry, in the spirit of torchvision.models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from device_sdk.errors import UsageError

KINDS = ("encoder", "teacher", "student")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    builder: Callable
    doc: str


_REGISTRY: Dict[str, ModelInfo] = {}


def register_model(name: str, kind: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``builder`` as model ``name`` of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def wrap(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        summary = (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = ModelInfo(name, kind, builder, summary)
        return builder

    return wrap


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def get_model(name: str, **kwargs):
    """Build the registered model ``name`` with ``kwargs``."""
    return model_info(name).builder(**kwargs)


def list_models(kind: Optional[str] = None) -> List[str]:
    return sorted(n for n, info in _REGISTRY.items() if kind is None or info.kind == kind)
