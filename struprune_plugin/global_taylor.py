"""A real O(N) global structured reference: first-order Taylor importance of every group from the
gradient of the whole model's calibration loss, one ranking over every head and MLP channel of
every layer, then StructPrune's per-layer least-squares refits.

This is what LLM-Pruner (Ma et al., 2023) and Torch-Pruning's `GroupTaylorImportance` compute:
a group's importance is sum over its weights of |w * dL/dw| (the first-order estimate of the loss
change when the weights go, element-wise), where L is the language-modelling loss over the
calibration windows. Gradients need every layer resident with its activations and gradient
buffers: whole model + gradients + one window's activations, the O(N) footprint StructPrune's
one-layer passes avoid. The ranking is global: groups are removed cheapest (importance per
parameter) first across all layers and kinds (`allocation.threshold_budget`). Each layer then
keeps its chosen groups, and o_proj and down_proj are refitted by least squares on the pruned
prefix's activations, as StructPrune refits them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import LayerView, ModelView, Projection, RowBlock, geometry_of
from .groups import (
    LayerPlan,
    choose_channels,
    choose_heads,
    head_channels,
    query_heads_of_kv,
    resolve_head_unit,
)
from .stats import InputRecorder
from .structprune import _assign, _refit
from .surgery import build_layer_graph, prune_layer


def taylor_gradients(
    model: nn.Module, view: ModelView, calibration_ids: torch.Tensor, device: torch.device, progress: bool
) -> dict[str, float]:
    """Accumulate the gradient of the mean calibration loss into the decoder layers' linears'
    `.grad` (one window per step; the loss of each window weighted by its share of the tokens).
    Returns the pass's time and loss."""
    start = time.perf_counter()
    linears = [lin for lv in view.layer_views() for lin in lv.linears]
    wanted = {id(p) for lin in linears for p in lin.parameters()}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    model.to(device)
    total = 0.0
    try:
        for ids in tqdm(calibration_ids.split(1), desc="gradients", disable=not progress, unit="window"):
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(calibration_ids)
            loss.backward()
            total += float(loss.detach())
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return {"seconds": time.perf_counter() - start, "loss": total}


def _wg(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise RuntimeError("no gradient reached a decoder linear; did the loss depend on it?")
    return (weight.detach().double() * grad.detach().double()).abs()


def taylor_group_scores(lv: LayerView, head_unit: str, kinds) -> dict[str, torch.Tensor]:
    """Per group of one layer: sum of |w * g| over every weight the group owns (MLP channel: its
    gate/up rows and down column; query head: its q rows and o columns; KV group: its query heads
    plus its k and v rows). Reads `.grad` of the layer's linears; fused (Phi-3) blocks are views."""
    geometry = geometry_of(lv)
    out = {}
    if "mlp" in kinds:
        rows = sum(_wg(w.weight, _grad(w)).sum(1) for w in lv.mlp_in)
        out["mlp"] = rows + _wg(lv.mlp_out.weight, _grad(lv.mlp_out)).sum(0)
    if "heads" in kinds:
        d = lv.head_dim
        q = _wg(lv.q.weight, _grad(lv.q)).sum(1).reshape(-1, d).sum(1)
        o = _wg(lv.o.weight, _grad(lv.o)).sum(0).reshape(-1, d).sum(1)
        per_head = q + o
        if resolve_head_unit(head_unit, geometry) == "query":
            out["heads"] = per_head
        else:
            k = _wg(lv.k.weight, _grad(lv.k)).sum(1).reshape(-1, d).sum(1)
            v = _wg(lv.v.weight, _grad(lv.v)).sum(1).reshape(-1, d).sum(1)
            out["heads"] = (
                torch.stack(
                    [per_head[query_heads_of_kv([g], geometry.group_size)].sum() for g in range(len(k))]
                )
                + k
                + v
            )
    return {kind: value.cpu() for kind, value in out.items()}


def _grad(projection: Projection) -> torch.Tensor | None:
    """The gradient of a projection's weight, also for a row block of a fused linear."""
    if isinstance(projection, RowBlock):
        grad = projection.linear.weight.grad
        return None if grad is None else grad[projection.start : projection.stop]
    return projection.weight.grad


def prune_layer_global(
    lv: LayerView,
    index: int,
    batches: list,
    forward: Callable,
    remove: dict[str, int],
    scores: dict[str, torch.Tensor],
    config,
    trace,
) -> tuple[LayerView, LayerPlan]:
    """Remove the layer's lowest-importance groups (counts from the global ranking) and refit
    o_proj, then down_proj, by least squares on the pruned prefix's activations."""
    geometry = geometry_of(lv)
    plan = LayerPlan.dense(geometry)
    graph = build_layer_graph(lv, trace.hidden, trace.kwargs_for(lv.layer))
    if remove.get("heads"):
        unit = resolve_head_unit(config.head_unit, geometry)
        plan.keep_heads, plan.keep_kv_heads = choose_heads(unit, scores["heads"], remove["heads"], geometry)
        with torch.no_grad(), InputRecorder({"o_in": lv.o}, index, grams=("o_in",)) as rec:
            for b in batches:
                forward(lv.layer, b)
        new_o, shift = _refit(
            lv.o,
            rec.stats["o_in"],
            head_channels(plan.keep_heads, lv.head_dim),
            config,
        )
        heads_only = LayerPlan(list(range(geometry.intermediate)), plan.keep_heads, plan.keep_kv_heads)
        lv = prune_layer(lv, heads_only, graph)
        _assign(lv.o, new_o, shift)
    if remove.get("mlp"):
        plan.keep_mlp = choose_channels(scores["mlp"], remove["mlp"])
        with torch.no_grad(), InputRecorder({"mlp_hidden": lv.mlp_out}, index, grams=("mlp_hidden",)) as rec:
            for b in batches:
                forward(lv.layer, b)
        new_down, shift = _refit(lv.mlp_out, rec.stats["mlp_hidden"], plan.keep_mlp, config)
        mlp_only = LayerPlan(plan.keep_mlp, list(range(lv.num_heads)), list(range(lv.num_kv_heads)))
        lv = prune_layer(lv, mlp_only, graph)
        _assign(lv.mlp_out, new_down, shift)
    del graph
    return lv, plan
