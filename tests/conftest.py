"""Shared fixtures: tiny random models of every supported family, and masking helpers that build
the reference a pruned model must reproduce (the original with the removed groups zeroed)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from struprune_plugin.architectures import model_view

TINY_TRAINED = Path(__file__).parent / "fixtures" / "tiny-llama-gqa"
VOCAB = 211


def make_model(family: str, layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random model of `family`; `overrides` go into its config (e.g. hidden_act)."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=128, **overrides
    )
    if family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                num_attention_heads=8,
                num_key_value_heads=2,
                intermediate_size=96,
                tie_word_embeddings=True,
                **common,
            )
        )
    elif family == "llama_mha":
        model = LlamaForCausalLM(
            LlamaConfig(num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, **common)
        )
    elif family == "mistral":
        model = MistralForCausalLM(
            MistralConfig(
                num_attention_heads=8,
                num_key_value_heads=4,
                intermediate_size=96,
                head_dim=8,
                sliding_window=8,
                **common,
            )
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, **common)
        )
    elif family == "qwen3":
        model = Qwen3ForCausalLM(
            Qwen3Config(
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=96, **common
            )
        )
    elif family == "gemma3":  # MQA, head_dim != hidden/heads, sliding + global layers, q/k norms
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=32,
                intermediate_size=96,
                query_pre_attn_scalar=32,
                sliding_window=8,
                layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
                **common,
            )
        )
    elif family == "gemma2":  # GQA, attention and final-logit soft-capping, sliding + global layers
        model = Gemma2ForCausalLM(
            Gemma2Config(
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                intermediate_size=96,
                query_pre_attn_scalar=16,
                sliding_window=8,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0,
                layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
                **common,
            )
        )
    elif family == "phi3":  # fused qkv_proj / gate_up_proj; GQA and partial RoPE as in Phi-4-mini
        phi3 = dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=96,
            partial_rotary_factor=0.75,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,  # the default (32000) lies outside the tiny vocabulary
        )
        model = Phi3ForCausalLM(Phi3Config(**{**phi3, **common}))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64, **common))
    else:
        raise ValueError(family)
    # Random init leaves norms at 1 and biases at 0; perturb them so masking bugs cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "opt"]
#: The families every family-parametrised test runs on in the fast tier: a GQA Llama with tied
#: embeddings, and Gemma 3 (MQA, head_dim != hidden / heads, sliding and global layers, q/k
#: norms). The same tests run on every other family in the slow tier (`pytest -m slow`).
FAST_FAMILIES = ("llama", "gemma3")


def family_params(families=FAMILIES) -> list:
    """`families` as parameters, those outside FAST_FAMILIES marked slow."""
    return [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in families]


@pytest.fixture(params=family_params())
def family(request) -> str:
    return request.param


def _no_real_model(*args, **kwargs):
    raise RuntimeError(
        "a fast-tier test asked for a real model (SmolLM2 / Gemma-3-270M): mark it @pytest.mark.slow, "
        "or use the tiny trained model (tests/fixtures)"
    )


@pytest.fixture(autouse=True)
def _real_models_only_in_the_slow_tier(request, monkeypatch):
    """The fast tier (plain `pytest`) never builds or loads a real model: that is what keeps it
    within minutes. A test that needs one must be marked slow."""
    if request.node.get_closest_marker("slow") is None:
        from struprune_plugin import zoo

        monkeypatch.setattr(zoo, "ensure_smollm2", _no_real_model)
        monkeypatch.setattr(zoo, "ensure_gemma3_270m", _no_real_model)


def masked_reference(model: torch.nn.Module, plans) -> torch.nn.Module:
    """The original model with every removed head and MLP channel zeroed (no shapes change).

    Zeroing a query head's o_proj columns and an MLP channel's down/fc2 column removes exactly
    that group's contribution; K/V heads matter only through the query heads that read them.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lv, plan in zip(model_view(ref).layer_views(), plans):
            channels = torch.zeros(lv.intermediate_size, dtype=torch.bool)
            channels[plan.keep_mlp] = True
            lv.mlp_out.weight[:, ~channels] = 0
            heads = torch.zeros(lv.num_heads, dtype=torch.bool)
            heads[plan.keep_heads] = True
            lv.o.weight[:, ~heads.repeat_interleave(lv.head_dim)] = 0
    return ref


def halve_mlp(mlp: torch.nn.Module) -> None:
    """Keep the first half of a gated MLP's channels, by hand (a layer unlike its neighbours)."""
    keep = mlp.down_proj.in_features // 2
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight, proj.out_features = torch.nn.Parameter(proj.weight[:keep].clone()), keep
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :keep].clone())
    mlp.down_proj.in_features = keep


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def tiny_trained_dir() -> Path:
    assert (TINY_TRAINED / "config.json").exists(), "run tests/fixtures/build_tiny_model.py"
    return TINY_TRAINED


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder's safetensors files, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_cli(*argv) -> int:
    """`struprune ARGV` in this process (paths and numbers may be passed as they are)."""
    from struprune_plugin.cli import main

    return main([str(a) for a in argv])


def tree_digest(folder: Path) -> str:
    """Every file below `folder`, names and bytes: equal digests mean nothing was touched."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def one_line_error(capsys, *needles: str) -> str:
    """The CLI's refusal: one `struprune: error:` line, no traceback, naming `needles` and a fix."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("struprune: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Fix" in lines[0]
    return lines[0]
