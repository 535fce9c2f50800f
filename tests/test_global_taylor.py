"""The O(N) global Taylor reference: group importances equal a one-shot autograd computation done
group by group, the ranking spans every layer, and the refits reduce each layer's output error."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, make_model
from struprune_plugin.allocation import threshold_budget
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.engine import PruneConfig, prune_model, unit_spaces
from struprune_plugin.global_taylor import taylor_gradients, taylor_group_scores
from struprune_plugin.groups import query_heads_of_kv


def _reference_scores(model, ids, head_unit):
    """|w * g| summed per group by explicit loops, g from one backward over all windows at once."""
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    out = []
    for lv in model_view(ref).layer_views():
        geometry = geometry_of(lv)
        d = lv.head_dim

        def wg(module):
            w = module.weight
            g = module.linear.weight.grad[module.start : module.stop] if hasattr(module, "linear") else w.grad
            return (w.detach().double() * g.double()).abs()

        mlp = torch.tensor(
            [
                sum(float(wg(w)[c].sum()) for w in lv.mlp_in) + float(wg(lv.mlp_out)[:, c].sum())
                for c in range(lv.intermediate_size)
            ],
            dtype=torch.float64,
        )
        heads = [
            float(wg(lv.q)[h * d : (h + 1) * d].sum() + wg(lv.o)[:, h * d : (h + 1) * d].sum())
            for h in range(lv.num_heads)
        ]
        if head_unit == "kv_group":
            heads = [
                sum(heads[h] for h in query_heads_of_kv([g], geometry.group_size))
                + float(wg(lv.k)[g * d : (g + 1) * d].sum() + wg(lv.v)[g * d : (g + 1) * d].sum())
                for g in range(lv.num_kv_heads)
            ]
        out.append({"mlp": mlp, "heads": torch.tensor(heads, dtype=torch.float64)})
    return out


@pytest.mark.parametrize(
    "family,head_unit", [("llama", "query"), ("llama", "kv_group"), ("phi3", "query"), ("gemma3", "kv_group")]
)
def test_taylor_scores_equal_a_group_by_group_autograd_computation(family, head_unit):
    model = make_model(family, layers=2, seed=3)
    ids = torch.randint(0, VOCAB, (4, 16))
    expected = _reference_scores(model, ids, head_unit)
    work = copy.deepcopy(model)
    view = model_view(work)
    taylor_gradients(work, view, ids, torch.device("cpu"), progress=False)
    for lv, ref in zip(view.layer_views(), expected):
        got = taylor_group_scores(lv, head_unit, ("mlp", "heads"))
        for kind in ("mlp", "heads"):
            torch.testing.assert_close(got[kind], ref[kind], rtol=1e-4, atol=1e-9)
    assert all(p.requires_grad for p in work.parameters())  # restored


def test_global_taylor_ranks_across_layers_and_hits_the_budget(family):
    model = make_model(family, layers=3, seed=1)
    ids = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(method="global-taylor", sparsity=0.4, batch_size=2)
    result = prune_model(model, ids, config, progress=False)
    spaces = unit_spaces([geometry_of(lv) for lv in model_view(model).layer_views()], config)
    tolerance = max(s.step * s.cost for kind in spaces.values() for s in kind) / result.prunable_before
    assert abs(result.achieved_sparsity - 0.4) <= tolerance
    # the counts are the global threshold over the Taylor scores, and each layer keeps its top groups
    work = copy.deepcopy(model)
    view = model_view(work)
    taylor_gradients(work, view, ids, torch.device("cpu"), progress=False)
    scores = [taylor_group_scores(lv, config.head_unit, config.units) for lv in view.layer_views()]
    counts = threshold_budget(
        spaces, {k: [s[k] for s in scores] for k in config.units}, 0.4 * result.prunable_before
    )
    assert [r.mlp[0] - r.mlp[1] for r in result.layers] == counts["mlp"]
    for plan, s in zip(result.plans, scores):
        kept = set(plan.keep_mlp)
        dropped = [c for c in range(len(s["mlp"])) if c not in kept]
        if dropped and kept:
            assert max(s["mlp"][dropped]) <= min(s["mlp"][sorted(kept)])
    assert (
        result.allocation["allocation"] == "global-taylor" and result.allocation["seconds"]["gradients"] > 0
    )


def test_refit_reduces_the_first_layers_mlp_error():
    """Least squares on the kept channels never does worse than zeroing the dropped ones."""
    model = make_model("llama", layers=2, seed=2)
    ids = torch.randint(0, VOCAB, (6, 16))
    result = prune_model(
        model, ids, PruneConfig(method="global-taylor", sparsity=0.5, units=("mlp",)), progress=False
    )
    dense_mlp = model_view(model).layer(0).layer.mlp
    pruned_mlp = model_view(result.model).layer(0).layer.mlp
    seen = []
    hook = dense_mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    x = seen[0]
    keep = result.plans[0].keep_mlp
    masked = copy.deepcopy(dense_mlp)
    with torch.no_grad():
        drop = torch.ones(masked.down_proj.in_features, dtype=torch.bool)
        drop[keep] = False
        masked.down_proj.weight[:, drop] = 0
        target = dense_mlp(x)
        refit_error = (pruned_mlp(x) - target).pow(2).sum()
        zeroed_error = (masked(x) - target).pow(2).sum()
    assert refit_error < 0.9 * zeroed_error
