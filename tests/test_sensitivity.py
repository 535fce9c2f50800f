"""The measured-KL sensitivity pass and the layer measurements the allocation rules read, each
checked against a full-model computation that does not stream."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import VOCAB, family_params, make_model
from struprune_plugin.allocators import LayerMeasurements, SensitivityCurves
from struprune_plugin.allocators.kl import interpolate_curve, knapsack_shares
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.engine import PruneConfig, capture_layer_inputs, layer_forward, unit_spaces
from struprune_plugin.sensitivity import head_logits, probe_counts, probe_weights, sensitivity_pass
from struprune_plugin.stats import InputRecorder
from struprune_plugin.structprune import energy_pass, taps_for

CPU = torch.device("cpu")


def test_head_logits_finish_the_models_own_forward(family):
    """Streaming every layer and applying `head_logits` equals the model's logits (final norm,
    OPT's projection, Gemma 2's soft-capping included)."""
    model = make_model(family, layers=3, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    view = model_view(model)
    with torch.no_grad():
        (batch,) = capture_layer_inputs(model, view, [ids], CPU)
        for layer in view.layers:
            batch.hidden = layer_forward(layer, batch)
        ours = head_logits(model, view, batch.hidden)
        theirs = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def _kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    logp = torch.log_softmax(dense_logits.double(), -1)
    logq = torch.log_softmax(logits.double(), -1)
    return float(torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum")) / (
        dense_logits.shape[0] * dense_logits.shape[1]
    )


@pytest.mark.parametrize("family", family_params(["llama", "gemma3", "opt"]))
def test_sensitivity_equals_full_model_kl_of_each_probe(family):
    """Every (layer, level) KL of the streamed pass equals the KL of a full forward of a copy of
    the model whose one layer carries that probe's weights (statistics from a plain forward)."""
    model = make_model(family, layers=3, seed=2)
    ids = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(sparsity=0.4, batch_size=2)
    view = model_view(model)
    spaces = unit_spaces([geometry_of(lv) for lv in view.layer_views()], config)
    levels = [0.2, 0.4, 0.6]
    with torch.no_grad():
        batches = capture_layer_inputs(model, view, ids.split(2), CPU)
        curves = sensitivity_pass(model, view, batches, layer_forward, spaces, levels, config, CPU)
        dense = model(input_ids=ids, use_cache=False).logits
    assert curves.tokens == ids.numel()
    for j, (k, level) in itertools.product(range(3), enumerate(levels)):
        probe = copy.deepcopy(model)
        lv = model_view(probe).layer(j)
        with (
            torch.no_grad(),
            InputRecorder(taps_for(lv, ("mlp", "heads")), j, grams=("mlp_hidden", "o_in")) as rec,
        ):
            probe(input_ids=ids, use_cache=False)
        remove = probe_counts(spaces, j, level, config.channels_first)
        weights = probe_weights(lv, rec.stats, remove, config.energy, config.head_unit)
        with torch.no_grad():
            for module, w in weights.items():
                module.weight.copy_(w)
            expected = _kl(dense, probe(input_ids=ids, use_cache=False).logits)
        assert curves.kl[j][k] == pytest.approx(expected, rel=1e-4, abs=1e-10), (j, level)
        assert expected > 0
    # more removal, more damage, in every layer of this model
    assert all(row[0] < row[1] < row[2] for row in curves.kl)


def test_probe_counts_follow_the_split_rule_and_caps():
    model = make_model("llama", layers=2)
    config = PruneConfig(sparsity=0.3)
    spaces = unit_spaces([geometry_of(lv) for lv in model_view(model).layer_views()], config)
    mlp, heads = spaces["mlp"][0], spaces["heads"][0]
    mass = mlp.n * mlp.cost + heads.n * heads.cost
    low = probe_counts(spaces, 0, 0.3, channels_first=True)
    assert low["heads"] == 0 and abs(low["mlp"] * mlp.cost - 0.3 * mass) <= mlp.step * mlp.cost / 2
    high = probe_counts(spaces, 0, 0.95, channels_first=True)
    assert high["mlp"] == mlp.max_remove and high["heads"] > 0 and high["heads"] % heads.step == 0
    ratio = probe_counts(spaces, 0, 0.5, channels_first=False)
    assert ratio["mlp"] == round(0.5 * mlp.n)


def test_stream_energy_and_outlier_ratio_match_a_full_forward():
    """The energy pass's extras: the residual stream's mean squared norm entering each layer equals
    the model's own hidden states; OWL's outlier ratio equals a direct count over every linear's
    Wanda scores from captured raw inputs."""
    model = make_model("llama", layers=3, seed=4)
    ids = torch.randint(0, VOCAB, (4, 16))
    view = model_view(model)
    config = PruneConfig(sparsity=0.3)
    with torch.no_grad():
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        batches = capture_layer_inputs(model, view, ids.split(2), CPU)
        _, _, extras = energy_pass(
            view,
            batches,
            layer_forward,
            config,
            CPU,
            False,
            measure=frozenset({"stream", "outliers"}),
            owl_m=3.0,
        )
    for i in range(3):
        expected = float(hidden[i].double().pow(2).sum()) / ids.numel()
        assert extras["stream"][i] == pytest.approx(expected, rel=1e-6)
    lv = model_view(model).layer(1)
    linears = [lv.q, lv.k, lv.v, lv.o, *lv.mlp_in, lv.mlp_out]
    seen: dict[int, list] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0]))
        for i, m in enumerate(linears)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    scores = []
    for i, m in enumerate(linears):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[i]]).double()
        scores.append((m.weight.double().abs() * x.norm(dim=0)).flatten())
    pool = torch.cat(scores)
    expected = float((pool > 3.0 * pool.mean()).double().mean())
    assert extras["outliers"][1] == pytest.approx(expected, abs=1e-9)


def test_knapsack_is_exact_against_brute_force():
    """The dynamic programme finds the minimum total damage over the grid under the budget."""
    torch.manual_seed(0)
    levels = [0.5, 1.0]
    for trial in range(20):
        kl = torch.rand(4, 2).cumsum(1).tolist()  # increasing curves, random shapes
        masses = [8.0, 8.0, 16.0, 8.0]
        target = [10.0, 16.0, 24.0][trial % 3]
        curves = SensitivityCurves(levels, kl, tokens=1)
        shares = knapsack_shares(curves, masses, [1.0] * 4, target, grid=4, bins=40)
        grid = [i / 4 for i in range(5)]
        best = min(
            sum(float(interpolate_curve(levels, kl[i], torch.tensor([s]))) for i, s in enumerate(combo))
            for combo in itertools.product(grid, repeat=4)
            if abs(sum(s * m for s, m in zip(combo, masses)) - target) < 1e-9
        )
        got = sum(float(interpolate_curve(levels, kl[i], torch.tensor([s]))) for i, s in enumerate(shares))
        assert sum(s * m for s, m in zip(shares, masses)) == pytest.approx(target)
        assert got == pytest.approx(best, abs=1e-9)


def test_knapsack_trust_region_is_exact_and_stays_within_the_deviation():
    """With max_deviation every share lies within +-d of the target share, and the result is the
    brute-force optimum over that window's grid."""
    torch.manual_seed(1)
    levels = [0.25, 0.5, 0.75]
    masses = [8.0, 8.0, 8.0, 8.0]
    for trial in range(12):
        kl = torch.rand(4, 3).cumsum(1).tolist()
        kl[trial % 4] = [5.0, 5.1, 5.2]  # costly first probe, flat after: looks cheap to cut deep
        curves = SensitivityCurves(levels, kl, tokens=1)
        target, d = 16.0, 0.1  # mean share 0.5
        shares = knapsack_shares(curves, masses, [1.0] * 4, target, grid=4, bins=160, max_deviation=d)
        assert all(0.4 - 1e-12 <= s <= 0.6 + 1e-12 for s in shares)
        window = [0.4 + 0.05 * i for i in range(5)]
        best = min(
            sum(float(interpolate_curve(levels, kl[i], torch.tensor([s]))) for i, s in enumerate(combo))
            for combo in itertools.product(window, repeat=4)
            if abs(sum(s * m for s, m in zip(combo, masses)) - target) < 1e-9
        )
        got = sum(float(interpolate_curve(levels, kl[i], torch.tensor([s]))) for i, s in enumerate(shares))
        assert got == pytest.approx(best, abs=1e-9)
        unbounded = knapsack_shares(curves, masses, [1.0] * 4, target, grid=12, bins=160)
        assert max(unbounded) > 0.6  # without the region the flat curve is cut past it


def test_interpolated_curve_passes_through_the_measurements():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 2.0], dtype=torch.float64)
    y = interpolate_curve([0.5, 1.0], [1.0, 3.0], x)
    assert y.tolist() == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_measurements_name_what_is_missing():
    m = LayerMeasurements(spaces={"mlp": []})
    with pytest.raises(ValueError, match="'sensitivity' measurement"):
        m.require("sensitivity", "kl")
