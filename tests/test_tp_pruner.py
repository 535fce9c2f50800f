"""StructPrunePruner: a Torch-Pruning pruner whose step() is `prune_model`. The model it leaves must
be the one `prune_model` gives with the same config (same kept indices, same weights, same
logits), land on the budget, save and reload, and refuse what it cannot do with a clear error."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch_pruning as tp

from conftest import VOCAB, logits, make_model
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, budget_tolerance, prune_model, unit_spaces
from struprune_plugin.errors import CalibrationDataError, StructPruneError
from struprune_plugin.tp_adapter import StructPruneImportance
from struprune_plugin.tp_pruner import StructPrunePruner


def _ids(shape=(4, 16), seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _assert_same_model(got, expected) -> None:
    """Every parameter equal (names, shapes, values): the same rows kept, the same solved weights."""
    a, b = dict(got.named_parameters()), dict(expected.named_parameters())
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
    ids = _ids((2, 11), seed=7)
    assert torch.allclose(logits(got, ids), logits(expected, ids), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "opt"])
def test_step_gives_the_model_prune_model_gives(family):
    model = make_model(family, layers=2)
    dense = copy.deepcopy(model)
    ids = _ids()
    config = PruneConfig(kind_split="ratio")  # at 40 % the ratio split removes heads too
    pruner = StructPrunePruner(model, ids[:1, :8], ids, pruning_ratio=0.4, config=config)
    assert isinstance(pruner, tp.pruner.BasePruner) and pruner.model is model
    pruner.step()
    assert config.sparsity == 0.3  # the caller's config is copied, not modified
    reference = prune_model(dense, ids, dataclasses.replace(config, sparsity=0.4), progress=False)
    got, expected = pruner.result.plans, reference.plans
    assert [(p.keep_heads, p.keep_kv_heads, p.keep_mlp) for p in got] == [
        (p.keep_heads, p.keep_kv_heads, p.keep_mlp) for p in expected
    ]
    assert any(len(p.keep_heads) < lv.num_heads for p, lv in zip(got, model_view(dense).layer_views()))
    assert [(r.heads, r.kv_heads, r.mlp) for r in pruner.result.layers] == [
        (r.heads, r.kv_heads, r.mlp) for r in reference.layers
    ]
    _assert_same_model(model, reference.model)


def test_budget_is_exact_and_the_result_saves_and_reloads(tmp_path):
    model = make_model("llama", layers=3)
    dense = copy.deepcopy(model)
    ids = _ids((6, 16))
    config = PruneConfig(temperature=1.0, energy_samples=None)  # per-layer allocation, not uniform
    pruner = StructPrunePruner(model, None, ids, pruning_ratio=0.3, config=config)
    pruner.step()
    result = pruner.result
    spaces = unit_spaces([geometry_of(lv) for lv in model_view(dense).layer_views()], config)
    assert result.budget_missed is None
    assert abs(result.achieved_sparsity - 0.3) <= budget_tolerance(spaces, result.prunable_before, config)
    assert result.prunable_before - result.prunable_after == sum(r.removed_params for r in result.layers)
    assert len({lv.intermediate_size for lv in model_view(model).layer_views()}) > 1
    _assert_same_model(
        model, prune_model(dense, ids, dataclasses.replace(config, sparsity=0.3), progress=False).model
    )
    save_pruned(model, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    ids2 = _ids((2, 9), seed=3)
    assert torch.allclose(logits(reloaded, ids2), logits(model, ids2), atol=1e-5)


def test_ignored_decoder_layer_and_round_to_map_to_skip_layers_and_mlp_round_to():
    model = make_model("qwen3", layers=3)
    dense = copy.deepcopy(model)
    ids = _ids()
    layer0 = model_view(model).layers[0]
    pruner = StructPrunePruner(
        model, ids[:1, :8], pruning_ratio=0.3, ignored_layers=[layer0, model.lm_head], round_to=8
    )
    pruner.step(calibration_ids=ids)  # calibration given to step() instead of the constructor
    assert pruner.config.skip_layers == (0,) and pruner.config.mlp_round_to == 8
    views = model_view(model).layer_views()
    assert (views[0].num_heads, views[0].intermediate_size) == (8, 96)
    assert all(lv.intermediate_size % 8 == 0 for lv in views) and views[1].intermediate_size < 96
    reference = prune_model(
        dense, ids, PruneConfig(sparsity=0.3, skip_layers=(0,), mlp_round_to=8), progress=False
    )
    _assert_same_model(model, reference.model)


def test_what_the_solver_cannot_do_is_refused():
    model = make_model("llama", layers=2)
    ids = _ids()
    with pytest.raises(StructPruneError, match="one step"):
        StructPrunePruner(model, ids[:1, :8], ids, iterative_steps=3)
    with pytest.raises(StructPruneError, match="calibration token ids"):
        StructPrunePruner(model, ids[:1, :8], StructPruneImportance())  # BasePruner's importance slot
    with pytest.raises(StructPruneError, match="global_pruning"):
        StructPrunePruner(model, ids[:1, :8], ids, global_pruning=True)
    with pytest.raises(TypeError, match="no_such_option"):
        StructPrunePruner(model, ids[:1, :8], ids, no_such_option=1)
    q_proj = model_view(model).layer(1).q
    with pytest.raises(StructPruneError, match="part of decoder layer 1"):
        StructPrunePruner(model, ids[:1, :8], ids, ignored_layers=[q_proj])
    with pytest.raises(StructPruneError, match="part of decoder layer 0"):
        StructPrunePruner(model, ids[:1, :8], ids, ignored_layers=[model_view(model).layer(0).mlp_out.weight])
    with pytest.raises(StructPruneError, match="example_inputs"):
        StructPrunePruner(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    pruner = StructPrunePruner(model, ids[:1, :8], pruning_ratio=0.3)
    with pytest.raises(StructPruneError, match="interactively"):
        pruner.step(interactive=True)
    with pytest.raises(CalibrationDataError, match="calibration"):
        pruner.step()
    with pytest.raises(StructPruneError, match="no importance"):
        pruner.manual_prune_width(q_proj, tp.prune_linear_out_channels, 0.5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing pruned yet
    pruner.step(calibration_ids=ids)
    pruned = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="maximum iterative steps"):
        pruner.step(calibration_ids=ids)  # past iterative_steps: BasePruner's warning, no pruning
    assert all(torch.equal(p, pruned[n]) for n, p in model.named_parameters())
