"""OWL's outlier-weighted layer ratios (Yin et al., ICML 2024): a layer whose Wanda scores hold
more outliers (scores above M times the layer's mean) is pruned less, within +-lam of the target."""

from __future__ import annotations

from ..allocation import owl_schedule, schedule_budget
from .base import Allocator, LayerMeasurements, layer_masses, register


@register
class OWLAllocator(Allocator):
    name = "owl"
    needs = frozenset({"outliers"})

    def __init__(self, lam: float = 0.08, m: float = 5.0) -> None:
        self.lam = float(lam)
        self.m = float(m)

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        sparsity = target / sum(layer_masses(measured.spaces))
        ratios = owl_schedule(measured.require("outliers", self.name), min(sparsity, 0.999), self.lam)
        return schedule_budget(measured.spaces, ratios, target, channels_first)

    def options(self) -> dict:
        return {"lam": self.lam, "m": self.m}
