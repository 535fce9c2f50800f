"""`export_vllm`: stock folders for uniform models, vLLM's DeciLM layout (`block_configs`) for
per-layer K/V heads and MLP widths, and refusals for what that layout cannot express.

No vLLM runs here (its wheels are CUDA builds). The DeciLM folders are checked the way vLLM's
`nemotron_nas.py` reads them: the config through the shipped class with attribute access, each
layer rebuilt from its block entry alone, weights loaded strictly, logits against the source."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TRAINED, halve_mlp, make_model
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.export.vllm_folder import VLLMExportError, export_vllm, load_deci_reference

IDS = torch.tensor([[1, 417, 1022, 88, 2500, 7, 3001, 12, 640, 9, 1500, 33]])


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TRAINED)


def _calib() -> torch.Tensor:
    ids = _tokenizer()("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids[0]
    return ids[: 8 * 48].reshape(8, 48)


def _pruned(tmp_path, name: str, **config):
    result = prune_model(
        load_pruned(TINY_TRAINED), _calib(), PruneConfig(admm_iterations=1, **config), progress=False
    )
    return save_pruned(result.model, tmp_path / name, tokenizer=_tokenizer())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def test_per_layer_mlp_widths_export_as_decilm_and_rebuild_exactly(tmp_path):
    folder = _pruned(tmp_path, "mlp", sparsity=0.4, units=("mlp",), temperature=0.5)
    source = load_pruned(folder)
    widths = [layer.mlp.down_proj.in_features for layer in source.model.layers]
    assert len(set(widths)) > 1
    info = export_vllm(folder, tmp_path / "vllm")
    assert (info.layout, info.architecture, info.intermediate_sizes) == ("deci", "DeciLMForCausalLM", widths)
    data = json.loads((info.path / "config.json").read_text())
    assert data["model_type"] == "nemotron-nas" and "struprune_layout" not in data
    assert [b["ffn"]["intermediate_size"] for b in data["block_configs"]] == widths
    assert all("ffn_mult" not in b["ffn"] for b in data["block_configs"])  # vLLM would prefer it
    assert (info.path / "tokenizer.json").exists() and (info.path / "configuration_decilm.py").exists()
    reference = load_deci_reference(info.path)
    assert torch.equal(_logits(reference), _logits(source))


def test_per_layer_kv_heads_become_head_groups(tmp_path):
    """K/V heads differing between layers (query heads equal) map to n_heads_in_group."""
    model = load_pruned(TINY_TRAINED)
    attn = model.model.layers[1].self_attn  # 2 K/V heads of dim 16 -> keep the first one
    for proj in (attn.k_proj, attn.v_proj):
        proj.weight = torch.nn.Parameter(proj.weight[:16].clone())
        proj.out_features = 16
    folder = save_pruned(model, tmp_path / "mqa", tokenizer=_tokenizer())
    source = load_pruned(folder)
    info = export_vllm(folder, tmp_path / "vllm")
    assert info.num_key_value_heads == [2, 1, 2, 2]
    groups = json.loads((info.path / "config.json").read_text())["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in groups] == [4, 8, 4, 4]
    assert torch.equal(_logits(load_deci_reference(info.path)), _logits(source))


def test_uniform_model_exports_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _pruned(tmp_path, "uniform", sparsity=0.4, equal_widths=True)
    info = export_vllm(folder, tmp_path / "vllm")
    assert (info.layout, info.architecture) == ("stock", "LlamaForCausalLM")
    data = json.loads((info.path / "config.json").read_text())
    assert data["model_type"] == "llama" and not {"auto_map", "struprune_layout"} & set(data)
    assert not list(info.path.glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(info.path, use_safetensors=True)
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert torch.equal(_logits(stock), _logits(load_pruned(folder)))


def test_what_the_layout_cannot_express_is_refused_and_nothing_is_written(tmp_path):
    folder = _pruned(
        tmp_path,
        "heads",
        sparsity=0.5,
        allocation="energy",
        temperature=0.5,
        kind_split="ratio",
        head_unit="kv_group",
    )
    with pytest.raises(VLLMExportError, match=r"query heads differ.*--units mlp"):
        export_vllm(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception, match="already exists"):
        export_vllm(TINY_TRAINED, tmp_path / "out")


def test_non_llama_models_with_differing_layers_are_refused(tmp_path):
    model = make_model("qwen2", layers=2)
    halve_mlp(model.model.layers[0].mlp)
    folder = save_pruned(model, tmp_path / "qwen2")
    with pytest.raises(VLLMExportError, match=r"model type 'struprune_qwen2'.*--equal-widths"):
        export_vllm(folder, tmp_path / "out")


def test_cli_writes_the_folder_and_says_how_to_serve_it(tmp_path, capsys):
    from struprune_plugin.cli import main

    folder = _pruned(tmp_path, "mlp", sparsity=0.4, units=("mlp",), temperature=0.5)
    assert main(["export", "vllm", str(folder), str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "deci layout" in out and f"vllm serve {tmp_path / 'v'} --trust-remote-code" in out
    assert main(["export", "vllm", str(folder), str(tmp_path / "v")]) != 0  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "vllm", str(folder), str(tmp_path / "v"), "--overwrite"]) == 0
