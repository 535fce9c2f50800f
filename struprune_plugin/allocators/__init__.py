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

__all__ = [
    "ALLOCATIONS",
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
