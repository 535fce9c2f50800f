"""StructPrune end to end through the engine: exact budgets, softmax allocation, ADMM updates."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import VOCAB, logits, make_model
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import StructPruneError


@pytest.mark.parametrize("split", ["mlp-first", "ratio"])
@pytest.mark.parametrize("temperature", [0.5, float("inf")])
def test_budget_and_shapes_on_every_family(family, temperature, split):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (6, 24))
    config = PruneConfig(
        method="structprune", sparsity=0.4, temperature=temperature, admm_iterations=2, kind_split=split
    )
    result = prune_model(model, calib, config, progress=False)
    # T = inf gives equal widths by default: within half an MLP channel in each of the 3 layers
    channels = 1.5 if temperature == float("inf") else 1
    tolerance = (
        channels
        * result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.4) <= tolerance
    if temperature == float("inf"):  # uniform reads no energies, so the energy pass is skipped
        assert result.layer_energies is None
    else:
        assert all(len(v) == 3 for v in result.layer_energies.values())
    out = logits(result.model, torch.randint(0, VOCAB, (2, 11)))
    assert out.isfinite().all()


def test_global_reference_runs_to_budget(family):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    result = prune_model(
        model, calib, PruneConfig(method="energy-threshold", sparsity=0.4, admm_iterations=1), progress=False
    )
    tolerance = (
        result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.4) <= tolerance
    assert logits(result.model, torch.randint(0, VOCAB, (1, 7))).isfinite().all()


def test_infinite_temperature_allocates_like_the_uniform_baselines():
    model = make_model("qwen2", layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    uniform = prune_model(model, calib, PruneConfig(method="wanda-sp", sparsity=0.35), progress=False)
    sp = prune_model(
        model,
        calib,
        PruneConfig(
            method="structprune",
            sparsity=0.35,
            temperature=float("inf"),
            kind_split="ratio",
            equal_widths=False,
            mlp_round_to=1,  # the references' channel-exact widths
        ),
        progress=False,
    )
    assert [(r.heads, r.mlp) for r in sp.layers] == [(r.heads, r.mlp) for r in uniform.layers]


def test_default_split_is_mlp_only_pruning_until_the_channels_run_out():
    """Below the MLP channels' capacity the default (mlp-first) prunes exactly as units=('mlp',)
    does: same widths and the same weights. Above it, heads take the overflow and no more."""
    model = make_model("llama", layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    # channel by channel, uniform ratios (every layer's share alike, so the overflow is too)
    base = dict(method="structprune", admm_iterations=1, mlp_round_to=1, temperature=math.inf)
    default = prune_model(model, calib, PruneConfig(**base, sparsity=0.3), progress=False)
    only_mlp = prune_model(model, calib, PruneConfig(**base, sparsity=0.3, units=("mlp",)), progress=False)
    assert [(r.heads, r.mlp) for r in default.layers] == [(r.heads, r.mlp) for r in only_mlp.layers]
    assert all(r.heads[0] == r.heads[1] for r in default.layers)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(logits(default.model, ids), logits(only_mlp.model, ids))

    g = geometry_of(model_view(model).layer(0))
    capacity = 3 * (g.intermediate - 1) * g.mlp_channel_cost / default.prunable_before
    high = prune_model(model, calib, PruneConfig(**base, sparsity=capacity + 0.05), progress=False)
    # The overflow (5 % of the budget) is less than one head step (one query head per K/V head),
    # so every layer loses exactly one step and its channels cover the rest.
    assert all(r.heads == (8, 6) and r.mlp[1] <= 6 for r in high.layers)
    tolerance = high.config.mlp_round_to * g.mlp_channel_cost / high.prunable_before
    assert abs(high.achieved_sparsity - capacity - 0.05) <= tolerance


def test_split_rules_resolve_per_method_and_refuse_what_cannot_apply():
    from struprune_plugin.errors import StructPruneError

    assert PruneConfig().split_rule == "mlp-first"
    assert PruneConfig(method="flap").split_rule == "ratio"
    assert PruneConfig(method="energy-threshold").split_rule == "ratio"
    with pytest.raises(StructPruneError, match="reference method 'wanda-sp'"):
        PruneConfig(method="wanda-sp", kind_split="mlp-first").validate()
    with pytest.raises(StructPruneError, match="head_sparsity"):
        PruneConfig(method="structprune", head_sparsity=1 / 4).validate()


def test_zero_sparsity_leaves_the_model_unchanged():
    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (2, 16))
    result = prune_model(model, calib, PruneConfig(method="structprune", sparsity=0.0), progress=False)
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(logits(result.model, ids), logits(model, ids))


def test_tiny_trained_model_beats_wanda_and_stays_finite_at_70(tiny_trained_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_trained_dir)
    corpus = ensure_texts()
    calib = sample_calibration(tokenize(tok, corpus.read("wiki_train")), 16, 128, seed=0)
    test_ids = tokenize(tok, corpus.read("wiki_valid"))[: 128 * 24]
    ppl = {}
    for name, config in {
        "wanda-sp": PruneConfig(method="wanda-sp", sparsity=0.5),
        "structprune": PruneConfig(method="structprune", sparsity=0.5),
        "structprune-70": PruneConfig(method="structprune", sparsity=0.7, admm_iterations=8),
    }.items():
        result = prune_model(model, calib, config, progress=False)
        for layer in result.model.model.layers:
            assert all(p.isfinite().all() for p in layer.parameters())
        ppl[name] = perplexity(result.model, test_ids, seq_len=128, progress=False).ppl
    assert ppl["structprune"] < ppl["wanda-sp"], ppl
    assert ppl["structprune-70"] < 3 * ppl["wanda-sp"], ppl


def test_refreshed_energies_keep_the_budget_and_follow_the_pruned_prefix(family):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (6, 24))
    base = dict(
        method="structprune",
        allocation="energy",
        sparsity=0.4,
        temperature=0.5,
        admm_iterations=1,
        energy_samples=None,
    )
    plain = prune_model(model, calib, PruneConfig(**base), progress=False)
    fresh = prune_model(model, calib, PruneConfig(**base, refresh_energies=True), progress=False)
    tolerance = (
        fresh.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / fresh.prunable_before
    )
    assert abs(fresh.achieved_sparsity - 0.4) <= tolerance
    for kind, values in fresh.layer_energies.items():
        # Layer 0 sees the same (dense) inputs in both passes; later layers see the pruned prefix.
        assert values[0] == pytest.approx(plain.layer_energies[kind][0], rel=1e-5)
        assert values[1:] != pytest.approx(plain.layer_energies[kind][1:], rel=1e-5)


def test_energy_pass_subsample_is_the_first_windows():
    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (6, 16))
    config = dict(method="structprune", sparsity=0.3, admm_iterations=0, temperature=1.0)
    sub = prune_model(model, calib, PruneConfig(**config, energy_samples=2), progress=False)
    first = prune_model(model, calib[:2], PruneConfig(**config, energy_samples=None), progress=False)
    for kind in sub.layer_energies:
        assert sub.layer_energies[kind] == pytest.approx(first.layer_energies[kind], rel=1e-5)


def test_refresh_is_rejected_for_the_global_reference():
    from struprune_plugin.errors import StructPruneError

    with pytest.raises(StructPruneError, match="structprune"):
        PruneConfig(method="energy-threshold", refresh_energies=True).validate()


def test_bias_refit_gives_biases_that_survive_a_reload(tmp_path):
    from struprune_plugin.checkpoint import load_pruned, save_pruned

    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (4, 20))
    config = PruneConfig(
        method="structprune", sparsity=0.4, admm_iterations=1, bias_refit=True, kind_split="ratio"
    )
    result = prune_model(model, calib, config, progress=False)
    lv = model_view(result.model).layer(0)
    assert lv.o.bias is not None and lv.o.bias.abs().sum() > 0
    assert lv.mlp_out.bias is not None and lv.mlp_out.bias.abs().sum() > 0
    reloaded = load_pruned(save_pruned(result.model, tmp_path / "b"))
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(logits(reloaded, ids), logits(result.model, ids))


def test_bias_refit_needs_a_solver_method():
    from struprune_plugin.errors import StructPruneError

    with pytest.raises(StructPruneError, match="bias_refit"):
        PruneConfig(method="wanda-sp", bias_refit=True).validate()


@pytest.mark.parametrize("cheap", ["heads", "mlp"])
def test_energy_split_gives_a_layers_budget_to_its_cheaper_kind(cheap):
    """Scaling layer 0's o_proj (or down_proj) down makes removing its heads (or channels) nearly
    free: the energy split must then spend the layer's budget there, unlike the ratio split, and the
    global budget stays exact because the rounding difference moves on to the next layer."""
    model = make_model("llama", layers=3)
    lv = model_view(model).layer(0)
    with torch.no_grad():
        (lv.o if cheap == "heads" else lv.mlp_out).weight.mul_(1e-4)
    calib = torch.randint(0, VOCAB, (4, 16))
    base = dict(method="structprune", sparsity=0.3, admm_iterations=0)
    ratio = prune_model(model, calib, PruneConfig(**base, kind_split="ratio"), progress=False)
    energy = prune_model(model, calib, PruneConfig(**base, kind_split="energy"), progress=False)
    tolerance = energy.config.mlp_round_to * geometry_of(lv).mlp_channel_cost / energy.prunable_before
    assert abs(energy.achieved_sparsity - 0.3) <= tolerance
    heads_before, heads_ratio = ratio.layers[0].heads
    heads_energy = energy.layers[0].heads[1]
    if cheap == "heads":  # every removable query head goes (one must stay on each of the 2 K/V heads)
        assert heads_energy == 2 < heads_ratio
        assert energy.layers[0].mlp[1] > ratio.layers[0].mlp[1]
    else:
        assert heads_energy == heads_before > heads_ratio
        assert energy.layers[0].mlp[1] < ratio.layers[0].mlp[1]
    # The layer keeps its share of the budget to within one head step.
    step = 2 * geometry_of(lv).head_dim * geometry_of(lv).hidden * 2
    assert abs(energy.layers[0].removed_params - ratio.layers[0].removed_params) <= step


@pytest.mark.parametrize("refresh", [False, True])
def test_energy_split_keeps_the_budget_on_every_family(family, refresh):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(
        method="structprune",
        sparsity=0.45,
        allocation="energy" if refresh else "auto",
        temperature=1.0 if refresh else float("inf"),
        refresh_energies=refresh,
        kind_split="energy",
        admm_iterations=1,
    )
    result = prune_model(model, calib, config, progress=False)
    tolerance = (
        result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.45) <= tolerance
    assert logits(result.model, torch.randint(0, VOCAB, (1, 9))).isfinite().all()


def test_energy_split_is_refused_where_it_cannot_apply():
    from struprune_plugin.errors import StructPruneError

    with pytest.raises(StructPruneError, match="kind_split"):
        PruneConfig(method="energy-threshold", kind_split="energy").validate()
    with pytest.raises(StructPruneError, match="kind_split"):
        PruneConfig(kind_split="energy", equal_widths=True).validate()
    with pytest.raises(StructPruneError, match="unknown kind_split"):
        PruneConfig(kind_split="size").validate()


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu", "relu"])
def test_llama_layers_with_other_activations_prune_save_and_reload(hidden_act, tmp_path):
    """A Llama-family model whose MLP is not SiLU (Mistral/Qwen variants, fine-tunes) prunes with
    the solver using its own activation, to the exact budget, and reloads with identical logits."""
    from struprune_plugin.checkpoint import load_pruned, save_pruned

    model = make_model("llama", hidden_act=hidden_act)
    assert {lv.activation for lv in model_view(model).layer_views()} == {
        {"gelu_pytorch_tanh": "gelu_tanh"}.get(hidden_act, hidden_act)
    }
    result = prune_model(
        model, torch.randint(0, VOCAB, (6, 24)), PruneConfig(sparsity=0.3, admm_iterations=2), progress=False
    )
    tolerance = (
        result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.3) <= tolerance
    ids = torch.randint(0, VOCAB, (2, 9))
    reloaded = load_pruned(save_pruned(result.model, tmp_path / "pruned"))
    assert torch.equal(logits(reloaded, ids), logits(result.model, ids))


def test_solver_tokens_and_damping_reach_the_solver(monkeypatch):
    """PruneConfig's solver settings are what the MLP solver and the refits receive."""
    import struprune_plugin.structprune as sp

    seen = {}
    real_solve, real_refit = sp.solve_gated_mlp, sp.refit_output_columns

    def solve(x, *args):
        seen["solver"] = (args[-1].max_tokens, args[-1].damping, args[-1].ridge_scale)
        return real_solve(x, *args)

    def refit(w, gram, keep, damping, mean=None, ridge_scale="mean"):
        seen["refit"] = (damping, ridge_scale)
        return real_refit(w, gram, keep, damping, mean, ridge_scale=ridge_scale)

    monkeypatch.setattr(sp, "solve_gated_mlp", solve)
    monkeypatch.setattr(sp, "refit_output_columns", refit)
    ids = torch.randint(0, VOCAB, (4, 16))
    for scale in ("mean", "channel"):
        config = PruneConfig(
            sparsity=0.5,
            damping=0.2,
            ridge_scale=scale,
            solver_tokens=33,
            admm_iterations=1,
            kind_split="ratio",
        )
        prune_model(make_model("llama", layers=2), ids, config, progress=False)
        assert seen == {"solver": (33, 0.2, scale), "refit": (0.2, scale)}


def test_bad_ridge_settings_are_refused():
    with pytest.raises(StructPruneError, match="ridge_scale must be one of mean, channel"):
        PruneConfig(sparsity=0.3, ridge_scale="diag").validate()
    with pytest.raises(StructPruneError, match="damping must be a positive number"):
        PruneConfig(sparsity=0.3, damping=True).validate()  # a recipe's `damping: true` is not 1


def test_width_scaled_solver_tokens_rule():
    """Unset, the solver's tokens are max(floor, 4 per kept MLP channel); set, a fixed cap."""
    from struprune_plugin.structprune import SOLVER_TOKENS_FLOOR, SOLVER_TOKENS_PER_CHANNEL, solver_tokens_for

    auto = PruneConfig(sparsity=0.3)
    assert auto.solver_tokens is None
    assert (SOLVER_TOKENS_FLOOR, SOLVER_TOKENS_PER_CHANNEL) == (8192, 4)
    # SmolLM2 / Gemma-3-270M's widest kept MLPs stay on the floor; a 7B MLP at 30 % does not
    assert solver_tokens_for(auto, 1966) == 8192
    assert solver_tokens_for(auto, 2048) == 8192
    assert solver_tokens_for(auto, 2049) == 8196
    assert solver_tokens_for(auto, 7706) == 30824
    assert solver_tokens_for(PruneConfig(sparsity=0.3, solver_tokens=33), 7706) == 33
    with pytest.raises(StructPruneError, match="solver_tokens must be an integer >= 1 \\(or None"):
        PruneConfig(sparsity=0.3, solver_tokens=0).validate()


def test_width_scaled_solver_tokens_reach_the_solver_per_layer(monkeypatch):
    """Each layer's MLP solver gets the rule's tokens for that layer's kept width, and the result
    is the run with that fixed cap; a different cap gives different weights (the cap bites)."""
    import struprune_plugin.structprune as sp

    monkeypatch.setattr(sp, "SOLVER_TOKENS_FLOOR", 16)
    monkeypatch.setattr(sp, "SOLVER_TOKENS_PER_CHANNEL", 1)
    seen = []
    real_solve = sp.solve_gated_mlp

    def solve(x, w_gate, w_up, w_down, keep, cfg):
        seen.append((keep, cfg.max_tokens))
        return real_solve(x, w_gate, w_up, w_down, keep, cfg)

    monkeypatch.setattr(sp, "solve_gated_mlp", solve)
    calib = torch.randint(0, VOCAB, (4, 16))  # 64 tokens per layer
    base = dict(sparsity=0.5, admm_iterations=1, temperature=math.inf, mlp_round_to=1)
    model = make_model("llama", layers=2)
    auto = prune_model(model, calib, PruneConfig(**base), progress=False)
    assert seen and all(tokens == max(16, keep) for keep, tokens in seen)
    keeps = {keep for keep, _ in seen}
    assert len(keeps) == 1 and 16 < keeps.pop() < 64  # one width for all layers, below the 64 tokens
    cap = seen[0][1]
    fixed = prune_model(model, calib, PruneConfig(**base, solver_tokens=cap), progress=False)
    other = prune_model(model, calib, PruneConfig(**base, solver_tokens=64), progress=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(logits(auto.model, ids), logits(fixed.model, ids))
    assert not torch.allclose(logits(auto.model, ids), logits(other.model, ids))


def test_former_method_name_global_still_means_the_energy_threshold():
    assert PruneConfig(method="global").method == "energy-threshold"


def test_uniform_run_gives_equal_widths_and_a_stock_checkpoint(tmp_path):
    """Uniform allocation's per-layer rounding only moves single channels between layers; uniform
    runs give every layer the same counts instead, so the saved folder is a plain config."""
    import json

    from struprune_plugin.checkpoint import save_pruned

    model = make_model("llama", layers=5)
    calib = torch.randint(0, VOCAB, (4, 16))
    exact = prune_model(
        model,
        calib,
        PruneConfig(
            sparsity=0.37, equal_widths=False, admm_iterations=0, mlp_round_to=1, temperature=math.inf
        ),
        progress=False,
    )
    default = prune_model(
        model,
        calib,
        PruneConfig(sparsity=0.37, admm_iterations=0, mlp_round_to=1, temperature=math.inf),
        progress=False,
    )
    widths = {lv.intermediate_size for lv in model_view(default.model).layer_views()}
    heads = {lv.num_heads for lv in model_view(default.model).layer_views()}
    assert len(widths) == 1 and len(heads) == 1
    assert len({lv.intermediate_size for lv in model_view(exact.model).layer_views()}) > 1  # rounding differs
    cost = geometry_of(model_view(model).layer(0)).mlp_channel_cost
    assert abs(default.achieved_sparsity - 0.37) * default.prunable_before <= 5 * cost / 2
    folder = save_pruned(default.model, tmp_path / "default")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    # the default (a temperature allocation) keeps its per-layer widths
    t1 = prune_model(model, calib, PruneConfig(sparsity=0.37, admm_iterations=0), progress=False)
    assert len({lv.intermediate_size for lv in model_view(t1.model).layer_views()}) > 1
