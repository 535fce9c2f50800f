"""Layer allocation rules behind one interface (see base.py); importing registers them all."""

from __future__ import annotations

from . import energy, kl, owl, slimgpt, threshold, uniform  # noqa: F401  (registration)
from .base import (
    MEASUREMENTS,
    REGISTRY,
    Allocator,
    LayerMeasurements,
    SensitivityCurves,
    layer_capacity,
    layer_masses,
    register,
)
from .kl import probe_levels

ALLOCATIONS = tuple(REGISTRY)

#: StructPrune's default allocation ("auto" at finite T): the relative-energy softmax at T = 1 with
#: every layer's keep share within (1 +- 0.2) x the mean kept share. Measured
#: (integration/results/allocation.md) on SmolLM2-135M and Gemma-3-270M, 20 to 60 %. Unbounded,
#: the rule loses at 50 % (it cuts Gemma's last layer to 0.24); with a fixed +-0.1 it wins up to
#: 50 % but loses on Gemma at 60 % (+6.9 %), where 0.1 is a quarter of the mean share; the bound
#: proportional to the mean share wins there (-8.3 %).
DEFAULT_TEMPERATURE = 1.0
AUTO_TRUST_REGION = {"relative_deviation": 0.2}

__all__ = [
    "ALLOCATIONS",
    "AUTO_TRUST_REGION",
    "DEFAULT_TEMPERATURE",
    "MEASUREMENTS",
    "REGISTRY",
    "Allocator",
    "LayerMeasurements",
    "SensitivityCurves",
    "layer_capacity",
    "layer_masses",
    "probe_levels",
    "register",
]
