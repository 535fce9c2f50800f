"""Allocation from measured end-to-end damage: the KL divergence of the final logits when only one
layer is pruned (`sensitivity.py` measures it, one layer resident, all perturbed streams together).

* `kl`: the paper's temperature softmax, with each layer's energy its measured KL increase per
  removed parameter at the target share. T keeps its meaning (inf = uniform).
* `kl-knapsack`: minimise the sum of the layers' measured KL curves (linear between the measured
  levels, 0 at 0) under the exact budget, by dynamic programming over a fine grid of per-layer
  shares. The curves stop at the largest measured level, which bounds how far any layer may move
  above uniform (by default 1.5 x the target). `max_deviation` adds a trust region as OWL's
  (every layer's share within +-max_deviation of the target share): single-layer curves ignore how
  layers' errors compound, and a layer whose curve flattens after a costly first probe (one
  critical unit removed early) would otherwise look cheap to cut far below uniform."""

from __future__ import annotations

import math

import torch

from ..allocation import schedule_budget
from .base import (
    Allocator,
    LayerMeasurements,
    SensitivityCurves,
    SoftmaxAllocator,
    layer_capacity,
    layer_masses,
    register,
)

#: Probe levels as multiples of the target share; the middle one is the softmax rule's energy.
DEFAULT_LEVEL_MULTIPLES = (0.5, 1.0, 1.5)
#: No probe removes more than this share of a layer.
MAX_PROBE_LEVEL = 0.9


def probe_levels(sparsity: float, multiples=DEFAULT_LEVEL_MULTIPLES) -> list[float]:
    return sorted({round(min(m * sparsity, MAX_PROBE_LEVEL), 6) for m in multiples if m > 0})


@register
class KLSoftmaxAllocator(SoftmaxAllocator):
    name = "kl"
    needs = frozenset({"sensitivity"})

    def __init__(
        self,
        temperature: float = 1.0,
        normalisation: str = "log-z",
        level_multiples=None,
        max_deviation: float | None = None,
        relative_deviation: float | None = None,
    ) -> None:
        super().__init__(temperature, normalisation, max_deviation, relative_deviation)
        self.level_multiples = tuple(float(m) for m in level_multiples or DEFAULT_LEVEL_MULTIPLES)

    def layer_energies(self, measured: LayerMeasurements, target: float) -> dict[str, list[float]]:
        """Each layer's measured KL increase per removed parameter at the probe level nearest the
        target share, the same for every unit kind of the layer."""
        curves: SensitivityCurves = measured.require("sensitivity", self.name)
        masses = layer_masses(measured.spaces)
        share = target / sum(masses)
        k = min(range(len(curves.levels)), key=lambda j: abs(curves.levels[j] - share))
        energy = [
            max(kl[k], 1e-12) / (curves.levels[k] * m) if m else 1.0 for kl, m in zip(curves.kl, masses)
        ]
        return {kind: energy for kind in measured.spaces}

    def options(self) -> dict:
        return {**super().options(), "level_multiples": list(self.level_multiples)}


@register
class KLKnapsackAllocator(Allocator):
    name = "kl-knapsack"
    needs = frozenset({"sensitivity"})

    def __init__(
        self, level_multiples=None, grid: int = 48, bins: int = 4000, max_deviation: float | None = None
    ) -> None:
        if max_deviation is not None and not (0 < float(max_deviation) < 1):
            raise ValueError(f"max_deviation must be a share in (0, 1), or None; got {max_deviation!r}")
        self.level_multiples = tuple(float(m) for m in level_multiples or DEFAULT_LEVEL_MULTIPLES)
        self.grid = int(grid)
        self.bins = int(bins)
        self.max_deviation = None if max_deviation is None else float(max_deviation)

    def allocate(self, measured: LayerMeasurements, target: float, channels_first: bool):
        curves: SensitivityCurves = measured.require("sensitivity", self.name)
        ratios = knapsack_shares(
            curves,
            layer_masses(measured.spaces),
            layer_capacity(measured.spaces),
            target,
            self.grid,
            self.bins,
            self.max_deviation,
        )
        return schedule_budget(measured.spaces, ratios, target, channels_first)

    def options(self) -> dict:
        return {
            "level_multiples": list(self.level_multiples),
            "grid": self.grid,
            "bins": self.bins,
            "max_deviation": self.max_deviation,
        }


def interpolate_curve(levels: list[float], values: list[float], x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear damage through (0, 0) and the measured points (x within the last level)."""
    xs = torch.tensor([0.0, *levels], dtype=torch.float64)
    ys = torch.tensor([0.0, *values], dtype=torch.float64)
    idx = torch.searchsorted(xs, x.clamp(max=float(xs[-1])), right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    return y0 + (y1 - y0) * (x.clamp(max=float(xs[-1])) - x0) / (x1 - x0)


def knapsack_shares(
    curves: SensitivityCurves,
    masses: list[float],
    capacity: list[float],
    target: float,
    grid: int = 48,
    bins: int = 4000,
    max_deviation: float | None = None,
) -> list[float]:
    """Per-layer removed shares minimising sum_l D_l(share_l) with sum_l share_l * mass_l = target.

    Exact over the grid (grid + 1 evenly spaced shares from lo to top per layer, top = min(last
    level, capacity), lo = 0; with `max_deviation` d both are clipped to the target share +- d) and
    the budget discretised into `bins`: a dynamic programme over layers, then a backtrack. The
    caller rescales and rounds to the exact budget."""
    total = sum(masses)
    unit = total / bins
    mean_share = target / total
    goal = round(target / unit)
    best = torch.full((bins + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices, options = [], []
    for kl, mass, cap in zip(curves.kl, masses, capacity):
        top, lo = min(curves.levels[-1], cap), 0.0
        if max_deviation is not None:
            top = min(top, mean_share + max_deviation)
            lo = min(max(0.0, mean_share - max_deviation), top)
        shares = (
            torch.linspace(lo, top, grid + 1, dtype=torch.float64)
            if top > lo
            else torch.full((1,), top, dtype=torch.float64)
        )
        damage = interpolate_curve(curves.levels, kl, shares)
        costs = torch.round(shares * mass / unit).long()
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(bins + 1, dtype=torch.long)
        for j, (c, d) in enumerate(zip(costs.tolist(), damage.tolist())):
            if c > bins:
                continue
            cand = torch.full_like(best, math.inf)
            cand[c:] = best[: bins + 1 - c] + d
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        choices.append(pick)
        options.append((shares, costs))
    reachable = torch.nonzero(torch.isfinite(best)).flatten()
    if reachable.numel() == 0:
        raise ValueError("no allocation over the measured levels is feasible")
    b = int(reachable[torch.argmin((reachable - goal).abs())])
    out = [0.0] * len(masses)
    for layer in range(len(masses) - 1, -1, -1):
        j = int(choices[layer][b])
        shares, costs = options[layer]
        out[layer] = float(shares[j])
        b -= int(costs[j])
    return out
