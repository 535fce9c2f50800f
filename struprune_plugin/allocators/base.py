"""One interface for every layer allocation rule: per-layer measurements + a budget -> counts.

In the spirit of Torch-Pruning's `Importance`: a rule is one class with one call. The engine runs
only the measurement passes a rule declares in `needs`, hands the results over in one
`LayerMeasurements`, and the rule returns integer removal counts per unit kind and layer whose
parameter cost meets the budget (within one coarse step). The engine, the llm-compressor modifier
and the Torch-Pruning adapter all go through `allocator_from_config`, so they agree by
construction, and a new rule is one module that subclasses `Allocator` and registers itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import is_number
from ..groups import UnitSpace

#: What an allocator may ask the engine to measure (each is one streamed pass, or part of one):
#: "energies": mean group energy per parameter, per layer and unit kind (the dense energy pass);
#: "groups": every group's energy (O(N) memory: the threshold reference);
#: "stream": the residual stream's mean squared norm entering each layer (scale-free energies);
#: "outliers": OWL's outlier ratio per layer (share of Wanda scores above M times their mean);
#: "sensitivity": measured end-to-end KL when only one layer is pruned (see `sensitivity.py`).
MEASUREMENTS = ("energies", "groups", "stream", "outliers", "sensitivity")


@dataclass
class SensitivityCurves:
    """kl[l][k]: mean per-token KL(dense || model with only layer l pruned at `levels[k]`), where a
    level is the removed share of that layer's prunable parameters. Measured on `tokens` tokens."""

    levels: list[float]
    kl: list[list[float]]
    tokens: int
    seconds: float = 0.0
    peak_stream_bytes: int = 0


@dataclass
class LayerMeasurements:
    """Everything the engine measured for an allocation; fields a rule did not ask for stay None."""

    spaces: dict[str, list[UnitSpace]]
    energies: dict[str, list[float]] | None = None
    group_energies: dict[str, list[torch.Tensor]] | None = None
    stream_energy: list[float] | None = None
    outlier_ratios: list[float] | None = None
    sensitivity: SensitivityCurves | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # pass name -> wall time

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.spaces.values())))

    def require(self, what: str, rule: str):
        value = {
            "energies": self.energies,
            "groups": self.group_energies,
            "stream": self.stream_energy,
            "outliers": self.outlier_ratios,
            "sensitivity": self.sensitivity,
        }[what]
        if value is None:
            raise ValueError(f"allocation {rule!r} needs the {what!r} measurement, which was not taken")
        return value


class Allocator(ABC):
    """A layer allocation rule. Subclasses set `name` (the registry key, the CLI's --allocation)
    and `needs` (a subset of MEASUREMENTS) and implement `allocate`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    #: True when the rule gives every layer the same ratio (equal_widths may apply).
    uniform: ClassVar[bool] = False

    @abstractmethod
    def allocate(
        self, measured: LayerMeasurements, target: float, channels_first: bool
    ) -> dict[str, list[int]]:
        """Removal counts per unit kind and layer whose parameter cost is `target` (within one
        coarse step); `channels_first` moves each layer's share onto its MLP channels first."""

    def options(self) -> dict:
        """The rule's settings, for reports and `allocation.json`."""
        return {}

    def describe(self) -> dict:
        return {"allocation": self.name, **self.options()}


#: The largest depth prior accepted: a hundred times the spread of the normalised energies.
MAX_DEPTH_PRIOR = 100.0


class SoftmaxAllocator(Allocator):
    """The paper's rule over some per-layer energy: a temperature softmax (Fermi-Dirac) with the
    exact budget, after log + z-score normalisation across layers. T = inf is uniform, T -> 0
    greedy by energy. Subclasses say which energy (`layer_energies`). `max_deviation` d bounds
    every layer's kept share to the mean's +- d (OWL's trust region around uniform): the energies
    rank layers, the bound keeps a far-from-uniform layer from compounding errors downstream.
    `relative_deviation` r sets d = r x the mean kept share instead, so the bound narrows as the
    model is pruned harder (every layer keeps between 1 - r and 1 + r times the mean share): at 60 %
    a fixed d = 0.1 lets a layer keep a quarter less than the mean, which cost Gemma-3-270M 7 %.

    `depth_prior` b >= 0 subtracts b x z(ln(1 + l)) from layer l's normalised energy, SlimGPT's
    log-increasing depth schedule as a prior: an error made early passes through every later
    layer, which a layer's own energy does not see. b = 0 is the energies alone; a large b orders
    the layers by depth alone (inside the trust region, the energies then only break ties)."""

    def __init__(
        self,
        temperature: float = 1.0,
        normalisation: str = "log-z",
        max_deviation: float | None = None,
        relative_deviation: float | None = None,
        depth_prior: float = 0.0,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (inf for uniform); got {temperature!r}")
        if max_deviation is not None and not (0 < float(max_deviation) < 1):
            raise ValueError(f"max_deviation must be a share in (0, 1), or None; got {max_deviation!r}")
        if relative_deviation is not None and not (0 < float(relative_deviation) < 1):
            raise ValueError(
                f"relative_deviation must be a fraction in (0, 1), or None; got {relative_deviation!r}"
            )
        if max_deviation is not None and relative_deviation is not None:
            raise ValueError("give max_deviation (absolute) or relative_deviation, not both")
        if not (is_number(depth_prior) and 0 <= float(depth_prior) <= MAX_DEPTH_PRIOR):
            raise ValueError(
                f"depth_prior must be a weight in [0, {MAX_DEPTH_PRIOR:g}] (0: none); got {depth_prior!r}. "
                f"The energies it is weighed against are z-scores of order 1: at {MAX_DEPTH_PRIOR:g} depth "
                "alone already orders the layers, and larger weights only overflow. Fix: a weight "
                f"between 0 and {MAX_DEPTH_PRIOR:g}"
            )
        self.depth_prior = float(depth_prior)
        self.temperature = float(temperature)
        self.normalisation = normalisation
        self.max_deviation = None if max_deviation is None else float(max_deviation)
        self.relative_deviation = None if relative_deviation is None else float(relative_deviation)

    def deviation_bound(self, spaces: dict[str, list[UnitSpace]], target: float) -> float | None:
        """The trust region's half-width d in kept share (None: unbounded)."""
        if self.relative_deviation is None:
            return self.max_deviation
        total = sum(layer_masses(spaces))
        mean_keep = max(0.0, total - target) / total if total else 1.0
        return self.relative_deviation * mean_keep

    @property
    def uniform(self) -> bool:  # type: ignore[override]
        return math.isinf(self.temperature)

    @abstractmethod
    def layer_energies(self, measured: LayerMeasurements, target: float) -> dict[str, list[float]]:
        """Per unit kind, one energy per layer (higher: keep more)."""

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        from ..allocation import allocate_softmax_budget
        from ..energies import normalise

        normalised = {
            kind: normalise(values, self.normalisation)
            for kind, values in self.layer_energies(measured, target).items()
        }
        if self.depth_prior:
            prior = normalise([math.log1p(layer) for layer in range(measured.num_layers)], "z")
            normalised = {
                kind: [e - self.depth_prior * p for e, p in zip(values, prior)]
                for kind, values in normalised.items()
            }
        bound = self.deviation_bound(measured.spaces, target)
        return allocate_softmax_budget(
            measured.spaces, normalised, target, self.temperature, channels_first, bound
        )

    def options(self) -> dict:
        return {
            "temperature": self.temperature,
            "normalisation": self.normalisation,
            "max_deviation": self.max_deviation,
            "relative_deviation": self.relative_deviation,
            "depth_prior": self.depth_prior,
        }


REGISTRY: dict[str, type[Allocator]] = {}


def register(cls: type[Allocator]) -> type[Allocator]:
    if cls.name in REGISTRY:
        raise ValueError(f"allocation {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def layer_masses(spaces: dict[str, list[UnitSpace]]) -> list[float]:
    """Prunable parameters per layer over the unit kinds in play."""
    layers = len(next(iter(spaces.values())))
    return [float(sum(spaces[k][i].n * spaces[k][i].cost for k in spaces)) for i in range(layers)]


def layer_capacity(spaces: dict[str, list[UnitSpace]]) -> list[float]:
    """The largest removable share of each layer (minimum groups kept, skipped layers 0)."""
    masses = layer_masses(spaces)
    return [
        sum(spaces[k][i].max_remove * spaces[k][i].cost for k in spaces) / m if m else 0.0
        for i, m in enumerate(masses)
    ]
