"""Physical removal of heads and MLP channels through Torch-Pruning's DependencyGraph.

The graph is built on one decoder layer at a time (so surgery, like everything else, needs only
that layer resident). Torch-Pruning then edits every coupled module consistently: removing
down_proj input columns also removes the matching gate/up rows, removing o_proj input columns
removes the query rows (and, through its GQA index mapping, reaches K/V, which we set explicitly).

Two workarounds are needed on transformers 5 (see Torch-Pruning issue #527): RoPE's
`rotate_half` slices and concatenates along head_dim, which makes Torch-Pruning's index mapping
loop forever, so while tracing we swap in a slice-free element-wise stand-in (whole heads are
removed and head_dim is never pruned, so RoPE needs no coupling); and we trace with eager
attention, because only `repeat_kv`'s expand lets Torch-Pruning see the GQA coupling.

Fused layers (Phi-3's qkv_proj and gate_up_proj) take the other path, and only that one: the graph
cannot express "the same channel index in two parts of one linear" (an MLP channel is a gate row
*and* the up row I rows further; a KV head is rows in the K part *and* the V part), so no graph is
built and the coupled rows and columns are stated explicitly, from the layer view's row blocks,
and removed with the same per-module Torch-Pruning functions the graph would call. The modules
stay fused, smaller: the checkpoint keeps the stock parameter names.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import GroupItem

from .architectures import LayerView, layer_view
from .errors import UnsupportedArchitectureError
from .groups import LayerPlan, head_channels


def _rope_elementwise(q, k, cos, sin, *args, **kwargs):
    """RoPE's channel coupling for the tracer: each q/k channel maps to itself. The tables are
    reduced to one factor per position, so partial rotary (Phi-3: cos narrower than head_dim)
    broadcasts too; the traced values are never used."""
    cos, sin = cos.mean(-1, keepdim=True).unsqueeze(1), sin.mean(-1, keepdim=True).unsqueeze(1)
    return q * cos + q * sin, k * cos + k * sin


@contextlib.contextmanager
def traceable(module: nn.Module, config=None) -> Iterator[None]:
    """While Torch-Pruning traces `module`: slice-free RoPE, eager attention, gradients on."""
    patched = []
    for sub in module.modules():
        mod = importlib.import_module(type(sub).__module__)
        if hasattr(mod, "apply_rotary_pos_emb") and mod not in [m for m, _ in patched]:
            patched.append((mod, mod.apply_rotary_pos_emb))
            mod.apply_rotary_pos_emb = _rope_elementwise
    configs = {
        id(c): c for c in [config, *(getattr(m, "config", None) for m in module.modules())] if c is not None
    }
    impls = {key: getattr(c, "_attn_implementation", None) for key, c in configs.items()}
    # Integer parameters (a quantizer's zero points, attached by llm-compressor) cannot carry grads.
    grads = {p: p.requires_grad for p in module.parameters() if p.is_floating_point()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        for p in grads:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for mod, fn in patched:
            mod.apply_rotary_pos_emb = fn
        for key, c in configs.items():
            c._attn_implementation = impls[key]
        for p, flag in grads.items():
            p.requires_grad_(flag)


def build_layer_graph(
    lv: LayerView, example_input: torch.Tensor, layer_kwargs: dict
) -> tp.DependencyGraph | None:
    """Trace one decoder layer on a small example (its captured hidden states and call kwargs).

    None for a fused layer: its surgery states the coupling itself (see `prune_layer`)."""
    if lv.fused:
        return None

    def forward(module, x):
        out = module(x, **layer_kwargs)
        return out[0] if isinstance(out, tuple) else out

    with traceable(lv.layer), warnings.catch_warnings():
        # Torch-Pruning warns about the RMSNorm weights it finds; they sit on the hidden size,
        # which we never prune.
        warnings.simplefilter("ignore")
        example = example_input.detach().clone().requires_grad_(True)
        return tp.DependencyGraph().build_dependency(
            lv.layer,
            example_inputs=example,
            forward_fn=forward,
            ignored_params=list(lv.head_norm_weights),
        )


def _check_targets(group, allowed: set[nn.Module], what: str) -> None:
    """Refuse a group that would touch modules outside the unit (e.g. the residual stream)."""
    for dep, idxs in group:
        module = dep.target.module
        if idxs and isinstance(module, (nn.Linear, nn.Parameter, nn.LayerNorm)) and module not in allowed:
            raise UnsupportedArchitectureError(
                f"Torch-Pruning coupled {what} with {type(module).__name__} {dep.target.name}: the layer "
                "is wired differently from the supported families"
            )


def _prune_fused(lv: LayerView, remove_mlp: list[int], remove_q: list[int], remove_kv: list[int]) -> None:
    """Phi-3 surgery by index selection: every group's rows in each part of a fused linear.

    A query head is its rows in the Q part of qkv_proj and its o_proj columns; a KV head its rows
    in the K part and in the V part; an MLP channel its gate row, its up row and its down_proj
    column. Row offsets come from the view's row blocks, taken before anything shrinks."""
    hd = lv.head_dim
    if remove_mlp:
        gate, up = lv.mlp_in
        rows = [gate.start + c for c in remove_mlp] + [up.start + c for c in remove_mlp]
        tp.prune_linear_out_channels(lv.fused_mlp_in, rows)
        tp.prune_linear_in_channels(lv.mlp_out, remove_mlp)
    if remove_q:
        q_channels, kv_channels = head_channels(remove_q, hd), head_channels(remove_kv, hd)
        rows = [lv.q.start + c for c in q_channels]
        rows += [block.start + c for block in (lv.k, lv.v) for c in kv_channels]
        tp.prune_linear_out_channels(lv.fused_qkv, rows)
        tp.prune_linear_in_channels(lv.o, q_channels)


def prune_layer(lv: LayerView, plan: LayerPlan, graph: tp.DependencyGraph | None) -> LayerView:
    """Remove what `plan` does not keep; return the refreshed view of the (same) layer module.

    Non-fused layers go through `graph` (from `build_layer_graph`); fused ones (graph None) through
    `_prune_fused`. Either way the modules are edited in place and the view's bookkeeping refreshed."""
    remove_mlp = sorted(set(range(lv.intermediate_size)) - set(plan.keep_mlp))
    remove_q = sorted(set(range(lv.num_heads)) - set(plan.keep_heads))
    remove_kv = sorted(set(range(lv.num_kv_heads)) - set(plan.keep_kv_heads))
    if remove_kv and not remove_q:
        raise UnsupportedArchitectureError("a plan cannot drop K/V heads while keeping all query heads")
    if lv.fused:
        _prune_fused(lv, remove_mlp, remove_q, remove_kv)
    elif graph is None:
        raise ValueError("prune_layer needs the layer's DependencyGraph (build_layer_graph) for this layer")
    else:
        _prune_with_graph(lv, graph, remove_mlp, remove_q, remove_kv)
    updated = layer_view(lv.layer, lv.family)
    updated.refresh_bookkeeping()
    return updated


def _prune_with_graph(
    lv: LayerView, graph: tp.DependencyGraph, remove_mlp: list[int], remove_q: list[int], remove_kv: list[int]
) -> None:
    """Separate projections: Torch-Pruning's groups from the layer's DependencyGraph."""
    if remove_mlp:
        group = graph.get_pruning_group(lv.mlp_out, tp.prune_linear_in_channels, remove_mlp)
        _check_targets(group, {*lv.mlp_in, lv.mlp_out}, "MLP channels")
        group.prune()
    if remove_q:
        hd = lv.head_dim
        group = graph.get_pruning_group(lv.o, tp.prune_linear_in_channels, head_channels(remove_q, hd))
        kv_channels = head_channels(remove_kv, hd)
        seen_kv = set()
        for i, (dep, _idxs) in enumerate(group):
            if dep.target.module in (lv.k, lv.v):
                # GQA index mapping is not invertible: state K/V removal explicitly.
                group[i] = GroupItem(dep=dep, idxs=list(kv_channels))
                group[i].root_idxs = [None] * len(kv_channels)
                seen_kv.add(dep.target.module)
        _check_targets(group, {lv.q, lv.k, lv.v, lv.o}, "attention heads")
        group.prune()
        for module in (lv.k, lv.v):
            if kv_channels and module not in seen_kv:
                tp.prune_linear_out_channels(module, kv_channels)
