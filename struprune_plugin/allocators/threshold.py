"""One threshold on energy per parameter over every group of every layer.

The `energy-threshold` method's rule (first called "global"): it needs every group's energy at once
(O(N) scores), but the energies themselves are local (each layer's output-side error on the pruned
prefix's dense inputs), so it is a global *ranking* of local scores, not a global method."""

from __future__ import annotations

from ..allocation import threshold_budget
from .base import Allocator, LayerMeasurements, register


@register
class ThresholdAllocator(Allocator):
    name = "threshold"
    needs = frozenset({"groups"})

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        return threshold_budget(measured.spaces, measured.require("groups", self.name), target)
