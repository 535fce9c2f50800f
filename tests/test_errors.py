"""Bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import VOCAB, make_model
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import (
    CalibrationDataError,
    GQAConstraintError,
    InvalidSparsityError,
    NonFiniteActivationError,
    StructPruneError,
    UnsupportedArchitectureError,
)


def _calib(n=2, length=16):
    return torch.randint(0, VOCAB, (n, length))


@pytest.mark.parametrize("sparsity", [-0.01, 1.0, 2.0, False])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(InvalidSparsityError, match=r"must be in \[0, 1\).*Fix"):
        prune_model(make_model("llama"), _calib(), PruneConfig(sparsity=sparsity), progress=False)


@pytest.mark.parametrize(
    ("calib", "match"),
    [
        (None, "needs calibration data"),
        (torch.empty(0, 16, dtype=torch.long), "needs calibration data"),
        (torch.zeros(4, 1, dtype=torch.long), "length >= 2"),
        (torch.full((2, 8), VOCAB + 5), "outside the vocabulary"),
        (torch.rand(2, 8), "integer token ids"),
    ],
)
def test_bad_calibration(calib, match):
    with pytest.raises(CalibrationDataError, match=match):
        prune_model(make_model("llama"), calib, PruneConfig(method="wanda-sp"), progress=False)


def test_nan_activations_are_reported_with_their_layer():
    """Finite weights can still produce NaN activations (overflow in low precision): simulated by
    a norm whose output turns NaN at one token; NaN weights themselves are refused earlier."""
    model = make_model("llama")

    def poison(_module, _args, out):
        out = out.clone()
        out[0, 3] = float("nan")
        return out

    model.model.layers[0].input_layernorm.register_forward_hook(poison)
    calib = _calib()
    with pytest.raises(NonFiniteActivationError, match=r"NaN/inf in the input of attn_in in decoder layer 0"):
        prune_model(model, calib, PruneConfig(method="wanda-sp"), progress=False)


def test_unsupported_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="no decoder layers"):
        prune_model(gpt2, None, PruneConfig(method="magnitude"), progress=False)

    class FusedQKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.qkv_proj = nn.Linear(8, 24)
            layer.self_attn.o_proj = nn.Linear(8, 8)
            self.model.layers = nn.ModuleList([layer])

    # a fused qkv of unknown row order (only Phi-3's classes have a known one)
    with pytest.raises(
        UnsupportedArchitectureError, match=r"fused layouts are supported for Phi-3 / Phi-4-mini only"
    ):
        prune_model(FusedQKV(), None, PruneConfig(method="magnitude"), progress=False)


def test_head_ratio_impossible_under_gqa():
    # 8 query heads over 2 KV heads: only even counts of query heads can go
    with pytest.raises(GQAConstraintError, match=r"only multiples of 2.*Feasible ratios"):
        prune_model(
            make_model("llama"), _calib(), PruneConfig(method="wanda-sp", head_sparsity=0.125), progress=False
        )
    with pytest.raises(GQAConstraintError, match="--head-unit kv_group"):
        prune_model(
            make_model("llama_mha"),
            _calib(),
            PruneConfig(method="wanda-sp", head_unit="query"),
            progress=False,
        )


def test_head_sparsity_with_a_per_layer_allocator_is_rejected():
    with pytest.raises(StructPruneError, match="head_sparsity"):
        PruneConfig(method="structprune", head_sparsity=0.5).validate()


def _small(config_cls, model_cls, **extra):
    config = config_cls(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=96,
        vocab_size=VOCAB,
        **extra,
    )
    return model_cls(config).eval()


class _Adapter(torch.nn.Module):
    """An extra residual branch the engine knows nothing of (as a LoRA-style or gated add-on)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)


def _with_adapter(model):
    for layer in model.model.layers:
        layer.adapter = _Adapter(model.config.hidden_size)
        layer.mlp.extra_gate = torch.nn.Linear(4, 4)
    return model


@pytest.mark.parametrize(
    ("build", "match"),
    [
        ("llama-adapter", r"LlamaDecoderLayer holds modules .*adapter, mlp.extra_gate"),
        ("gemma3-adapter", r"Gemma3DecoderLayer holds modules .*adapter"),
        ("llama-tanh", r"activation Tanh is none of silu, gelu, gelu_tanh, relu"),
    ],
)
def test_layers_the_engine_was_not_built_for_are_refused_before_any_work(build, match):
    """A layer with modules the engine does not model (here an extra branch) passes the structural
    detection by its Llama module names; an activation the solver has no exact steps for is refused
    too: nothing may be pruned on assumptions untested for it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    model = {
        "llama-adapter": lambda: _with_adapter(_small(LlamaConfig, LlamaForCausalLM)),
        "gemma3-adapter": lambda: _with_adapter(_small(Gemma3TextConfig, Gemma3ForCausalLM)),
        "llama-tanh": lambda: _small(LlamaConfig, LlamaForCausalLM, hidden_act="tanh"),
    }[build]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (PruneConfig(method="structprune"), PruneConfig(method="magnitude")):
        with pytest.raises(UnsupportedArchitectureError, match=match):
            prune_model(model, _calib(), config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
