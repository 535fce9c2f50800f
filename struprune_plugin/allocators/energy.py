"""The paper's rule: a temperature softmax (Fermi-Dirac) over normalised layer energies.

`energy` uses the absolute removal energy per parameter (the output-side error a layer's groups
would cause). Its level follows the residual stream's scale, which grows with depth, so it sends
pruning to early layers. `energy-relative` divides each layer's energy by the mean squared norm of
the residual stream entering it: the *relative* error the layer adds, which is what the rest of the
model feels (the next layers' norms rescale the stream). Both keep the temperature's meaning:
T = inf is uniform, T -> 0 greedy by energy.
"""

from __future__ import annotations

import math

from ..allocation import allocate_softmax_budget
from ..energies import normalise
from .base import Allocator, LayerMeasurements, register


@register
class EnergySoftmaxAllocator(Allocator):
    name = "energy"
    needs = frozenset({"energies"})

    def __init__(self, temperature: float = 1.0, normalisation: str = "log-z") -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (inf for uniform); got {temperature!r}")
        self.temperature = float(temperature)
        self.normalisation = normalisation

    @property
    def uniform(self) -> bool:  # type: ignore[override]
        return math.isinf(self.temperature)

    def layer_energies(self, measured: LayerMeasurements) -> dict[str, list[float]]:
        return measured.require("energies", self.name)

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        normalised = {
            kind: normalise(values, self.normalisation)
            for kind, values in self.layer_energies(measured).items()
        }
        return allocate_softmax_budget(measured.spaces, normalised, target, self.temperature, channels_first)

    def options(self) -> dict:
        return {"temperature": self.temperature, "normalisation": self.normalisation}


@register
class RelativeEnergySoftmaxAllocator(EnergySoftmaxAllocator):
    name = "energy-relative"
    needs = frozenset({"energies", "stream"})

    def layer_energies(self, measured: LayerMeasurements) -> dict[str, list[float]]:
        energies = measured.require("energies", self.name)
        stream = measured.require("stream", self.name)
        return {
            kind: [e / max(s, 1e-30) for e, s in zip(values, stream)] for kind, values in energies.items()
        }
