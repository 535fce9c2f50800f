"""Measured layer sensitivity: how far the final logits move when only one layer is pruned.

For every layer l and a few probe levels p (the removed share of that layer's prunable
parameters), the pass measures KL(dense || model with only layer l pruned at p), averaged over the
tokens of a small calibration subsample. It keeps one decoder layer resident: the dense stream and
every perturbed stream advance together, so each layer is loaded once. At layer j the streams
forked at earlier layers go through the dense layer j, and new streams fork from the dense input
through layer j probed at each level. Perturbed hidden states stay on the CPU (L x levels x
tokens x hidden floats: about 0.4 GB for SmolLM2 with 2048 tokens).

A probe removes what the real solver would remove first and refits what it cheaply can: MLP
channels (MLP-first, or the layer's ratio split) chosen by their energy, then down_proj refitted by
least squares on the kept channels; overflow heads chosen by energy, o_proj refitted likewise.
Removal is done by zeroing the dropped input columns of the output projection, which equals
removing the group. The gate/up weights are not updated (the ADMM solver does that too), so the
probe overstates every layer's damage by a similar factor; the allocation needs the ranking and
the curves' shapes, not their absolute level.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .admm import refit_output_columns
from .allocation import mlp_first
from .allocators.base import SensitivityCurves
from .architectures import LayerView, ModelView, geometry_of
from .energies import LayerMoments
from .groups import UnitSpace, choose_channels, choose_heads, head_channels, resolve_head_unit
from .residency import all_resident, head_modules, resident
from .stats import InputRecorder
from .structprune import group_energies, taps_for

#: Ridge damping of the probes' refits, as the solver's `_refit`.
PROBE_DAMPING = 0.01
#: Logits are computed for this many tokens x vocabulary entries at a time.
LOGIT_CHUNK_ELEMENTS = 1 << 24


def head_logits(model: nn.Module, view: ModelView, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from the last decoder layer's output: final norm (OPT: and project_out),
    LM head, and Gemma 2's final soft-capping, exactly as the model's own forward applies them."""
    backbone = view.backbone
    h = hidden
    for name in ("norm", "final_layer_norm", "project_out"):
        module = getattr(backbone, name, None)
        if module is not None:
            h = module(h)
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def probe_counts(
    spaces: dict[str, list[UnitSpace]], layer: int, level: float, channels_first: bool
) -> dict[str, int]:
    """Groups a probe at `level` removes from `layer`: the same split rule as the allocation
    (MLP-first or the ratio split), rounded to feasible steps, within each kind's cap."""
    removal = {kind: [level * spaces[kind][layer].n] for kind in spaces}
    one = {kind: [spaces[kind][layer]] for kind in spaces}
    if channels_first:
        removal = mlp_first(one, removal)
    counts = {}
    for kind, (value,) in removal.items():
        s = spaces[kind][layer]
        # MLP-first heads take only the overflow: round it up so the probe removes the level's share
        up = channels_first and kind == "heads"
        steps = math.ceil(value / s.step - 1e-9) if up else round(value / s.step)
        counts[kind] = max(0, min(steps * s.step, s.max_remove))
    return counts


def probe_weights(
    lv: LayerView, stats: dict, remove: dict[str, int], energy: str, head_unit: str
) -> dict[nn.Linear, torch.Tensor]:
    """New weights of the output projections that realise one probe: dropped input columns zero,
    kept ones refitted by least squares to the dense output (from the recorded input Grams)."""
    geometry = geometry_of(lv)
    kinds = [k for k, c in remove.items() if c]
    moments = LayerMoments.from_stats(stats)
    energies = group_energies(lv, moments, energy, head_unit, kinds)
    out = {}
    if remove.get("mlp"):
        keep = choose_channels(energies["mlp"], remove["mlp"])
        out[lv.mlp_out] = _refit_zeroed(lv.mlp_out.weight, stats["mlp_hidden"], keep)
    if remove.get("heads"):
        unit = resolve_head_unit(head_unit, geometry)
        keep_heads, _ = choose_heads(unit, energies["heads"], remove["heads"], geometry)
        out[lv.o] = _refit_zeroed(lv.o.weight, stats["o_in"], head_channels(keep_heads, lv.head_dim))
    return out


def _refit_zeroed(weight: torch.Tensor, moments, keep: list[int]) -> torch.Tensor:
    fitted, _ = refit_output_columns(weight.detach(), moments.gram / moments.tokens, keep, PROBE_DAMPING)
    full = torch.zeros_like(weight)
    full[:, keep] = fitted.to(weight.dtype)
    return full


@contextlib.contextmanager
def swapped(weights: dict[nn.Linear, torch.Tensor]):
    """Temporarily give linears other weights (restored even on error). The model's own weight
    tensors are swapped out, not overwritten, since they may be shared with the caller's model."""
    saved = {m: m.weight for m in weights}
    try:
        for m, w in weights.items():  # new Parameters: the weights themselves are never written
            m.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
        yield
    finally:
        for m, w in saved.items():
            m.weight = w


@dataclass
class _Stream:
    layer: int
    level: int
    hidden: list[torch.Tensor]


def sensitivity_pass(
    model: nn.Module,
    view: ModelView,
    batches: list,
    forward: Callable,
    spaces: dict[str, list[UnitSpace]],
    levels: Sequence[float],
    config,
    device: torch.device,
    progress: bool = False,
) -> SensitivityCurves:
    """KL curves for every layer and level (see the module docstring). `batches` are layer 0's
    inputs for the subsample; their hidden states are overwritten (they end as the dense output)."""
    start = time.perf_counter()
    store = torch.device("cpu")
    streams: list[_Stream] = []
    peak_bytes = 0
    prunable = [any(spaces[k][i].max_remove > 0 for k in spaces) for i in range(len(view.layers))]
    grams = tuple(n for k in spaces for n in {"mlp": ("mlp_hidden",), "heads": ("o_in",)}[k])
    for j, lv in enumerate(tqdm(view.layer_views(), desc="sensitivity", disable=not progress, unit="layer")):
        with resident(lv.layer, device), torch.no_grad():
            for s in streams:
                s.hidden = [
                    forward(lv.layer, replace(b, hidden=h.to(device))).to(store)
                    for b, h in zip(batches, s.hidden)
                ]
            with InputRecorder(taps_for(lv, spaces), j, grams=grams) as rec:
                outputs = [forward(lv.layer, b) for b in batches]
            if prunable[j]:
                for k, level in enumerate(levels):
                    remove = probe_counts(spaces, j, level, config.channels_first)
                    weights = probe_weights(lv, rec.stats, remove, config.energy, config.head_unit)
                    with swapped(weights):
                        hidden = [forward(lv.layer, b).to(store) for b in batches]
                    streams.append(_Stream(j, k, hidden))
            del rec
            for b, out in zip(batches, outputs):
                b.hidden = out
        peak_bytes = max(peak_bytes, sum(h.numel() * h.element_size() for s in streams for h in s.hidden))
    kl = _kl_per_stream(model, view, batches, streams, device)
    curves = [[0.0] * len(levels) for _ in view.layers]
    for s, value in zip(streams, kl):
        curves[s.layer][s.level] = value
    tokens = distributed.all_sum_int(sum(b.hidden.shape[0] * b.hidden.shape[1] for b in batches))
    return SensitivityCurves(list(levels), curves, tokens, time.perf_counter() - start, peak_bytes)


def _kl_per_stream(model, view, batches, streams: list[_Stream], device) -> list[float]:
    """Mean per-token KL(dense || stream) of the final logits, computed in token chunks so the
    (tokens x vocabulary) logits never exist at once."""
    totals = torch.zeros(len(streams), dtype=torch.float64)
    tokens = 0
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    with torch.no_grad(), all_resident(head_modules(model, view.backbone), device):
        for bi, b in enumerate(batches):
            dense = b.hidden.reshape(-1, b.hidden.shape[-1])
            tokens += dense.shape[0]
            for lo in range(0, dense.shape[0], chunk):
                # float64 softmax: small KLs are differences of nearly equal log-probabilities
                logp = torch.log_softmax(
                    head_logits(model, view, dense[lo : lo + chunk].to(device)).double(), -1
                )
                p = logp.exp()
                for si, s in enumerate(streams):
                    h = s.hidden[bi].reshape(-1, dense.shape[-1])[lo : lo + chunk].to(device)
                    logq = torch.log_softmax(head_logits(model, view, h).double(), -1)
                    totals[si] += float((p * (logp - logq)).sum())
    distributed.all_sum(totals)
    return (totals / max(distributed.all_sum_int(tokens), 1)).tolist()
