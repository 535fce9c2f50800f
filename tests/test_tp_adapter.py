"""Torch-Pruning adapter: the importance against an independent computation, BasePruner with
StructPrune's allocation against the masked original, and Torch-Pruning's own options on LLMs,
a CNN and a ViT."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch_pruning as tp
from torch import nn

from conftest import VOCAB, family_params, logits, make_model, masked_reference
from struprune_plugin.architectures import model_view
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import StructPruneError
from struprune_plugin.groups import LayerPlan
from struprune_plugin.tp_adapter import StructPruneImportance, finish, pruner_kwargs, ratio_for, traceable


def _record(model, imp, ids):
    with torch.no_grad(), imp.record(model):
        model(input_ids=ids, use_cache=False)


def _input_norms(model, ids, modules):
    seen = {m: [] for m in modules}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen[mod].append(a[0].detach())) for m in modules]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {
        m: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().norm(dim=0) for m, xs in seen.items()
    }


@pytest.mark.parametrize("energy", ["wanda", "obs"])
def test_importance_of_an_mlp_group_is_the_wanda_sum_or_the_obs_energy(energy):
    model = make_model("llama", layers=2)
    ids = torch.randint(0, VOCAB, (3, 12))
    imp = StructPruneImportance(energy=energy, normalizer=None)
    _record(model, imp, ids)
    lv = model_view(model).layer(1)
    with traceable(model):
        graph = tp.DependencyGraph().build_dependency(
            model, ids, forward_fn=lambda m, x: m(x, use_cache=False), output_transform=lambda o: o.logits
        )
    group = graph.get_pruning_group(
        lv.mlp_out, tp.prune_linear_in_channels, list(range(lv.intermediate_size))
    )
    got = imp(group)
    norms = _input_norms(model, ids, [lv.mlp_in[0], lv.mlp_out])
    x, h = norms[lv.mlp_in[0]], norms[lv.mlp_out]
    if energy == "wanda":
        expected = sum((w.weight.double().abs() * x).sum(1) for w in lv.mlp_in)
        expected = expected + lv.mlp_out.weight.double().abs().sum(0) * h
    else:  # the exact output error of removing channel j alone
        expected = lv.mlp_out.weight.double().pow(2).sum(0) * h.pow(2)
    assert torch.allclose(got.double(), expected, rtol=1e-4)


def test_ratio_for_lands_on_the_count_after_truncation():
    for total in (7, 96, 1536, 11008):
        for remove in range(0, total, max(1, total // 37)):
            assert total - int(total * (1 - ratio_for(remove, total))) == remove


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of `original` survive in `pruned` (random weights: rows are unique)."""
    dist = torch.cdist(pruned.detach().double(), original.detach().double())
    return dist.argmin(1).tolist()


def _plans_from_weights(dense, pruned) -> list[LayerPlan]:
    plans = []
    for a, b in zip(model_view(dense).layer_views(), model_view(pruned).layer_views()):
        keep_mlp = _kept_rows(a.mlp_in[0].weight, b.mlp_in[0].weight)
        hd = a.head_dim
        q_rows = _kept_rows(a.q.weight, b.q.weight)
        keep_heads = sorted({r // hd for r in q_rows})
        plans.append(LayerPlan(keep_mlp, keep_heads, list(range(a.num_kv_heads))))
    return plans


def _shared_defaults() -> dict:
    params = inspect.signature(tp.pruner.BasePruner.__init__).parameters
    return {k: dict(params[k].default) for k in ("in_channel_groups", "out_channel_groups")}


@pytest.mark.parametrize("family", family_params(["llama", "qwen2", "qwen3"]))
def test_base_pruner_with_structprune_allocation_equals_masked_original(family):
    model = make_model(family, layers=3)
    dense = make_model(family, layers=3)
    ids = torch.randint(0, VOCAB, (4, 16))
    kwargs = pruner_kwargs(model, ids, 0.35, PruneConfig(temperature=0.5, energy_samples=None))
    counts = kwargs.pop("allocation")["counts"]
    shared_before = _shared_defaults()
    imp = StructPruneImportance()
    _record(model, imp, ids)
    with traceable(model):
        pruner = tp.pruner.BasePruner(model, ids, imp, **kwargs)
    for group in pruner.step(interactive=True):
        group.prune()
    finish(model)
    views = model_view(model).layer_views()
    assert [lv.intermediate_size for lv in views] == [96 - c for c in counts["mlp"]]
    assert [lv.num_heads for lv in views] == [8 - c for c in counts["heads"]]
    assert len({lv.intermediate_size for lv in views}) > 1  # the allocation is not uniform
    plans = _plans_from_weights(dense, model)
    ids2 = torch.randint(0, VOCAB, (2, 11))
    diff = (logits(model, ids2) - logits(masked_reference(dense, plans), ids2)).abs().max()
    assert diff <= 1e-5
    # BasePruner's shared default dicts are left alone: no state leaks into the next pruner
    assert _shared_defaults() == shared_before


@pytest.mark.parametrize("family", family_params(["llama", "qwen2", "qwen3"]))
def test_solver_path_surgery_equals_the_masked_original(family):
    """No weight updates (0 ADMM iterations, no refit): what the DependencyGraph removes is
    exactly what the solver's plan masks."""
    model = make_model(family, layers=3)
    ids = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(sparsity=0.35, admm_iterations=0, refit=False, use_aux=False)
    result = prune_model(model, ids, config, progress=False)
    ids2 = torch.randint(0, VOCAB, (2, 11))
    diff = (logits(result.model, ids2) - logits(masked_reference(model, result.plans), ids2)).abs().max()
    assert diff <= 1e-4


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


def test_conv_input_channel_scores_are_wanda_on_channel_norms():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = torch.randn(4, 3, 12, 12)
    imp = StructPruneImportance(normalizer=None)
    with torch.no_grad(), imp.record(net):
        net(x)
    conv = net.features[3]
    graph = tp.DependencyGraph().build_dependency(net, x)
    group = graph.get_pruning_group(net.features[0], tp.prune_conv_out_channels, list(range(16)))
    got = imp(group)
    inp = net.features[2](net.features[1](net.features[0](x))).detach()
    x0 = x.movedim(1, -1).reshape(-1, 3).double().norm(dim=0)
    x1 = inp.movedim(1, -1).reshape(-1, 16).double().norm(dim=0)
    w0, w1 = net.features[0].weight.double(), conv.weight.double()
    expected = (w0.abs().sum((2, 3)) * x0).sum(1) + w1.abs().sum((0, 2, 3)) * x1
    assert torch.allclose(got.double(), expected, rtol=1e-4)


def test_cnn_global_pruning_with_torch_pruning_options():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = torch.randn(4, 3, 12, 12)
    imp = StructPruneImportance()
    pruner = tp.pruner.BasePruner(
        net,
        x,
        imp,
        global_pruning=True,
        pruning_ratio=0.5,
        iterative_steps=2,
        round_to=4,
        ignored_layers=[net.head],
    )
    before = sum(p.numel() for p in net.parameters())
    for _step in range(2):
        with torch.no_grad(), imp.record(net):
            net(x)
        pruner.step()
        widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert all(w % 4 == 0 for w in widths), widths
    assert net.head.out_features == 10  # ignored layer untouched
    assert sum(p.numel() for p in net.parameters()) < 0.6 * before
    assert net(x).shape == (4, 10)


def test_stale_statistics_are_refused():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    imp = StructPruneImportance()
    with torch.no_grad(), imp.record(net):
        net(x)
    pruner = tp.pruner.BasePruner(
        net, x, imp, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[net.head]
    )
    pruner.step()
    with pytest.raises(StructPruneError, match="record again"):
        pruner.step()


def test_vit_global_pruning_with_heads():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    model = ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    imp = StructPruneImportance()
    with torch.no_grad(), imp.record(model):
        model(x)
    num_heads = {}
    for layer in model.vit.layers:
        att = layer.attention
        num_heads.update({att.q_proj: 4, att.k_proj: 4, att.v_proj: 4})
    pruner = tp.pruner.BasePruner(
        model,
        x,
        imp,
        global_pruning=True,
        pruning_ratio=0.3,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.25,
        output_transform=lambda o: o.logits,
        ignored_layers=[model.classifier],
    )
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    heads = [pruner.num_heads[layer.attention.q_proj] for layer in model.vit.layers]
    assert min(heads) < 4  # heads went, ranked globally
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(x).logits.shape == (2, 5)


def test_llm_path_keeps_round_to_and_ignored_layers_working():
    model = make_model("llama", layers=3)
    ids = torch.randint(0, VOCAB, (4, 16))
    kwargs = pruner_kwargs(model, ids, 0.35, PruneConfig(mlp_round_to=8, energy_samples=None))
    counts = kwargs.pop("allocation")["counts"]
    views = model_view(model).layer_views()
    kwargs["ignored_layers"].append(views[0].mlp_in[0])  # keep layer 0's MLP as it is
    imp = StructPruneImportance()
    _record(model, imp, ids)
    with traceable(model):
        pruner = tp.pruner.BasePruner(model, ids, imp, round_to=8, **kwargs)
    for group in pruner.step(interactive=True):
        group.prune()
    finish(model)
    widths = [lv.intermediate_size for lv in model_view(model).layer_views()]
    assert widths[0] == 96
    assert widths[1:] == [96 - c for c in counts["mlp"][1:]]
    assert all(w % 8 == 0 for w in widths)
    assert logits(model, torch.randint(0, VOCAB, (1, 7))).isfinite().all()
