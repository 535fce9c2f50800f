"""Out-of-core pruning: the folder it writes holds exactly the tensors the in-memory engine gives,
an interrupted run leaves nothing behind, and the in-memory engine copies no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, folder_tensors, logits, make_model
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import StructPruneError
from struprune_plugin.streaming import prune_checkpoint


def _both_ways(source: Path, tmp_path: Path, config: PruneConfig, calib) -> tuple[Path, Path]:
    """The in-memory result (load, prune, save) and the streamed one, from the same folder."""
    in_memory = prune_model(load_pruned(source), calib, config, progress=False).model
    a = save_pruned(in_memory, tmp_path / "in-memory")
    b = tmp_path / "streamed"
    prune_checkpoint(source, b, calib, config, progress=False)
    return a, b


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = folder_tensors(a), folder_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert ca["struprune_layout"] == cb["struprune_layout"]
    assert ca["model_type"] == cb["model_type"]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("structprune", {}),
        ("structprune", {"temperature": 1.0}),  # per-layer widths, through the energy pass
        ("wanda-sp", {}),
        ("flap", {"bias_compensation": False}),
    ],
)
def test_streamed_equals_in_memory_multi_shard(family, method, extra, tmp_path):
    """A model saved in many small shards, pruned both ways: identical tensors, layout and type."""
    source = tmp_path / "dense"
    make_model(family, layers=3).save_pretrained(source, max_shard_size="40KB")
    assert len(list(source.glob("*.safetensors"))) > 3
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(method=method, sparsity=0.4, batch_size=2, **extra)
    a, b = _both_ways(source, tmp_path, config, calib)
    _assert_same_checkpoint(a, b)
    ids = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(logits(load_pruned(a), ids), logits(load_pruned(b), ids))


def test_streamed_equals_in_memory_on_the_trained_model(tiny_trained_dir, tmp_path):
    calib = torch.randint(0, 200, (8, 32))
    config = PruneConfig(sparsity=0.3, batch_size=4, allocation="kl-knapsack", sensitivity_samples=2)
    _assert_same_checkpoint(*_both_ways(tiny_trained_dir, tmp_path, config, calib))


def test_streamed_bias_refit_writes_the_new_biases(tmp_path):
    source = tmp_path / "dense"
    make_model("llama", layers=2).save_pretrained(source)
    calib = torch.randint(0, VOCAB, (4, 16))
    a, b = _both_ways(source, tmp_path, PruneConfig(sparsity=0.3, bias_refit=True), calib)
    _assert_same_checkpoint(a, b)
    assert any(k.endswith("down_proj.bias") for k in folder_tensors(b))


def test_streamed_bf16_stays_bf16(tmp_path):
    source = tmp_path / "dense"
    make_model("llama", layers=2).to(torch.bfloat16).save_pretrained(source)
    calib = torch.randint(0, VOCAB, (4, 16))
    a, b = _both_ways(source, tmp_path, PruneConfig(sparsity=0.3), calib)
    _assert_same_checkpoint(a, b)
    assert {t.dtype for t in folder_tensors(b).values()} == {torch.bfloat16}


def test_interrupted_run_leaves_no_folder(tmp_path, monkeypatch):
    source = tmp_path / "dense"
    make_model("llama", layers=3).save_pretrained(source)
    from struprune_plugin import streaming

    real = streaming.ShardWriter.write
    calls = []

    def fail_on_second_layer(self, tensors):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, tensors)

    monkeypatch.setattr(streaming.ShardWriter, "write", fail_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(
            source, tmp_path / "out", torch.randint(0, VOCAB, (4, 16)), PruneConfig(), progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_streaming_refuses_the_global_reference(tmp_path):
    source = tmp_path / "dense"
    make_model("llama", layers=2).save_pretrained(source)
    with pytest.raises(StructPruneError, match="every layer resident"):
        prune_checkpoint(
            source, tmp_path / "out", torch.randint(0, VOCAB, (2, 8)), PruneConfig(method="global-taylor")
        )
    assert not (tmp_path / "out").exists()


def test_in_memory_engine_shares_unchanged_tensors_and_leaves_the_input_alone():
    """No deep copy: embeddings and the final norm are the input's own storage; every layer's
    pruned tensors are new, and the input's tensors are bit-identical afterwards."""
    model = make_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_model(model, torch.randint(0, VOCAB, (4, 16)), PruneConfig(sparsity=0.3), progress=False)
    pruned = result.model
    assert pruned is not model
    emb = pruned.get_input_embeddings().weight
    assert emb.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert pruned.model.norm.weight.data_ptr() == model.model.norm.weight.data_ptr()
    for a, b in zip(pruned.model.layers, model.model.layers):
        assert a.mlp.down_proj.weight.shape != b.mlp.down_proj.weight.shape
    after = model.state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == model.config.intermediate_size
