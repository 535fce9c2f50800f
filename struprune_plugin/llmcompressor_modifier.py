"""`StructPruneModifier`: StructPrune as an llm-compressor modifier for recipes and `oneshot`.

llm-compressor's sequential pipeline already does what StructPrune's engine does by hand: it runs
the calibration data through one decoder layer at a time and feeds the next layer the outputs of
the already-pruned one. The modifier therefore only has to

* allocate the per-layer keep counts before calibration (`on_initialize`: the engine's dense
  energy pass and allocation rule, by default the relative-energy softmax, each layer within 0.8 to 1.2 times the mean kept share;
  at temperature inf uniform, with no extra pass),
* record each decoder layer's inputs during its calibration pass (a forward pre-hook),
* prune that layer when its pass ends (`on_sequential_epoch_end`) with the same solver call the
  engine makes (heads by energy with an o_proj refit, the ADMM block solver for the MLP,
  Torch-Pruning surgery), so the propagation pass and every later layer see the pruned layer,
* record the per-layer layout in the model config at `on_finalize`, before `oneshot` saves.

Given the same data and settings, its masks equal `prune_model`'s (a test holds it to that).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import time
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier, ModifierFactory
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from . import distributed
from .allocation import allocate_equal, allocate_uniform
from .allocators import ALLOCATIONS, DEFAULT_TEMPERATURE
from .architectures import ModelView, enable_output_biases, geometry_of, model_view
from .checkpoint import patch_config_json, record_layout, structural_fields, write_loader_files
from .engine import (
    LayerBatch,
    LayerRecord,
    PruneConfig,
    allocate_layers,
    dense_targets,
    equal_widths_for,
    heal_pruned_layer,
    kind_splitter,
    layer_forward,
    make_allocator,
    mlp_round_to_for,
    targeted_prunable_count,
    unit_spaces,
)
from .errors import CalibrationDataError, RecipeError, StructPruneError
from .outputs import check_output_file, write_text_atomic
from .structprune import prune_layer_structprune

__all__ = ["StructPruneModifier", "register"]


class StructPruneModifier(Modifier):
    """Structured pruning of attention heads and MLP channels, one decoder layer at a time.

    The pruned model is a smaller dense model (Torch-Pruning removes the groups), not a masked one.
    Sparsity is the removed share of the attention and MLP linears' parameters of the layers not
    ignored. Put quantization modifiers in a later stage of the recipe, so they calibrate on the
    pruned model. Example recipe::

        structprune_stage:
          pruning_modifiers:
            StructPruneModifier:
              sparsity: 0.3
              units: [mlp, heads]
    """

    # llm-compressor's Modifier forbids extra fields too (0.14.0.1); pinned here so that a typo such as
    # `temprature: 2` can never run silently with the default should the host relax its base class.
    model_config = ConfigDict(extra="forbid")

    requires_calibration_data: bool = True

    sparsity: float = Field(0.3, description="removed share of the prunable parameters, in [0, 1)")
    units: list[Literal["mlp", "heads"]] = Field(
        default_factory=lambda: ["mlp", "heads"], description="what may be removed: MLP channels, heads"
    )
    head_unit: Literal["auto", "query", "kv_group"] = Field(
        "auto", description="under GQA: query heads evenly within KV groups, or whole KV groups"
    )
    allocation: Literal[("auto", *ALLOCATIONS)] = Field(  # type: ignore[valid-type]
        "auto",
        description="layer allocation rule (as `struprune prune --allocation`); auto = energy-relative "
        "with every layer's keep share within 0.8 to 1.2 times the mean, uniform at temperature inf",
    )
    allocation_options: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the allocation rule (as `--allocation-option`), e.g. {max_deviation: 0.08}",
    )
    temperature: float = Field(
        DEFAULT_TEMPERATURE,
        description="softmax temperature of the energy / energy-relative / kl rules; inf = uniform",
    )
    sensitivity_samples: int = Field(2, ge=1, description="calibration samples for the measured-KL pass")
    energy: Literal["obs", "wanda", "flap"] = Field("obs", description="group removal cost")
    energy_samples: int | None = Field(
        32, description="calibration samples for the energy pass (finite temperature only); None = all"
    )
    kind_split: Literal["mlp-first", "ratio", "energy"] = Field(
        "mlp-first",
        description="a layer's heads vs MLP share: MLP channels first (heads take the overflow), the "
        "allocation's ratio, or an energy threshold",
    )
    admm_iterations: int = Field(4, ge=0, description="ADMM iterations of the MLP block solver")
    use_aux: bool = Field(True, description="SparseLLM auxiliary variables in the MLP solver")
    refit: bool = Field(True, description="least-squares refit of the kept weights")
    bias_refit: bool = Field(False, description="the refits also fit o_proj/down_proj biases")
    damping: float = Field(0.01, gt=0, description="ridge damping of the least-squares solves")
    ridge_scale: Literal["mean", "channel"] = Field(
        "mean",
        description="what damping multiplies: the Gram's mean diagonal, or each channel's second moment",
    )
    solver_tokens: int | None = Field(
        None,
        ge=1,
        description="calibration tokens the MLP solver fits on per layer; None: 4 per kept MLP channel, at least 8192",
    )
    mlp_round_to: int | None = Field(
        None,
        ge=1,
        description=(
            "keep every MLP width a multiple of this; None = 32 where every width is a multiple of 32 "
            "and at least 512, else 8 where the widths allow, else 1"
        ),
    )
    min_query_per_kv: int = Field(1, ge=1, description="query heads every K/V head keeps at least")
    equal_widths: bool | None = Field(
        None,
        description="the same widths in every layer: a plain config vLLM loads (uniform allocation); "
        "None = automatically where the allocation is uniform and the layers start alike",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="decoder layers kept dense: module names or 're:' regexes (e.g. 're:.*layers\\.0$')",
    )
    heal_steps: int = Field(
        0, ge=0, description="gradient steps per pruned layer towards the dense layer's output (0: off)"
    )
    heal_lr: float = Field(1e-3, gt=0, description="learning rate of heal_steps (cosine decay)")
    report_path: str | None = Field(None, description="optional .json file for the per-layer result")

    _config: PruneConfig | None = PrivateAttr(default=None)
    _view: ModelView | None = PrivateAttr(default=None)
    _counts: dict[str, list[int]] = PrivateAttr(default_factory=dict)
    _split: Callable | None = PrivateAttr(default=None)
    _pending: dict[int, list[LayerBatch]] = PrivateAttr(default_factory=dict)
    _records: list[LayerRecord] = PrivateAttr(default_factory=list)
    _keep: dict[int, dict] = PrivateAttr(default_factory=dict)
    _round_to: int = PrivateAttr(default=1)  # mlp_round_to as resolved for the model

    def __init__(self, **data: Any) -> None:
        # Before pydantic's validation, which would wrap the error in a multi-line report that names
        # the unknown key but not the known ones; recipes (ModifierFactory) construct through here.
        check_known_keys(data)
        super().__init__(**data)

    @model_validator(mode="after")
    def _validate_settings(self) -> StructPruneModifier:
        self.prune_config().validate()  # a StructPruneError is a ValueError: pydantic reports it
        if self.report_path is not None and not self.report_path.endswith(".json"):
            raise ValueError(f"report_path must end with .json, got {self.report_path!r}")
        return self

    def prune_config(self, skip_layers: tuple[int, ...] = (), device: str = "cpu") -> PruneConfig:
        """The engine configuration these fields stand for (`prune_model` with it prunes alike)."""
        return PruneConfig(
            method="structprune",
            sparsity=self.sparsity,
            units=tuple(self.units),
            head_unit=self.head_unit,
            mlp_round_to=self.mlp_round_to,
            min_query_per_kv=self.min_query_per_kv,
            skip_layers=skip_layers,
            equal_widths=self.equal_widths,
            device=device,
            allocation=self.allocation,
            allocation_options=dict(self.allocation_options),
            sensitivity_samples=self.sensitivity_samples,
            temperature=self.temperature,
            energy=self.energy,
            energy_samples=self.energy_samples,
            kind_split=self.kind_split,
            admm_iterations=self.admm_iterations,
            use_aux=self.use_aux,
            refit=self.refit,
            bias_refit=self.bias_refit,
            damping=self.damping,
            ridge_scale=self.ridge_scale,
            solver_tokens=self.solver_tokens,
            heal_steps=self.heal_steps,
            heal_lr=self.heal_lr,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        view = model_view(model)  # unsupported architectures fail here, before any calibration
        if self.report_path is not None:
            # not only after the whole run; never inside the model's own folder, and a file that is
            # there already is replaced only if it is an earlier report of this modifier
            check_output_file(
                self.report_path,
                "report_path",
                [getattr(model.config, "_name_or_path", None)],
                overwrite=True,
                ours=_is_modifier_report,
            )
        skip = ignored_layers(model, view, self.ignore)
        device = str(next(model.parameters()).device)
        config = self.prune_config(skip, device)
        config.validate()
        geometries = [geometry_of(lv) for lv in view.layer_views()]
        spaces = unit_spaces(geometries, config)
        self._round_to = mlp_round_to_for(config, geometries)
        if equal_widths_for(config, spaces):
            self._counts = allocate_equal(
                spaces, targeted_prunable_count(model, config), self.sparsity, config.channels_first
            )
        elif make_allocator(config).uniform:
            # Uniform allocation needs no energies, hence no extra pass over the data.
            self._counts = allocate_uniform(
                spaces, targeted_prunable_count(model, config), self.sparsity, None, config.channels_first
            )
        else:
            wanted = (
                None if self.energy_samples is None else max(self.energy_samples, self.sensitivity_samples)
            )
            ids = calibration_ids(state.data.calib, wanted)
            with distributed.windows_already_sharded():  # each rank's dataloader holds its share
                self._counts, _ = allocate_layers(model, ids, config)
        if self.kind_split == "energy" and len(spaces) > 1:
            self._split = kind_splitter(spaces, self._counts)
        if self.bias_refit:
            enable_output_biases(model, view)
        self._config, self._view = config, view
        removed = {k: sum(v) for k, v in self._counts.items()}
        logger.info(
            f"StructPrune: {len(view.layers)} decoder layers ({len(skip)} ignored), sparsity "
            f"{self.sparsity:.0%}, allocation {make_allocator(config).name}, temperature "
            f"{self.temperature}; removing {removed}"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        # Every modifier of the recipe has initialised by now, quantizers included.
        check_quantization_groups(self._view, self._counts, self._round_to, self._split is not None)
        for index, layer in enumerate(self._view.layers):
            if any(self._counts[kind][index] for kind in self._counts):
                self._pending[index] = []
                self.register_hook(
                    layer, partial(self._record_inputs, index), "forward_pre", with_kwargs=True
                )

    def _record_inputs(self, index: int, module, args, kwargs):
        batches = self._pending.get(index)
        if batches is not None:
            _check_causal_mask(index, module, kwargs)
            batches.append(LayerBatch.from_call(args, kwargs, torch.device(self._config.device)))

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        """Prune every layer whose calibration pass just ended (the pipeline propagates next)."""
        for index in sorted(i for i, batches in self._pending.items() if batches):
            self._prune_layer(index, self._pending.pop(index))

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        left = sorted(self._pending)
        self._pending.clear()
        if left:
            raise CalibrationDataError(
                f"decoder layers {left} saw no calibration data, so they were not pruned. Fix: run "
                "oneshot with the sequential pipeline (the default for this modifier) and a dataset"
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        layout = record_layout(state.model)
        keep_structure_on_save(state.model)
        if self.report_path is not None:
            report = {
                "settings": dataclasses.asdict(self._config) if self._config else None,
                "counts": self._counts,
                "layers": [vars(r) for r in self._records],
                "kept": self._keep,
                "layout": layout,
            }
            write_text_atomic(self.report_path, json.dumps(report, indent=1, default=list))
        return True

    # -- one layer ---------------------------------------------------------------------------

    def _prune_layer(self, index: int, batches: list[LayerBatch]) -> None:
        t0 = time.perf_counter()
        lv = self._view.layer(index)
        geometry = geometry_of(lv)
        before = (lv.num_heads, lv.num_kv_heads, lv.intermediate_size)
        remove = {kind: self._counts[kind][index] for kind in self._counts}
        targets = dense_targets(lv.layer, batches) if self._config.heal_steps else None
        # The solver's own passes over the layer must not feed other modifiers' calibration
        # hooks; Torch-Pruning's tracing needs autograd, which the pipeline turned off.
        with HooksMixin.disable_hooks(), torch.enable_grad():
            pruned, plan = prune_layer_structprune(
                lv, index, batches, layer_forward, remove, self._config, batches[0], split=self._split
            )
            if targets is not None:  # the pipeline then propagates the healed layer's outputs
                heal_pruned_layer(lv.layer, batches, targets, self._config, seed=index)
        refresh_quantization_params(lv.layer)
        self._keep[index] = {"mlp": plan.keep_mlp, "heads": plan.keep_heads, "kv_heads": plan.keep_kv_heads}
        record = LayerRecord(
            index=index,
            heads=(before[0], pruned.num_heads),
            kv_heads=(before[1], pruned.num_kv_heads),
            mlp=(before[2], pruned.intermediate_size),
            removed_params=plan.removed_params(geometry),
            seconds=time.perf_counter() - t0,
        )
        self._records.append(record)
        logger.info(
            f"StructPrune layer {index}: heads {record.heads[0]}->{record.heads[1]}, "
            f"MLP {record.mlp[0]}->{record.mlp[1]} ({record.seconds:.1f}s)"
        )


def check_known_keys(settings: dict[str, Any]) -> None:
    """Refuse settings StructPruneModifier does not have, naming the closest known one: a misspelt key
    (`sparsityy: 0.3`) would otherwise be a run at the default sparsity that looks like the asked one."""
    known = StructPruneModifier.model_fields
    unknown = [key for key in settings if key not in known]
    if not unknown:
        return
    own = [name for name in known if name not in Modifier.model_fields]
    # The host's public fields (group, start, ...); its state fields (`initialized_`) and the class
    # flag `requires_calibration_data` are accepted (saved recipes carry them) but not advertised.
    host = [n for n in Modifier.model_fields if not n.endswith("_") and n != "requires_calibration_data"]
    close = {key: difflib.get_close_matches(str(key), own + host, n=1) for key in unknown}
    if all(close.values()):
        fix = "rename " + ", ".join(f"{key!r} to {match[0]!r}" for key, match in close.items())
    else:
        fix = "remove the key or spell it as one of the settings listed"
    raise RecipeError(
        f"StructPruneModifier has no setting {', '.join(repr(k) for k in unknown)}; its settings are "
        f"{', '.join(own)} (and llm-compressor's {', '.join(host)}). Fix: {fix} in the recipe entry "
        "or constructor call"
    )


def _check_causal_mask(index: int, layer: torch.nn.Module, kwargs: dict) -> None:
    """llm-compressor calibrates under eager attention, which applies a causal mask only when one
    is passed. Its sequential pipeline hands Phi-3's layers none (llmcompressor 0.14.0.1), so every
    token would attend to later ones: the solver would fit a computation the model never runs, and
    the pipeline's own propagation to the next layer is wrong too. Refuse rather than prune on it."""
    attn = getattr(layer, "self_attn", None)
    implementation = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if implementation == "eager" and kwargs.get("attention_mask") is None:
        raise CalibrationDataError(
            f"llm-compressor's pipeline called decoder layer {index} ({type(layer).__name__}) under eager "
            "attention without an attention mask, so it would attend to future tokens (seen with Phi-3 on "
            "llmcompressor 0.14). Fix: prune with struprune (`struprune prune` or prune_model, which run "
            "the model's own causal attention), then run the rest of the recipe on the pruned folder"
        )


def _weight_group_size(module: torch.nn.Module) -> int | None:
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    return getattr(weights, "group_size", None) if weights is not None else None


def check_quantization_groups(
    view: ModelView, counts: dict[str, list[int]], mlp_round_to: int, split: bool = False
) -> None:
    """Group-wise weight quantization (W4A16: groups of 128 along the input) needs every pruned
    input width to stay a multiple of the group size; fail before calibration, not in GPTQ.
    With the energy split a layer's budget may go to either kind, so both are checked."""

    def shrinks(kind: str, index: int) -> bool:
        own = counts.get(kind, [0] * (index + 1))[index]
        return bool(own or (split and any(c[index] for c in counts.values())))

    for index, lv in enumerate(view.layer_views()):
        group = _weight_group_size(lv.mlp_out)
        if group and shrinks("mlp", index) and mlp_round_to % group:
            raise StructPruneError(
                f"{type(lv.mlp_out).__name__} of decoder layer {index} is quantized in groups of {group} "
                f"along its input, but pruned MLP widths are multiples of mlp_round_to={mlp_round_to} "
                f"only. Fix: set mlp_round_to: {group} on StructPruneModifier (or quantize per channel, "
                "e.g. scheme W8A8)"
            )
        group = _weight_group_size(lv.o)
        if group and shrinks("heads", index) and lv.head_dim % group:
            raise StructPruneError(
                f"o_proj of decoder layer {index} is quantized in groups of {group} along its input "
                f"(heads x head_dim {lv.head_dim}), which removing heads cannot keep divisible. Fix: "
                "units: [mlp] on StructPruneModifier, or a per-channel scheme such as W8A8"
            )


def refresh_quantization_params(layer: torch.nn.Module) -> None:
    """Quantization modifiers attach their scales and zero points when the session initialises,
    before this stage runs; once a module has shrunk they have the old shapes. Re-create them
    from the module's scheme (compressed-tensors drops the stale ones first)."""
    schemed = [m for m in layer.modules() if getattr(m, "quantization_scheme", None) is not None]
    if not schemed:
        return
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    for module in schemed:
        initialize_module_for_quantization(module)


def keep_structure_on_save(model: torch.nn.Module) -> None:
    """llm-compressor's save_pretrained rewrites config.json from the *original* model's file
    (patching only the fields it knows: dtype, tied embeddings, expert counts), which would undo
    the pruned widths. Wrap it once more and write the structural fields back after it."""
    inner = model.save_pretrained
    if getattr(inner, "_struprune", False):
        return

    @wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        result = inner(save_directory, *args, **kwargs)
        patch_config_json(save_directory, structural_fields(model.config))
        write_loader_files(save_directory)
        return result

    save_pretrained._overridden = getattr(inner, "_overridden", False)  # llm-compressor's marker
    save_pretrained._struprune = True
    model.save_pretrained = save_pretrained


def ignored_layers(model: torch.nn.Module, view: ModelView, patterns: list[str]) -> tuple[int, ...]:
    """Decoder layer indices whose module name equals a pattern or matches a 're:' regex."""
    names = {id(m): n for n, m in model.named_modules()}
    skip = [i for i, layer in enumerate(view.layers) if any(_matches(p, names[id(layer)]) for p in patterns)]
    unused = [p for p in patterns if not any(_matches(p, names[id(layer)]) for layer in view.layers)]
    if unused:
        raise StructPruneError(
            f"ignore patterns {unused} match no decoder layer (e.g. {names[id(view.layers[0])]!r}). "
            "Fix: name decoder layers exactly, or use 're:' regexes such as 're:.*layers\\.0$'"
        )
    return tuple(skip)


def _matches(pattern: str, name: str) -> bool:
    return bool(re.fullmatch(pattern[3:], name)) if pattern.startswith("re:") else pattern == name


def calibration_ids(dataloader, limit: int | None) -> torch.Tensor:
    """The first `limit` calibration samples as one (samples, length) id tensor, for the energy
    pass; samples of different lengths are cut to the shortest."""
    if dataloader is None:
        raise CalibrationDataError(
            "a non-uniform allocation needs calibration data for its measurement passes. Fix: pass a "
            "dataset to oneshot"
        )
    rows: list[torch.Tensor] = []
    for batch in dataloader:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        for j, row in enumerate(torch.as_tensor(ids)):
            if mask is not None:
                row = row[torch.as_tensor(mask)[j].bool()]
            rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise CalibrationDataError("the calibration dataloader is empty. Fix: pass a non-empty dataset")
    length = min(r.numel() for r in rows)
    if length < 2:
        raise CalibrationDataError("calibration samples need at least 2 tokens each")
    return torch.stack([r[:length] for r in rows]).long()


def register() -> None:
    """Make recipes (YAML or dict) find the modifier by its class name."""
    ModifierFactory.register("StructPruneModifier", StructPruneModifier)


register()


def _is_modifier_report(path: Path) -> bool:
    """A JSON report this modifier wrote (its own keys): the only file `report_path` replaces."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and {"settings", "layers", "layout"} <= set(data)
