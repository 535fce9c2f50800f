"""Every allocation rule behind the one interface: exact budgets through the engine, what each
rule's counts must look like, and clear errors for bad combinations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import VOCAB, make_model
from struprune_plugin.allocation import slimgpt_schedule
from struprune_plugin.allocators import ALLOCATIONS, REGISTRY, Allocator, LayerMeasurements, layer_masses
from struprune_plugin.architectures import geometry_of, model_view
from struprune_plugin.engine import PruneConfig, allocate_layers, make_allocator, prune_model, unit_spaces
from struprune_plugin.errors import StructPruneError


def _spaces(layers=6, config=None):
    model = make_model("llama", layers=layers)
    return unit_spaces(
        [geometry_of(lv) for lv in model_view(model).layer_views()], config or PruneConfig(mlp_round_to=1)
    )


@pytest.mark.parametrize("allocation", [a for a in ALLOCATIONS if a != "threshold"])
def test_every_allocation_prunes_to_the_exact_budget(allocation):
    model = make_model("llama", layers=4, seed=7)
    calib = torch.randint(0, VOCAB, (6, 24))
    config = PruneConfig(
        sparsity=0.4,
        allocation=allocation,
        temperature=1.0,
        batch_size=3,
        energy_samples=4,
        equal_widths=False,  # the rule's own counts (uniform would otherwise get equal widths)
    )
    result = prune_model(model, calib, config, progress=False)
    geometry = geometry_of(model_view(model).layer(0))
    assert (
        abs(result.achieved_sparsity - 0.4)
        <= result.config.mlp_round_to * geometry.mlp_channel_cost / result.prunable_before
    )
    assert result.allocation["allocation"] == allocation
    if allocation.startswith("kl"):
        assert len(result.allocation["sensitivity"]["kl"]) == 4
        assert result.allocation["sensitivity"]["levels"] == [0.2, 0.4, 0.6]


def test_auto_allocation_is_the_bounded_relative_softmax_and_uniform_at_infinite_temperature():
    default = make_allocator(PruneConfig())
    assert (default.name, default.temperature) == ("energy-relative", 1.0)
    assert (default.relative_deviation, default.max_deviation) == (0.2, None)
    assert make_allocator(PruneConfig(temperature=math.inf)).name == "uniform"
    # a stock checkpoint (the same widths everywhere) asks for uniform ratios
    assert make_allocator(PruneConfig(equal_widths=True)).name == "uniform"
    with pytest.raises(StructPruneError, match="equal_widths"):
        PruneConfig(equal_widths=True, allocation="energy-relative").validate()
    assert make_allocator(PruneConfig(temperature=2.0)).temperature == 2.0
    # the user's own trust region (or none) wins over auto's
    absolute = make_allocator(PruneConfig(allocation_options={"max_deviation": 0.2}))
    assert (absolute.max_deviation, absolute.relative_deviation) == (0.2, None)
    wider = make_allocator(PruneConfig(allocation_options={"relative_deviation": 0.3}))
    assert wider.relative_deviation == 0.3
    assert make_allocator(PruneConfig(allocation="energy-relative")).max_deviation is None
    assert make_allocator(PruneConfig(method="energy-threshold")).name == "threshold"
    assert make_allocator(PruneConfig(allocation="kl", temperature=0.5)).temperature == 0.5


def test_refresh_energies_needs_the_absolute_energy_rule():
    with pytest.raises(StructPruneError, match="allocation='energy'"):
        PruneConfig(refresh_energies=True).validate()
    PruneConfig(refresh_energies=True, allocation="energy").validate()


def test_an_allocator_instance_is_used_as_given():
    class EveryOther(Allocator):
        name = "every-other"

        def allocate(self, measured, target, channels_first):
            ratios = [0.0 if i % 2 else 1.0 for i in range(measured.num_layers)]
            from struprune_plugin.allocation import schedule_budget

            return schedule_budget(measured.spaces, ratios, target, channels_first)

    model = make_model("llama", layers=4, seed=1)
    result = prune_model(
        model,
        torch.randint(0, VOCAB, (4, 16)),
        PruneConfig(sparsity=0.3, allocation=EveryOther(), units=("mlp",)),
        progress=False,
    )
    widths = [r.mlp[1] for r in result.layers]
    assert widths[1] == widths[3] == result.layers[1].mlp[0]  # odd layers untouched
    assert widths[0] < result.layers[0].mlp[0]


def test_slimgpt_prunes_early_layers_least_and_hits_the_budget():
    spaces = _spaces(8, PruneConfig(units=("mlp",), mlp_round_to=1))
    target = 0.3 * sum(layer_masses(spaces))
    counts = REGISTRY["slimgpt"]().allocate(LayerMeasurements(spaces), target, False)["mlp"]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    cost = spaces["mlp"][0].cost
    assert abs(sum(counts) * cost - target) <= cost
    expected = slimgpt_schedule(8, 0.3)
    n = spaces["mlp"][0].n
    assert all(abs(c - r * n) <= 1.0 for c, r in zip(counts, expected))


def test_slimgpt_spans_only_the_layers_not_skipped():
    spaces = _spaces(6, PruneConfig(units=("mlp",), skip_layers=(0,)))
    target = 0.3 * sum(layer_masses(spaces)[1:])
    counts = REGISTRY["slimgpt"]().allocate(LayerMeasurements(spaces), target, False)["mlp"]
    assert counts[0] == 0 and counts[1:] == sorted(counts[1:])


def test_owl_moves_pruning_away_from_outlier_layers_within_lambda():
    spaces = _spaces(4, PruneConfig(units=("mlp",), mlp_round_to=1))
    measured = LayerMeasurements(spaces, outlier_ratios=[0.01, 0.05, 0.02, 0.03])
    target = 0.4 * sum(layer_masses(spaces))
    counts = REGISTRY["owl"](lam=0.08).allocate(measured, target, False)["mlp"]
    n = spaces["mlp"][0].n
    ratios = [c / n for c in counts]
    assert ratios[1] == min(ratios) and ratios[0] == max(ratios)
    assert max(ratios) - min(ratios) == pytest.approx(0.16, abs=2 / n)


def test_relative_energy_divides_by_the_stream():
    spaces = _spaces(4, PruneConfig(units=("mlp",), mlp_round_to=1))
    energies = {"mlp": [1.0, 2.0, 4.0, 8.0]}
    stream = [1.0, 2.0, 4.0, 8.0]  # the same relative energy everywhere: uniform
    measured = LayerMeasurements(spaces, energies=energies, stream_energy=stream)
    target = 0.3 * sum(layer_masses(spaces))
    relative = REGISTRY["energy-relative"](temperature=0.5).allocate(measured, target, False)["mlp"]
    assert max(relative) - min(relative) <= 1
    absolute = REGISTRY["energy"](temperature=0.5).allocate(measured, target, False)["mlp"]
    assert absolute[0] > absolute[-1] + 5  # low absolute energy early: pruned most


def test_relative_energy_trust_region_reaches_the_rule():
    spaces = _spaces(4, PruneConfig(units=("mlp",), mlp_round_to=1))
    measured = LayerMeasurements(spaces, energies={"mlp": [1.0, 50.0, 4.0, 8.0]}, stream_energy=[1.0] * 4)
    target = 0.3 * sum(layer_masses(spaces))
    n = spaces["mlp"][0].n
    free = REGISTRY["energy-relative"](temperature=0.5).allocate(measured, target, False)["mlp"]
    rule = make_allocator(
        PruneConfig(allocation="energy-relative", temperature=0.5, allocation_options={"max_deviation": 0.05})
    )
    boxed = rule.allocate(measured, target, False)["mlp"]
    assert max(free) / n - min(free) / n > 0.1
    assert all(0.25 - 1 / n <= c / n <= 0.35 + 1 / n for c in boxed)
    assert boxed[1] == min(boxed)  # the energies still rank the layers


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.6])
def test_relative_trust_region_is_the_absolute_one_scaled_by_the_mean_kept_share(sparsity):
    """relative_deviation r bounds each layer's kept share to (1 +- r) x the mean kept share: the
    same counts as max_deviation = r x (1 - sparsity), and every share within that box."""
    spaces = _spaces(5, PruneConfig(units=("mlp",), mlp_round_to=1))
    measured = LayerMeasurements(
        spaces, energies={"mlp": [1.0, 50.0, 4.0, 8.0, 0.5]}, stream_energy=[1.0] * 5
    )
    target = sparsity * sum(layer_masses(spaces))
    n = spaces["mlp"][0].n
    relative = make_allocator(
        PruneConfig(
            allocation="energy-relative", temperature=0.5, allocation_options={"relative_deviation": 0.2}
        )
    ).allocate(measured, target, False)["mlp"]
    absolute = REGISTRY["energy-relative"](temperature=0.5, max_deviation=0.2 * (1 - sparsity)).allocate(
        measured, target, False
    )["mlp"]
    assert relative == absolute
    keep = [1 - c / n for c in relative]
    mean = 1 - sparsity
    assert all(0.8 * mean - 1 / n <= k <= 1.2 * mean + 1 / n for k in keep), keep
    assert max(keep) - min(keep) > 0.3 * mean  # the box binds: the energies spread the layers
    assert sum(relative) == pytest.approx(target / spaces["mlp"][0].cost, abs=1)


def test_trust_region_settings_are_checked():
    with pytest.raises(StructPruneError, match="not both"):
        PruneConfig(
            allocation="energy-relative",
            allocation_options={"max_deviation": 0.1, "relative_deviation": 0.2},
        ).validate()
    with pytest.raises(StructPruneError, match="relative_deviation must be"):
        PruneConfig(allocation="kl", allocation_options={"relative_deviation": 1.5}).validate()
    with pytest.raises(StructPruneError, match="max_deviation instead"):
        PruneConfig(
            allocation="energy", refresh_energies=True, allocation_options={"relative_deviation": 0.2}
        ).validate()


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_depth_prior_alone_prunes_deeper_layers_more_within_the_box(sparsity):
    """Equal relative energies leave only the depth prior: removals never fall with depth, the
    first layer sits on the box's ceiling of kept share and the last on its floor, budget exact."""
    layers = 8
    spaces = _spaces(layers, PruneConfig(units=("mlp",), mlp_round_to=1))
    measured = LayerMeasurements(spaces, energies={"mlp": [2.0] * layers}, stream_energy=[1.0] * layers)
    target = sparsity * sum(layer_masses(spaces))
    n = spaces["mlp"][0].n
    plain = REGISTRY["energy-relative"](relative_deviation=0.2).allocate(measured, target, False)["mlp"]
    assert max(plain) - min(plain) <= 1  # no prior: uniform
    counts = REGISTRY["energy-relative"](relative_deviation=0.2, depth_prior=1.0).allocate(
        measured, target, False
    )["mlp"]
    assert all(a <= b + 1 for a, b in itertools.pairwise(counts)), counts  # +1: integer rounding
    keep = [1 - c / n for c in counts]
    mean = 1 - sparsity
    assert keep[0] == pytest.approx(1.2 * mean, abs=1 / n)
    assert keep[-1] == pytest.approx(0.8 * mean, abs=1 / n)
    assert sum(counts) == pytest.approx(target / spaces["mlp"][0].cost, abs=1)


def test_depth_prior_weighs_against_the_energies():
    """Energies rising with depth keep the late layers; a strong depth prior reverses that order,
    a weak one only tempers it. Every layer stays inside the box and the budget is exact."""
    layers = 6
    spaces = _spaces(layers, PruneConfig(units=("mlp",), mlp_round_to=1))
    energies = {"mlp": [float(2**i) for i in range(layers)]}
    measured = LayerMeasurements(spaces, energies=energies, stream_energy=[1.0] * layers)
    target = 0.5 * sum(layer_masses(spaces))

    def counts(prior: float) -> list[int]:
        rule = make_allocator(
            PruneConfig(
                allocation="energy-relative",
                allocation_options={"relative_deviation": 0.2, "depth_prior": prior},
            )
        )
        return rule.allocate(measured, target, False)["mlp"]

    none, weak, strong = counts(0.0), counts(0.3), counts(10.0)
    assert none[0] > none[-1] and strong[0] < strong[-1]
    assert none[0] - none[-1] >= weak[0] - weak[-1]
    for c in (none, weak, strong):
        assert sum(c) == pytest.approx(target / spaces["mlp"][0].cost, abs=1)


def test_depth_prior_settings_are_checked():
    for bad in (-1.0, math.inf, "deep", True):  # a bool is not a weight (True == 1)
        with pytest.raises(StructPruneError, match="depth_prior must be"):
            PruneConfig(allocation="energy-relative", allocation_options={"depth_prior": bad}).validate()
    with pytest.raises(StructPruneError, match="depth prior"):
        PruneConfig(
            allocation="energy", refresh_energies=True, allocation_options={"depth_prior": 1}
        ).validate()


def test_kl_rules_prune_the_least_sensitive_layers_most():
    from struprune_plugin.allocators import SensitivityCurves

    spaces = _spaces(4, PruneConfig(units=("mlp",), mlp_round_to=1))
    kl = [[3.0, 9.0, 18.0], [0.1, 0.3, 0.6], [0.5, 1.5, 3.0], [0.2, 0.6, 1.2]]
    measured = LayerMeasurements(spaces, sensitivity=SensitivityCurves([0.15, 0.3, 0.45], kl, tokens=1))
    target = 0.3 * sum(layer_masses(spaces))
    for rule in (REGISTRY["kl"](temperature=1.0), REGISTRY["kl-knapsack"]()):
        counts = rule.allocate(measured, target, False)["mlp"]
        assert counts[1] == max(counts) and counts[0] == min(counts), rule.name
        assert abs(sum(counts) * spaces["mlp"][0].cost - target) <= spaces["mlp"][0].cost
    uniform = REGISTRY["kl"](temperature=math.inf).allocate(measured, target, False)["mlp"]
    assert max(uniform) - min(uniform) <= 1


def test_bad_allocation_settings_name_the_fix():
    with pytest.raises(StructPruneError, match="unknown allocation"):
        PruneConfig(allocation="owl2").validate()
    with pytest.raises(StructPruneError, match="allocation='auto'"):
        PruneConfig(method="flap", allocation="owl").validate()
    with pytest.raises(StructPruneError, match="equal_widths"):
        PruneConfig(allocation="slimgpt", equal_widths=True).validate()
    with pytest.raises(StructPruneError, match="refresh_energies"):
        PruneConfig(allocation="kl", temperature=1.0, refresh_energies=True).validate()
    with pytest.raises(StructPruneError, match=r"no setting 'lam'.*max_deviation"):
        PruneConfig(allocation="kl-knapsack", allocation_options={"lam": 0.1}).validate()
    with pytest.raises(StructPruneError, match="max_deviation must be a share"):
        PruneConfig(allocation="kl-knapsack", allocation_options={"max_deviation": 2}).validate()


def test_allocation_options_reach_the_rule():
    rule = make_allocator(PruneConfig(allocation="owl", allocation_options={"lam": 0.05}))
    assert rule.lam == 0.05
    rule = make_allocator(
        PruneConfig(allocation="kl", temperature=2.0, allocation_options={"level_multiples": [1.0]})
    )
    assert (rule.temperature, rule.level_multiples) == (2.0, (1.0,))


def test_allocate_layers_gives_the_engines_counts_for_measured_rules():
    model = make_model("llama", layers=4, seed=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(sparsity=0.35, allocation="kl-knapsack", batch_size=2)
    counts, _ = allocate_layers(model, calib, config)
    result = prune_model(model, calib, config, progress=False)
    assert [r.mlp[0] - r.mlp[1] for r in result.layers] == counts["mlp"]


def test_allocate_layers_gives_the_engines_equal_widths_for_uniform():
    """The Torch-Pruning adapter calls allocate_layers: with the uniform config it must give the
    engine's equal widths, not per-layer rounding of the exact budget."""
    model = make_model("llama", layers=4, seed=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(sparsity=0.33, batch_size=2, admm_iterations=0, temperature=math.inf)
    counts, _ = allocate_layers(model, calib, config)
    exact, _ = allocate_layers(
        model, calib, PruneConfig(sparsity=0.33, equal_widths=False, temperature=math.inf)
    )
    assert len(set(exact["mlp"])) > 1, "pick a sparsity whose exact budget differs per layer"
    result = prune_model(model, calib, config, progress=False)
    assert [r.mlp[0] - r.mlp[1] for r in result.layers] == counts["mlp"]
    assert len(set(counts["mlp"])) == 1


def test_allocate_layers_gives_the_engines_counts_for_the_default():
    """The default (relative-energy softmax in its trust region) allocates per layer; the counts
    the Torch-Pruning adapter reads are the ones the engine prunes, and each layer's keep share
    stays within the trust region around the mean (0.8 to 1.2 times it)."""
    model = make_model("llama", layers=4, seed=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    config = PruneConfig(sparsity=0.4, batch_size=2, admm_iterations=0)
    counts, _ = allocate_layers(model, calib, config)
    assert len(set(counts["mlp"])) > 1, "the default allocates per layer"
    result = prune_model(model, calib, config, progress=False)
    assert [r.mlp[0] - r.mlp[1] for r in result.layers] == counts["mlp"]
    assert [r.heads[0] - r.heads[1] for r in result.layers] == counts["heads"]
    layer_params = result.prunable_before / len(result.layers)
    keep = [1 - r.removed_params / layer_params for r in result.layers]
    mean = sum(keep) / len(keep)
    assert max(abs(k / mean - 1) for k in keep) <= 0.2 + 0.08  # + one step of rounding
    assert result.achieved_sparsity == pytest.approx(0.4, abs=0.02)
