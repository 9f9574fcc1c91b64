"""Samplers that pick the proxy set S from the pool: ECOS and the baselines, by name.

Importing the implementation modules fills the registry, so ``get_sampler("ecos")`` works
after ``import cloud.sampling``.
"""

from __future__ import annotations

from cloud.sampling import ecos, kcenter, random  # noqa: F401  (registers the samplers)
from cloud.sampling.base import PoolView, Sampler, ScoreSet, get_sampler, list_samplers, register_sampler
from cloud.sampling.ecos import EcosSampler, SamplingPlan, proportional_quotas
from cloud.sampling.farthest import farthest_first

__all__ = [
    "EcosSampler",
    "PoolView",
    "Sampler",
    "SamplingPlan",
    "ScoreSet",
    "farthest_first",
    "get_sampler",
    "list_samplers",
    "proportional_quotas",
    "register_sampler",
]
