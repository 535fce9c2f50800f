"""Uniform ratios: every layer loses the same share (StructPrune's T = inf limit, measured best so far)."""

from __future__ import annotations

import math

from ..allocation import allocate_softmax_budget
from .base import Allocator, LayerMeasurements, register


@register
class UniformAllocator(Allocator):
    name = "uniform"
    uniform = True

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        return allocate_softmax_budget(measured.spaces, None, target, math.inf, channels_first)
