"""The layer-by-layer engine: one decoder layer resident, calibration activations streamed.

Layer 0's inputs are captured once (embeddings only run on the compute device). Then for each
layer in turn: move it to the device, run the calibration batches through it with hooks that keep
sufficient statistics, decide which groups survive, remove the rest physically (Torch-Pruning),
run the batches through the *pruned* layer to produce the next layer's inputs, and move it back.
Every later layer therefore calibrates on what the pruned prefix really produces.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, flap
from .admm import RIDGE_SCALES
from .allocation import (
    allocate_equal,
    allocate_global_threshold,
    allocate_softmax_budget,
    allocate_uniform,
    check_sparsity,
    threshold_budget,
)
from .allocators import (
    ALLOCATIONS,
    AUTO_TRUST_REGION,
    DEFAULT_TEMPERATURE,
    REGISTRY,
    Allocator,
    LayerMeasurements,
    probe_levels,
)
from .architectures import (
    LayerView,
    ModelView,
    context_length,
    enable_output_biases,
    geometry_of,
    model_view,
    parameter_count,
)
from .checkpoint import record_layout
from .devices import resolve_device
from .energies import ENERGIES, normalise
from .errors import (
    BudgetMissedError,
    CalibrationDataError,
    NonFiniteWeightError,
    StructPruneError,
    UnsupportedArchitectureError,
    is_number,
)
from .global_taylor import prune_layer_global, taylor_gradients, taylor_group_scores
from .groups import (
    UNIT_KINDS,
    LayerPlan,
    choose_channels,
    choose_heads,
    head_channels,
    resolve_head_unit,
    unit_space,
)
from .layer_passes import AttentionCache
from .memory import RssSampler, peak_memory, reset_peak
from .residency import all_resident, is_streamed, resident
from .scoring import NEEDS_CALIBRATION, LayerInputs, head_scores, mlp_channel_scores
from .sensitivity import sensitivity_pass
from .stats import InputRecorder
from .structprune import energy_pass, prune_layer_structprune
from .surgery import build_layer_graph, prune_layer

log = logging.getLogger(__name__)

#: Every method the engine runs, and whether it needs calibration data.
METHOD_NEEDS_CALIBRATION = {
    **NEEDS_CALIBRATION,
    "flap": True,
    "structprune": True,
    "energy-threshold": True,
    "global-taylor": True,
}
#: Former method names, still accepted: "global" was the threshold reference's first name, but
#: ranking local energies globally is not a global method (that is "global-taylor").
METHOD_ALIASES = {"global": "energy-threshold"}
ALL_METHODS = tuple(METHOD_NEEDS_CALIBRATION)
#: Methods that run the energy pass and the per-layer solver; "energy-threshold" allocates by one threshold
#: over all groups' energies (the O(N) reference) instead of StructPrune's per-layer softmax.
SOLVER_METHODS = ("structprune", "energy-threshold")
#: The output pass replays the attention outputs the MLP statistics pass recorded (exact; see
#: layer_passes.py). A switch so tests can compare with the full layer forward.
REUSE_ATTENTION = True
#: How a layer's budget is shared between heads and MLP channels: "mlp-first" (MLP channels take
#: it, heads only the overflow; StructPrune's measured best), "ratio" (the allocation's own share,
#: the references' rule), "energy" (one threshold over the layer's groups, see `kind_splitter`);
#: "auto" is mlp-first for StructPrune and ratio for every other method.
KIND_SPLITS = ("auto", "mlp-first", "ratio", "energy")


@dataclass
class PruneConfig:
    """What to prune and how. Sparsity counts removed parameters of the attention and MLP linears."""

    method: str = "structprune"
    sparsity: float = 0.3
    units: tuple[str, ...] = ("mlp", "heads")
    head_unit: str = "auto"  # "query" (even within KV groups), "kv_group", or auto by GQA
    head_sparsity: float | None = None  # honoured exactly per layer when given
    # Keep every MLP width a multiple of this. None = auto (`mlp_round_to_for`): for StructPrune 32,
    # else 8, where every layer's width allows, else 1 (references: 1). integration/results/rounding.md:
    # an odd width halves bf16 GEMM throughput on a GPU (LLaMA-2-7B shapes on an H200: prefill
    # 13.4k vs 27.6k tok/s at 30 %), llama.cpp's AVX-512 f16 kernels need multiples of 16 (SmolLM2
    # prefill 0.76x dense at width 922, 0.98x at 920, 1.25x at 928) and q8_0 rows blocks of 32.
    mlp_round_to: int | None = None
    min_query_per_kv: int = 1  # query unit: query heads every K/V head keeps at least
    skip_layers: tuple[int, ...] = ()  # decoder layers kept dense; sparsity counts the others only
    # The same counts in every layer, so the result is a plain config stock tools load (vLLM,
    # llama.cpp's llama graph). None = auto: StructPrune's uniform allocation on layers that start
    # alike gets equal widths (it costs at most half an MLP channel per layer of the budget).
    equal_widths: bool | None = None
    batch_size: int = 8
    device: str = "cpu"
    trace_tokens: int = 16
    # Prune as far as the units allow when the request is out of reach, instead of refusing.
    allow_shortfall: bool = False
    # StructPrune only (method="structprune"):
    # Layer allocation rule: a name from allocators.ALLOCATIONS or an Allocator instance. "auto" is
    # the measured best (integration/results/allocation.md): at finite T "energy-relative" (the
    # softmax over energies relative to the residual stream) within the trust region
    # AUTO_TRUST_REGION around the mean keep share; "uniform" at T = inf or with equal_widths=True; "threshold"
    # for method="energy-threshold".
    # The paper's softmax over absolute energies is allocation="energy".
    allocation: str | Allocator = "auto"
    # Settings of the rule's constructor (e.g. {"max_deviation": 0.08} for kl-knapsack).
    allocation_options: dict = field(default_factory=dict)
    sensitivity_samples: int = 2  # calibration windows for the measured-KL pass (allocation kl*)
    temperature: float = DEFAULT_TEMPERATURE  # of the softmax over normalised layer energies; inf = uniform
    energy: str = "obs"  # group energy: "obs", "wanda" or "flap"
    normalisation: str = "log-z"
    energy_samples: int | None = 32  # calibration windows for the energy pass (None: all)
    refresh_energies: bool = False  # re-measure each layer's energy on the pruned prefix, re-allocate
    kind_split: str = "auto"  # heads vs MLP within a layer: see KIND_SPLITS
    admm_iterations: int = 4
    use_aux: bool = True  # SparseLLM auxiliary variables in the MLP solver
    refit: bool = True  # least-squares refit of the kept weights (o_proj, MLP)
    bias_refit: bool = False  # the refits also fit o_proj/down_proj biases (mean compensation)
    # Ridge damping of every least-squares solve, times the Gram's mean diagonal (ridge_scale
    # "mean") or each channel's own second moment ("channel", scale-free: admm.RIDGE_SCALES), and the
    # calibration tokens the MLP solver fits on (a seeded subsample of the layer's tokens beyond it):
    # None scales them with the layer's kept MLP width (structprune.solver_tokens_for), an integer
    # is a fixed cap.
    damping: float = 0.01
    ridge_scale: str = "mean"
    solver_tokens: int | None = None
    # FLAP only (method="flap"):
    bias_compensation: bool = True  # fold removed channels' mean output into o_proj/down_proj biases
    # Layer-wise healing inside the walk (0: off): once a layer is pruned, `heal_steps` AdamW steps
    # (cosine-decayed from `heal_lr`) train all its kept weights to reproduce the dense layer's
    # output on the same calibration inputs, before the walk moves on (healing.layerwise).
    heal_steps: int = 0
    heal_lr: float = 1e-3

    def __post_init__(self) -> None:
        self.method = METHOD_ALIASES.get(self.method, self.method)
        # units="mlp" would otherwise be read letter by letter; lists become hashable tuples
        if isinstance(self.units, str):
            self.units = tuple(u.strip() for u in self.units.split(",") if u.strip())
        self.units = tuple(self.units)
        self.skip_layers = tuple(self.skip_layers)

    @property
    def split_rule(self) -> str:
        """`kind_split` with "auto" resolved for this method."""
        if self.kind_split != "auto":
            return self.kind_split
        return "mlp-first" if self.method == "structprune" else "ratio"

    def _allocation_name(self) -> str:
        return self.allocation.name if isinstance(self.allocation, Allocator) else self.allocation

    @property
    def channels_first(self) -> bool:
        return self.split_rule == "mlp-first"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        if self.heal_steps < 0 or not self.heal_lr > 0:
            raise StructPruneError(
                f"heal_steps={self.heal_steps}, heal_lr={self.heal_lr}: steps must be >= 0 (0 = no healing) "
                "and the learning rate positive"
            )
        if self.heal_steps and (self.method == "flap" or not METHOD_NEEDS_CALIBRATION.get(self.method)):
            raise StructPruneError(
                f"heal_steps needs the calibration batches the walk carries layer by layer; method "
                f"{self.method!r} decides without them. Fix: heal afterwards with `struprune heal`, or "
                "use method='structprune'"
            )
        if self.method not in ALL_METHODS:
            raise StructPruneError(f"unknown method {self.method!r}; choose one of {ALL_METHODS}")
        if self.energy not in ENERGIES:
            raise StructPruneError(f"unknown energy {self.energy!r}; choose one of {ENERGIES}")
        if not self.temperature > 0:
            raise StructPruneError(f"temperature must be > 0 (inf for uniform); got {self.temperature}")
        bad = [u for u in self.units if u not in UNIT_KINDS]
        if bad or not self.units:
            raise StructPruneError(
                f"units must be a non-empty subset of {UNIT_KINDS}; got {list(self.units)} "
                f"({', '.join(map(repr, bad)) or 'empty'} not known). Fix: e.g. units=('mlp', 'heads')"
            )
        if not isinstance(self.allocation, Allocator) and self.allocation not in ("auto", *ALLOCATIONS):
            raise StructPruneError(
                f"unknown allocation {self.allocation!r}; choose one of {('auto', *ALLOCATIONS)}"
            )
        if self.allocation != "auto" and self.method != "structprune":
            raise StructPruneError(
                f"allocation={self._allocation_name()!r} is a rule of StructPrune's solver "
                f"(method='structprune'); {self.method!r} allocates as published. Fix: allocation='auto'"
            )
        if self.allocation_options and self.method not in SOLVER_METHODS:
            raise StructPruneError(
                f"allocation options ({', '.join(sorted(map(str, self.allocation_options)))}) set the layer "
                f"allocation of {' and '.join(SOLVER_METHODS)}; method {self.method!r} allocates as "
                "published and would ignore them. Fix: drop the allocation options, or use method='structprune'"
            )
        if self.method in SOLVER_METHODS:
            make_allocator(self)  # the options' names and values are checked now, not after loading
        if self.refresh_energies and self.method != "structprune":
            raise StructPruneError(
                "refresh_energies re-allocates StructPrune's softmax budget; it applies to "
                f"method='structprune' only, not {self.method!r}"
            )
        if self.refresh_energies and "relative_deviation" in self.allocation_options:
            raise StructPruneError(
                "refresh_energies re-allocates the rest of the budget with an absolute trust region "
                "only. Fix: allocation_options max_deviation instead of relative_deviation"
            )
        if self.refresh_energies and self.allocation_options.get("depth_prior"):
            raise StructPruneError(
                "refresh_energies re-allocates the rest of the budget from the energies alone, without "
                "a depth prior. Fix: drop refresh_energies or allocation_options depth_prior"
            )
        if self.refresh_energies and resolved_allocation_name(self) != "energy":
            raise StructPruneError(
                "refresh_energies re-measures the absolute energies of the 'energy' softmax allocation; "
                f"allocation {resolved_allocation_name(self)!r} does not read them. Fix: allocation='energy'"
            )
        if not (is_number(self.damping) and self.damping > 0 and math.isfinite(self.damping)):
            raise StructPruneError(f"damping must be a positive number; got {self.damping!r}")
        if self.ridge_scale not in RIDGE_SCALES:
            raise StructPruneError(
                f"ridge_scale must be one of {', '.join(RIDGE_SCALES)}; got {self.ridge_scale!r}"
            )
        if self.sensitivity_samples < 1:
            raise CalibrationDataError("sensitivity_samples must be >= 1")
        if self.head_sparsity is not None and self.method not in NEEDS_CALIBRATION:
            raise StructPruneError(
                f"head_sparsity fixes the same head ratio in every layer, which only the uniform "
                f"methods {tuple(NEEDS_CALIBRATION)} do; {self.method!r} allocates per layer. Fix: drop "
                "head_sparsity, or use units=('mlp',) to keep every head"
            )
        if self.kind_split not in KIND_SPLITS:
            raise StructPruneError(f"unknown kind_split {self.kind_split!r}; choose one of {KIND_SPLITS}")
        if self.kind_split in ("mlp-first", "energy") and self.method != "structprune":
            raise StructPruneError(
                f"kind_split={self.kind_split!r} is StructPrune's rule; the reference method "
                f"{self.method!r} shares a layer's budget as published. Fix: kind_split='auto' or 'ratio'"
            )
        if self.kind_split == "energy" and self.equal_widths:
            raise StructPruneError(
                "kind_split='energy' chooses each layer's heads vs MLP share from its own energies, so "
                "the widths would differ between layers. Fix: kind_split='mlp-first' or drop equal_widths"
            )
        if self.bias_refit and (self.method not in (*SOLVER_METHODS, "global-taylor") or not self.refit):
            raise StructPruneError(
                "bias_refit fits biases in the solver's least-squares refits: it needs "
                f"method='structprune', 'energy-threshold' or 'global-taylor' with refit=True (got {self.method!r}, refit={self.refit})"
            )
        if self.energy_samples is not None and self.energy_samples < 1:
            raise CalibrationDataError("energy_samples must be >= 1 (or None for every window)")
        if self.mlp_round_to is not None and (
            isinstance(self.mlp_round_to, bool)
            or not isinstance(self.mlp_round_to, int)
            or self.mlp_round_to < 1
        ):
            raise StructPruneError(
                f"mlp_round_to must be an integer >= 1, or None (auto); got {self.mlp_round_to!r}"
            )
        for name, least in (
            ("batch_size", 1),
            ("admm_iterations", 0),
            ("min_query_per_kv", 1),
            ("trace_tokens", 2),
            ("solver_tokens", 1),
        ):
            value = getattr(self, name)
            if name == "solver_tokens" and value is None:
                continue  # the width-scaled default
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                default = " (or None: scaled with the kept MLP width)" if name == "solver_tokens" else ""
                raise StructPruneError(f"{name} must be an integer >= {least}{default}; got {value!r}")
        resolve_device(self.device)
        uniform = self.method in NEEDS_CALIBRATION or (
            self.method == "structprune" and make_allocator(self).uniform and not self.refresh_energies
        )
        if self.equal_widths and not uniform:
            raise StructPruneError(
                "equal_widths gives every layer the same counts, which only uniform allocation does: "
                f"method {self.method!r} with temperature {self.temperature} allocates per layer. Fix: "
                "temperature=inf or allocation='uniform' (structprune), or method magnitude / wanda-sp"
            )
        if self.equal_widths and self.head_sparsity is not None:
            raise StructPruneError("equal_widths and head_sparsity both fix the heads' share: choose one")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.skip_layers):
            raise StructPruneError(f"skip_layers must be decoder layer indices >= 0; got {self.skip_layers}")


#: What the energy pass measures; a rule that reads none of these does not need the pass.
ENERGY_PASS_MEASUREMENTS = frozenset({"energies", "groups", "stream", "outliers"})


def make_allocator(config: PruneConfig) -> Allocator:
    """The allocation rule a config stands for (the one object the engine, the llm-compressor
    modifier and the Torch-Pruning adapter all call)."""
    if isinstance(config.allocation, Allocator):
        if config.allocation_options:
            raise StructPruneError(
                "allocation_options configure a rule given by name; an Allocator instance carries "
                "its own settings. Fix: drop allocation_options"
            )
        return config.allocation
    name = resolved_allocation_name(config)
    cls = REGISTRY[name]
    options = dict(config.allocation_options)
    bounded = {"max_deviation", "relative_deviation"} & set(options)
    if config.allocation == "auto" and name == "energy-relative" and not bounded:
        options = {**AUTO_TRUST_REGION, **options}
    if name in ("energy", "energy-relative", "kl"):
        options = {"temperature": config.temperature, "normalisation": config.normalisation, **options}
    unknown = sorted(set(options) - allocator_settings(cls))
    if unknown:
        raise StructPruneError(
            f"allocation {name!r} has no setting {', '.join(map(repr, unknown))}; its settings are "
            f"{', '.join(sorted(allocator_settings(cls))) or 'none'}. Fix: use one of those names, or "
            "drop the option"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise StructPruneError(f"allocation {name!r}: {err}") from err


def resolved_allocation_name(config: PruneConfig) -> str:
    """The rule's name, with "auto" resolved: "threshold" for method="energy-threshold", else
    "uniform" at T = inf or with `equal_widths=True` (a stock checkpoint needs the same widths in
    every layer, which only uniform ratios give), and "energy-relative" (within the trust region)
    otherwise."""
    if isinstance(config.allocation, Allocator):
        return config.allocation.name
    if config.allocation != "auto":
        return config.allocation
    if config.method == "energy-threshold":
        return "threshold"
    if math.isinf(config.temperature) or config.equal_widths:
        return "uniform"
    return "energy-relative"


def allocator_settings(cls: type[Allocator]) -> set[str]:
    """The keyword settings a rule's constructor takes (what allocation_options may name)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


@dataclass
class LayerRecord:
    index: int
    heads: tuple[int, int]  # (before, after) query heads
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]
    removed_params: int
    seconds: float


@dataclass
class PruneResult:
    model: nn.Module
    config: PruneConfig
    layers: list[LayerRecord]
    requested_sparsity: float
    achieved_sparsity: float
    prunable_before: int
    prunable_after: int
    params_before: int
    params_after: int
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    plans: list[LayerPlan] = field(default_factory=list)  # kept indices per layer, in dense numbering
    layer_energies: dict[str, list[float]] | None = None  # StructPrune's first pass (raw, per kind)
    budget_missed: str | None = None  # why the achieved sparsity is off the request, when it is
    allocation: dict | None = None  # the rule, its settings and what it measured (solver methods)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("model")
        data.pop("plans")
        return data


#: What mlp_round_to=None rounds MLP widths to, best first, with the narrowest MLP each step is
#: taken for: 32 (llama.cpp's q8_0/q4_0 blocks and its AVX-512 f16 kernels' multiple of 16) where
#: every layer has 16 steps or more, so a small model's budget is not moved by a large fraction of
#: a layer; else 8 (GPU tensor cores, AVX2).
AUTO_MLP_ROUND_TO = ((32, 512), (8, 0))


def mlp_round_to_for(config: PruneConfig, geometries) -> int:
    """The MLP rounding a run uses: `mlp_round_to` when set; otherwise, for StructPrune, the first
    of 32 (for MLPs 512 wide or more) and 8 that divides every layer's MLP width (32 for SmolLM2,
    Gemma 3, LLaMA-2-7B and -70B, Qwen2.5), else 1. The reference methods (magnitude,
    Wanda-sp, FLAP, the global references) keep channel-exact widths unless asked, as published."""
    if config.mlp_round_to is not None:
        return config.mlp_round_to
    if config.method != "structprune":  # the references prune channel by channel, as published
        return 1
    for step, narrowest in AUTO_MLP_ROUND_TO:
        if all(g.intermediate % step == 0 and g.intermediate >= narrowest for g in geometries):
            return step
    return 1


def unit_spaces(geometries, config: PruneConfig) -> dict[str, list]:
    """Per unit kind, every layer's UnitSpace under the config's head unit and rounding rules.
    A skipped layer's space keeps all its groups, so every allocator leaves it dense."""
    check_skip_layers(config, len(geometries))
    round_to = mlp_round_to_for(config, geometries)
    spaces = {}
    for kind in config.units:
        spaces[kind] = []
        for i, g in enumerate(geometries):
            space = unit_space(kind, g, config.head_unit, round_to, config.min_query_per_kv)
            spaces[kind].append(replace(space, min_keep=space.n) if i in config.skip_layers else space)
    return spaces


def check_skip_layers(config: PruneConfig, num_layers: int) -> None:
    bad = [i for i in config.skip_layers if i >= num_layers]
    if bad:
        raise StructPruneError(
            f"skip_layers {bad} do not exist: the model has {num_layers} decoder layers (0..{num_layers - 1})"
        )
    if len(set(config.skip_layers)) >= num_layers:
        raise StructPruneError("skip_layers names every decoder layer: nothing is left to prune")


def equal_widths_for(config: PruneConfig, spaces: dict[str, list]) -> bool:
    """Whether this run gives every layer the same counts: `equal_widths` when set; automatically
    for StructPrune's uniform allocation when every layer starts alike (no skipped layers, no fixed
    head share, no per-layer energy split), since per-layer rounding there only moves single
    channels between layers and costs a stock checkpoint."""
    if config.equal_widths is not None:
        return config.equal_widths
    return (
        config.method == "structprune"
        and make_allocator(config).uniform
        and not config.refresh_energies
        and config.head_sparsity is None
        and config.split_rule != "energy"
        and all(len(set(kind)) == 1 for kind in spaces.values())
    )


def budget_tolerance(spaces: dict[str, list], prunable: int, config: PruneConfig) -> float:
    """How far the achieved sparsity may lie from the request by rounding alone: one step of the
    coarsest unit any layer removes (equal widths: half an MLP step in every layer), at least 0.5
    percentage points. Anything further is a missed budget that must be reported."""
    coarsest = max(s.step * s.cost for kind in spaces.values() for s in kind)
    equal = sum(s.step * s.cost for s in spaces.get("mlp", [])) / 2 if equal_widths_for(config, spaces) else 0
    return max(0.005, coarsest / prunable, equal / prunable)


def check_budget_reachable(spaces: dict[str, list], prunable: int, config: PruneConfig) -> float:
    """Refuse, before any work, a sparsity the units cannot reach (every layer keeps at least one
    channel and its minimum heads; `units` and `skip_layers` limit what can go at all). Returns the
    largest reachable sparsity."""
    reachable = sum(s.max_remove * s.cost for kind in spaces.values() for s in kind) / prunable
    if (
        config.sparsity > reachable + budget_tolerance(spaces, prunable, config)
        and not config.allow_shortfall
    ):
        raise BudgetMissedError(
            f"sparsity {config.sparsity:g} is out of reach: with units {list(config.units)} at most "
            f"{reachable:.4f} of the prunable parameters can go (units not listed stay whole, every layer "
            "keeps at least one MLP channel and its minimum of heads). Fix: lower the sparsity, add units (--units mlp,heads), "
            "or accept the shortfall (--allow-shortfall, PruneConfig(allow_shortfall=True))"
        )
    return reachable


def missed_budget(requested: float, achieved: float, tolerance: float) -> str | None:
    """A sentence for the log and the report when the achieved sparsity is off the request."""
    if abs(achieved - requested) <= tolerance:
        return None
    return (
        f"achieved sparsity {achieved:.4f} misses the requested {requested:.4f} by "
        f"{abs(achieved - requested):.4f} (rounding alone explains up to {tolerance:.4f})"
    )


def check_finite_weights(model: nn.Module) -> None:
    """NaN/inf weights make every score meaningless and survive into the saved model: refuse them."""
    for name, param in model.named_parameters():
        if not param.is_meta and param.is_floating_point() and not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise NonFiniteWeightError(
                f"the model's weight {name} holds {bad} NaN/inf values, so no pruning decision (and no "
                "saved model) could be trusted. Fix: repair or re-download the checkpoint"
            )


def targeted_prunable_count(model: nn.Module, config: PruneConfig) -> int:
    """The budget's denominator: prunable parameters of the layers not in `skip_layers`."""
    skip = set(config.skip_layers)
    return sum(
        p.numel()
        for i, lv in enumerate(model_view(model).layer_views())
        if i not in skip
        for lin in lv.linears
        for p in lin.parameters()
    )


class _StopForward(Exception):
    pass


@dataclass
class LayerBatch:
    """One calibration batch as a decoder layer sees it: hidden states and the call's kwargs.

    Models that interleave attention kinds (Gemma's sliding-window and global layers, Qwen2 or
    Mistral with `layer_types`) hand each kind its own mask and RoPE tables. `kwargs_by_type` then
    holds one kwargs dict per kind and `layer_types` names each layer's kind, exactly as the
    backbone's own forward picks them (`config.layer_types[i]`)."""

    hidden: torch.Tensor
    kwargs: dict
    kwargs_by_type: dict[str, dict] | None = None
    layer_types: tuple[str, ...] | None = None

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict, device: torch.device) -> LayerBatch:
        """From a forward pre-hook's (args, kwargs): the layer can be called again without a cache."""
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return cls(hidden.detach(), _reusable_kwargs(kwargs, device))

    def kwargs_for(self, layer: nn.Module) -> dict:
        """The kwargs `layer` receives in the model's own forward."""
        if self.kwargs_by_type is None or self.layer_types is None:
            return self.kwargs
        return self.kwargs_by_type[self.layer_types[_layer_index(layer)]]


def _reusable_kwargs(kwargs: dict, device: torch.device) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return {k: _to(v, device) for k, v in kwargs.items()}


def _layer_index(layer: nn.Module) -> int:
    index = getattr(layer, "layer_idx", None)
    if index is None:
        index = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
    if index is None:
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__} interleaves attention kinds but records no layer_idx: cannot tell "
            "which mask and RoPE tables it takes"
        )
    return int(index)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def interleaved_layer_types(model: nn.Module) -> tuple[str, ...] | None:
    """`config.layer_types` when the layers take more than one kind of attention, else None."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if not types or len(set(types)) < 2:
        return None
    return tuple(types)


def capture_layer_inputs(
    model: nn.Module, view: ModelView, id_batches: Sequence[torch.Tensor], device: torch.device
) -> list[LayerBatch]:
    """Run only the pre-layer modules (embeddings, RoPE, masks) and keep layer 0's inputs and the
    kwargs every layer is called with.

    With interleaved attention kinds, the layers up to the first of each kind are replaced for the
    pass by an identity (their own forward never runs), so their kwargs are recorded at the cost of
    the embeddings alone: one decoder layer's worth of memory, as everywhere else."""
    types = interleaved_layer_types(model)
    first_of = {} if types is None else {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(first_of.values(), default=0)
    captured: list[LayerBatch] = []
    by_type: dict[str, dict] = {}

    def grab(index: int):
        def hook(_module, args, kwargs):
            if index == 0:
                captured.append(LayerBatch.from_call(args, kwargs, device))
            for kind, first in first_of.items():
                if first == index:
                    by_type[kind] = _reusable_kwargs(
                        {k: v for k, v in kwargs.items() if k != "hidden_states"}, device
                    )
            if index == last:
                if by_type:
                    captured[-1].kwargs_by_type, captured[-1].layer_types = dict(by_type), types
                    by_type.clear()
                raise _StopForward

        return hook

    stack = contextlib.ExitStack()
    stack.enter_context(all_resident(view.pre_layer_modules, device))
    handles = [view.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(last + 1)]
    skipped = [view.layers[i] for i in range(last)]
    for layer in skipped:  # an instance attribute shadows the class's forward for this pass only
        layer.forward = _pass_hidden_through
    try:
        for ids in id_batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for layer in skipped:
            del layer.forward
        stack.close()
    return captured


def _pass_hidden_through(hidden_states, *args, **kwargs):
    return hidden_states


def layer_forward(layer: nn.Module, batch: LayerBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs_for(layer))
    return out[0] if isinstance(out, tuple) else out


def check_calibration(
    ids: torch.Tensor | None, vocab_size: int | None, context: int | None = None
) -> torch.Tensor:
    if ids is not None and not isinstance(ids, torch.Tensor):
        try:  # nested lists or arrays of token ids are fine
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise CalibrationDataError(
                f"calibration ids must be a (samples, length) tensor of token ids; got a "
                f"{type(ids).__name__} torch cannot convert ({err}). Fix: torch.tensor(ids) with equal lengths"
            ) from err
    if ids is None or ids.numel() == 0:
        raise CalibrationDataError(
            "this method needs calibration data and none was given. Fix: pass token ids of shape "
            "(samples, length), e.g. from struprune_plugin.data.sample_calibration"
        )
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise CalibrationDataError(
            f"calibration ids must have shape (samples, length >= 2); got {tuple(ids.shape)}"
        )
    if ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise CalibrationDataError(f"calibration ids must be integer token ids; got {ids.dtype}")
    if context is not None and ids.shape[1] > context:
        raise CalibrationDataError(
            f"calibration windows of {ids.shape[1]} tokens exceed the model's {context} positions "
            f"(max_position_embeddings): it never saw such contexts. Fix: --calib-len {context} or less"
        )
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CalibrationDataError(
            f"calibration ids fall outside the vocabulary [0, {vocab_size}). Fix: tokenize with the "
            "model's own tokenizer"
        )
    return ids.long()


def _plan_layer(lv: LayerView, cfg: PruneConfig, remove: dict[str, int], norms: LayerInputs) -> LayerPlan:
    geometry = geometry_of(lv)
    plan = LayerPlan.dense(geometry)
    if remove.get("mlp"):
        scores = mlp_channel_scores(cfg.method, [w.weight for w in lv.mlp_in], lv.mlp_out.weight, norms)
        plan.keep_mlp = choose_channels(scores, remove["mlp"])
    if remove.get("heads"):
        unit = resolve_head_unit(cfg.head_unit, geometry)
        scores = head_scores(
            cfg.method, unit, lv.q.weight, lv.k.weight, lv.v.weight, lv.o.weight, lv.head_dim, norms
        )
        plan.keep_heads, plan.keep_kv_heads = choose_heads(unit, scores, remove["heads"], geometry)
    plan.validate(geometry)
    return plan


def prune_model(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    config: PruneConfig,
    inplace: bool = False,
    progress: bool = True,
    *,
    sink=None,
) -> PruneResult:
    """Prune a causal LM layer by layer. The input model is left untouched unless `inplace`, and
    it is not copied either: the result shares the tensors pruning does not change (embeddings,
    norms, the LM head) with it. `sink(index, layer)` receives every pruned layer while it is
    resident (`streaming.prune_checkpoint` writes it to disk there)."""
    config.validate()
    device = torch.device(config.device)
    reset_peak(device)
    with RssSampler() as sampler:
        result = _prune(model, calibration_ids, config, inplace, progress, sink)
    peak = peak_memory(device, sampler)
    result.peak_memory_bytes, result.peak_memory_kind = peak.bytes, peak.kind
    log.info(
        "pruned to %.4f sparsity (requested %.4f) in %.1fs",
        result.achieved_sparsity,
        config.sparsity,
        result.seconds,
    )
    return result


def dense_targets(layer: nn.Module, batches: Sequence[LayerBatch]) -> list[torch.Tensor]:
    """The dense layer's outputs on `batches`: what in-walk healing trains the pruned layer to give."""
    if distributed.active():
        raise StructPruneError(
            "heal_steps under torch.distributed would train a different copy of each layer on every "
            "rank. Fix: prune without healing under torchrun, then run `struprune heal` in one process"
        )
    with torch.no_grad():
        return [layer_forward(layer, b).detach() for b in batches]


def heal_pruned_layer(
    layer: nn.Module,
    batches: Sequence[LayerBatch],
    targets: list[torch.Tensor],
    config: PruneConfig,
    seed: int,
) -> list[float]:
    """`config.heal_steps` gradient steps on the pruned `layer` towards the dense `targets`."""
    from .healing.layerwise import LayerwiseHealConfig, train_layer  # healing builds on this module

    heal = LayerwiseHealConfig(steps=config.heal_steps, lr=config.heal_lr, seed=seed)
    with torch.enable_grad():
        return train_layer(layer, list(batches), targets, heal, torch.Generator().manual_seed(seed))


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """The model's modules copied, its tensors shared: new Parameter objects over the same storage.

    Pruning replaces a layer's tensors (the engine clones each layer's before it changes them), so
    the copy leaves the input untouched at the cost of one layer, where a deep copy costs a whole
    model. Ties (a shared embedding and LM head) stay ties in the copy."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def _own_tensors(module: nn.Module) -> None:
    """Give `module` private copies of its parameters before the engine changes them."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(
                    param.detach().clone(), requires_grad=param.requires_grad
                )


def _prune(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    config: PruneConfig,
    inplace: bool,
    progress: bool,
    sink=None,
) -> PruneResult:
    """The engine. `sink(index, layer)`, when given, receives every pruned layer while it is still
    resident (the out-of-core path writes it to the output shards before it is dropped)."""
    start = time.perf_counter()
    device = torch.device(config.device)
    view = model_view(model)  # fail on unsupported models before copying anything
    if not inplace:
        model = copy_sharing_weights(model)
        view = model_view(model)
    model.eval()
    home = next(model.parameters()).device
    needs_calibration = METHOD_NEEDS_CALIBRATION[config.method]
    vocab = getattr(model.config, "vocab_size", None)
    if needs_calibration or calibration_ids is not None:
        calibration_ids = check_calibration(calibration_ids, vocab, context_length(model.config))

    views = view.layer_views()
    geometries = [geometry_of(lv) for lv in views]
    spaces = unit_spaces(geometries, config)
    prunable_before = targeted_prunable_count(model, config)
    params_before = parameter_count(model)
    check_budget_reachable(spaces, prunable_before, config)
    check_finite_weights(model)

    with torch.no_grad():
        trace_ids = (
            calibration_ids[:1, : config.trace_tokens]
            if calibration_ids is not None
            else torch.arange(config.trace_tokens).remainder(vocab or config.trace_tokens)[None]
        )
        trace = capture_layer_inputs(model, view, [trace_ids], device)[0]
        batches = []
        if needs_calibration:
            batches = capture_layer_inputs(
                model, view, distributed.shard_windows(calibration_ids).split(config.batch_size), device
            )
    energies = allocation = None
    if config.method in SOLVER_METHODS:
        counts, energies, consumed, allocation = _energy_allocation(
            model, view, batches, calibration_ids, config, spaces, prunable_before, progress
        )
        if config.bias_refit:
            enable_output_biases(model, view)
        if consumed:  # the energy pass consumed the batches: capture layer 0's inputs again
            with torch.no_grad():
                batches = capture_layer_inputs(
                    model, view, distributed.shard_windows(calibration_ids).split(config.batch_size), device
                )
    elif config.method == "global-taylor":
        if distributed.active():
            raise StructPruneError(
                "global-taylor is the O(N) reference, run in one process; under torch.distributed "
                "use the layer-wise methods. Fix: launch it without torchrun"
            )
        taylor_scores, counts, allocation = _global_taylor_allocation(
            model, view, views, calibration_ids, config, spaces, prunable_before, progress
        )
        if config.bias_refit:
            enable_output_biases(model, view)
    elif config.method == "flap":
        flap_stats = flap.dense_pass(view, batches, layer_forward, config.head_unit, device, progress)
        counts = allocate_global_threshold(
            spaces, flap.threshold_energies(flap_stats, spaces), prunable_before, config.sparsity
        )
        if config.bias_compensation:
            enable_output_biases(model, view)
        batches = []  # FLAP decides from the dense pass alone: no per-layer forward follows
    else:
        counts = allocate_uniform(spaces, prunable_before, config.sparsity, config.head_sparsity)

    if equal_widths_for(config, spaces):
        counts = allocate_equal(spaces, prunable_before, config.sparsity, config.channels_first)

    reallocate = split = None
    if config.refresh_energies:
        reallocate = _reallocator(spaces, energies, counts, prunable_before * config.sparsity, config)
    if config.split_rule == "energy" and len(spaces) > 1:
        split = kind_splitter(spaces, counts, carry=not config.refresh_energies)

    records, plans = [], []
    attention = AttentionCache()  # filled by the MLP statistics pass, replayed by the output pass
    for i, lv in enumerate(
        tqdm(views, desc=f"pruning ({config.method})", disable=not progress, unit="layer")
    ):
        t0 = time.perf_counter()
        before = (lv.num_heads, lv.num_kv_heads, lv.intermediate_size)
        remove = {k: counts[k][i] for k in counts}
        with resident(lv.layer, device):
            if not inplace and not is_streamed(lv.layer):
                _own_tensors(lv.layer)
            targets = dense_targets(lv.layer, batches) if config.heal_steps else None
            if config.method == "flap":
                pruned, plan = _prune_layer_flap(lv, remove, flap_stats[i], config, trace)
            elif config.method == "global-taylor":
                pruned, plan = prune_layer_global(
                    lv, i, batches, layer_forward, remove, taylor_scores[i], config, trace
                )
            elif config.method in SOLVER_METHODS:
                pruned, plan = prune_layer_structprune(
                    lv,
                    i,
                    batches,
                    layer_forward,
                    remove,
                    config,
                    trace,
                    reallocate,
                    split,
                    attention if REUSE_ATTENTION and i + 1 < len(views) else None,
                )
            else:
                pruned, plan = _prune_layer_by_score(lv, i, batches, remove, config, trace)
            plans.append(plan)
            if targets is not None:
                heal_pruned_layer(lv.layer, batches, targets, config, seed=i)
                del targets
            with torch.no_grad():
                if needs_calibration and i + 1 < len(views):
                    replay = attention.usable_for(lv.attn, len(batches))
                    with attention.replaying(lv.attn) if replay else contextlib.nullcontext():
                        for b in batches:
                            b.hidden = layer_forward(lv.layer, b)
            attention.clear()
            if sink is not None:
                sink(i, lv.layer)
        gc.collect()  # the dense layer's tensors sit in Torch-Pruning's reference cycles: free them now
        records.append(
            LayerRecord(
                index=i,
                heads=(before[0], pruned.num_heads),
                kv_heads=(before[1], pruned.num_kv_heads),
                mlp=(before[2], pruned.intermediate_size),
                removed_params=plan.removed_params(geometries[i]),
                seconds=time.perf_counter() - t0,
            )
        )
    del batches
    record_layout(model)
    if home.type != "meta":
        model.to(home)
    prunable_after = targeted_prunable_count(model, config)
    achieved = 1.0 - prunable_after / prunable_before
    missed = missed_budget(config.sparsity, achieved, budget_tolerance(spaces, prunable_before, config))
    if missed:
        log.warning("%s", missed)
    return PruneResult(
        model=model,
        config=replace(config, mlp_round_to=mlp_round_to_for(config, geometries)),  # as it ran
        layers=records,
        requested_sparsity=config.sparsity,
        achieved_sparsity=achieved,
        prunable_before=prunable_before,
        prunable_after=prunable_after,
        params_before=params_before,
        params_after=parameter_count(model),
        seconds=time.perf_counter() - start,
        peak_memory_bytes=0,
        peak_memory_kind="",
        plans=plans,
        layer_energies=energies,
        budget_missed=missed,
        allocation=allocation,
    )


def _energy_allocation(model, view, batches, calibration_ids, config, spaces, prunable, progress):
    """The measurement passes the allocation rule needs, then the rule itself. The energy pass
    runs only when the rule (or the energy refresh) reads what it measures: uniform and the
    KL rules skip it, which saves one forward pass over `energy_samples` windows.

    Returns (removal counts, layer energies or None, whether `batches` were consumed by the
    pass, a summary of the allocation for reports)."""
    device = torch.device(config.device)
    allocator = make_allocator(config)
    needs = allocator.needs
    measured = LayerMeasurements(spaces)
    energies, energy_batches = None, None
    if needs & ENERGY_PASS_MEASUREMENTS or config.refresh_energies:
        subsample = config.energy_samples is not None and config.energy_samples < len(calibration_ids)
        energy_batches = batches
        if subsample or not batches:
            with torch.no_grad():
                ids = calibration_ids[: config.energy_samples] if subsample else calibration_ids
                energy_batches = capture_layer_inputs(
                    model, view, distributed.shard_windows(ids).split(config.batch_size), device
                )
        t0 = time.perf_counter()
        energies, groups, extras = energy_pass(
            view,
            energy_batches,
            layer_forward,
            config,
            device,
            progress,
            "groups" in needs,
            needs,
            getattr(allocator, "m", 5.0),
        )
        measured.seconds["energies"] = time.perf_counter() - t0
        measured.energies, measured.group_energies = energies, groups
        measured.stream_energy, measured.outlier_ratios = extras.get("stream"), extras.get("outliers")
    if "sensitivity" in needs:
        with torch.no_grad():
            ids = calibration_ids[: config.sensitivity_samples]
            probe_batches = capture_layer_inputs(
                model, view, distributed.shard_windows(ids).split(config.batch_size), device
            )
        levels = probe_levels(config.sparsity, allocator.level_multiples)
        measured.sensitivity = sensitivity_pass(
            model, view, probe_batches, layer_forward, spaces, levels, config, device, progress
        )
        measured.seconds["sensitivity"] = measured.sensitivity.seconds
        del probe_batches
    counts = allocator.allocate(measured, config.sparsity * prunable, config.channels_first)
    consumed = energy_batches is not None and energy_batches is batches
    return counts, energies, consumed, allocation_summary(allocator, measured)


def _global_taylor_allocation(model, view, views, calibration_ids, config, spaces, prunable, progress):
    """The O(N) reference's ranking: gradients of the whole model's calibration loss (every layer
    resident), Taylor importance per group, one threshold over all groups. Returns (per-layer group
    scores, counts, allocation summary)."""
    home = next(model.parameters()).device
    info = taylor_gradients(model, view, calibration_ids, torch.device(config.device), progress)
    scores = [taylor_group_scores(lv, config.head_unit, config.units) for lv in views]
    for p in model.parameters():
        p.grad = None
    model.to(home)
    by_kind = {kind: [s[kind] for s in scores] for kind in config.units}
    counts = threshold_budget(spaces, by_kind, config.sparsity * prunable)
    summary = {"allocation": "global-taylor", "seconds": {"gradients": info["seconds"]}, "loss": info["loss"]}
    return scores, counts, summary


def allocation_summary(allocator: Allocator, measured: LayerMeasurements) -> dict:
    """What a report and `allocation.json` record about an allocation: the rule, its settings, the
    per-layer measurements it read, and each pass's time."""
    out: dict = {**allocator.describe(), "seconds": dict(measured.seconds)}
    if measured.stream_energy is not None:
        out["stream_energy"] = measured.stream_energy
    if measured.outlier_ratios is not None:
        out["outlier_ratios"] = measured.outlier_ratios
    if measured.sensitivity is not None:
        s = measured.sensitivity
        out["sensitivity"] = {
            "levels": s.levels,
            "kl": s.kl,
            "tokens": s.tokens,
            "seconds": s.seconds,
            "peak_stream_mib": s.peak_stream_bytes / 2**20,
        }
    return out


def allocate_layers(
    model: nn.Module, calibration_ids: torch.Tensor, config: PruneConfig, progress: bool = False
) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """StructPrune's allocation alone: per-layer removal counts (and the layer energies) for the
    model as it is, nothing pruned. One layer is resident at a time, as in `prune_model`; the
    Torch-Pruning adapter turns the counts into a BasePruner's per-layer ratios."""
    config.validate()
    if config.method not in SOLVER_METHODS:
        raise StructPruneError(
            f"allocate_layers needs method 'structprune' or 'energy-threshold', not {config.method!r}"
        )
    view = model_view(model)
    calibration_ids = check_calibration(
        calibration_ids, getattr(model.config, "vocab_size", None), context_length(model.config)
    )
    spaces = unit_spaces([geometry_of(lv) for lv in view.layer_views()], config)
    was_training = model.training
    model.eval()
    try:
        prunable = targeted_prunable_count(model, config)
        counts, energies, _, _ = _energy_allocation(
            model, view, [], calibration_ids, config, spaces, prunable, progress
        )
    finally:
        model.train(was_training)
    if equal_widths_for(config, spaces):  # as prune_model does: the same counts in every layer
        counts = allocate_equal(spaces, prunable, config.sparsity, config.channels_first)
    return counts, energies


def _reallocator(spaces, energies, counts, target: float, config: PruneConfig):
    """Energy refresh: layer i's first-pass energies are replaced by ones measured on the pruned
    prefix's outputs, and what is left of the budget is re-allocated over layers i..L-1 (earlier
    layers are final). Only one scalar per layer and kind is kept, so memory stays at one layer."""

    def reallocate(i: int, fresh: dict[str, float]) -> dict[str, int]:
        for kind, value in fresh.items():
            energies[kind][i] = value
        done = sum(counts[k][j] * spaces[k][j].cost for k in spaces for j in range(i))
        normalised = {k: normalise(v, config.normalisation)[i:] for k, v in energies.items()}
        rest = allocate_softmax_budget(
            {k: s[i:] for k, s in spaces.items()},
            normalised,
            max(0.0, target - done),
            config.temperature,
            config.channels_first,
            config.allocation_options.get("max_deviation"),
        )
        for kind in counts:
            counts[kind][i:] = rest[kind]
        return {kind: counts[kind][i] for kind in counts}

    return reallocate


def kind_splitter(spaces, counts, carry: bool = True):
    """Energy split: the parameters the allocation removes from layer i are re-shared between its
    heads and MLP channels by one threshold on energy per parameter over both kinds (the global
    reference's rule, inside one layer). Output-side energies of heads (through o_proj) and of MLP
    channels (through down_proj) are errors on the same residual stream, so one threshold compares
    them; the ratio split instead gives heads the budget's share rounded to whole head steps, which
    on small GQA layers can mean a third of the heads at 20 % sparsity.

    A layer's choice misses its share by up to one step; with `carry` the difference moves to the
    next layer, so the global budget stays exact (energy refresh re-allocates the rest itself)."""
    pending = 0.0

    def split(i: int, per_group: dict[str, torch.Tensor]) -> dict[str, int]:
        nonlocal pending
        target = sum(counts[k][i] * spaces[k][i].cost for k in spaces) + pending
        layer = threshold_budget(
            {k: [spaces[k][i]] for k in spaces}, {k: [per_group[k]] for k in spaces}, target
        )
        for kind in spaces:
            counts[kind][i] = layer[kind][0]
        if carry:
            pending = target - sum(counts[k][i] * spaces[k][i].cost for k in spaces)
        return {kind: counts[kind][i] for kind in spaces}

    return split


def _prune_layer_flap(lv: LayerView, remove: dict, stats: flap.FlapLayerStats, config: PruneConfig, trace):
    """FLAP's choice in one layer: lowest standardised scores go, their mean output moves to the bias."""
    geometry = geometry_of(lv)
    plan = LayerPlan.dense(geometry)
    if remove.get("mlp"):
        plan.keep_mlp = choose_channels(stats.mlp, remove["mlp"])
    if remove.get("heads"):
        unit = resolve_head_unit(config.head_unit, geometry)
        plan.keep_heads, plan.keep_kv_heads = choose_heads(unit, stats.heads, remove["heads"], geometry)
    plan.validate(geometry)
    if config.bias_compensation:
        kept_o = set(head_channels(plan.keep_heads, lv.head_dim))
        flap.compensate(lv.o, [c for c in range(lv.o.in_features) if c not in kept_o], stats.o_in_mean)
        kept_mlp = set(plan.keep_mlp)
        dropped = [c for c in range(geometry.intermediate) if c not in kept_mlp]
        flap.compensate(lv.mlp_out, dropped, stats.mlp_hidden_mean)
    graph = build_layer_graph(lv, trace.hidden, trace.kwargs_for(lv.layer))
    return prune_layer(lv, plan, graph), plan


def _prune_layer_by_score(lv: LayerView, index: int, batches: list, remove: dict, config: PruneConfig, trace):
    """One-shot baselines: score groups from the layer's own statistics, keep the best, remove the rest."""
    norms = LayerInputs()
    with torch.no_grad():
        if batches:
            with InputRecorder(lv.input_taps(), index) as recorder:
                for batch in batches:
                    layer_forward(lv.layer, batch)
            norms = LayerInputs(**{k: s.norms() for k, s in recorder.stats.items()})
        plan = _plan_layer(lv, config, remove, norms)
    graph = build_layer_graph(lv, trace.hidden, trace.kwargs_for(lv.layer))
    pruned = prune_layer(lv, plan, graph)
    return pruned, plan
