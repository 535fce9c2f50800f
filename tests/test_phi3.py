"""Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj are split into groups correctly, stay fused
through surgery, and every solver path reads and writes the right rows (checked against the same
weights in Llama form, where nothing is fused)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, logits, make_model
from struprune_plugin import architectures, modeling_struprune
from struprune_plugin.architectures import RowBlock, detect_family, geometry_of, model_view
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import UnsupportedArchitectureError
from struprune_plugin.groups import LayerPlan, head_channels
from struprune_plugin.surgery import build_layer_graph, prune_layer


def test_views_are_row_blocks_of_the_fused_linears():
    model = make_model("phi3")
    lv = model_view(model).layer(0)
    attn, mlp = lv.layer.self_attn, lv.layer.mlp
    qkv, gate_up = attn.qkv_proj.weight, mlp.gate_up_proj.weight
    assert (lv.family, lv.num_heads, lv.num_kv_heads, lv.head_dim, lv.intermediate_size) == (
        "phi3",
        8,
        2,
        8,
        96,
    )
    assert all(isinstance(b, RowBlock) for b in (lv.q, lv.k, lv.v, *lv.mlp_in))
    assert torch.equal(torch.cat([lv.q.weight, lv.k.weight, lv.v.weight]), qkv)
    assert (lv.q.out_features, lv.k.out_features, lv.v.out_features) == (64, 16, 16)
    assert torch.equal(torch.cat([w.weight for w in lv.mlp_in]), gate_up)
    assert lv.linears == (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    assert lv.input_taps()["attn_in"] is attn.qkv_proj and lv.input_taps()["mlp_in"] is mlp.gate_up_proj
    assert geometry_of(lv).prunable_params == sum(p.numel() for m in lv.linears for p in m.parameters())
    # the gate half is what Phi3MLP feeds its activation: the row blocks follow its forward
    x = torch.randn(3, 64)
    with torch.no_grad():
        manual = mlp.down_proj(mlp.activation_fn(x @ lv.mlp_in[0].weight.T) * (x @ lv.mlp_in[1].weight.T))
        torch.testing.assert_close(mlp(x), manual)


def test_surgery_keeps_one_smaller_fused_linear_holding_each_groups_rows():
    model = make_model("phi3", layers=1)
    lv = model_view(model).layer(0)
    before = {n: p.detach().clone() for n, p in lv.layer.named_parameters()}
    keep_kv, keep_q = [1], [5, 7]  # query heads 4..7 read K/V head 1 (group size 4)
    keep_mlp = list(range(0, 96, 3))
    plan = LayerPlan(keep_mlp, keep_q, keep_kv)
    plan.validate(geometry_of(lv))
    pruned = prune_layer(lv, plan, build_layer_graph(lv, None, {}))
    attn, mlp = pruned.layer.self_attn, pruned.layer.mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    qkv, q_rows, kv_rows = (
        before["self_attn.qkv_proj.weight"],
        head_channels(keep_q, 8),
        head_channels(keep_kv, 8),
    )
    expected = torch.cat([qkv[:64][q_rows], qkv[64:80][kv_rows], qkv[80:][kv_rows]])
    assert torch.equal(attn.qkv_proj.weight, expected)
    assert torch.equal(attn.o_proj.weight, before["self_attn.o_proj.weight"][:, q_rows])
    gate_up = before["mlp.gate_up_proj.weight"]
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate_up[:96][keep_mlp], gate_up[96:][keep_mlp]]))
    assert torch.equal(mlp.down_proj.weight, before["mlp.down_proj.weight"][:, keep_mlp])
    # what Phi3Attention reads when it splits qkv: the layer's own counts, the model's config intact
    assert (attn.num_key_value_heads, attn.num_key_value_groups, attn.config.num_attention_heads) == (1, 2, 2)
    assert model.config.num_attention_heads == 8
    assert (pruned.num_heads, pruned.num_kv_heads, pruned.intermediate_size) == (2, 1, 32)


def test_layer_config_shares_everything_but_the_head_count():
    model = make_model("phi3")
    result = prune_model(
        model, torch.randint(0, VOCAB, (4, 16)), PruneConfig(method="wanda-sp", sparsity=0.4), progress=False
    )
    pruned = result.model
    attn = pruned.model.layers[0].self_attn
    assert attn.config.num_attention_heads == len(result.plans[0].keep_heads) < 8
    assert attn.config.hidden_size == pruned.config.hidden_size
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = logits(pruned, ids)
    for impl in ("eager", "sdpa"):  # switched on the model config, seen by every layer
        pruned.config._attn_implementation = impl
        assert attn.config._attn_implementation == impl
        torch.testing.assert_close(logits(pruned, ids), expected, rtol=0, atol=1e-5)
    twin = copy.deepcopy(pruned)
    assert twin.model.layers[0].self_attn.config._struprune_base is twin.config
    assert torch.equal(logits(twin, ids), logits(pruned, ids))


def _llama_twin(phi3: nn.Module) -> nn.Module:
    """The same weights in a Llama model (separate q/k/v and gate/up): the same function when RoPE
    spans the whole head (Phi-3's other differences, residual dropouts, are off in eval)."""
    c = phi3.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=False,
        )
    ).eval()
    q_rows, kv_rows, width = (
        c.hidden_size,
        c.num_key_value_heads * c.hidden_size // c.num_attention_heads,
        c.intermediate_size,
    )
    state = {}
    for name, value in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            q, k, v = value.split([q_rows, kv_rows, kv_rows])
            for part, tensor in zip("qkv", (q, k, v)):
                state[name.replace("qkv_proj", f"{part}_proj")] = tensor
        elif name.endswith("gate_up_proj.weight"):
            gate, up = value.split([width, width])
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = value
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "wanda-sp"},
        {"method": "magnitude"},
        {"method": "structprune", "kind_split": "ratio", "temperature": 1.0},
        {
            "method": "structprune",
            "allocation": "energy",
            "kind_split": "energy",
            "refresh_energies": True,
            "sparsity": 0.75,
        },
        {"method": "flap", "bias_compensation": False},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_phi3_prunes_exactly_as_its_weights_in_llama_form(settings):
    """Every score, energy, solver read and refit write goes through the row blocks: choices and
    new weights must be those of the unfused twin."""
    phi3 = make_model("phi3", layers=3, partial_rotary_factor=1.0)
    llama = _llama_twin(phi3)
    ids = torch.randint(0, VOCAB, (2, 13))
    torch.testing.assert_close(logits(phi3, ids), logits(llama, ids), rtol=0, atol=1e-5)
    calib = torch.randint(0, VOCAB, (6, 24))
    config = {"sparsity": 0.4, "admm_iterations": 2, **settings}
    a = prune_model(phi3, calib, PruneConfig(**config), progress=False)
    b = prune_model(llama, calib, PruneConfig(**config), progress=False)
    assert [(p.keep_heads, p.keep_kv_heads, p.keep_mlp) for p in a.plans] == [
        (p.keep_heads, p.keep_kv_heads, p.keep_mlp) for p in b.plans
    ]
    assert any(len(p.keep_heads) < 8 for p in a.plans) and any(len(p.keep_mlp) < 96 for p in a.plans)
    assert a.achieved_sparsity == pytest.approx(b.achieved_sparsity, abs=1e-12)
    for fused, split in zip(model_view(a.model).layer_views(), model_view(b.model).layer_views()):
        for block, linear in ((fused.q, split.q), (fused.k, split.k), (fused.v, split.v)):
            torch.testing.assert_close(block.weight, linear.weight, rtol=1e-4, atol=1e-5)
        for block, linear in zip(fused.mlp_in, split.mlp_in):
            torch.testing.assert_close(block.weight, linear.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.o.weight, split.o.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.mlp_out.weight, split.mlp_out.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(a.model, ids), logits(b.model, ids), rtol=1e-4, atol=1e-4)
    if settings["method"] == "structprune":  # the solver really wrote new gate/up rows
        lv, plan = model_view(a.model).layer(0), a.plans[0]
        dense_gate = model_view(phi3).layer(0).mlp_in[0].weight[plan.keep_mlp]
        assert not torch.allclose(lv.mlp_in[0].weight, dense_gate)


@pytest.fixture(scope="module")
def per_layer_phi3() -> nn.Module:
    return prune_model(
        make_model("phi3", layers=3),
        torch.randint(0, VOCAB, (4, 16)),
        PruneConfig(sparsity=0.4, temperature=1.0, kind_split="ratio", admm_iterations=1),
        progress=False,
    ).model


@pytest.mark.parametrize("apply", [architectures.apply_layout, modeling_struprune.apply_layout])
def test_layout_loaders_rebuild_per_layer_phi3_widths(apply, per_layer_phi3):
    """Both skeleton shrinkers (the plugin's, and the one shipped next to the weights) build fused
    layers that take the pruned weights and compute the same logits."""
    layout = architectures.layer_layout(per_layer_phi3)
    assert len(set(layout["num_attention_heads"])) > 1
    skeleton = make_model("phi3", layers=3, seed=1)
    apply(skeleton, layout)
    skeleton.load_state_dict(per_layer_phi3.state_dict())
    ids = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(logits(skeleton, ids), logits(per_layer_phi3, ids))


def test_output_bias_methods_are_refused_naming_the_model_type():
    """Phi-3's linears carry no bias and its config has no flag to add one."""
    with pytest.raises(UnsupportedArchitectureError, match="'phi3'"):
        prune_model(
            make_model("phi3"), torch.randint(0, VOCAB, (2, 8)), PruneConfig(method="flap"), progress=False
        )


def test_torch_pruning_base_pruner_path_refuses_fused_layers():
    from struprune_plugin.tp_adapter import kwargs_for_counts

    with pytest.raises(UnsupportedArchitectureError, match="fused projections"):
        kwargs_for_counts(make_model("phi3"), {"mlp": [8, 8]})


class _FusedMLP(nn.Module):
    """A fused gate/up of unknown row order (halves, or interleaved rows as some exports write)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = nn.Linear(16, 64), nn.Linear(32, 16), nn.SiLU()


def test_fused_mlps_of_other_models_are_refused():
    """Separate q/k/v but a fused gate_up_proj outside Phi3MLP: refused, not read as Llama's MLP.
    (A fused qkv_proj outside Phi-3 is tested in test_errors.)"""
    model = make_model("llama", layers=1)
    layer = model.model.layers[0]
    layer.mlp = _FusedMLP()
    with pytest.raises(UnsupportedArchitectureError, match="supported for Phi-3 / Phi-4-mini only"):
        detect_family(layer)
    with pytest.raises(UnsupportedArchitectureError, match="supported for Phi-3 / Phi-4-mini only"):
        prune_model(model, None, PruneConfig(method="magnitude"), progress=False)
