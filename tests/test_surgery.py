"""Physical removal through Torch-Pruning equals the original model with the same groups zeroed."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, logits, make_model, masked_reference
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.engine import capture_layer_inputs
from struprune_plugin.groups import LayerPlan, query_heads_of_kv
from struprune_plugin.surgery import build_layer_graph, prune_layer


def _plans(model, unit: str, seed: int = 0) -> list[LayerPlan]:
    """Random but GQA-valid plans, different in every layer."""
    gen = torch.Generator().manual_seed(seed)
    plans = []
    for i, lv in enumerate(model_view(model).layer_views()):
        g = geometry_of(lv)
        keep_mlp = sorted(torch.randperm(g.intermediate, generator=gen)[: g.intermediate // (2 + i)].tolist())
        if unit == "query" and g.group_size > 1:
            per_group = g.group_size - 1 - (i % (g.group_size - 1))
            heads = []
            for kv in range(g.num_kv_heads):
                members = query_heads_of_kv([kv], g.group_size)
                pick = torch.randperm(g.group_size, generator=gen)[:per_group].tolist()
                heads += [members[j] for j in pick]
            plans.append(LayerPlan(keep_mlp, sorted(heads), list(range(g.num_kv_heads))))
        else:
            kv = sorted(
                torch.randperm(g.num_kv_heads, generator=gen)[: max(1, g.num_kv_heads - 1 - i)].tolist()
            )
            plans.append(LayerPlan(keep_mlp, query_heads_of_kv(kv, g.group_size), kv))
    return plans


@pytest.mark.parametrize("unit", ["query", "kv_group"])
def test_pruned_equals_masked(family, unit):
    if unit == "query" and family in ("llama_mha", "opt"):
        pytest.skip("MHA has no query heads to remove inside a KV group")
    model = make_model(family, layers=3)
    plans = _plans(model, unit)
    reference = masked_reference(model, plans)
    view = model_view(model)
    example = capture_layer_inputs(model, view, [torch.randint(0, VOCAB, (1, 12))], torch.device("cpu"))[0]
    for lv, plan in zip(view.layer_views(), plans):
        graph = build_layer_graph(lv, example.hidden, example.kwargs_for(lv.layer))
        pruned = prune_layer(lv, plan, graph)
        assert (pruned.num_heads, pruned.num_kv_heads, pruned.intermediate_size) == (
            len(plan.keep_heads),
            len(plan.keep_kv_heads),
            len(plan.keep_mlp),
        )
    ids = torch.randint(0, VOCAB, (2, 17))
    diff = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    assert diff <= 1e-5
    # layers really differ in width, and the model still generates with its KV cache
    assert len({lv.intermediate_size for lv in view.layer_views()}) > 1
    out = model.generate(ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
