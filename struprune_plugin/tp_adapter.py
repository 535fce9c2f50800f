"""Torch-Pruning host adapter: StructPrune as an `Importance` and an allocation for `BasePruner`.

Torch-Pruning users write scripts around `tp.pruner.BasePruner(model, example_inputs, importance,
...)`. This module gives them three things, each in Torch-Pruning's own terms:

* `StructPruneImportance`: a calibration-aware importance for *any* Torch-Pruning group (LLM,
  CNN, ViT). Like Torch-Pruning's `ActivationImportance` it records during forward passes run
  inside `with importance.record(model):`, but keeps only per-feature sums of squares of every
  Linear/Conv input (no activations), and scores each group item by the Wanda product
  |W| * ||X|| (or, with energy="obs", only the consumers' input channels, each by the output
  error of removing it, ||W[:, j]||^2 * ||x_j||^2), reduced
  over the group with `root_idxs` exactly as `GroupMagnitudeImportance` does.
* `pruner_kwargs`: StructPrune's per-layer allocation (energy pass, temperature softmax, exact
  budget) translated into `pruning_ratio_dict` / `head_pruning_ratio_dict` and the head settings
  BasePruner needs, with ratios chosen so that BasePruner's own rounding lands on the allocated
  counts, and GQA honoured (query heads evenly within KV groups; BasePruner never removes K/V).
* `finish`: the transformers bookkeeping BasePruner does not do (attention head counts, MLP
  width, per-layer layout in the config), so the result saves and reloads.

The solver path ("the solver decides, the DependencyGraph cuts") is `prune_model` itself: its
surgery goes through a per-layer DependencyGraph (`surgery.prune_layer`); `traceable` is the
tracing context that avoids Torch-Pruning's endless loop on transformers 5 RoPE.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from .architectures import geometry_of, model_view
from .checkpoint import record_layout
from .engine import PruneConfig, allocate_layers
from .errors import NonFiniteActivationError, StructPruneError, UnsupportedArchitectureError
from .groups import resolve_head_unit
from .stats import FeatureMoments
from .surgery import traceable

__all__ = ["StructPruneImportance", "finish", "kwargs_for_counts", "pruner_kwargs", "ratio_for", "traceable"]

TP_ENERGIES = ("wanda", "obs")


class StructPruneImportance(tp.importance.GroupMagnitudeImportance):
    """Calibration-aware group importance from streamed input statistics.

    Usage, as with Torch-Pruning's ActivationImportance::

        imp = StructPruneImportance()
        with torch.no_grad(), imp.record(model):
            for batch in calibration:
                model(batch)
        pruner = tp.pruner.BasePruner(model, example_inputs, imp, ...)

    With `iterative_steps > 1`, record again after every `pruner.step()`: the statistics describe
    the layers' current inputs, and a stale record is refused rather than misread.
    """

    def __init__(
        self,
        energy: str = "wanda",
        group_reduction: str = "sum",
        normalizer: str | None = "mean",
        target_types: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd),
    ):
        if energy not in TP_ENERGIES:
            raise StructPruneError(f"unknown energy {energy!r}; choose one of {TP_ENERGIES}")
        super().__init__(
            p=1, group_reduction=group_reduction, normalizer=normalizer, target_types=list(target_types)
        )
        self.energy = energy
        self.stats: dict[nn.Module, FeatureMoments] = {}

    @contextlib.contextmanager
    def record(self, model: nn.Module) -> Iterator[StructPruneImportance]:
        """Hooks on every Linear/Conv input for the duration of the block; earlier records are dropped."""
        self.stats = {}
        names = {m: n for n, m in model.named_modules()}

        def hook(module, args):
            x = args[0].detach()
            if isinstance(module, nn.modules.conv._ConvNd):
                x = x.movedim(1, -1)  # channels last: one feature per input channel
            moments = self.stats.setdefault(module, FeatureMoments())
            moments.add(x)
            if not torch.isfinite(moments.sum_sq).all():
                raise NonFiniteActivationError(
                    f"NaN/inf in the input of {names.get(module, type(module).__name__)}. Fix: check the "
                    "calibration data and the model weights (an fp16 overflow? use float32)"
                )

        handles = [
            m.register_forward_pre_hook(hook)
            for m in model.modules()
            if isinstance(m, tuple(self.target_types))
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _norms(self, layer: nn.Module, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.stats.get(layer)
        if moments is None:
            raise StructPruneError(
                f"no calibration statistics for {type(layer).__name__} {tuple(layer.weight.shape)}. Fix: run "
                "calibration batches through the model inside `with importance.record(model):`"
            )
        if moments.sum_sq.numel() != features:
            raise StructPruneError(
                f"statistics for {type(layer).__name__} describe {moments.sum_sq.numel()} input features, "
                f"but the layer now has {features}. Fix: record again after each pruning step"
            )
        return moments.norms().to(layer.weight.device), moments.sum_sq.float().to(layer.weight.device)

    def _item_score(self, layer: nn.Module, prune_fn, idxs: list[int]) -> torch.Tensor | None:
        """Per index of one group item: the Wanda sum |W| * ||x|| over the weights it removes
        (or, for input channels with energy='obs', ||W[:, j]||^2 * ||x_j||^2)."""
        conv = isinstance(layer, nn.modules.conv._ConvNd)
        if conv and getattr(layer, "transposed", False):
            return None  # transposed convs: no per-input-channel activation norm to pair with
        in_features = layer.in_channels if conv else layer.in_features
        norms, sum_sq = self._norms(layer, in_features)
        groups = layer.groups if conv else 1
        w = layer.weight.detach().float()
        # (groups, out per group, in per group): kernel positions summed (|W|) or squared-summed.
        mag = w.abs().flatten(2).sum(2) if conv else w.abs()
        sq = w.pow(2).flatten(2).sum(2) if conv else w.pow(2)
        out_g, in_g = mag.shape[0] // groups, mag.shape[1]
        idx = torch.as_tensor(idxs, device=w.device, dtype=torch.long)
        if prune_fn in (function.prune_linear_out_channels, function.prune_conv_out_channels):
            if self.energy == "obs":
                return None  # output-side energy: only the consumers' input channels count
            seen = norms.view(groups, in_g)[idx // out_g]  # the inputs each output channel reads
            return (mag[idx] * seen).sum(1)
        if prune_fn in (function.prune_linear_in_channels, function.prune_conv_in_channels):
            per_in = (sq if self.energy == "obs" else mag).view(groups, out_g, in_g).sum(1).reshape(-1)
            act = sum_sq if self.energy == "obs" else norms
            return per_in[idx] * act[idx]
        return None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.target.module, dep.handler
            if not isinstance(layer, tuple(self.target_types)):
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue  # e.g. K/V reached through the GQA mapping: not invertible to the root
            score = self._item_score(layer, prune_fn, list(idxs))
            if score is not None:
                group_imp.append(score)
                group_idxs.append(root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def ratio_for(remove: int, total: int) -> float:
    """A BasePruner ratio that removes exactly `remove` of `total`.

    BasePruner keeps int(total * (1 - ratio)) channels; aiming half a channel inside the interval
    makes that truncation land on total - remove despite float round-off.
    """
    if remove <= 0:
        return 0.0
    return (remove - 0.5) / total


def head_ratio_for(remove_query: int, num_heads: int, num_kv_heads: int) -> float:
    """BasePruner's local GQA rule removes ceil(ceil(ratio * H) / H_kv) query heads per KV group."""
    if remove_query <= 0:
        return 0.0
    if remove_query % num_kv_heads:
        raise StructPruneError(
            f"{remove_query} query heads cannot be removed evenly from {num_kv_heads} KV groups"
        )
    return (remove_query - 0.5) / num_heads


def pruner_kwargs(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    sparsity: float,
    config: PruneConfig | None = None,
    progress: bool = False,
) -> dict:
    """Keyword arguments for `tp.pruner.BasePruner` that realise StructPrune's allocation.

    The energy pass and temperature softmax (`allocate_layers`) give per-layer counts;
    `kwargs_for_counts` turns them into BasePruner's settings. The returned dict also holds
    `allocation` (counts and energies, for reports): pop it before passing the rest on. Build the
    pruner inside `with traceable(model):`.
    """
    config = dataclasses.replace(config or PruneConfig(method="structprune"), sparsity=sparsity)
    _refuse_fused(model_view(model))  # before the energy pass, not after it
    # Torch-Pruning 1.6.1 stops treating a layer as GQA once its query heads equal its K/V heads,
    # then refuses the head group silently: keep at least two query heads on every K/V head.
    config.min_query_per_kv = max(config.min_query_per_kv, 2)
    counts, energies = allocate_layers(model, calibration_ids, config, progress)
    kwargs = kwargs_for_counts(model, counts, config.head_unit)
    kwargs["allocation"] = {"counts": counts, "energies": energies}
    return kwargs


def _refuse_fused(view) -> None:
    """BasePruner's graph cannot couple "the same index in two parts of one linear" (Phi-3's fused
    qkv_proj and gate_up_proj): it would cut one block and leave the other, or refuse silently."""
    if view.layer(0).fused:
        raise UnsupportedArchitectureError(
            "Torch-Pruning's BasePruner cannot prune fused projections (Phi-3's qkv_proj and "
            "gate_up_proj: a head or MLP channel is rows in two or three parts of one linear). Fix: "
            "prune with struprune_plugin.prune_model (or the CLI), whose surgery splits fused rows itself"
        )


def kwargs_for_counts(model: nn.Module, counts: dict[str, list[int]], head_unit: str = "auto") -> dict:
    """BasePruner settings that remove exactly `counts[kind][layer]` units per layer.

    `pruning_ratio_dict` has one scope per MLP (keyed by gate_proj / fc1) plus q_proj so the
    attention groups are visited; `head_pruning_ratio_dict` is keyed by the attention module;
    `pruning_ratio=0.0` keeps the hidden size; `ignored_layers` holds lm_head (and Qwen3's
    q_norm/k_norm weights); `forward_fn`/`output_transform` suit HF causal LMs.
    """
    view = model_view(model)
    _refuse_fused(view)
    ratio_dict, head_dict, num_heads, ignored = {}, {}, {}, []
    for i, lv in enumerate(view.layer_views()):
        if "mlp" in counts:
            ratio_dict[lv.mlp_in[0]] = ratio_for(counts["mlp"][i], lv.intermediate_size)
        kv = lv.num_kv_heads if lv.family == "llama" else lv.num_heads
        num_heads.update({lv.q: lv.num_heads, lv.k: kv, lv.v: kv})
        ignored.extend(lv.head_norm_weights)
        removed_heads = counts.get("heads", [0] * len(view.layers))[i]
        if removed_heads:
            unit = resolve_head_unit(head_unit, geometry_of(lv))
            if unit == "kv_group" and lv.num_kv_heads != lv.num_heads:
                raise StructPruneError(
                    "Torch-Pruning's BasePruner never removes K/V heads under GQA; use head_unit='query' "
                    "(or 'auto') for this path, or prune_model for whole KV groups"
                )
            head_dict[lv.attn] = head_ratio_for(removed_heads, lv.num_heads, lv.num_kv_heads)
            ratio_dict[lv.q] = 0.5  # any ratio > 0 makes BasePruner visit the attention group
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is not None:
        ignored.insert(0, lm_head)
    return {
        "pruning_ratio": 0.0,
        "pruning_ratio_dict": ratio_dict,
        "head_pruning_ratio_dict": head_dict,
        "num_heads": num_heads,
        # BasePruner's defaults for these are shared dicts that its constructor writes num_heads
        # into: every later pruner in the process would inherit this model's modules. Fresh ones.
        "in_channel_groups": {},
        "out_channel_groups": {},
        "prune_num_heads": True,
        "prune_head_dims": False,
        "ignored_layers": ignored,
        "forward_fn": lambda m, x: m(x, use_cache=False),
        "output_transform": lambda out: out.logits,
    }


def finish(model: nn.Module) -> nn.Module:
    """After BasePruner: fix the attributes transformers reads at run time and record the layout."""
    for lv in model_view(model).layer_views():
        lv.refresh_bookkeeping()
    record_layout(model)
    return model
