"""Group scores for the one-shot baselines: magnitude and Wanda-sp.

Both add up per-weight contributions over every weight a group would remove, so a group's score
is comparable across the linears it spans:
* ``magnitude``: the group's L2 norm, sqrt(sum of W_ij^2) (Torch-Pruning's GroupMagnitudeImportance
  with p=2, summed instead of averaged so every weight counts once).
* ``wanda-sp``: sum of |W_ij| * ||X_j||_2, X the calibration input of that linear (Wanda's score,
  summed over the structured group; An et al. 2024 use it as the structured Wanda baseline).
Weights are [out, in] as in nn.Linear; `in_norms` are per-input-feature L2 norms over all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

METHODS = ("magnitude", "wanda-sp")
NEEDS_CALIBRATION = {"magnitude": False, "wanda-sp": True}


def _row_contrib(method: str, weight: torch.Tensor, in_norm: torch.Tensor | None) -> torch.Tensor:
    """Per output row: the additive contribution of that row's weights."""
    w = weight.detach().float()
    if method == "magnitude":
        return w.pow(2).sum(1)
    return (w.abs() * in_norm.float().unsqueeze(0)).sum(1)


def _col_contrib(method: str, weight: torch.Tensor, in_norm: torch.Tensor | None) -> torch.Tensor:
    """Per input column: the additive contribution of that column's weights."""
    w = weight.detach().float()
    if method == "magnitude":
        return w.pow(2).sum(0)
    return w.abs().sum(0) * in_norm.float()


def _finish(method: str, total: torch.Tensor) -> torch.Tensor:
    return total.sqrt() if method == "magnitude" else total


def _per_head(values: torch.Tensor, head_dim: int) -> torch.Tensor:
    return values.reshape(-1, head_dim).sum(1)


@dataclass
class LayerInputs:
    """Per-feature L2 norms of the four inputs a decoder layer's linears see (None for magnitude)."""

    attn_in: torch.Tensor | None = None  # input of q/k/v
    o_in: torch.Tensor | None = None  # input of o_proj (attention output, heads concatenated)
    mlp_in: torch.Tensor | None = None  # input of gate/up (fc1)
    mlp_hidden: torch.Tensor | None = None  # input of down (fc2)


def mlp_channel_scores(
    method: str, mlp_in: Sequence[torch.Tensor], mlp_out: torch.Tensor, norms: LayerInputs
) -> torch.Tensor:
    total = sum(_row_contrib(method, w, norms.mlp_in) for w in mlp_in)
    total = total + _col_contrib(method, mlp_out, norms.mlp_hidden)
    return _finish(method, total)


def head_scores(
    method: str,
    unit: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    head_dim: int,
    norms: LayerInputs,
) -> torch.Tensor:
    """One score per unit: per query head ('query') or per K/V group with its query heads ('kv_group')."""
    query = _per_head(_row_contrib(method, q, norms.attn_in), head_dim)
    query = query + _per_head(_col_contrib(method, o, norms.o_in), head_dim)
    if unit == "query":
        return _finish(method, query)
    kv = _per_head(_row_contrib(method, k, norms.attn_in) + _row_contrib(method, v, norms.attn_in), head_dim)
    group_size = query.numel() // kv.numel()
    return _finish(method, query.reshape(-1, group_size).sum(1) + kv)
