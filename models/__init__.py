"""PyTorch model definitions (encoders, teachers, students) behind a small registry.

``register_model`` adds a builder under a name and a kind; ``get_model(name, **kwargs)`` builds
one; ``list_models(kind)`` lists them. Only the cloud imports this package (it needs torch).
"""

from __future__ import annotations

from . import encoder, student, teacher  # noqa: F401  (fills the registry)
from .registry import get_model, list_models, model_info, register_model  # noqa: F401

__all__ = ["get_model", "list_models", "model_info", "register_model"]
