"""Turn a parameter budget into integer group counts per layer, hitting the budget within one group.

A structured model cannot remove an arbitrary number of parameters: heads come in chunks of
~2*d*head_dim parameters, KV groups in bigger ones. The allocator therefore treats heads as the
coarse part (a per-layer ratio rounded to feasible counts) and lets MLP channels, the fine part,
absorb the remainder, so the achieved sparsity matches the request to within one MLP channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import GQAConstraintError, InvalidSparsityError
from .groups import UnitSpace


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise InvalidSparsityError(
            f"{name} must be in [0, 1) (a fraction of the prunable parameters to remove); got {sparsity!r}. "
            "Fix: e.g. --sparsity 0.3 for 30 %"
        )
    return float(sparsity)


def fill_evenly(spaces: Sequence[UnitSpace], target_cost: float) -> list[int]:
    """Removal counts with the same ratio in every layer and total cost within one group of target.

    Each layer first gets floor(ratio * n) (in whole steps); the leftover cost goes one step at a
    time to the layers with the largest rounding remainders, as long as that brings the total closer.
    """
    if target_cost <= 0 or not spaces:
        return [0] * len(spaces)
    full = sum(s.max_remove * s.cost for s in spaces)
    ratio = min(1.0, target_cost / max(1, sum(s.n * s.cost for s in spaces)))
    if target_cost >= full:
        return [s.max_remove for s in spaces]
    steps = [ratio * s.n / s.step for s in spaces]
    counts = [min(math.floor(x) * s.step, s.max_remove) for x, s in zip(steps, spaces)]
    remaining = target_cost - sum(c * s.cost for c, s in zip(counts, spaces))
    while True:
        order = sorted(
            range(len(spaces)),
            key=lambda i: (-(steps[i] - counts[i] / spaces[i].step), i),
        )
        for i in order:
            add = spaces[i].step * spaces[i].cost
            if counts[i] + spaces[i].step <= spaces[i].max_remove and remaining - add > -add / 2:
                counts[i] += spaces[i].step
                remaining -= add
                break
        else:
            return counts


def fixed_ratio(spaces: Sequence[UnitSpace], ratio: float, strict: bool) -> list[int]:
    """The same removal ratio in every layer, rounded to feasible counts (GQA: multiples of the KV heads).

    With `strict` a ratio that some layer cannot honour exactly is an error rather than rounded.
    """
    counts = []
    for s in spaces:
        exact = ratio * s.n
        count = min(round(exact / s.step) * s.step, s.max_remove)
        if strict and abs(count - exact) > 1e-6:
            feasible = sorted({k / s.n for k in range(0, s.max_remove + 1, s.step)})
            raise GQAConstraintError(
                f"head ratio {ratio:g} asks for {exact:g} of {s.n} heads, but only multiples of {s.step} "
                f"(at most {s.max_remove}) can be removed here. Feasible ratios: "
                f"{', '.join(f'{r:.4g}' for r in feasible)}. Fix: pick one of those, or let the allocator "
                "choose (omit --head-sparsity), or use --head-unit kv_group"
            )
        counts.append(count)
    return counts


def allocate_uniform(
    spaces: dict[str, list[UnitSpace]],
    total_prunable: int,
    sparsity: float,
    head_sparsity: float | None = None,
) -> dict[str, list[int]]:
    """Uniform (local) allocation: the same ratio in every layer, exact global parameter budget.

    `spaces` maps a unit kind ('heads', 'mlp') to one UnitSpace per layer. Heads get the requested
    ratio (or `head_sparsity`, honoured exactly), rounded to whole feasible counts; MLP channels
    take up whatever is left of the budget.
    """
    check_sparsity(sparsity)
    target = sparsity * total_prunable
    counts: dict[str, list[int]] = {}
    if "heads" in spaces:
        head_spaces = spaces["heads"]
        if head_sparsity is not None:
            check_sparsity(head_sparsity, "head sparsity")
            counts["heads"] = fixed_ratio(head_spaces, head_sparsity, strict=True)
        elif "mlp" in spaces:
            counts["heads"] = fixed_ratio(head_spaces, sparsity, strict=False)
            if _cost(counts["heads"], head_spaces) > target:  # rounding up overshot: round down
                counts["heads"] = [
                    min(int(sparsity * s.n / s.step) * s.step, s.max_remove) for s in head_spaces
                ]
        else:
            counts["heads"] = fill_evenly(head_spaces, target)
        target -= _cost(counts["heads"], head_spaces)
    if "mlp" in spaces:
        counts["mlp"] = fill_evenly(spaces["mlp"], max(0.0, target))
    return counts


def _cost(counts: Sequence[int], spaces: Sequence[UnitSpace]) -> int:
    return sum(c * s.cost for c, s in zip(counts, spaces))
