"""SlimGPT's log-increasing layer schedule (Ling et al., NeurIPS 2024): early layers lose least,
because every later layer amplifies their error. Needs no measurement."""

from __future__ import annotations

from ..allocation import schedule_budget, slimgpt_schedule
from .base import Allocator, LayerMeasurements, layer_masses, register


@register
class SlimGPTAllocator(Allocator):
    name = "slimgpt"

    def __init__(self, first_share: float = 0.3125) -> None:
        self.first_share = float(first_share)

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        spaces = measured.spaces
        masses = layer_masses(spaces)
        active = [i for i in range(measured.num_layers) if any(spaces[k][i].max_remove > 0 for k in spaces)]
        sparsity = target / sum(masses[i] for i in active)
        schedule = slimgpt_schedule(len(active), min(sparsity, 0.999), self.first_share)
        ratios = [0.0] * measured.num_layers
        for i, r in zip(active, schedule):
            ratios[i] = r
        return schedule_budget(measured.spaces, ratios, target, channels_first)

    def options(self) -> dict:
        return {"first_share": self.first_share}
