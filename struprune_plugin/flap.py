"""FLAP (An et al., AAAI 2024), the fluctuation-based reference, in the same harness as the others.

FLAP scores every input channel c of an output projection (o_proj / down_proj, fc2) by its
weighted fluctuation ``||W[:, c]||^2 * Var(x_c)`` on the *dense* model, standardises the scores per
layer and per module (z-score over the layer's heads or channels; a head's score is the mean of its
channels' standardised scores), ranks heads and channels of every layer together against one
threshold with parameter costs as weights (FLAP's "AL-AM" structure), and compensates every
removed channel by folding its mean contribution ``W[:, c] * E[x_c]`` into the projection's bias.
No weights are refitted. Like the energy-threshold reference, it holds every group's score at once.

LLaMA projections carry no bias: `architectures.enable_output_biases` switches them on where the
checkpoint format allows it (see there); elsewhere FLAP runs only without compensation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import LayerView, ModelView, geometry_of
from .groups import resolve_head_unit
from .residency import resident
from .stats import InputRecorder


@dataclass
class FlapLayerStats:
    """What FLAP keeps of one dense layer: standardised scores per unit and the projections' input means."""

    heads: torch.Tensor  # one standardised score per head unit
    mlp: torch.Tensor  # one standardised score per MLP channel
    o_in_mean: torch.Tensor
    mlp_hidden_mean: torch.Tensor


def standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def fluctuation(w_out: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's weighted input-feature variance: ||W[:, c]||^2 * Var(x_c) per input column c."""
    return w_out.detach().double().pow(2).sum(0) * variance.double()


def layer_scores(lv: LayerView, stats: dict, head_unit: str) -> FlapLayerStats:
    o_in, hidden = stats["o_in"], stats["mlp_hidden"]
    channels = standardise(fluctuation(lv.o.weight, o_in.variance()))
    heads = channels.reshape(-1, lv.head_dim).mean(1)
    if resolve_head_unit(head_unit, geometry_of(lv)) == "kv_group":
        heads = heads.reshape(lv.num_kv_heads, -1).mean(1)
    return FlapLayerStats(
        heads=heads,
        mlp=standardise(fluctuation(lv.mlp_out.weight, hidden.variance())),
        o_in_mean=o_in.mean().double(),
        mlp_hidden_mean=hidden.mean().double(),
    )


def dense_pass(
    view: ModelView, batches: list, forward: Callable, head_unit: str, device, progress: bool
) -> list[FlapLayerStats]:
    """One pass over the dense model, one layer resident, keeping FLAP's scores and means."""
    out = []
    for i, lv in enumerate(tqdm(view.layer_views(), desc="flap scores", disable=not progress, unit="layer")):
        with resident(lv.layer, device):
            taps = {name: m for name, m in lv.input_taps().items() if name in ("o_in", "mlp_hidden")}
            with torch.no_grad(), InputRecorder(taps, i) as rec:
                outputs = [forward(lv.layer, b) for b in batches]
            out.append(layer_scores(lv, rec.stats, head_unit))
            for batch, hidden in zip(batches, outputs):
                batch.hidden = hidden
    return out


def threshold_energies(scores: list[FlapLayerStats], spaces: dict) -> dict[str, list[torch.Tensor]]:
    """Standardised scores scaled by unit cost, so that `allocate_global_threshold` (which ranks by
    energy per parameter and counts the budget in parameters) ranks by FLAP's score itself."""
    out: dict[str, list[torch.Tensor]] = {}
    for kind, kind_spaces in spaces.items():
        out[kind] = [getattr(s, kind) * space.cost for s, space in zip(scores, kind_spaces)]
    return out


def compensate(linear: nn.Linear, removed: list[int], mean: torch.Tensor) -> None:
    """bias += W[:, removed] @ E[x_removed]: the removed inputs' average contribution stays."""
    if not removed:
        return
    idx = torch.as_tensor(removed, device=linear.weight.device)
    shift = linear.weight.detach().double()[:, idx] @ mean.to(linear.weight.device)[idx]
    with torch.no_grad():
        linear.bias.add_(shift.to(linear.bias.dtype))
