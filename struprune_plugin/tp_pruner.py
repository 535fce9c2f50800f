"""`StructPrunePruner`: StructPrune's allocation and layer-wise solver as a Torch-Pruning pruner.

Through `tp.pruner.BasePruner` with `StructPruneImportance` a Torch-Pruning script gets
StructPrune's scores and allocation but no weight updates (SmolLM2 at 30 %: perplexity 681 to
1068, against 58 from `prune_model`). The difference is the solver: layer by layer, on inputs the
pruned prefix really produces, the heads are chosen and o_proj refitted by least squares, then the
ADMM block solver picks the MLP channels and their new weights. That is sequential (layer i+1
calibrates on pruned layer i), so it cannot be expressed as one ranking of importance scores over
the groups of a whole-model graph, which is what `BasePruner._prune` does.

So this pruner keeps BasePruner's interface (`pruner = StructPrunePruner(model, example_inputs,
calibration_ids, pruning_ratio=0.3)`, `pruner.step()`, `pruner.model`, `pruner.DG`) and its
`step()` runs the engine itself, `prune_model(model, calibration_ids, config, inplace=True)`: the
same code, so the same model, bit for bit, as a `prune_model` call with the same config. The
engine cuts through Torch-Pruning's DependencyGraph, one decoder layer's graph at a time (so the
groups are Torch-Pruning's own, and only one layer is traced and resident at once), and leaves the
transformers bookkeeping done: attention head counts and MLP widths on the modules, the per-layer
layout in the config, so `checkpoint.save_pruned` / `load_pruned` round-trip the result.

Calibration data is token ids of shape (samples, length), given at construction (like
`example_inputs`, which it can stand in for) or to `step(calibration_ids=...)`. Torch-Pruning's
data-driven importances instead record data in forward passes before `step()`; the solver needs
the batches again inside every layer, so it takes them itself.

What BasePruner offers and this pruner does not, and why (each is refused with a clear error,
never silently ignored): `interactive=True` (the solver must cut layer i before it can calibrate
layer i+1, so groups cannot be handed out for the caller to prune later); `iterative_steps > 1`
(one shot with weight updates; for gradual pruning build a new pruner per step); per-layer ratios,
global ranking, head ratios and importances (StructPrune's allocation and solver decide those:
`PruneConfig` holds the knobs). `round_to` maps to `PruneConfig.mlp_round_to`, and
`ignored_layers` accepts whole decoder layers (kept dense, as `PruneConfig.skip_layers`) and
modules outside them (embeddings, lm_head), which are never pruned anyway.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .architectures import ModelView, model_view
from .engine import METHOD_NEEDS_CALIBRATION, PruneConfig, PruneResult, prune_model
from .errors import CalibrationDataError, StructPruneError
from .surgery import traceable

__all__ = ["StructPrunePruner"]

#: BasePruner options the solver replaces, with what to use instead.
_REPLACED = {
    "importance": "the solver decides what goes (PruneConfig.energy scores, ADMM picks the MLP channels); "
    "pass calibration token ids instead",
    "global_pruning": "StructPrune's allocation already shares one budget over all layers; for one "
    "threshold over every group use PruneConfig(method='energy-threshold')",
    "pruning_ratio_dict": "StructPrune allocates each layer's share itself (PruneConfig.temperature); "
    "keep layers dense with ignored_layers=[decoder layer] or PruneConfig(skip_layers=...)",
    "head_pruning_ratio": "heads vs MLP channels are shared per layer by PruneConfig.kind_split; "
    "PruneConfig(units=('mlp',)) keeps every head",
    "head_pruning_ratio_dict": "heads vs MLP channels are shared per layer by PruneConfig.kind_split",
    "iterative_pruning_ratio_scheduler": "the pruner prunes in one step (iterative_steps=1)",
    "ch_sparsity": "a deprecated alias of pruning_ratio: use pruning_ratio",
    "ch_sparsity_dict": "a deprecated alias of pruning_ratio_dict, which StructPrune's allocation replaces",
}


def _forward_causal_lm(model: nn.Module, inputs: Any) -> Any:
    """Tracing forward for HF causal LMs: token ids (or a dict of model inputs), no KV cache."""
    if isinstance(inputs, Mapping):
        return model(**inputs, use_cache=False)
    return model(inputs, use_cache=False)


def _logits(output: Any) -> Any:
    return getattr(output, "logits", output)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple)) or hasattr(value, "__array__")


class StructPrunePruner(tp.pruner.BasePruner):
    """A Torch-Pruning pruner whose `step()` runs StructPrune's allocation and layer-wise solver.

    Usage, as with any Torch-Pruning pruner::

        pruner = StructPrunePruner(model, example_inputs, calibration_ids, pruning_ratio=0.3)
        pruner.step()            # pruner.model is pruned in place, pruner.result the report
        save_pruned(pruner.model, "out")

    `pruning_ratio` is StructPrune's sparsity: the removed share of the attention and MLP linears'
    parameters, over the whole model (not one channel ratio for every layer: the allocation
    decides each layer's share, and the total lands on the budget up to one unit's rounding).
    Left None it is `config.sparsity`. `config` carries every other StructPrune setting (method, energy,
    temperature, ADMM iterations, device, ...) and is copied, never modified.

    After `step()`, `pruner.DG` (the whole-model graph BasePruner built at construction) still
    describes the dense model: to prune again, build a new pruner on the pruned model.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        calibration_ids: torch.Tensor | None = None,
        pruning_ratio: float | None = None,
        config: PruneConfig | None = None,
        iterative_steps: int = 1,
        ignored_layers: Iterable[nn.Module | nn.Parameter] | None = None,
        round_to: int | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        progress: bool = False,
        **basepruner_options: Any,
    ):
        _refuse_options(basepruner_options)
        if calibration_ids is not None and not _is_token_ids(calibration_ids):
            raise StructPruneError(
                f"StructPrunePruner's third argument is calibration token ids, not a "
                f"{type(calibration_ids).__name__}: {_REPLACED['importance']}"
            )
        if iterative_steps != 1:
            raise StructPruneError(
                f"iterative_steps={iterative_steps}: StructPrunePruner prunes in one step, with weight "
                "updates fitted to the model as that step finds it. Fix: iterative_steps=1; for gradual "
                "pruning, build a new StructPrunePruner on the pruned model for each step"
            )
        view = model_view(model)  # unsupported architectures fail here, before tracing
        config = dataclasses.replace(config or PruneConfig())
        if pruning_ratio is not None:
            config.sparsity = pruning_ratio
        if round_to is not None:
            if config.mlp_round_to not in (None, 1, round_to):
                raise StructPruneError(
                    f"round_to={round_to} and config.mlp_round_to={config.mlp_round_to} disagree; give one"
                )
            config.mlp_round_to = round_to
        skip, ignored = _split_ignored(model, view, ignored_layers or [])
        config.skip_layers = tuple(sorted({*config.skip_layers, *skip}))
        config.validate()
        if example_inputs is None:
            if calibration_ids is None:
                raise StructPruneError(
                    "example_inputs is needed to trace the model. Fix: pass token ids (e.g. "
                    "calibration_ids[:1, :16]), or calibration_ids, whose first tokens then trace it"
                )
            example_inputs = torch.as_tensor(calibration_ids)[:1, : config.trace_tokens].long()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_norms = [p for lv in view.layer_views() for p in lv.head_norm_weights]
        with traceable(model), warnings.catch_warnings():
            # Torch-Pruning warns about the RMSNorm weights it finds on the (never pruned) hidden size.
            warnings.simplefilter("ignore")
            super().__init__(
                model,
                example_inputs,
                importance=None,
                pruning_ratio=config.sparsity,
                iterative_steps=1,
                ignored_layers=[*([output] if output is not None else []), *ignored, *head_norms],
                forward_fn=forward_fn or _forward_causal_lm,
                output_transform=output_transform or _logits,
                # fresh dicts: BasePruner's defaults are shared mutable dicts it writes into
                in_channel_groups={},
                out_channel_groups={},
                num_heads={},
                channel_groups={},
            )
        self.config = config
        self.calibration_ids = calibration_ids
        self.progress = progress
        #: `prune_model`'s report of the step (kept indices per layer, achieved sparsity, timings).
        self.result: PruneResult | None = None

    def step(self, interactive: bool = False, calibration_ids: torch.Tensor | None = None) -> None:
        """Prune `self.model` in place: allocation, layer-wise solver, DependencyGraph surgery.

        `calibration_ids` (samples, length) replaces the ids given at construction for this step.
        A step past `iterative_steps` warns and prunes nothing, as in BasePruner."""
        if interactive:
            raise StructPruneError(
                "StructPrunePruner cannot run interactively: the solver must cut decoder layer i before "
                "it calibrates layer i+1, so it cannot hand out groups for the caller to prune later. "
                "Fix: pruner.step() (read pruner.result.plans for the kept indices of every layer)"
            )
        if self.current_step >= self.iterative_steps:
            warnings.warn(
                "Pruning exceed the maximum iterative steps, no pruning will be performed.", stacklevel=2
            )
            return
        ids = self.calibration_ids if calibration_ids is None else calibration_ids
        if ids is None and METHOD_NEEDS_CALIBRATION[self.config.method]:
            raise CalibrationDataError(
                f"method {self.config.method!r} needs calibration data and none was given. Fix: "
                "StructPrunePruner(model, example_inputs, calibration_ids, ...) or "
                "pruner.step(calibration_ids=ids), token ids of shape (samples, length)"
            )
        if ids is not None and not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        self.result = prune_model(self.model, ids, self.config, inplace=True, progress=self.progress)
        self.current_step += 1

    def estimate_importance(self, group) -> torch.Tensor:
        raise StructPruneError(
            "StructPrunePruner has no importance of its own: its solver chooses what goes. Fix: "
            "manual_prune_width(layer, fn, indices) with explicit indices, or pruner.step()"
        )

    def pruning_history(self):
        raise StructPruneError(
            "StructPrunePruner's cut is recorded as the per-layer layout in the model's config, not as "
            "a Torch-Pruning history. Fix: struprune_plugin.checkpoint.save_pruned / load_pruned"
        )

    def load_pruning_history(self, pruning_history) -> None:
        self.pruning_history()


def _refuse_options(options: dict[str, Any]) -> None:
    """BasePruner options the solver replaces are refused with what to use instead; others are
    a TypeError, as for any unknown keyword."""
    known = set(inspect.signature(tp.pruner.BasePruner.__init__).parameters)
    for name in options:
        if name not in known:
            raise TypeError(f"StructPrunePruner got an unexpected keyword argument {name!r}")
    if options:
        name = next(iter(options))
        hint = _REPLACED.get(
            name, "StructPrune's engine decides this itself; its settings are in PruneConfig"
        )
        raise StructPruneError(f"StructPrunePruner does not take BasePruner's {name!r}: {hint}")


def _split_ignored(
    model: nn.Module, view: ModelView, ignored: Iterable[nn.Module | nn.Parameter]
) -> tuple[set[int], list[nn.Module | nn.Parameter]]:
    """BasePruner's `ignored_layers` in StructPrune's terms.

    A module holding whole decoder layers keeps them dense (`skip_layers`, which the budget then
    leaves out); modules outside the decoder layers are never pruned anyway. A part of a layer
    (one q_proj, one MLP) is refused: StructPrune prunes a layer's heads and MLP channels
    together, and the budget cannot leave half a layer out."""
    layers = list(view.layers)
    names = {id(m): n for n, m in [*model.named_modules(), *model.named_parameters()]}
    parts = {id(m): i for i, layer in enumerate(layers) for m in layer.modules() if m is not layer}
    parts.update(  # the weights of a layer's linears (norm weights sit on sizes never pruned)
        {
            id(p): i
            for i, layer in enumerate(layers)
            for m in layer.modules()
            if isinstance(m, nn.Linear)
            for p in m.parameters(recurse=False)
        }
    )
    skip, passed = set(), []
    for item in ignored:
        if isinstance(item, nn.Module):
            inside = {id(m) for m in item.modules()}
            skip.update(i for i, layer in enumerate(layers) if id(layer) in inside)
        elif not isinstance(item, nn.Parameter):
            raise StructPruneError(
                f"ignored_layers takes modules (or parameters); got a {type(item).__name__}"
            )
        if id(item) in parts:
            i, name = parts[id(item)], names.get(id(item), type(item).__name__)
            raise StructPruneError(
                f"ignored_layers holds {name}, a part of decoder layer {i}: "
                "StructPrune prunes a layer's heads and MLP channels together. Fix: ignore the whole "
                f"layer (its module, or PruneConfig(skip_layers=({i},))), or keep one unit kind whole "
                "in every layer with PruneConfig(units=('mlp',)) or units=('heads',)"
            )
        passed.append(item)
    return skip, passed
