"""StructPrune's two passes over the decoder layers, one layer resident in each.

Pass 1 (energies): the dense model's calibration activations stream through each layer once; the
group energies are reduced to one number per layer and unit kind, so the global allocation needs
O(layers) memory, not the scores of every group at once.

Pass 2 (pruning), per layer: heads are chosen by energy and o_proj is refitted by least squares
from the Gram of its input; the MLP then sees the *pruned* attention's output, and the ADMM block
solver chooses its channels and updated weights (OPT's ReLU MLP: energy choice + fc2 refit).
Torch-Pruning removes the groups; the solver's weights are copied into the smaller modules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from .admm import ADMMConfig, refit_output_columns, solve_gated_mlp
from .architectures import LayerView, ModelView, Projection, geometry_of
from .energies import LayerMoments, head_energy, layer_energy, mlp_channel_energy
from .groups import LayerPlan, choose_channels, choose_heads, head_channels, resolve_head_unit, unit_space
from .layer_passes import AttentionCache, run_until_stop, stop_at
from .residency import resident
from .stats import InputRecorder
from .surgery import build_layer_graph, prune_layer

#: The inputs each unit kind's energies read (see energies.py).
ENERGY_TAPS = {"mlp": ("mlp_in", "mlp_hidden"), "heads": ("attn_in", "o_in")}


def taps_for(lv: LayerView, kinds) -> dict[str, torch.nn.Module]:
    wanted = {name for kind in kinds for name in ENERGY_TAPS[kind]}
    return {name: module for name, module in lv.input_taps().items() if name in wanted}


def group_energies(
    lv: LayerView, moments: LayerMoments, energy: str, head_unit: str, kinds=("mlp", "heads")
) -> dict[str, torch.Tensor]:
    unit = resolve_head_unit(head_unit, geometry_of(lv))
    out = {}
    if "mlp" in kinds:
        out["mlp"] = mlp_channel_energy(energy, [w.weight for w in lv.mlp_in], lv.mlp_out.weight, moments)
    if "heads" in kinds:
        out["heads"] = head_energy(
            energy, unit, lv.q.weight, lv.k.weight, lv.v.weight, lv.o.weight, lv.head_dim, moments
        )
    return out


def energy_pass(
    view: ModelView,
    batches: list,
    forward: Callable,
    config,
    device: torch.device,
    progress: bool,
    keep_groups: bool = False,
    measure: frozenset[str] = frozenset(),
    owl_m: float = 5.0,
) -> tuple[dict[str, list[float]], dict[str, list[torch.Tensor]] | None, dict[str, list[float]]]:
    """Layer energies of the dense model (mean energy per parameter, per unit kind).

    With `keep_groups` every group's energy is kept as well: the threshold reference needs them
    all at once; StructPrune itself needs only the per-layer means. `measure` adds per-layer
    scalars in the same pass: "stream" (the residual stream's mean squared norm per token entering
    the layer, for scale-free energies) and "outliers" (OWL's outlier ratio). The pass streams the
    batches it is given through every layer and overwrites their hidden states; callers hand it a
    subsample (`PruneConfig.energy_samples`) because one mean per layer needs few tokens.
    Returns (energies, groups or None, extras).
    """
    energies: dict[str, list[float]] = {kind: [] for kind in config.units}
    groups: dict[str, list[torch.Tensor]] | None = (
        {kind: [] for kind in config.units} if keep_groups else None
    )
    extras: dict[str, list[float]] = {name: [] for name in measure & {"stream", "outliers"}}
    for i, lv in enumerate(tqdm(view.layer_views(), desc="energies", disable=not progress, unit="layer")):
        with resident(lv.layer, device):
            if "stream" in extras:
                sq = distributed.all_sum_scalar(sum(float(b.hidden.double().pow(2).sum()) for b in batches))
                count = distributed.all_sum_int(sum(b.hidden.shape[0] * b.hidden.shape[1] for b in batches))
                extras["stream"].append(sq / count)
            taps = lv.input_taps() if "outliers" in extras else taps_for(lv, config.units)
            with torch.no_grad(), InputRecorder(taps, i) as rec:
                outputs = [forward(lv.layer, b) for b in batches]
            moments = LayerMoments.from_stats(rec.stats)
            per_group = group_energies(lv, moments, config.energy, config.head_unit, config.units)
            for kind, value in layer_energies_of(lv, per_group, config.head_unit).items():
                energies[kind].append(value)
            for kind in config.units:
                if groups is not None:
                    groups[kind].append(per_group[kind].detach().double().cpu())
            if "outliers" in extras:
                extras["outliers"].append(outlier_ratio(lv, rec.stats, owl_m))
            for batch, out in zip(batches, outputs):
                batch.hidden = out
    return energies, groups, extras


def outlier_ratio(lv: LayerView, stats: dict, m: float) -> float:
    """OWL's layerwise outlier distribution: the share of the layer's Wanda scores |W_ij| ||X_j||
    (every linear, one pool) above `m` times their mean, as its release code computes it."""
    inputs = {name: moments.norms() for name, moments in stats.items()}
    pairs = [(w, inputs["attn_in"]) for w in (lv.q, lv.k, lv.v)]
    pairs += [(lv.o, inputs["o_in"]), (lv.mlp_out, inputs["mlp_hidden"])]
    pairs += [(w, inputs["mlp_in"]) for w in lv.mlp_in]
    scores = [(w.weight.detach().float().abs() * norm.float()[None, :]).flatten() for w, norm in pairs]
    total = sum(x.numel() for x in scores)
    mean = sum(float(x.double().sum()) for x in scores) / total
    return sum(int((x > m * mean).sum()) for x in scores) / total


#: The MLP solver's default token budget: never fewer than SOLVER_TOKENS_FLOOR calibration tokens,
#: and at least SOLVER_TOKENS_PER_CHANNEL per kept MLP channel. The down projection's refit has one
#: unknown per kept channel in every output row, so a fixed 8192 tokens leaves a 7B model's
#: refit (7706 channels kept at 30 %) about one equation per unknown; more tokens per unknown
#: help in and out of domain alike (on SmolLM2 at 30 %, 4x the tokens lowered perplexity on
#: all three texts by 2 to 6 %). The floor keeps the measured models' results:
#: SmolLM2's and Gemma-3-270M's widest kept MLP (1966 channels) stays at or below 8192 tokens.
SOLVER_TOKENS_FLOOR = 8192
SOLVER_TOKENS_PER_CHANNEL = 4


def solver_tokens_for(config, keep_channels: int) -> int:
    """Calibration tokens the MLP solver fits on for a layer keeping `keep_channels` channels:
    `config.solver_tokens` when set (a fixed cap), else the width-scaled default."""
    if config.solver_tokens is not None:
        return config.solver_tokens
    return max(SOLVER_TOKENS_FLOOR, math.ceil(SOLVER_TOKENS_PER_CHANNEL * keep_channels))


def admm_config(config, activation: str = "silu", keep_channels: int = 0) -> ADMMConfig:
    return ADMMConfig(
        activation=activation,
        iterations=config.admm_iterations,
        use_aux=config.use_aux,
        refit=config.refit,
        intercept=config.bias_refit,
        damping=config.damping,
        ridge_scale=config.ridge_scale,
        max_tokens=solver_tokens_for(config, keep_channels),
    )


def layer_energies_of(lv: LayerView, per_group: dict[str, torch.Tensor], head_unit: str) -> dict[str, float]:
    geometry = geometry_of(lv)
    return {
        kind: layer_energy(values, unit_space(kind, geometry, head_unit).cost)
        for kind, values in per_group.items()
    }


def prune_layer_structprune(
    lv: LayerView,
    index: int,
    batches: list,
    forward: Callable,
    remove: dict[str, int],
    config,
    trace,
    reallocate: Callable[[int, dict[str, float]], dict[str, int]] | None = None,
    split: Callable[[int, dict[str, torch.Tensor]], dict[str, int]] | None = None,
    attention_cache: AttentionCache | None = None,
) -> tuple[LayerView, LayerPlan]:
    """Prune one resident layer (heads, then MLP) with weight updates; returns the new view and plan.

    With `attention_cache`, the MLP statistics pass records attention's outputs (attention is
    final by then) so the caller's output pass can replay them (`layer_passes`).

    With `reallocate` (energy refresh) the layer's energies are measured again on the inputs the
    pruned prefix really produces, in the same pass that gathers the heads' statistics, and
    `reallocate(index, energies)` returns this layer's counts under the re-allocated budget. With
    `split` (energy split) the same pass measures both kinds' group energies and
    `split(index, group_energies)` re-shares the layer's budget between heads and MLP channels.
    """
    geometry = geometry_of(lv)
    plan = LayerPlan.dense(geometry)
    graph = build_layer_graph(lv, trace.hidden, trace.kwargs_for(lv.layer))
    rec = None
    all_kinds = reallocate is not None or (split is not None and any(remove.values()))
    if remove.get("heads") or all_kinds:
        kinds = config.units if all_kinds else ["heads"]
        with (
            torch.no_grad(),
            InputRecorder(taps_for(lv, kinds), index, grams=("o_in",)) as rec,
            # heads alone need nothing past o_proj's input: the rest of the layer is skipped
            stop_at(lv.o) if kinds == ["heads"] else contextlib.nullcontext(),
        ):
            for b in batches:
                run_until_stop(forward, lv.layer, b)
        moments = LayerMoments.from_stats(rec.stats)
        per_group = group_energies(lv, moments, config.energy, config.head_unit, kinds)
        if reallocate is not None:
            remove = reallocate(index, layer_energies_of(lv, per_group, config.head_unit))
        if split is not None:
            remove = split(index, per_group)
    if remove.get("heads"):
        unit = resolve_head_unit(config.head_unit, geometry)
        plan.keep_heads, plan.keep_kv_heads = choose_heads(
            unit, per_group["heads"], remove["heads"], geometry
        )
        new_o = shift = None
        if config.refit:
            kept = head_channels(plan.keep_heads, lv.head_dim)
            new_o, shift = _refit(lv.o, rec.stats["o_in"], kept, config)
        heads_only = LayerPlan(list(range(geometry.intermediate)), plan.keep_heads, plan.keep_kv_heads)
        heads_only.validate(geometry)
        lv = prune_layer(lv, heads_only, graph)
        if new_o is not None:
            _assign(lv.o, new_o, shift)
    del rec
    if remove.get("mlp"):
        keep_count = geometry.intermediate - remove["mlp"]
        gated = lv.gated
        with (
            torch.no_grad(),
            InputRecorder(
                {"mlp_in": lv.input_taps()["mlp_in"]} if gated else taps_for(lv, ["mlp"]),
                index,
                grams=() if gated else ("mlp_hidden",),
                keep_inputs=("mlp_in",) if gated else (),
            ) as rec,
            # the gated solver needs only the MLP's input: the dense MLP itself is skipped
            stop_at(lv.input_taps()["mlp_in"]) if gated else contextlib.nullcontext(),
            attention_cache.recording(lv.attn) if attention_cache is not None else contextlib.nullcontext(),
        ):
            for b in batches:
                run_until_stop(forward, lv.layer, b)
        sol = refitted = None
        if gated:
            x = torch.cat(rec.stats["mlp_in"].inputs)
            sol = solve_gated_mlp(
                x,
                lv.mlp_in[0].weight.detach(),
                lv.mlp_in[1].weight.detach(),
                lv.mlp_out.weight.detach(),
                keep_count,
                admm_config(config, lv.activation, keep_count),
            )
            plan.keep_mlp = sol.keep
        else:
            moments = LayerMoments.from_stats(rec.stats)
            scores = mlp_channel_energy(
                config.energy, [w.weight for w in lv.mlp_in], lv.mlp_out.weight, moments
            )
            plan.keep_mlp = choose_channels(scores, remove["mlp"])
            if config.refit:
                refitted = _refit(lv.mlp_out, rec.stats["mlp_hidden"], plan.keep_mlp, config)
        mlp_only = LayerPlan(plan.keep_mlp, list(range(lv.num_heads)), list(range(lv.num_kv_heads)))
        lv = prune_layer(lv, mlp_only, graph)
        # The new weights go where the pruned view says: gate and up may be row blocks of one fused
        # linear (Phi-3), whose offsets moved when it shrank.
        if sol is not None:
            _assign(lv.mlp_in[0], sol.w_gate, None)
            _assign(lv.mlp_in[1], sol.w_up, None)
            _assign(lv.mlp_out, sol.w_down, sol.down_bias_shift)
        elif refitted is not None:
            _assign(lv.mlp_out, *refitted)
    del graph
    return lv, plan


def _refit(linear: torch.nn.Linear, moments, keep: list[int], config):
    """Least-squares refit of an output projection on its kept inputs, with the config's ridge
    (and a bias, with `bias_refit`)."""
    gram = moments.gram / moments.tokens
    mean = moments.mean() if config.bias_refit else None
    return refit_output_columns(
        linear.weight.detach(), gram, keep, config.damping, mean, ridge_scale=config.ridge_scale
    )


def _assign(linear: Projection, weight: torch.Tensor, shift: torch.Tensor | None) -> None:
    """Write a solver's weight (and bias shift) into a module, or into a fused module's row block
    through the view its `.weight` is."""
    with torch.no_grad():
        linear.weight.copy_(weight)
        if shift is not None:
            linear.bias.add_(shift.to(linear.bias.dtype))
