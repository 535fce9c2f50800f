"""Pruned folders load through transformers' Auto classes: with the plugin imported, with
trust_remote_code and no plugin at all, and (equal widths) as plain stock checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import VOCAB, family_params, logits, make_model
from struprune_plugin.architectures import model_view
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import StructPruneError


def _prune(model, **kw):
    calib = torch.randint(0, VOCAB, (4, 16))
    settings = {"method": "wanda-sp", "sparsity": 0.4, **kw}
    return prune_model(model, calib, PruneConfig(**settings), progress=False).model


def widths(model):
    return [(lv.num_heads, lv.num_kv_heads, lv.intermediate_size) for lv in model_view(model).layer_views()]


def nonuniform(family):
    # structprune at T = 1 gives per-layer widths on every family
    # (channel-exact widths: steps of 8 on these 96-channel toys can make every layer alike)
    return _prune(
        make_model(family, layers=3), method="structprune", temperature=1.0, admm_iterations=1, mlp_round_to=1
    )


def test_from_pretrained_builds_per_layer_widths_and_generates(family, tmp_path):
    pruned = nonuniform(family)
    assert len(set(widths(pruned))) > 1
    out = save_pruned(pruned, tmp_path / "p")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"].startswith("struprune_") and "auto_map" in config
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__.startswith("StruPrune")
    assert widths(loaded) == widths(pruned)
    ids = torch.randint(0, VOCAB, (2, 11))
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))
    prompt = ids[:1, :5]
    expected = pruned.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    assert torch.equal(load_pruned(out)(input_ids=ids).logits, logits(pruned, ids))


REMOTE = """
import sys, torch
sys.modules["struprune_plugin"] = None  # the plugin is not installed
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(input_ids=ids).logits
gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
torch.save({"logits": out, "gen": gen, "cls": type(model).__name__}, sys.argv[3])
"""


@pytest.mark.parametrize("family", family_params(["llama", "qwen3", "gemma3", "gemma2", "phi3", "opt"]))
def test_trust_remote_code_loads_without_the_plugin(family, tmp_path):
    pruned = nonuniform(family)
    out = save_pruned(pruned, tmp_path / "p")
    assert (out / "modeling_struprune.py").exists()
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", REMOTE, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "r.pt")],
        check=True,
        env=env,
        cwd=tmp_path,  # not the repository: struprune_plugin must not be importable by path
    )
    remote = torch.load(tmp_path / "r.pt")
    assert remote["cls"].startswith("StruPrune")
    torch.testing.assert_close(remote["logits"], logits(pruned, ids), rtol=0, atol=1e-6)
    assert torch.equal(remote["gen"], pruned.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))


def scaled_rope(config) -> None:
    """Linear RoPE scaling with a non-default theta, in whichever form this transformers reads."""
    if hasattr(config, "rope_parameters"):  # transformers 5
        config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    else:  # the 4.5x line
        config.rope_scaling, config.rope_theta = {"rope_type": "linear", "factor": 2.0}, 5000.0


def rope_of(config):
    return getattr(config, "rope_parameters", None) or (config.rope_scaling, config.rope_theta)


def test_tied_embeddings_stay_tied_and_rope_settings_survive(tmp_path):
    plain = make_model("llama", layers=3)
    scaled_rope(plain.config)
    model = type(plain)(plain.config)  # rebuild so the rotary embedding uses the scaled settings
    model.load_state_dict(plain.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40))
    assert not torch.allclose(logits(model, ids), logits(make_model("llama", layers=3), ids))
    pruned = nonuniform_from(model)
    out = save_pruned(pruned, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert rope_of(loaded.config) == rope_of(model.config)
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))


def nonuniform_from(model):
    return _prune(model, method="structprune", temperature=1.0, admm_iterations=1)


def test_equal_widths_give_a_plain_stock_config(tmp_path):
    model = make_model("qwen2", layers=3)
    result = prune_model(
        model,
        torch.randint(0, VOCAB, (4, 16)),
        PruneConfig(sparsity=0.4, equal_widths=True, admm_iterations=1),
        progress=False,
    )
    assert len(set(widths(result.model))) == 1
    # the budget holds to within half an MLP step per layer
    cost = 3 * model.config.hidden_size
    step = result.config.mlp_round_to
    assert abs(result.achieved_sparsity - 0.4) * result.prunable_before <= 3 * step * cost / 2 + 1
    out = save_pruned(result.model, tmp_path / "p")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen2" and not (out / "modeling_struprune.py").exists()
    assert config.intermediate_size == widths(result.model)[0][2]
    assert config.num_attention_heads == widths(result.model)[0][0]
    ids = torch.randint(0, VOCAB, (2, 7))
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert type(stock).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(logits(stock, ids), logits(result.model, ids))


def stored_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("uniform", [True, False])
def test_phi3_checkpoints_keep_the_fused_stock_names(uniform, tmp_path):
    """Phi-3 stays fused after pruning (one smaller qkv_proj and gate_up_proj per layer), so the
    folder holds exactly the stock parameter names; equal widths load with stock Phi3ForCausalLM,
    which needs the pruned head count and an explicit head_dim in the plain config."""
    from transformers import Phi3ForCausalLM

    model = make_model("phi3", layers=3)
    settings = {"equal_widths": True} if uniform else {"method": "structprune", "temperature": 1.0}
    pruned = _prune(model, kind_split="ratio", admm_iterations=1, **settings)  # heads and channels
    assert (len(set(widths(pruned))) == 1) == uniform
    assert max(w[0] for w in widths(pruned)) < model.config.num_attention_heads
    out = save_pruned(pruned, tmp_path / "p")
    assert stored_names(out) == set(model.state_dict())
    assert {n for n in stored_names(out) if "layers.0." in n} == {
        f"model.layers.0.{n}.weight"
        for n in (
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    }
    ids = torch.randint(0, VOCAB, (2, 11))
    if uniform:
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "phi3" and not (out / "modeling_struprune.py").exists()
        assert (config["num_attention_heads"], config["head_dim"]) == (widths(pruned)[0][0], 8)
        loaded = Phi3ForCausalLM.from_pretrained(out)
        assert type(loaded) is Phi3ForCausalLM
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out)
    assert widths(loaded) == widths(pruned)
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))
    assert torch.equal(load_pruned(out)(input_ids=ids).logits, logits(pruned, ids))


def longrope(config) -> dict:
    """Phi-3-128k / Phi-4-mini style long RoPE, in whichever form this transformers reads; its
    factors have one entry per rotary frequency, a length the config checks against hidden / heads."""
    factors = {
        "short_factor": [1.0, 1.1, 1.2],  # rotary dims: 8 * 0.75 = 6, so 3 frequencies
        "long_factor": [1.5, 2.0, 3.0],
    }
    if hasattr(config, "rope_parameters"):  # transformers 5
        return {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                **factors,
            }
        }
    return {"rope_scaling": {"type": "longrope", **factors}}


def test_phi3_longrope_with_fewer_heads_reloads(tmp_path):
    """Equal widths with fewer heads break Phi3Config's longrope check (factors must number
    hidden / heads * partial / 2), so such a config cannot be a plain one: the layout loader
    keeps the original head count in config.json and rebuilds the layers, on both lines."""
    probe = make_model("phi3")
    model = make_model("phi3", layers=3, original_max_position_embeddings=32, **longrope(probe.config))
    long_ids = torch.randint(0, VOCAB, (1, 40))  # past original_max_position_embeddings: the long factors
    short = make_model("phi3", layers=3)
    assert not torch.allclose(logits(model, long_ids), logits(short, long_ids))
    pruned = _prune(model, equal_widths=True)
    assert len(set(widths(pruned))) == 1 and widths(pruned)[0][0] < 8
    out = save_pruned(pruned, tmp_path / "p")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "struprune_phi3" and config["num_attention_heads"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert widths(loaded) == widths(pruned)
    assert torch.equal(logits(loaded, long_ids), logits(pruned, long_ids))
    assert torch.equal(load_pruned(out)(input_ids=long_ids).logits, logits(pruned, long_ids))


def test_equal_widths_need_uniform_allocation():
    with pytest.raises(StructPruneError, match="equal_widths"):
        PruneConfig(allocation="energy-relative", temperature=1.0, equal_widths=True).validate()
    # with the rule left to "auto", equal widths choose uniform ratios
    PruneConfig(temperature=1.0, equal_widths=True).validate()


def test_the_shipped_modeling_file_imports_nothing_from_the_plugin():
    source = (Path(__file__).parent.parent / "struprune_plugin" / "modeling_struprune.py").read_text()
    assert "struprune_plugin" not in source.replace('"struprune_plugin"', "")
    assert "from ." not in source


def test_every_pruned_class_is_importable_under_its_own_name():
    """`auto_map` names the classes by `__name__`; remote code looks them up in the module by that
    name, so each must be a module attribute of exactly that name (Gemma 3's config once was not)."""
    from struprune_plugin import modeling_struprune

    for config_cls, model_cls in modeling_struprune.PRUNED_CLASSES.values():
        for cls in (config_cls, model_cls):
            assert getattr(modeling_struprune, cls.__name__) is cls
