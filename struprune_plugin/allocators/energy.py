"""The paper's rule: a temperature softmax (Fermi-Dirac) over normalised layer energies.

`energy` uses the absolute removal energy per parameter (the output-side error a layer's groups
would cause). Its level follows the residual stream's scale, which grows with depth, so it sends
pruning to early layers. `energy-relative` divides each layer's energy by the mean squared norm of
the residual stream entering it: the *relative* error the layer adds, which is what the rest of the
model feels (the next layers' norms rescale the stream). Both keep the temperature's meaning:
T = inf is uniform, T -> 0 greedy by energy. StructPrune's default ("auto") is `energy-relative` at
T = 1 within a trust region of 0.8 to 1.2 times the mean kept share (`relative_deviation=0.2`).
"""

from __future__ import annotations

from .base import LayerMeasurements, SoftmaxAllocator, register


@register
class EnergySoftmaxAllocator(SoftmaxAllocator):
    name = "energy"
    needs = frozenset({"energies"})

    def layer_energies(self, measured: LayerMeasurements, target: float) -> dict[str, list[float]]:
        return measured.require("energies", self.name)


@register
class RelativeEnergySoftmaxAllocator(SoftmaxAllocator):
    name = "energy-relative"
    needs = frozenset({"energies", "stream"})

    def layer_energies(self, measured: LayerMeasurements, target: float) -> dict[str, list[float]]:
        energies = measured.require("energies", self.name)
        stream = measured.require("stream", self.name)
        return {
            kind: [e / max(s, 1e-30) for e, s in zip(values, stream)] for kind, values in energies.items()
        }
