"""Exact budgets: the allocator hits the requested parameter count within one group."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from struprune_plugin.allocation import allocate_equal, allocate_softmax, allocate_uniform, fill_evenly
from struprune_plugin.errors import GQAConstraintError, InvalidSparsityError
from struprune_plugin.groups import LayerGeometry, UnitSpace, unit_space

SMOL = LayerGeometry(
    hidden=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate=1536,
    mlp_in_count=2,
    mlp_in_bias=False,
    qkv_bias=False,
    prunable_params=0,
)


def _prunable(g: LayerGeometry) -> int:
    q = o = g.hidden * g.num_heads * g.head_dim
    kv = 2 * g.hidden * g.num_kv_heads * g.head_dim
    return q + o + kv + 3 * g.hidden * g.intermediate


@pytest.mark.parametrize("head_unit", ["query", "kv_group"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
def test_budget_within_one_group(head_unit, sparsity):
    layers = [SMOL] * 30
    spaces = {k: [unit_space(k, g, head_unit) for g in layers] for k in ("heads", "mlp")}
    total = sum(_prunable(g) for g in layers)
    counts = allocate_uniform(spaces, total, sparsity)
    removed = sum(c * s.cost for k in counts for c, s in zip(counts[k], spaces[k]))
    assert abs(removed - sparsity * total) <= SMOL.mlp_channel_cost / 2 + 1e-9
    # uniform: every layer gets the same head count and MLP counts differ by at most one channel
    assert len(set(counts["heads"])) == 1
    assert max(counts["mlp"]) - min(counts["mlp"]) <= 1
    # GQA rule for query heads: multiples of the number of KV heads, never all of a group
    for c, s in zip(counts["heads"], spaces["heads"]):
        assert c % s.step == 0 and c <= s.max_remove


def test_fill_evenly_matches_brute_force():
    """On small problems the greedy rounding is as close to the target as any feasible choice."""
    spaces = [UnitSpace(n=5, cost=7), UnitSpace(n=4, cost=11, step=2, min_keep=2), UnitSpace(n=6, cost=3)]
    for target in range(0, 80, 3):
        counts = fill_evenly(spaces, target)
        got = sum(c * s.cost for c, s in zip(counts, spaces))
        best = min(
            abs(target - sum(c * s.cost for c, s in zip(choice, spaces)))
            for choice in itertools.product(*[range(0, s.max_remove + 1, s.step) for s in spaces])
        )
        largest = max(s.cost * s.step for s in spaces)
        assert abs(got - target) <= max(best, largest / 2)


def test_heads_only_and_mlp_only():
    layers = [SMOL] * 4
    total = sum(_prunable(g) for g in layers)
    for kinds in (("heads",), ("mlp",)):
        spaces = {k: [unit_space(k, g, "query") for g in layers] for k in kinds}
        counts = allocate_uniform(spaces, total, 0.1)
        removed = sum(c * s.cost for k in counts for c, s in zip(counts[k], spaces[k]))
        step_cost = max(s.cost * s.step for s in spaces[kinds[0]])
        assert abs(removed - 0.1 * total) <= step_cost / 2


def test_layers_never_emptied():
    layers = [SMOL] * 3
    spaces = {k: [unit_space(k, g, "query") for g in layers] for k in ("heads", "mlp")}
    counts = allocate_uniform(spaces, sum(_prunable(g) for g in layers), 0.99)
    assert all(c <= SMOL.num_heads - SMOL.num_kv_heads for c in counts["heads"])
    assert all(c <= SMOL.intermediate - 1 for c in counts["mlp"])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(bad):
    spaces = {"mlp": [unit_space("mlp", SMOL, "query")]}
    with pytest.raises(InvalidSparsityError, match=r"\[0, 1\)"):
        allocate_uniform(spaces, _prunable(SMOL), bad)


def test_infeasible_head_ratio_under_gqa():
    spaces = {k: [unit_space(k, SMOL, "query")] for k in ("heads", "mlp")}
    with pytest.raises(GQAConstraintError, match=r"multiples of 3.*0\.3333"):
        allocate_uniform(spaces, _prunable(SMOL), 0.3, head_sparsity=0.25)
    counts = allocate_uniform(spaces, _prunable(SMOL), 0.3, head_sparsity=1 / 3)
    assert counts["heads"] == [3]


def test_query_unit_impossible_under_mha():
    mha = LayerGeometry(
        hidden=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        intermediate=96,
        mlp_in_count=2,
        mlp_in_bias=False,
        qkv_bias=False,
        prunable_params=0,
    )
    with pytest.raises(GQAConstraintError, match="kv_group"):
        unit_space("heads", mha, "query")
    assert unit_space("heads", mha, "auto").n == 4


# --- temperature softmax (Fermi-Dirac) allocation ---------------------------------------------


def _smol_spaces(layers: int, head_unit: str = "query"):
    return {k: [unit_space(k, SMOL, head_unit) for _ in range(layers)] for k in ("heads", "mlp")}


def _removed(counts, spaces) -> float:
    return sum(c * s.cost for k in counts for c, s in zip(counts[k], spaces[k]))


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("temperature", [1e-3, 0.1, 0.5, 2.0, 1e3, float("inf")])
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5, 0.8])
def test_softmax_budget_within_one_group(temperature, sparsity, channels_first):
    gen = torch.Generator().manual_seed(0)
    spaces = _smol_spaces(12)
    energies = {k: torch.randn(12, generator=gen).tolist() for k in spaces}
    total = 12 * _prunable(SMOL)
    counts = allocate_softmax(spaces, energies, total, sparsity, temperature, channels_first)
    assert abs(_removed(counts, spaces) - sparsity * total) <= SMOL.mlp_channel_cost / 2 + 1e-6
    for k in counts:
        assert all(0 <= c <= s.max_remove and c % s.step == 0 for c, s in zip(counts[k], spaces[k]))


def test_infinite_temperature_is_uniform():
    spaces = _smol_spaces(10)
    energies = {k: torch.linspace(-2, 2, 10).tolist() for k in spaces}
    total = 10 * _prunable(SMOL)
    for sparsity in (0.2, 0.3, 0.5):
        uniform = allocate_uniform(spaces, total, sparsity)
        assert allocate_softmax(spaces, energies, total, sparsity, 1e9) == uniform
        assert allocate_softmax(spaces, energies, total, sparsity, float("inf")) == uniform


# --- MLP-first split (StructPrune's default) --------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.76, 0.85])
def test_mlp_first_removes_heads_only_where_channels_run_out(sparsity):
    spaces = _smol_spaces(6)
    total = 6 * _prunable(SMOL)
    counts = allocate_uniform(spaces, total, sparsity, channels_first=True)
    assert abs(_removed(counts, spaces) - sparsity * total) <= SMOL.mlp_channel_cost / 2 + 1e-6
    h, m = spaces["heads"][0], spaces["mlp"][0]
    # Brute force per layer: the fewest feasible heads that, with every removable channel gone,
    # still reach the layer's (uniform) share of the budget.
    share = sparsity * total / 6
    fewest = min(c for c in range(0, h.max_remove + 1, h.step) if c * h.cost + m.max_remove * m.cost >= share)
    assert counts["heads"] == [fewest] * 6
    if sparsity * total <= 6 * m.max_remove * m.cost:
        assert counts["heads"] == [0] * 6
        only_mlp = allocate_uniform({"mlp": spaces["mlp"]}, total, sparsity)
        assert counts["mlp"] == only_mlp["mlp"]  # below the channels' cap: MLP-only pruning


@pytest.mark.parametrize("temperature", [0.5, 2.0, float("inf")])
@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_mlp_first_keeps_each_layers_allocated_total(temperature, sparsity):
    """The split moves parameters between a layer's kinds, never between layers (within rounding)."""
    gen = torch.Generator().manual_seed(1)
    spaces = _smol_spaces(8)
    energies = {k: torch.randn(8, generator=gen).tolist() for k in spaces}
    total = 8 * _prunable(SMOL)
    ratio = allocate_softmax(spaces, energies, total, sparsity, temperature)
    first = allocate_softmax(spaces, energies, total, sparsity, temperature, channels_first=True)
    assert abs(_removed(first, spaces) - sparsity * total) <= SMOL.mlp_channel_cost / 2 + 1e-6
    h, m = spaces["heads"][0], spaces["mlp"][0]
    for i in range(8):
        layer_ratio = ratio["heads"][i] * h.cost + ratio["mlp"][i] * m.cost
        layer_first = first["heads"][i] * h.cost + first["mlp"][i] * m.cost
        assert abs(layer_first - layer_ratio) <= h.step * h.cost + 2 * m.cost
        assert first["heads"][i] <= ratio["heads"][i] or first["mlp"][i] == m.max_remove


def test_mlp_first_equal_widths():
    spaces = _smol_spaces(4)
    total = 4 * _prunable(SMOL)
    m = spaces["mlp"][0]
    for sparsity in (0.3, 0.8):
        counts = allocate_equal(spaces, total, sparsity, channels_first=True)
        assert len(set(counts["heads"])) == len(set(counts["mlp"])) == 1
        assert abs(_removed(counts, spaces) - sparsity * total) <= 4 * m.cost / 2 + 1e-6
        assert (counts["heads"][0] == 0) == (sparsity * total <= 4 * m.max_remove * m.cost)


def test_mlp_first_and_a_fixed_head_ratio_exclude_each_other():
    spaces = _smol_spaces(2)
    with pytest.raises(InvalidSparsityError, match="choose one"):
        allocate_uniform(spaces, 2 * _prunable(SMOL), 0.3, head_sparsity=1 / 3, channels_first=True)


def test_low_temperature_prunes_low_energy_layers_first():
    spaces = {"mlp": [unit_space("mlp", SMOL, "query") for _ in range(8)]}
    energies = {"mlp": [3.0, -1.0, 2.0, -3.0, 0.0, 1.0, -2.0, 4.0]}
    total = 8 * _prunable(SMOL)
    cold = allocate_softmax(spaces, energies, total, 0.3, 0.01)["mlp"]
    warm = allocate_softmax(spaces, energies, total, 0.3, 1.0)["mlp"]
    order = sorted(range(8), key=lambda i: energies["mlp"][i])  # lowest energy first
    assert [cold[i] for i in order] == sorted(cold, reverse=True)
    assert [warm[i] for i in order] == sorted(warm, reverse=True)
    # cold: the two lowest-energy layers are emptied down to their minimum, the highest untouched
    assert cold[3] == cold[6] == SMOL.intermediate - 1 and cold[7] == 0
    assert max(warm) - min(warm) < max(cold) - min(cold)  # warmer is more even


def _free_energy_minimum(e, m, lo, hi, T, K):
    """Direct numerical minimiser (SLSQP) of sum_i m_i (-e_i r_i + T H(r_i)) over lo <= r <= hi
    with sum_i m_i r_i = K: the independent reference for the closed form."""
    import numpy as np
    from scipy.optimize import minimize

    def free_energy(r):
        r = np.clip(r, 1e-12, 1 - 1e-12)
        return float(np.sum(m * (-e * r + T * (r * np.log(r) + (1 - r) * np.log(1 - r)))))

    return minimize(
        free_energy,
        np.full(len(e), K / m.sum()),
        method="SLSQP",
        bounds=list(zip(lo, hi)),
        constraints=[{"type": "eq", "fun": lambda r: float(m @ r - K)}],
        options={"ftol": 1e-14},
    ).x


def test_fermi_dirac_minimises_the_free_energy():
    """The closed form equals a direct numerical minimisation of
    sum_i m_i (-e_i r_i + T (r_i ln r_i + (1 - r_i) ln(1 - r_i))) s.t. sum_i m_i r_i = K."""
    import numpy as np

    from struprune_plugin.allocation import fermi_dirac_keep

    e = np.array([0.3, -1.2, 2.0, 0.0, 0.7])
    m = np.array([3.0, 1.0, 2.0, 5.0, 1.5])
    lo = np.array([0.05, 0.1, 0.05, 0.2, 0.05])
    T, K = 0.7, 0.55 * m.sum()
    ref = _free_energy_minimum(e, m, lo, np.full(5, 1 - 1e-9), T, K)
    got = np.array(fermi_dirac_keep(e.tolist(), m.tolist(), lo.tolist(), K, T))
    assert float(m @ got) == pytest.approx(K, rel=1e-9)
    assert np.allclose(got, ref, atol=1e-4)


def test_fermi_dirac_with_a_ceiling_minimises_the_free_energy_in_the_box():
    """The trust region's ceiling: the closed form still equals a direct minimisation of the free
    energy, now over lower_i <= r_i <= upper_i, and binds where the energies would push past it."""
    import numpy as np

    from struprune_plugin.allocation import fermi_dirac_keep

    e = np.array([0.3, -1.2, 2.0, 0.0, 0.7])
    m = np.array([3.0, 1.0, 2.0, 5.0, 1.5])
    lo = np.array([0.45, 0.45, 0.45, 0.45, 0.45])
    hi = np.array([0.65, 0.65, 0.65, 0.65, 0.65])
    T, K = 0.7, 0.55 * m.sum()
    ref = _free_energy_minimum(e, m, lo, hi, T, K)
    got = np.array(fermi_dirac_keep(e.tolist(), m.tolist(), lo.tolist(), K, T, hi.tolist()))
    assert float(m @ got) == pytest.approx(K, rel=1e-9)
    assert np.allclose(got, ref, atol=1e-4)
    assert got[2] == pytest.approx(0.65) and got[1] == pytest.approx(0.45)  # both bounds bind
    free = np.array(fermi_dirac_keep(e.tolist(), m.tolist(), lo.tolist(), K, T))
    assert free.max() > 0.65  # the box changed the answer


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_softmax_trust_region_keeps_every_layer_within_the_deviation(sparsity):
    from struprune_plugin.allocation import allocate_softmax_budget

    spaces = {"mlp": [unit_space("mlp", SMOL, "query") for _ in range(8)]}
    energies = {"mlp": [3.0, -1.0, 2.0, -3.0, 0.0, 1.0, -2.0, 4.0]}
    n, cost = SMOL.intermediate, spaces["mlp"][0].cost
    target = sparsity * 8 * n * cost  # the mean removed share of the MLP channels is `sparsity`
    d = 0.1
    for temperature in (0.01, 1.0):
        counts = allocate_softmax_budget(spaces, energies, target, temperature, max_deviation=d)["mlp"]
        assert abs(sum(counts) * cost - target) <= cost
        assert all(sparsity - d - 1 / n <= c / n <= sparsity + d + 1 / n for c in counts)
    cold = allocate_softmax_budget(spaces, energies, target, 0.01, max_deviation=d)["mlp"]
    # greedy inside the box: the lowest-energy layers on the box's floor, the highest on its roof
    assert cold[3] / n == pytest.approx(sparsity + d, abs=1 / n)
    assert cold[7] / n == pytest.approx(sparsity - d, abs=1 / n)


# --- global structured threshold (the O(N) reference) ---------------------------------------------


def test_global_threshold_removes_the_globally_cheapest_groups():
    from struprune_plugin.allocation import allocate_global_threshold

    gen = torch.Generator().manual_seed(0)
    spaces = {"mlp": [UnitSpace(n=50, cost=10) for _ in range(4)]}
    energies = {"mlp": [torch.rand(50, generator=gen) * (layer + 1) for layer in range(4)]}
    counts = allocate_global_threshold(spaces, energies, 4 * 50 * 10, 0.3)["mlp"]
    assert sum(counts) == 60  # exactly 30 % of 200 equal-cost groups
    everything = sorted((float(e), layer) for layer in range(4) for e in energies["mlp"][layer])
    expected = [sum(1 for _, layer in everything[:60] if layer == i) for i in range(4)]
    assert counts == expected


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.6])
def test_global_threshold_budget_with_heads_and_channels(sparsity):
    from struprune_plugin.allocation import allocate_global_threshold

    gen = torch.Generator().manual_seed(1)
    spaces = _smol_spaces(6)
    energies = {k: [torch.rand(s.n, generator=gen) * s.cost for s in spaces[k]] for k in spaces}
    total = 6 * _prunable(SMOL)
    counts = allocate_global_threshold(spaces, energies, total, sparsity)
    removed = sum(c * s.cost for k in counts for c, s in zip(counts[k], spaces[k]))
    assert abs(removed - sparsity * total) <= SMOL.mlp_channel_cost / 2 + 1e-6
    for k in counts:
        assert all(0 <= c <= s.max_remove and c % s.step == 0 for c, s in zip(counts[k], spaces[k]))


@pytest.mark.parametrize("target", [30, 80, 140, 190, 255])
def test_threshold_budget_lands_closest_when_small_steps_run_out(target):
    """One layer, 6 MLP channels of 10 parameters (5 removable) and 3 heads of 100 (2 removable),
    heads dearer per parameter: when the channels run out short of the target the split must still
    take a head and hand channels back, landing as close as any combination can (brute force)."""
    from struprune_plugin.allocation import threshold_budget

    spaces = {"mlp": [UnitSpace(n=6, cost=10)], "heads": [UnitSpace(n=3, cost=100)]}
    energies = {"mlp": [torch.arange(6.0)], "heads": [torch.tensor([5e3, 6e3, 7e3])]}
    counts = threshold_budget(spaces, energies, target)
    removed = counts["mlp"][0] * 10 + counts["heads"][0] * 100
    best = min(abs(c * 10 + h * 100 - target) for c in range(6) for h in range(3))
    assert abs(removed - target) == best


@pytest.mark.parametrize("layers", [2, 18, 30, 32, 40])
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_slimgpt_schedule_rises_logarithmically_and_averages_the_target(layers, sparsity):
    from struprune_plugin.allocation import slimgpt_schedule

    ratios = slimgpt_schedule(layers, sparsity)
    assert sum(ratios) / layers == pytest.approx(sparsity, abs=1e-12)
    assert ratios[0] == pytest.approx(0.3125 * sparsity)
    assert all(b > a for a, b in itertools.pairwise(ratios))
    # log shape: equal steps of ln(1 + l) give equal steps of the ratio
    slope = (ratios[-1] - ratios[0]) / math.log(layers)
    assert all(r == pytest.approx(ratios[0] + slope * math.log(1 + i)) for i, r in enumerate(ratios))


def test_slimgpt_schedule_reproduces_the_published_llama7b_pair():
    """The release runs LLaMA-7B (32 layers) at 20 % with ratios 0.0625 -> 0.25 (mean 0.2004)."""
    from struprune_plugin.allocation import slimgpt_schedule

    ratios = slimgpt_schedule(32, 0.2004)
    assert ratios[0] == pytest.approx(0.0625, abs=5e-4) and ratios[-1] == pytest.approx(0.25, abs=1e-3)


def test_owl_schedule_gives_outlier_rich_layers_less_sparsity():
    from struprune_plugin.allocation import owl_schedule

    outliers = [5.0, 1.0, 3.0, 1.0, 9.0]
    ratios = owl_schedule(outliers, 0.5, lam=0.08)
    assert sum(ratios) / len(ratios) == pytest.approx(0.5)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)  # the rescale spans 2 * lam
    order = sorted(range(5), key=lambda i: outliers[i])
    assert [ratios[i] for i in order] == sorted(ratios, reverse=True)  # more outliers, less pruned
    assert owl_schedule([2.0, 2.0, 2.0], 0.3) == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("channels_first", [False, True])
def test_ratio_schedule_meets_the_budget_and_follows_the_schedule(channels_first):
    from struprune_plugin.allocation import allocate_ratio_schedule, slimgpt_schedule

    geometries = [LayerGeometry(64, 8, 2, 8, 96 + 32 * (i % 2), 2, False, False, 0) for i in range(6)]
    spaces = {
        "heads": [unit_space("heads", g, "query") for g in geometries],
        "mlp": [unit_space("mlp", g, "query") for g in geometries],
    }
    total = sum(s.n * s.cost for kind in spaces.values() for s in kind)
    ratios = slimgpt_schedule(6, 0.3)
    counts = allocate_ratio_schedule(spaces, total, 0.3, ratios, channels_first)
    removed = sum(c * s.cost for kind in spaces for c, s in zip(counts[kind], spaces[kind]))
    assert abs(removed - 0.3 * total) <= spaces["mlp"][0].cost  # exact to one MLP channel
    per_layer = [
        sum(counts[k][i] * spaces[k][i].cost for k in spaces)
        / sum(spaces[k][i].n * spaces[k][i].cost for k in spaces)
        for i in range(6)
    ]
    assert per_layer[0] < per_layer[2] < per_layer[5]  # later layers pruned more
