"""Structured groups of a decoder layer, as plain integers: what a group is, what it costs, which
indices it covers. Framework-free on purpose: the allocator and solvers reason about these shapes,
and only the surgery step turns them back into module edits.

Units:
* ``mlp``: MLP channel j = row j of gate/up (or fc1 + its bias) and column j of down (or fc2).
* ``kv_group``: one K/V head with every query head that reads it (plain heads under MHA).
* ``query``: query heads removed evenly inside every KV group; K/V heads stay (so the KV cache
  layout stays uniform, which deployment runtimes expect). head_dim is never pruned (RoPE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import GQAConstraintError, WidthConstraintError

HEAD_UNITS = ("query", "kv_group")
UNIT_KINDS = ("mlp", "heads")


@dataclass(frozen=True)
class LayerGeometry:
    """The integer shapes of one decoder layer that the budget maths needs."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    mlp_in_count: int  # 2 for gated (gate, up), 1 for OPT (fc1)
    mlp_in_bias: bool
    qkv_bias: bool
    prunable_params: int  # every parameter of q, k, v, o and the MLP linears

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def mlp_channel_cost(self) -> int:
        return self.mlp_in_count * (self.hidden + int(self.mlp_in_bias)) + self.hidden

    @property
    def query_head_cost(self) -> int:
        return self.head_dim * (self.hidden + int(self.qkv_bias)) + self.hidden * self.head_dim

    @property
    def kv_head_cost(self) -> int:
        return 2 * self.head_dim * (self.hidden + int(self.qkv_bias))

    @property
    def kv_group_cost(self) -> int:
        return self.group_size * self.query_head_cost + self.kv_head_cost


@dataclass(frozen=True)
class UnitSpace:
    """How many groups of one kind a layer has, what each costs, and how they may be removed.

    Removal counts must be multiples of `step` (query heads: one per KV group at a time) and at
    least `min_keep` groups stay, so no layer loses all its heads or channels.
    """

    n: int
    cost: int
    step: int = 1
    min_keep: int = 1

    @property
    def max_remove(self) -> int:
        return max(0, (self.n - self.min_keep) // self.step * self.step)


def resolve_head_unit(head_unit: str, geometry: LayerGeometry) -> str:
    """'auto' means query-head pruning under GQA and whole heads (= KV groups) under MHA."""
    if head_unit == "auto":
        return "query" if geometry.group_size > 1 else "kv_group"
    if head_unit not in HEAD_UNITS:
        raise GQAConstraintError(f"unknown head unit {head_unit!r}; choose 'auto', 'query' or 'kv_group'")
    if head_unit == "query" and geometry.group_size == 1:
        raise GQAConstraintError(
            f"head unit 'query' keeps every K/V head, but this layer has {geometry.num_heads} query "
            f"heads over {geometry.num_kv_heads} K/V heads (one query head per K/V head), so no query "
            "head can be removed alone. Fix: use --head-unit kv_group (or auto)"
        )
    return head_unit


def unit_space(
    kind: str, geometry: LayerGeometry, head_unit: str, mlp_round_to: int = 1, min_query_per_kv: int = 1
) -> UnitSpace:
    """`mlp_round_to` keeps every MLP width a multiple of it (8 or 64 suit GEMM kernels): channels
    are then removed in steps of that many, and the width must already be such a multiple.
    `min_query_per_kv` keeps at least that many query heads on every K/V head (query unit)."""
    if kind == "mlp":
        if mlp_round_to < 1 or geometry.intermediate % mlp_round_to:
            raise WidthConstraintError(
                f"MLP width {geometry.intermediate} is not a multiple of mlp_round_to={mlp_round_to}, "
                "so the pruned widths cannot be either. Fix: choose a divisor of the width (e.g. 8) "
                "or 1 for no rounding"
            )
        return UnitSpace(
            n=geometry.intermediate, cost=geometry.mlp_channel_cost, step=mlp_round_to, min_keep=mlp_round_to
        )
    if kind != "heads":
        raise ValueError(f"unknown unit kind {kind!r}; choose from {UNIT_KINDS}")
    if resolve_head_unit(head_unit, geometry) == "kv_group":
        return UnitSpace(n=geometry.num_kv_heads, cost=geometry.kv_group_cost)
    return UnitSpace(
        n=geometry.num_heads,
        cost=geometry.query_head_cost,
        step=geometry.num_kv_heads,
        min_keep=geometry.num_kv_heads * min(min_query_per_kv, geometry.group_size),
    )


def head_channels(heads: Sequence[int], head_dim: int) -> list[int]:
    """Output channels of q (or input channels of o) that belong to the given heads."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def query_heads_of_kv(kv_heads: Sequence[int], group_size: int) -> list[int]:
    """HF GQA: query head h reads K/V head h // group_size."""
    return [g * group_size + j for g in kv_heads for j in range(group_size)]


@dataclass
class LayerPlan:
    """Which groups of one layer survive. Indices refer to the layer's current (dense) shapes."""

    keep_mlp: list[int]
    keep_heads: list[int]  # query heads
    keep_kv_heads: list[int]

    @classmethod
    def dense(cls, geometry: LayerGeometry) -> LayerPlan:
        return cls(
            keep_mlp=list(range(geometry.intermediate)),
            keep_heads=list(range(geometry.num_heads)),
            keep_kv_heads=list(range(geometry.num_kv_heads)),
        )

    def removed_params(self, geometry: LayerGeometry) -> int:
        mlp = (geometry.intermediate - len(self.keep_mlp)) * geometry.mlp_channel_cost
        heads = (geometry.num_heads - len(self.keep_heads)) * geometry.query_head_cost
        kv = (geometry.num_kv_heads - len(self.keep_kv_heads)) * geometry.kv_head_cost
        return mlp + heads + kv

    def validate(self, geometry: LayerGeometry) -> None:
        """The GQA rule: every surviving K/V head keeps the same number of query heads."""
        kept = set(self.keep_heads)
        per_group = [
            sum(h in kept for h in query_heads_of_kv([g], geometry.group_size))
            for g in range(geometry.num_kv_heads)
        ]
        survivors = [per_group[g] for g in self.keep_kv_heads]
        dropped = [per_group[g] for g in range(geometry.num_kv_heads) if g not in self.keep_kv_heads]
        if any(dropped) or len(set(survivors)) > 1 or (survivors and survivors[0] == 0):
            raise GQAConstraintError(
                f"plan keeps query heads per K/V group {per_group} with K/V heads {self.keep_kv_heads}: "
                "every kept K/V head must keep the same, non-zero number of query heads and removed "
                "K/V heads must lose all theirs"
            )
        if not self.keep_mlp:
            raise GQAConstraintError("plan removes every MLP channel of a layer")


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:keep].tolist())


def choose_channels(scores: Sequence[float], remove: int) -> list[int]:
    """Kept MLP channels: all but the `remove` lowest-scoring ones."""
    scores_t = torch.as_tensor(scores, dtype=torch.float64)
    return _top(scores_t, scores_t.numel() - remove)


def choose_heads(
    unit: str, scores: Sequence[float], remove: int, geometry: LayerGeometry
) -> tuple[list[int], list[int]]:
    """(kept query heads, kept K/V heads) after removing `remove` units of the given kind.

    `scores` has one entry per unit: per K/V group for 'kv_group', per query head for 'query'.
    Query-head removal takes the same number of lowest-scoring query heads from every KV group.
    """
    scores_t = torch.as_tensor(scores, dtype=torch.float64)
    if unit == "kv_group":
        kept_kv = _top(scores_t, geometry.num_kv_heads - remove)
        return query_heads_of_kv(kept_kv, geometry.group_size), kept_kv
    if remove % geometry.num_kv_heads:
        raise GQAConstraintError(
            f"removing {remove} of {geometry.num_heads} query heads cannot be spread evenly over "
            f"{geometry.num_kv_heads} KV groups. Fix: remove a multiple of {geometry.num_kv_heads}"
        )
    per_group = remove // geometry.num_kv_heads
    kept: list[int] = []
    for g in range(geometry.num_kv_heads):
        members = query_heads_of_kv([g], geometry.group_size)
        order = torch.argsort(scores_t[members], descending=True, stable=True)
        kept += [members[i] for i in order[: geometry.group_size - per_group].tolist()]
    return sorted(kept), list(range(geometry.num_kv_heads))
