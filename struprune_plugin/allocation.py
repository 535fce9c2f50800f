"""Turn a parameter budget into integer group counts per layer, hitting the budget within one group.

A structured model cannot remove an arbitrary number of parameters: heads come in chunks of
~2*d*head_dim parameters, KV groups in bigger ones. The allocator therefore treats heads as the
coarse part (a per-layer ratio rounded to feasible counts) and lets MLP channels, the fine part,
absorb the remainder, so the achieved sparsity matches the request to within one MLP channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import GQAConstraintError, InvalidSparsityError, is_number
from .groups import UnitSpace


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not is_number(sparsity) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise InvalidSparsityError(
            f"{name} must be in [0, 1) (a fraction of the prunable parameters to remove); got {sparsity!r}. "
            "Fix: e.g. --sparsity 0.3 for 30 %"
        )
    return float(sparsity)


def fill_proportional(spaces: Sequence[UnitSpace], shares: Sequence[float], target_cost: float) -> list[int]:
    """Removal counts proportional to `shares`, total cost within one group of `target_cost`.

    Real-valued removals alpha * share_l are water-filled (a layer that hits its cap keeps the cap
    and alpha is recomputed for the rest), floored to whole steps, and the leftover cost goes one
    step at a time to the layers with the largest rounding remainders while that brings the total
    closer to the target.
    """
    if target_cost <= 0 or not spaces:
        return [0] * len(spaces)
    if target_cost >= sum(s.max_remove * s.cost for s in spaces):
        return [s.max_remove for s in spaces]
    desired = [0.0] * len(spaces)
    free = {i for i, share in enumerate(shares) if share > 0}
    budget = target_cost
    while free:
        alpha = budget / sum(shares[i] * spaces[i].cost for i in free)
        capped = {i for i in free if alpha * shares[i] >= spaces[i].max_remove}
        if not capped:
            for i in free:
                desired[i] = alpha * shares[i]
            break
        for i in capped:
            desired[i] = spaces[i].max_remove
            budget -= spaces[i].max_remove * spaces[i].cost
        free -= capped
    steps = [x / s.step for x, s in zip(desired, spaces)]
    counts = [min(math.floor(x + 1e-9) * s.step, s.max_remove) for x, s in zip(steps, spaces)]
    remaining = target_cost - sum(c * s.cost for c, s in zip(counts, spaces))
    while True:
        order = sorted(range(len(spaces)), key=lambda i: (-(steps[i] - counts[i] / spaces[i].step), i))
        for i in order:
            add = spaces[i].step * spaces[i].cost
            if counts[i] + spaces[i].step <= spaces[i].max_remove and remaining - add > -add / 2:
                counts[i] += spaces[i].step
                remaining -= add
                break
        else:
            return counts


def fill_evenly(spaces: Sequence[UnitSpace], target_cost: float) -> list[int]:
    """The same removal ratio in every layer (shares proportional to layer size)."""
    return fill_proportional(spaces, [float(s.n) for s in spaces], target_cost)


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


def fermi_dirac_keep(
    energies: Sequence[float],
    masses: Sequence[float],
    lower: Sequence[float],
    keep_mass: float,
    temperature: float,
    upper: Sequence[float] | None = None,
) -> list[float]:
    """Keep fractions r_i = clip(sigmoid(e_i / T - u), lower_i, upper_i) with sum m_i r_i =
    keep_mass (upper_i = 1 unless given: a trust region's ceiling).

    The mean-field minimiser of the free energy under the budget (method.md section 3): a block
    whose energy per parameter is high keeps more. `u` (lambda / T) is found by bisection, so the
    budget holds for any temperature; T = inf gives the same fraction everywhere (local pruning),
    T -> 0 keeps blocks greedily by energy.
    """
    if not temperature > 0:
        raise InvalidSparsityError(f"temperature must be > 0 (inf for uniform); got {temperature!r}")
    e = torch.tensor(
        [0.0 if math.isinf(temperature) else x / temperature for x in energies], dtype=torch.float64
    )
    m = torch.tensor(masses, dtype=torch.float64)
    lo = torch.tensor(lower, dtype=torch.float64)
    hi = torch.ones_like(lo) if upper is None else torch.tensor(upper, dtype=torch.float64).clamp(max=1.0)
    hi = torch.maximum(hi, lo)

    def kept(u: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(torch.sigmoid(e - u), lo), hi)

    if keep_mass <= float((m * lo).sum()):
        return lo.tolist()
    if keep_mass >= float((m * hi).sum()):
        return hi.tolist()
    a, b = float(e.min()) - 60.0, float(e.max()) + 60.0  # sigmoid saturates beyond these
    for _ in range(200):
        mid = 0.5 * (a + b)
        if float((m * kept(mid)).sum()) > keep_mass:
            a = mid
        else:
            b = mid
    return kept(0.5 * (a + b)).tolist()


def mlp_first(
    spaces: dict[str, list[UnitSpace]], removal: dict[str, Sequence[float]]
) -> dict[str, list[float]]:
    """Each layer's real-valued removal, in parameters, moved onto its MLP channels up to their cap;
    heads take only the overflow.

    Why: on SmolLM2 (3 KV groups of 3 query heads) the smallest head step is a third of a layer's
    heads, and removing channels alone was better at 20, 30 and 50 % (integration/results/quality.md).
    Layers keep the allocation's totals, so temperature and energies still decide where to prune.
    """
    if "heads" not in spaces or "mlp" not in spaces:
        return {kind: list(values) for kind, values in removal.items()}
    moved: dict[str, list[float]] = {"heads": [], "mlp": []}
    for h, m, rh, rm in zip(spaces["heads"], spaces["mlp"], removal["heads"], removal["mlp"]):
        total = rh * h.cost + rm * m.cost
        on_mlp = min(total, m.max_remove * m.cost)
        moved["mlp"].append(on_mlp / m.cost)
        moved["heads"].append((total - on_mlp) / h.cost)
    return moved


def round_to_budget(
    spaces: dict[str, list[UnitSpace]],
    removal: dict[str, Sequence[float]],
    target_cost: float,
    heads_up: bool = False,
) -> dict[str, list[int]]:
    """Real-valued removals -> feasible integer counts with the exact total.

    Heads are the coarse part: each layer's count is rounded to the nearest feasible value (down if
    that overshoots the budget); MLP channels, the fine part, take the rest in proportion to their
    real-valued removals. With one kind only, that kind is filled to the budget directly.
    `heads_up` rounds heads up instead: under `mlp_first` heads only absorb what capped MLP layers
    cannot, and rounding that overflow down would leave the budget short.
    """
    counts: dict[str, list[int]] = {}
    if "heads" in spaces and "mlp" in spaces:
        heads = spaces["heads"]
        snap = (lambda x: math.ceil(x - 1e-9)) if heads_up else round
        counts["heads"] = [
            min(snap(x / s.step) * s.step, s.max_remove) for x, s in zip(removal["heads"], heads)
        ]
        if _cost(counts["heads"], heads) > target_cost:
            counts["heads"] = [
                min(math.floor(x / s.step) * s.step, s.max_remove) for x, s in zip(removal["heads"], heads)
            ]
        counts["mlp"] = fill_proportional(
            spaces["mlp"], removal["mlp"], max(0.0, target_cost - _cost(counts["heads"], heads))
        )
        return counts
    for kind, kind_spaces in spaces.items():
        counts[kind] = fill_proportional(kind_spaces, removal[kind], target_cost)
    return counts


def allocate_softmax(
    spaces: dict[str, list[UnitSpace]],
    energies: dict[str, Sequence[float]] | None,
    total_prunable: int,
    sparsity: float,
    temperature: float,
    channels_first: bool = False,
) -> dict[str, list[int]]:
    """Per-layer removal counts from the temperature softmax over block energies, exact budget.

    `energies[kind][l]` is layer l's mean group energy per parameter for that unit kind (already
    normalised across layers); one threshold spans every layer and kind, as in global pruning.
    `channels_first` keeps each layer's total but moves it onto MLP channels (`mlp_first`).
    """
    check_sparsity(sparsity)
    return allocate_softmax_budget(spaces, energies, sparsity * total_prunable, temperature, channels_first)


def allocate_softmax_budget(
    spaces: dict[str, list[UnitSpace]],
    energies: dict[str, Sequence[float]] | None,
    target: float,
    temperature: float,
    channels_first: bool = False,
    max_deviation: float | None = None,
) -> dict[str, list[int]]:
    """`allocate_softmax` for an explicit number of parameters to remove: refreshing energies
    re-allocates what is left of the budget over the layers not pruned yet.

    `max_deviation` d is a trust region around uniform (OWL's bound): every block keeps a share
    within the mean kept share +- d, so a layer's share stays within it too."""
    keys = [(kind, layer) for kind in spaces for layer in range(len(spaces[kind]))]
    masses = [spaces[k][i].n * spaces[k][i].cost for k, i in keys]
    lower = [spaces[k][i].min_keep / spaces[k][i].n for k, i in keys]
    keep_mass = max(0.0, sum(masses) - target)
    upper = None
    if max_deviation is not None:
        mean_keep = keep_mass / sum(masses) if sum(masses) else 1.0
        lower = [max(lo, mean_keep - max_deviation) for lo in lower]
        upper = [min(1.0, mean_keep + max_deviation)] * len(keys)
    e = [0.0 if energies is None else float(energies[k][i]) for k, i in keys]
    keep = fermi_dirac_keep(e, masses, lower, keep_mass, temperature, upper)
    removal: dict[str, list[float]] = {kind: [0.0] * len(spaces[kind]) for kind in spaces}
    for (kind, layer), r in zip(keys, keep):
        removal[kind][layer] = (1.0 - r) * spaces[kind][layer].n
    if channels_first:
        return round_to_budget(spaces, mlp_first(spaces, removal), target, heads_up=True)
    return round_to_budget(spaces, removal, target)


def allocate_global_threshold(
    spaces: dict[str, list[UnitSpace]],
    group_energies: dict[str, Sequence[torch.Tensor]],
    total_prunable: int,
    sparsity: float,
) -> dict[str, list[int]]:
    """The global structured reference: one threshold on energy per parameter over every group of
    every layer (method.md section 2), which needs all groups' energies at once (O(N) memory).

    Removal happens in feasible steps (query heads: the lowest head of every KV group at once, so
    a step's energy is their sum); steps are taken cheapest-first across the whole model while they
    bring the removed parameter count closer to the budget, never below a layer's minimum.
    """
    check_sparsity(sparsity)
    return threshold_budget(spaces, group_energies, sparsity * total_prunable)


def threshold_budget(
    spaces: dict[str, list[UnitSpace]], group_energies: dict[str, Sequence[torch.Tensor]], target: float
) -> dict[str, list[int]]:
    """`allocate_global_threshold` for an explicit number of parameters to remove: StructPrune's
    energy split of one layer's budget between heads and MLP channels is this rule on one layer."""
    steps = []  # (energy per parameter, kind, layer, step cost)
    for kind, kind_spaces in spaces.items():
        for layer, (space, energies) in enumerate(zip(kind_spaces, group_energies[kind])):
            ordered = torch.sort(torch.as_tensor(energies, dtype=torch.float64)).values
            for j in range(space.max_remove // space.step):
                chunk = ordered[j * space.step : (j + 1) * space.step]
                cost = space.cost * space.step
                steps.append((float(chunk.sum()) / cost, kind, layer, cost))
    steps.sort(key=lambda item: item[0])
    counts = {kind: [0] * len(kind_spaces) for kind, kind_spaces in spaces.items()}
    removed = 0.0
    taken, skipped = [], []
    for step in steps:
        _energy, kind, layer, cost = step
        if removed + cost / 2 >= target:
            if removed >= target - 1e-9:
                break
            skipped.append(step)
            continue  # this step overshoots by more than half; a smaller one may still fit
        counts[kind][layer] += spaces[kind][layer].step
        removed += cost
        taken.append(step)
    removed, taken = _give_back(spaces, counts, removed, taken, target)
    if skipped and removed < target - 1e-9:
        # The small steps ran out short of the target (e.g. every MLP channel a layer may lose is
        # gone): try the cheapest coarse step skipped above, trimmed by the give-back, and keep it
        # if that lands closer.
        _energy, kind, layer, cost = skipped[0]
        trial = {k: list(v) for k, v in counts.items()}
        trial[kind][layer] += spaces[kind][layer].step
        smaller = [s for s in taken if s[3] < cost]
        trial_removed, _ = _give_back(spaces, trial, removed + cost, smaller, target)
        if abs(trial_removed - target) < abs(removed - target):
            counts = trial
    return counts


def _give_back(spaces, counts, removed: float, taken: list, target: float) -> tuple[float, list]:
    """A coarse step (a head) may have overshot: give back the dearest small steps taken while
    that brings the total closer, so the budget holds to within one MLP channel. Updates `counts`
    in place; returns the new total and the steps still taken."""
    kept = list(taken)
    for step in reversed(taken):
        _energy, kind, layer, cost = step
        if abs(removed - cost - target) < abs(removed - target):
            counts[kind][layer] -= spaces[kind][layer].step
            removed -= cost
            kept.remove(step)
    return removed, kept


def allocate_uniform(
    spaces: dict[str, list[UnitSpace]],
    total_prunable: int,
    sparsity: float,
    head_sparsity: float | None = None,
    channels_first: bool = False,
) -> dict[str, list[int]]:
    """Uniform (local) allocation: the T = inf limit of `allocate_softmax`, the same removal ratio
    for every layer and unit kind, exact global parameter budget. `head_sparsity` instead fixes the
    heads' ratio exactly (an error if GQA cannot honour it) and MLP channels take the rest;
    `channels_first` moves every layer's share onto its MLP channels (`mlp_first`)."""
    check_sparsity(sparsity)
    if head_sparsity is not None and channels_first:
        raise InvalidSparsityError(
            "head_sparsity fixes the heads' share; channels_first moves it: choose one"
        )
    if head_sparsity is None or "heads" not in spaces:
        return allocate_softmax(spaces, None, total_prunable, sparsity, math.inf, channels_first)
    check_sparsity(head_sparsity, "head sparsity")
    counts = {"heads": fixed_ratio(spaces["heads"], head_sparsity, strict=True)}
    rest = sparsity * total_prunable - _cost(counts["heads"], spaces["heads"])
    if "mlp" in spaces:
        counts["mlp"] = fill_evenly(spaces["mlp"], max(0.0, rest))
    return counts


def _cost(counts: Sequence[int], spaces: Sequence[UnitSpace]) -> int:
    return sum(c * s.cost for c, s in zip(counts, spaces))


def allocate_equal(
    spaces: dict[str, list[UnitSpace]], total_prunable: int, sparsity: float, channels_first: bool = False
) -> dict[str, list[int]]:
    """Identical counts in every layer, so the pruned model has one width per kind and a plain
    config that every stock loader (transformers without the plugin, vLLM) accepts.

    Heads take the sparsity's share rounded to a feasible count (with `channels_first`, only what
    the MLP channels cannot absorb, rounded up), MLP channels the rest of the budget rounded to
    whole steps; the budget then holds to within half an MLP step per layer.
    Layers must have the same geometry (and no skipped layers).
    """
    check_sparsity(sparsity)
    target = sparsity * total_prunable
    counts: dict[str, list[int]] = {}
    for kind, kind_spaces in spaces.items():
        if len(set(kind_spaces)) != 1:
            raise InvalidSparsityError(
                f"equal widths need every layer to start alike and none skipped; the {kind} spaces "
                "differ between layers. Fix: drop equal_widths (per-layer widths load with the plugin "
                "or trust_remote_code) or skip_layers"
            )
    layers = len(next(iter(spaces.values())))
    removed = 0.0
    if "heads" in spaces:
        s = spaces["heads"][0]
        if "mlp" not in spaces:
            h = round(min(1.0, target / (layers * s.n * s.cost)) * s.n / s.step) * s.step
        elif channels_first:
            m = spaces["mlp"][0]
            overflow = max(0.0, target / layers - m.max_remove * m.cost) / s.cost
            h = math.ceil(overflow / s.step - 1e-9) * s.step
        else:
            h = round(sparsity * s.n / s.step) * s.step
        h = min(h, s.max_remove)
        counts["heads"] = [h] * layers
        removed = layers * h * s.cost
    if "mlp" in spaces:
        s = spaces["mlp"][0]
        m = round(max(0.0, target - removed) / (layers * s.cost) / s.step) * s.step
        counts["mlp"] = [min(max(m, 0), s.max_remove)] * layers
    return counts


def slimgpt_schedule(num_layers: int, sparsity: float, first_share: float = 0.3125) -> list[float]:
    """SlimGPT's incremental pruning ratio (Ling et al., NeurIPS 2024): layer l removes
    r_0 + (r_last - r_0) * ln(1 + l) / ln(L), rising logarithmically from the first layer to the
    last, because a layer's error is amplified by every layer after it.

    r_0 = `first_share` * sparsity (the release's LLaMA-7B 20 % pair, 0.0625 -> 0.25, has
    r_0 = 0.3125 S) and r_last is solved so the ratios average exactly `sparsity`:
    r_last = r_0 + (S - r_0) / c_L with c_L = ln(L!) / (L ln L). The release code divides by a
    fixed ln 32 (LLaMA-7B's depth); ln(L) keeps the schedule's mean on target for any depth
    (docs/design/allocation_baselines.md). Raises when r_last would reach 1."""
    check_sparsity(sparsity)
    if num_layers < 2:
        return [sparsity] * num_layers
    r0 = first_share * sparsity
    c = math.lgamma(num_layers + 1) / (num_layers * math.log(num_layers))
    r_last = r0 + (sparsity - r0) / c
    if r_last >= 1.0:
        raise InvalidSparsityError(
            f"SlimGPT's schedule at sparsity {sparsity:g} over {num_layers} layers would remove "
            f"{r_last:.2f} of the last layer. Fix: a lower sparsity or a larger first_share"
        )
    return [r0 + (r_last - r0) * math.log(1 + layer) / math.log(num_layers) for layer in range(num_layers)]


def owl_schedule(outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's outlier-weighted layer sparsity (Yin et al., ICML 2024), as its release code computes
    it: the layers' outlier ratios D_l are min-max rescaled to a_l in [0, 2 lam] and layer l
    removes S - (a_l - mean a): more outliers, less pruning; the plain mean stays S. Equal ratios
    give uniform sparsity. Ratios outside [0, 1) are an error (the release clamps to 0.01)."""
    check_sparsity(sparsity)
    d = [float(x) for x in outlier_ratios]
    low, high = min(d), max(d)
    if high - low <= 0:
        return [sparsity] * len(d)
    a = [(x - low) / (high - low) * 2 * lam for x in d]
    mean = sum(a) / len(a)
    ratios = [sparsity - (x - mean) for x in a]
    if min(ratios) < 0 or max(ratios) >= 1:
        raise InvalidSparsityError(
            f"OWL's schedule at sparsity {sparsity:g} with lam {lam:g} leaves [0, 1): "
            f"{min(ratios):.3f} .. {max(ratios):.3f}. Fix: a smaller lam"
        )
    return ratios


def allocate_ratio_schedule(
    spaces: dict[str, list[UnitSpace]],
    total_prunable: int,
    sparsity: float,
    layer_ratios: Sequence[float],
    channels_first: bool = False,
) -> dict[str, list[int]]:
    """Counts that follow a per-layer ratio schedule (SlimGPT, OWL) with the exact global budget:
    layer l's real-valued removal is ratio_l of each unit kind, rescaled together to the budget
    (layers of different sizes make the plain mean differ from the parameter-weighted one), then
    rounded as every other allocation is."""
    check_sparsity(sparsity)
    lengths = {len(kind_spaces) for kind_spaces in spaces.values()}
    if lengths != {len(layer_ratios)}:
        raise InvalidSparsityError(
            f"a layer schedule of {len(layer_ratios)} ratios for {sorted(lengths)} layers"
        )
    return schedule_budget(spaces, layer_ratios, sparsity * total_prunable, channels_first)


def schedule_budget(
    spaces: dict[str, list[UnitSpace]],
    layer_ratios: Sequence[float],
    target: float,
    channels_first: bool = False,
) -> dict[str, list[int]]:
    """`allocate_ratio_schedule` for an explicit number of parameters to remove."""
    removal = {
        kind: [r * s.n for r, s in zip(layer_ratios, kind_spaces)] for kind, kind_spaces in spaces.items()
    }
    if channels_first:
        return round_to_budget(spaces, mlp_first(spaces, removal), target, heads_up=True)
    return round_to_budget(spaces, removal, target)
