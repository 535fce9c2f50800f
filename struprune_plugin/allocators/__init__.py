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
#: every layer's keep share within +-0.1 of the mean. It beat uniform ratios (same solver) in every
#: cell measured, SmolLM2-135M and Gemma-3-270M at 20 to 60 % on Wikipedia and news; unbounded, the
#: same rule loses at 50 % (it cuts Gemma's last layer to 0.24). integration/results/allocation.md.
DEFAULT_TEMPERATURE = 1.0
AUTO_MAX_DEVIATION = 0.1

__all__ = [
    "ALLOCATIONS",
    "AUTO_MAX_DEVIATION",
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
