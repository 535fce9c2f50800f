"""ADMM block solver: every closed-form step equals a brute-force minimiser, and the whole solver
improves the pruned block's calibration loss as it iterates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from struprune_plugin.admm import (
    ADMMConfig,
    block_loss,
    p_update,
    refit_output_columns,
    ridge_solve,
    s_update,
    solve_gated_mlp,
    weight_update,
    z_update,
)

torch.manual_seed(0)


def _minimise(loss_fn, init: torch.Tensor, steps: int = 500) -> torch.Tensor:
    """Independent reference: L-BFGS on the objective itself (autograd), float64."""
    v = init.clone().double().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [v], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        value = loss_fn(v)
        value.backward()
        return value

    opt.step(closure)
    return v.detach()


def test_ridge_solve_is_least_squares():
    a, t = torch.randn(200, 6, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    gram = a.T @ a
    got = ridge_solve(t.T @ a, gram, damping=0.0)
    ref = torch.linalg.lstsq(a, t).solution.T
    assert torch.allclose(got, ref, atol=1e-9)


def test_channel_ridge_is_least_squares_on_an_augmented_system():
    """scale="channel" solves min ||T - A W^T||^2 + damping * sum_j G_jj ||W[:, j]||^2: ordinary
    least squares on A stacked over diag(sqrt(damping * G_jj)) against T stacked over zeros."""
    a = torch.randn(200, 6, dtype=torch.float64) * torch.tensor(
        [1.0, 30.0, 0.1, 2.0, 1.0, 5.0], dtype=torch.float64
    )
    t = torch.randn(200, 3, dtype=torch.float64)
    gram, damping = a.T @ a, 0.3
    got = ridge_solve(t.T @ a, gram, damping, scale="channel")
    stacked = torch.cat([a, torch.diag((damping * gram.diagonal()).sqrt())])
    ref = torch.linalg.lstsq(stacked, torch.cat([t, torch.zeros(6, 3, dtype=torch.float64)])).solution.T
    assert torch.allclose(got, ref, atol=1e-9)
    # the classic ridge is the same system with every channel damped by the mean diagonal
    got_mean = ridge_solve(t.T @ a, gram, damping, scale="mean")
    stacked = torch.cat([a, (damping * gram.diagonal().mean()).sqrt() * torch.eye(6, dtype=torch.float64)])
    ref = torch.linalg.lstsq(stacked, torch.cat([t, torch.zeros(6, 3, dtype=torch.float64)])).solution.T
    assert torch.allclose(got_mean, ref, atol=1e-9)


def test_channel_ridge_is_scale_free():
    """Rescaling one input channel by c rescales its fitted weights by 1/c under the per-channel
    ridge, and leaves the others alone; the mean-scaled ridge moves every weight."""
    a, t = torch.randn(300, 5, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64)
    scaled = a.clone()
    scaled[:, 1] *= 40.0
    for scale, invariant in (("channel", True), ("mean", False)):
        w = ridge_solve(t.T @ a, a.T @ a, 0.5, scale=scale)
        v = ridge_solve(t.T @ scaled, scaled.T @ scaled, 0.5, scale=scale)
        v[:, 1] *= 40.0
        assert torch.allclose(w, v, atol=1e-10) == invariant


def test_channel_ridge_survives_a_dead_channel():
    """A channel with no signal (zero second moment) gets a floor, so the solve stays finite."""
    a, t = torch.randn(100, 4, dtype=torch.float64), torch.randn(100, 2, dtype=torch.float64)
    a[:, 2] = 0
    w = ridge_solve(t.T @ a, a.T @ a, 0.01, scale="channel")
    assert torch.isfinite(w).all() and torch.equal(w[:, 2], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="ridge scale"):
        ridge_solve(t.T @ a, a.T @ a, 0.01, scale="diag")


def test_weight_update_matches_autograd():
    n, d, m = 150, 5, 4
    a, t = torch.randn(n, d, dtype=torch.float64), torch.randn(n, m, dtype=torch.float64)
    anchor, weight, rho = torch.randn(m, d, dtype=torch.float64), 0.7, 0.4
    got = weight_update(t.T @ a / n, a.T @ a / n, anchor, weight, rho)
    ref = _minimise(
        lambda w: weight * (t - a @ w.T).pow(2).sum() / n + rho / 2 * (w - anchor).pow(2).sum(),
        torch.zeros(m, d),
    )
    assert torch.allclose(got, ref, atol=1e-6)


def test_p_update_matches_autograd():
    y, w, act = (
        torch.randn(30, 4, dtype=torch.float64),
        torch.randn(4, 6, dtype=torch.float64),
        torch.randn(30, 6),
    )
    got = p_update(y, w, act, beta=1.3, gamma=0.6)
    ref = _minimise(
        lambda p: 1.3 * (y - p @ w.T).pow(2).sum() + 0.6 * (p - act.double()).pow(2).sum(), torch.zeros(30, 6)
    )
    assert torch.allclose(got, ref, atol=1e-6)


def test_z_update_matches_autograd():
    m, sigma, p = (
        torch.randn(20, 5, dtype=torch.float64),
        torch.randn(20, 5, dtype=torch.float64),
        torch.randn(20, 5),
    )
    got = z_update(m, sigma, p.double(), alpha=0.8, gamma=1.7)
    ref = _minimise(lambda z: 0.8 * (z - m).pow(2).sum() + 1.7 * (p.double() - sigma * z).pow(2).sum(), m)
    assert torch.allclose(got, ref, atol=1e-6)


def test_s_update_decreases_its_objective():
    target, z, p = (
        torch.randn(50, 8, dtype=torch.float64),
        torch.randn(50, 8, dtype=torch.float64),
        torch.randn(50, 8),
    )
    objective = lambda s: float((target - s).pow(2).sum() + (p.double() - F.silu(s) * z).pow(2).sum())  # noqa: E731
    s0 = target + torch.randn_like(target)
    values = [objective(s_update(s0, target, z, p.double(), 1.0, 1.0, steps)) for steps in (0, 1, 3, 10)]
    assert values == sorted(values, reverse=True) and values[-1] < values[0]


def test_refit_output_columns_is_least_squares_on_kept_inputs():
    a, w = torch.randn(300, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    keep = [0, 2, 3, 7]
    got, shift = refit_output_columns(w, a.T @ a, keep, damping=0.0)
    assert shift is None
    ref = torch.linalg.lstsq(a[:, keep], a @ w.T).solution.T
    assert torch.allclose(got, ref, atol=1e-8)


def _problem(seed=0, n=1500, d=24, width=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) * 0.5
    return (
        x,
        torch.randn(width, d, generator=gen) / d**0.5,
        torch.randn(width, d, generator=gen) / d**0.5,
        torch.randn(d, width, generator=gen) / width**0.5,
    )


def test_no_pruning_leaves_the_block_unchanged():
    x, wg, wu, wd = _problem()
    sol = solve_gated_mlp(x, wg, wu, wd, keep=wd.shape[1])
    assert sol.keep == list(range(wd.shape[1]))
    assert torch.equal(sol.w_gate, wg) and torch.equal(sol.w_up, wu) and torch.equal(sol.w_down, wd)


@pytest.mark.parametrize("seed", [0, 1])
def test_more_iterations_never_hurt_and_beat_projection(seed):
    x, wg, wu, wd = _problem(seed)
    losses = [
        solve_gated_mlp(x, wg, wu, wd, keep=32, cfg=ADMMConfig(iterations=t)).history[-1]
        for t in (0, 1, 4, 8)
    ]
    assert losses == sorted(losses, reverse=True), losses
    y = F.silu(x @ wg.T) * (x @ wu.T) @ wd.T
    plain = solve_gated_mlp(x, wg, wu, wd, keep=32, cfg=ADMMConfig(iterations=0, refit=False))
    assert plain.history[-1] == pytest.approx(
        block_loss(x, y, wg[plain.keep], wu[plain.keep], wd[:, plain.keep]), rel=1e-6
    )
    assert losses[-1] < 0.95 * plain.history[-1]  # ADMM + refit clearly beats projection alone


def test_high_sparsity_stays_finite():
    x, wg, wu, wd = _problem(3)
    sol = solve_gated_mlp(x * 50, wg, wu, wd, keep=4, cfg=ADMMConfig(iterations=8))
    assert all(torch.isfinite(t).all() for t in (sol.w_gate, sol.w_up, sol.w_down))


def test_refit_with_intercept_is_least_squares_with_a_ones_column():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(300, 10, generator=gen, dtype=torch.float64) + torch.linspace(
        -1, 2, 10, dtype=torch.float64
    )
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    keep = [1, 2, 5, 8]
    n = a.shape[0]
    got, shift = refit_output_columns(w, a.T @ a / n, keep, damping=0.0, mean_in=a.mean(0))
    design = torch.cat([a[:, keep], torch.ones(n, 1, dtype=a.dtype)], 1)
    ref = torch.linalg.lstsq(design, a @ w.T).solution.T
    assert torch.allclose(got, ref[:, :-1], atol=1e-8)
    assert torch.allclose(shift, ref[:, -1], atol=1e-8)


def test_gated_mlp_intercept_refit_never_loses_to_the_plain_one():
    x, wg, wu, wd = _problem(5)
    x = x + 0.7  # non-centred inputs: a bias has something to absorb
    y = F.silu(x @ wg.T) * (x @ wu.T) @ wd.T
    plain = solve_gated_mlp(x, wg, wu, wd, keep=24, cfg=ADMMConfig(iterations=2))
    fitted = solve_gated_mlp(x, wg, wu, wd, keep=24, cfg=ADMMConfig(iterations=2, intercept=True))
    assert plain.keep == fitted.keep and plain.down_bias_shift is None
    loss = block_loss(x, y, fitted.w_gate, fitted.w_up, fitted.w_down, fitted.down_bias_shift)
    assert loss == pytest.approx(fitted.history[-1], rel=1e-5)
    assert loss < plain.history[-1]


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activation_values_and_slopes_match_autograd(name):
    from struprune_plugin.admm import ACTIVATIONS

    act = ACTIVATIONS[name]
    s = torch.linspace(-7, 7, 1001, dtype=torch.float64).requires_grad_(True)
    reference = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu,
    }[name](s)
    (slope,) = torch.autograd.grad(reference.sum(), s)
    value, got_slope = act.value_and_slope(s.detach())
    torch.testing.assert_close(value, reference.detach())
    torch.testing.assert_close(got_slope, slope, atol=1e-10, rtol=1e-9)
    assert float(got_slope.pow(2).max()) <= act.slope_sq_bound  # the step size relies on it


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu"])
def test_s_update_decreases_its_objective_for_every_activation(name):
    from struprune_plugin.admm import ACTIVATIONS

    act = ACTIVATIONS[name]
    gen = torch.Generator().manual_seed(1)
    target, z, p = (torch.randn(50, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    objective = lambda s: float((target - s).pow(2).sum() + (p - act.fn(s) * z).pow(2).sum())  # noqa: E731
    s0 = target + torch.randn(50, 8, generator=gen, dtype=torch.float64)
    values = [objective(s_update(s0, target, z, p, 1.0, 1.0, steps, act)) for steps in (0, 1, 3, 10)]
    assert values == sorted(values, reverse=True) and values[-1] < 0.9 * values[0]


@pytest.mark.parametrize(
    ("hidden_act", "name"), [("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"), ("relu", "relu")]
)
def test_solver_is_exact_for_the_layers_own_activation(hidden_act, name):
    """The solver's loss is the real module's loss (transformers' own MLP with that activation, an
    independent computation), and solving under the right activation beats solving under SiLU."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from struprune_plugin.architectures import mlp_activation

    x, wg, wu, wd = _problem(2)

    def mlp_of(width):
        config = LlamaConfig(
            hidden_size=wg.shape[1], num_attention_heads=4, intermediate_size=width, hidden_act=hidden_act
        )
        return LlamaMLP(config)

    mlp = mlp_of(wg.shape[0])
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(wg), mlp.up_proj.weight.copy_(wu), mlp.down_proj.weight.copy_(wd)
        y = mlp(x)
    layer = torch.nn.Module()
    layer.mlp = mlp
    assert mlp_activation(layer, "llama") == name

    def real_loss(sol):
        pruned = mlp_of(len(sol.keep))
        with torch.no_grad():
            pruned.gate_proj.weight.copy_(sol.w_gate), pruned.up_proj.weight.copy_(sol.w_up)
            pruned.down_proj.weight.copy_(sol.w_down)
            return float((y - pruned(x)).double().pow(2).sum() / x.shape[0])

    right = solve_gated_mlp(x, wg, wu, wd, keep=32, cfg=ADMMConfig(iterations=4, activation=name))
    wrong = solve_gated_mlp(x, wg, wu, wd, keep=32, cfg=ADMMConfig(iterations=4, activation="silu"))
    assert right.history[-1] == pytest.approx(real_loss(right), rel=1e-4)
    assert real_loss(right) < real_loss(wrong)
