"""Group energies: the loss of removing one structured group, from calibration statistics only.

Three definitions (method.md section 2), all computed from per-feature moments of the inputs, so
no activation is stored:
* ``wanda``: sum over the group's weights of |W_ij| * ||X_j|| (the Wanda-sp score).
* ``obs``: output-side OBS with a diagonal Hessian: sum_c ||W_out[:, c]||^2 * ||x_c||^2 over the
  group's input columns c of down_proj / o_proj. For one column this is exactly the squared
  output error of removing it without compensation.
* ``flap``: FLAP's fluctuation, the same with the variance of x_c instead of its second moment:
  the error left after the column's mean is folded into a bias (bias compensation).

Layer energies for the allocator are the mean energy per removed parameter over the layer's
groups, normalised across layers (log, then z-score by default), so a temperature has a meaning
that does not depend on the model's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .scoring import LayerInputs, head_scores, mlp_channel_scores

ENERGIES = ("wanda", "obs", "flap")
NORMALISATIONS = ("log-z", "z", "log", "none")


@dataclass
class LayerMoments:
    """Second moments and variances of the inputs of a decoder layer's linears.

    A pass that records only some inputs (the heads pass needs no MLP statistics) leaves the
    others None; the energies of the unit kind it serves never read them.
    """

    tokens: int
    attn_in_norm: torch.Tensor | None = None
    o_in_sq: torch.Tensor | None = None  # sum over tokens of a_c^2
    o_in_var: torch.Tensor | None = None  # per-token variance of a_c (times tokens = centred sum of squares)
    mlp_in_norm: torch.Tensor | None = None
    mlp_hidden_sq: torch.Tensor | None = None
    mlp_hidden_var: torch.Tensor | None = None

    @classmethod
    def from_stats(cls, stats: dict) -> LayerMoments:
        def get(name, what):
            return what(stats[name]) if name in stats else None

        return cls(
            tokens=next(iter(stats.values())).tokens,
            attn_in_norm=get("attn_in", lambda m: m.norms()),
            o_in_sq=get("o_in", lambda m: m.sum_sq.float()),
            o_in_var=get("o_in", lambda m: m.variance()),
            mlp_in_norm=get("mlp_in", lambda m: m.norms()),
            mlp_hidden_sq=get("mlp_hidden", lambda m: m.sum_sq.float()),
            mlp_hidden_var=get("mlp_hidden", lambda m: m.variance()),
        )

    def wanda_inputs(self) -> LayerInputs:
        return LayerInputs(
            attn_in=self.attn_in_norm,
            o_in=None if self.o_in_sq is None else self.o_in_sq.sqrt(),
            mlp_in=self.mlp_in_norm,
            mlp_hidden=None if self.mlp_hidden_sq is None else self.mlp_hidden_sq.sqrt(),
        )


def _output_side(
    kind: str, w_out: torch.Tensor, sq: torch.Tensor, var: torch.Tensor, tokens: int
) -> torch.Tensor:
    """Per input column c of an output projection: ||W[:, c]||^2 times sum_t x_tc^2 (obs) or its
    centred version sum_t (x_tc - mean_c)^2 (flap)."""
    col = w_out.detach().float().pow(2).sum(0)
    return col * (sq if kind == "obs" else var * tokens)


def mlp_channel_energy(
    kind: str, mlp_in: Sequence[torch.Tensor], mlp_out: torch.Tensor, moments: LayerMoments
) -> torch.Tensor:
    if kind == "wanda":
        return mlp_channel_scores("wanda-sp", mlp_in, mlp_out, moments.wanda_inputs())
    return _output_side(kind, mlp_out, moments.mlp_hidden_sq, moments.mlp_hidden_var, moments.tokens)


def head_energy(
    kind: str,
    unit: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    head_dim: int,
    moments: LayerMoments,
) -> torch.Tensor:
    """One energy per unit: query head ('query') or K/V group with its query heads ('kv_group')."""
    if kind == "wanda":
        return head_scores("wanda-sp", unit, q, k, v, o, head_dim, moments.wanda_inputs())
    per_channel = _output_side(kind, o, moments.o_in_sq, moments.o_in_var, moments.tokens)
    per_head = per_channel.reshape(-1, head_dim).sum(1)
    if unit == "query":
        return per_head
    group_size = q.shape[0] // k.shape[0]
    return per_head.reshape(-1, group_size).sum(1)


def layer_energy(group_energies: torch.Tensor, group_cost: int) -> float:
    """Mean energy per removed parameter over the layer's groups (the mean-field block energy)."""
    return float(group_energies.double().mean() / group_cost)


def normalise(values: Sequence[float], how: str = "log-z") -> list[float]:
    """Make layer energies comparable across models: log (energies span decades), then z-score."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; choose one of {NORMALISATIONS}")
    x = torch.tensor(values, dtype=torch.float64)
    if how in ("log-z", "log"):
        x = torch.log(x.clamp(min=torch.finfo(torch.float64).tiny))
    if how in ("log-z", "z") and x.numel() > 1:
        std = float(x.std())
        x = (x - x.mean()) / (std if std > 0 and math.isfinite(std) else 1.0)
    return x.tolist()
