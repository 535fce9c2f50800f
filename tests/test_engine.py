"""The layer-by-layer engine: exact budgets, the pruned model equals the masked original, the
streamed statistics equal a full-model computation, and the input model is never touched."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, logits, make_model, masked_reference
from struprune_plugin.architectures import geometry_of, model_view, prunable_parameter_count
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.groups import LayerPlan, choose_channels
from struprune_plugin.scoring import LayerInputs, mlp_channel_scores


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp"])
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_engine_prunes_to_budget_and_matches_masked(family, method, sparsity):
    model = make_model(family, layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, VOCAB, (6, 24))
    result = prune_model(
        model, calib, PruneConfig(method=method, sparsity=sparsity, batch_size=4), progress=False
    )
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # exact budget: within one MLP channel of the request
    geometry = geometry_of(model_view(model).layer(0))
    tolerance = result.config.mlp_round_to * geometry.mlp_channel_cost / result.prunable_before
    assert abs(result.achieved_sparsity - sparsity) <= tolerance
    assert result.prunable_after == prunable_parameter_count(result.model)
    ids = torch.randint(0, VOCAB, (2, 19))
    diff = (logits(result.model, ids) - logits(masked_reference(model, result.plans), ids)).abs().max()
    assert diff <= 1e-5


def test_streamed_statistics_match_full_forward():
    """Layer 0's Wanda-sp choice from the engine equals one from hooks on a plain full forward."""
    model = make_model("llama", layers=2, seed=3)
    calib = torch.randint(0, VOCAB, (5, 20))
    result = prune_model(
        model,
        calib,
        PruneConfig(method="wanda-sp", sparsity=0.3, units=("mlp",), batch_size=2),
        progress=False,
    )
    lv = model_view(model).layer(0)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, key=key: seen.setdefault(key, []).append(a[0]))
        for key, m in (("mlp_in", lv.mlp_in[0]), ("mlp_hidden", lv.mlp_out))
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    norms = LayerInputs(**{k: torch.cat(v).reshape(-1, v[0].shape[-1]).norm(dim=0) for k, v in seen.items()})
    scores = mlp_channel_scores("wanda-sp", [w.weight for w in lv.mlp_in], lv.mlp_out.weight, norms)
    removed = lv.intermediate_size - len(result.plans[0].keep_mlp)
    assert result.plans[0].keep_mlp == choose_channels(scores, removed)


def test_later_layers_calibrate_on_pruned_outputs(tiny_trained_dir):
    """Layer 1's choice equals Wanda-sp computed on the model whose layer 0 is already pruned
    (masked here, independently of the engine), not on the dense model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32).eval()
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, calib, PruneConfig(method="wanda-sp", sparsity=0.6), progress=False)
    dense_rest = [LayerPlan.dense(geometry_of(lv)) for lv in model_view(model).layer_views()[1:]]
    partly_pruned = masked_reference(model, [result.plans[0], *dense_rest])

    def layer1_choice(net):
        lv = model_view(net).layer(1)
        seen = {}
        hooks = [
            m.register_forward_pre_hook(lambda m, a, key=key: seen.setdefault(key, a[0]))
            for key, m in (("mlp_in", lv.mlp_in[0]), ("mlp_hidden", lv.mlp_out))
        ]
        with torch.no_grad():
            net(input_ids=calib, use_cache=False)
        for h in hooks:
            h.remove()
        norms = LayerInputs(**{k: v.reshape(-1, v.shape[-1]).norm(dim=0) for k, v in seen.items()})
        scores = mlp_channel_scores("wanda-sp", [w.weight for w in lv.mlp_in], lv.mlp_out.weight, norms)
        return choose_channels(scores, lv.intermediate_size - len(result.plans[1].keep_mlp))

    assert result.plans[1].keep_mlp == layer1_choice(partly_pruned)
    assert result.plans[1].keep_mlp != layer1_choice(model)  # the dense pass would choose differently


def test_units_and_head_unit_choices():
    model = make_model("qwen2", layers=2)
    calib = torch.randint(0, VOCAB, (4, 16))
    mlp_only = prune_model(
        model, calib, PruneConfig(method="wanda-sp", sparsity=0.3, units=("mlp",)), progress=False
    )
    assert all(r.heads[0] == r.heads[1] for r in mlp_only.layers)
    groups = prune_model(
        model,
        calib,
        PruneConfig(
            method="wanda-sp", sparsity=0.4, units=("heads",), head_unit="kv_group", allow_shortfall=True
        ),
        progress=False,
    )
    assert all(r.kv_heads[1] < r.kv_heads[0] for r in groups.layers)
    assert all(r.mlp[0] == r.mlp[1] for r in groups.layers)


def test_zero_sparsity_is_identity():
    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (2, 16))
    result = prune_model(model, calib, PruneConfig(method="wanda-sp", sparsity=0.0), progress=False)
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(logits(result.model, ids), logits(model, ids))
    assert result.achieved_sparsity == 0.0


def test_tiny_trained_model_keeps_quality_better_with_wanda(tiny_trained_dir):
    """On a trained model, calibration-aware Wanda-sp loses less than magnitude at the same budget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_trained_dir)
    corpus = ensure_texts()
    calib = sample_calibration(tokenize(tok, corpus.read("wiki_train")), 16, 128, seed=0)
    test_ids = tokenize(tok, corpus.read("wiki_valid"))[: 128 * 24]
    ppl = {"dense": perplexity(model, test_ids, seq_len=128, progress=False).ppl}
    for method in ("magnitude", "wanda-sp"):
        pruned = prune_model(model, calib, PruneConfig(method=method, sparsity=0.3), progress=False).model
        ppl[method] = perplexity(pruned, test_ids, seq_len=128, progress=False).ppl
    assert ppl["dense"] < ppl["wanda-sp"] < ppl["magnitude"], ppl


@pytest.mark.parametrize("method", ["wanda-sp", "structprune", "energy-threshold", "flap"])
def test_mlp_widths_round_to_multiples(method):
    model = make_model("llama", layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(
        method=method, sparsity=0.35, mlp_round_to=8, admm_iterations=1, bias_compensation=False
    )
    result = prune_model(model, calib, config, progress=False)
    assert all(r.mlp[1] % 8 == 0 for r in result.layers), [r.mlp for r in result.layers]
    steps = 1.5 if method == "structprune" else 1  # equal widths (its default): half a step per layer
    tolerance = (
        steps
        * 8
        * result.config.mlp_round_to
        * geometry_of(model_view(model).layer(0)).mlp_channel_cost
        / result.prunable_before
    )
    assert abs(result.achieved_sparsity - 0.35) <= tolerance
    ids = torch.randint(0, VOCAB, (1, 9))
    if method in ("wanda-sp", "flap"):  # no weight updates: the masked original is the reference
        diff = (logits(result.model, ids) - logits(masked_reference(model, result.plans), ids)).abs().max()
        assert diff <= 1e-5


def test_mlp_round_to_must_divide_the_width():
    from struprune_plugin.errors import WidthConstraintError

    with pytest.raises(WidthConstraintError, match="not a multiple of mlp_round_to=7"):
        prune_model(
            make_model("llama"), torch.randint(0, VOCAB, (2, 8)), PruneConfig(mlp_round_to=7), progress=False
        )


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "structprune", "energy-threshold"])
def test_skipped_layers_stay_dense_and_the_budget_counts_the_rest(method):
    model = make_model("llama", layers=4)
    calib = torch.randint(0, VOCAB, (4, 16))
    # (FLAP without its bias compensation: the added biases would count as prunable parameters)
    config = PruneConfig(
        method=method,
        sparsity=0.4,
        skip_layers=(0, 3),
        admm_iterations=1,
        temperature=1.0,
        bias_compensation=False,
    )
    result = prune_model(model, calib, config, progress=False)
    before, after = model_view(model), model_view(result.model)
    for i in (0, 3):
        original = before.layers[i].state_dict()
        kept = after.layers[i].state_dict()
        assert all(torch.equal(original[k], kept[k]) for k in original), f"layer {i} changed"
    pruned = [prunable_parameter_count(model) // 4] * 2  # equal layers: two of four are pruned
    geometry = geometry_of(before.layer(0))
    removed = sum(r.removed_params for r in result.layers)
    assert abs(removed - 0.4 * sum(pruned)) <= geometry.mlp_channel_cost
    assert abs(result.achieved_sparsity - 0.4) <= geometry.mlp_channel_cost / sum(pruned)


def test_skip_layers_must_exist_and_leave_something():
    from struprune_plugin.errors import StructPruneError

    model = make_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(StructPruneError, match=r"skip_layers \[5\] do not exist"):
        prune_model(model, calib, PruneConfig(method="wanda-sp", skip_layers=(5,)), progress=False)
    with pytest.raises(StructPruneError, match="every decoder layer"):
        prune_model(model, calib, PruneConfig(method="wanda-sp", skip_layers=(0, 1)), progress=False)


def test_layer_by_layer_walk_reproduces_the_models_own_forward(family):
    """The engine replays each decoder layer alone from captured inputs. With interleaved attention
    kinds (Gemma: sliding-window and global layers, different masks and RoPE tables) each layer must
    get its own kind's kwargs: the walk must equal the model's own hidden states, on windows longer
    than the sliding window (8 tokens in the tiny configs) so that the masks differ."""
    from struprune_plugin.engine import capture_layer_inputs, layer_forward

    model = make_model(family, layers=4, seed=5)
    ids = torch.randint(0, VOCAB, (3, 24))
    view = model_view(model)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        (batch,) = capture_layer_inputs(model, view, [ids], torch.device("cpu"))
        assert torch.equal(batch.hidden, reference[0])
        for i, layer in enumerate(view.layers[:-1]):  # the last hidden state is after the final norm
            batch.hidden = layer_forward(layer, batch)
            assert torch.allclose(batch.hidden, reference[i + 1], atol=1e-5), f"layer {i}"
    assert all("forward" not in vars(layer) for layer in view.layers)  # the pass-through is undone


def _llama_of_width(intermediate: int):
    """A two-layer GQA Llama whose MLP is `intermediate` channels wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=intermediate,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
    )


def test_mlp_widths_round_by_default_where_every_width_allows():
    """mlp_round_to=None rounds to 32 where every layer's MLP width is a multiple of 32 and at least
    512, else to 8 where every width is a multiple of 8, else keeps exact widths; the result
    records what ran."""
    calib = torch.randint(0, VOCAB, (2, 8))
    result = prune_model(make_model("llama"), calib, PruneConfig(sparsity=0.3), progress=False)
    assert make_model("llama").config.intermediate_size < 512  # too narrow for 32
    assert result.config.mlp_round_to == 8
    assert all(r.mlp[1] % 8 == 0 and r.mlp[1] < r.mlp[0] for r in result.layers)
    wide = prune_model(_llama_of_width(512), calib, PruneConfig(sparsity=0.3), progress=False)
    assert wide.config.mlp_round_to == 32
    assert all(r.mlp[1] % 32 == 0 and r.mlp[1] < r.mlp[0] for r in wide.layers)

    odd = prune_model(_llama_of_width(99), calib, PruneConfig(sparsity=0.3), progress=False)
    assert odd.config.mlp_round_to == 1
    exact = prune_model(make_model("llama"), calib, PruneConfig(sparsity=0.3, mlp_round_to=1), progress=False)
    assert exact.config.mlp_round_to == 1
    assert any(r.mlp[1] % 8 for r in exact.layers), "pick a sparsity whose exact width is no multiple of 8"
