"""FLAP reference: global standardised ranking, the masked-model identity, exact bias compensation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import VOCAB, family_params, logits, make_model, masked_reference
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import UnsupportedArchitectureError
from struprune_plugin.flap import compensate, fluctuation, standardise


@pytest.mark.parametrize("family", family_params(["llama", "llama_mha", "qwen2", "phi3", "opt"]))
def test_without_compensation_it_equals_the_masked_model_at_budget(family):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (6, 24))
    config = PruneConfig(method="flap", sparsity=0.4, bias_compensation=False)
    result = prune_model(model, calib, config, progress=False)
    tolerance = (
        result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.4) <= tolerance
    ids = torch.randint(0, VOCAB, (2, 13))
    diff = (logits(result.model, ids) - logits(masked_reference(model, result.plans), ids)).abs().max()
    assert diff <= 1e-5


def test_ranking_is_global_across_layers():
    """Every removed MLP channel, in any layer, scores below every kept one (one threshold)."""
    model = make_model("llama_mha", layers=4, seed=2)
    calib = torch.randint(0, VOCAB, (6, 24))
    result = prune_model(
        model, calib, PruneConfig(method="flap", sparsity=0.4, bias_compensation=False), progress=False
    )
    # Independent scores: hooks on a plain full forward of the dense model.
    inputs = {}
    views = model_view(model).layer_views()
    hooks = [
        lv.mlp_out.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
        for i, lv in enumerate(views)
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    removed, kept = [], []
    for i, (lv, plan) in enumerate(zip(views, result.plans)):
        x = torch.cat(inputs[i]).reshape(-1, lv.intermediate_size).double()
        score = standardise(fluctuation(lv.mlp_out.weight, x.var(0, unbiased=False)))
        mask = torch.zeros(lv.intermediate_size, dtype=torch.bool)
        mask[plan.keep_mlp] = True
        removed.append(score[~mask])
        kept.append(score[mask])
    per_layer_removed = [r.numel() for r in removed]
    assert len(set(per_layer_removed)) > 1  # non-uniform: the ranking spans layers
    assert torch.cat(removed).max() <= torch.cat(kept).min() + 1e-9


def test_compensate_keeps_the_mean_output():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(12, 5, bias=True)
    x = torch.randn(400, 12, generator=gen) + torch.linspace(-2, 2, 12)
    dense_mean = linear(x).mean(0)
    removed = [1, 4, 5, 9]
    compensate(linear, removed, x.double().mean(0))
    with torch.no_grad():
        linear.weight[:, removed] = 0
    assert torch.allclose(linear(x).mean(0), dense_mean, atol=1e-5)


def test_compensated_llama_keeps_layer0_attention_mean_and_reloads(tmp_path):
    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (4, 20))
    result = prune_model(
        model,
        calib,
        PruneConfig(method="flap", sparsity=0.4, units=("heads",), allow_shortfall=True),
        progress=False,
    )
    assert result.model.config.attention_bias and result.model.config.mlp_bias
    assert result.layers[0].heads[1] < result.layers[0].heads[0]  # layer 0 lost heads: the check bites

    def o_mean(m):
        out = []
        h = model_view(m).layer(0).o.register_forward_hook(lambda mod, a, o: out.append(o))
        with torch.no_grad():
            m(input_ids=calib, use_cache=False)
        h.remove()
        return torch.cat(out).reshape(-1, out[0].shape[-1]).mean(0)

    assert torch.allclose(o_mean(result.model), o_mean(model), atol=1e-5)
    reloaded = load_pruned(save_pruned(result.model, tmp_path / "flap"))
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(logits(reloaded, ids), logits(result.model, ids))


def test_compensation_on_a_model_without_bias_flags_is_a_clear_error():
    model = make_model("qwen2", layers=2)
    with pytest.raises(UnsupportedArchitectureError, match="bias_compensation=False"):
        prune_model(model, torch.randint(0, VOCAB, (2, 12)), PruneConfig(method="flap"), progress=False)
