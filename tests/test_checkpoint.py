"""Saving and reloading models with per-layer widths: identical logits, atomic writes, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VOCAB, logits, make_model
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import LayoutMismatchError, OutputExistsError, OutputPathError


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _pruned(family: str, **kw):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    return prune_model(
        model, calib, PruneConfig(**{"method": "wanda-sp", "sparsity": 0.4, **kw}), progress=False
    ).model


def test_roundtrip_identical_logits(family, tmp_path):
    pruned = _pruned(family)
    out = save_pruned(pruned, tmp_path / "pruned")
    assert not list(tmp_path.glob(".pruned.tmp-*"))  # the temporary folder was renamed away
    layout = json.loads((out / "config.json").read_text())["struprune_layout"]
    assert len(layout["intermediate_sizes"]) == 3
    reloaded = load_pruned(out)
    ids = torch.randint(0, VOCAB, (2, 15))
    assert torch.equal(logits(reloaded, ids), logits(pruned, ids))
    if pruned.config.tie_word_embeddings:
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


def test_uniform_result_is_a_plain_hf_checkpoint(tmp_path):
    """Head-only pruning leaves every layer alike: stock from_pretrained loads it without the plugin."""
    from transformers import AutoModelForCausalLM

    # heads alone cannot reach 40 %: the fixed head ratio decides, the shortfall is accepted
    pruned = _pruned("qwen2", units=("heads",), head_sparsity=0.5, allow_shortfall=True)
    out = save_pruned(pruned, tmp_path / "uniform")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["head_dim"] == 8
    stock = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(logits(stock, ids), logits(pruned, ids))


def test_existing_output_needs_overwrite(tmp_path):
    pruned = _pruned("llama")
    out = save_pruned(pruned, tmp_path / "o")
    marker = out / "keep.txt"
    marker.write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pruned(pruned, out)
    assert marker.exists()
    # --overwrite replaces only what struprune wrote: a file of the user's in it is never deleted
    with pytest.raises(OutputExistsError, match=r"holds other content \(keep.txt\)"):
        save_pruned(pruned, out, overwrite=True)
    assert marker.read_text() == "x"
    marker.unlink()
    (out / "config.json").write_text("{}")  # its own files may differ: they are replaced
    save_pruned(pruned, out, overwrite=True)
    assert load_pruned(out).config.struprune_layout == pruned.config.struprune_layout


def test_source_folder_is_never_modified(tmp_path):
    source = tmp_path / "source"
    make_model("llama", layers=2).save_pretrained(source)
    digest = _tree_digest(source)
    model = load_pruned(source)
    result = prune_model(
        model, torch.randint(0, VOCAB, (2, 16)), PruneConfig(method="wanda-sp", sparsity=0.3), progress=False
    )
    with pytest.raises(OutputPathError, match="is the input model folder"):
        save_pruned(result.model, source, overwrite=True)
    save_pruned(result.model, tmp_path / "out")
    assert _tree_digest(source) == digest


def test_weights_not_matching_layout_are_refused(tmp_path):
    out = save_pruned(_pruned("llama"), tmp_path / "bad")
    state = load_file(out / "model.safetensors")
    key = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight"))
    state[key] = state[key][:, :-1].contiguous()  # one MLP channel short
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayoutMismatchError, match="do not match"):
        load_pruned(out)


def test_model_pruned_by_hand_saves_the_widths_it_has(tmp_path):
    """save_pruned reads the layout from the modules, not from an earlier pruning run: a model
    whose MLP was shrunk by other means reloads with its own weights (no re-initialised layers)."""
    from torch import nn

    model = make_model("llama", layers=3)
    mlp = model.model.layers[1].mlp
    keep = torch.arange(0, mlp.down_proj.in_features, 3)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, len(keep), bias=False)
            new.weight.copy_(old.weight[keep])
            setattr(mlp, name, new)
        down = nn.Linear(len(keep), mlp.down_proj.out_features, bias=False)
        down.weight.copy_(mlp.down_proj.weight[:, keep])
        mlp.down_proj = down
    ids = torch.randint(0, VOCAB, (2, 9))
    folder = save_pruned(model, tmp_path / "by-hand")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "struprune_llama"
    torch.testing.assert_close(logits(load_pruned(folder), ids), logits(model, ids), rtol=0, atol=0)
