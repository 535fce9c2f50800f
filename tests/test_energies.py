"""Group energies against the removal error computed directly on the activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from struprune_plugin.energies import head_energy, layer_energy, mlp_channel_energy, normalise
from struprune_plugin.stats import FeatureMoments

torch.manual_seed(0)
TOKENS, HIDDEN, WIDTH, HEADS, KV, HD = 300, 12, 10, 4, 2, 3


def _fake_layer(p_hidden: torch.Tensor, a: torch.Tensor):
    from struprune_plugin.energies import LayerMoments

    def moments(x):
        m = FeatureMoments()
        for chunk in x.split(70):
            m.add(chunk)
        return m

    x = torch.randn(TOKENS, HIDDEN)
    return LayerMoments.from_stats(
        {"attn_in": moments(x), "o_in": moments(a), "mlp_in": moments(x), "mlp_hidden": moments(p_hidden)}
    )


def test_obs_energy_is_the_exact_error_of_removing_one_channel():
    down = nn.Linear(WIDTH, HIDDEN, bias=False)
    p = torch.randn(TOKENS, WIDTH) * torch.linspace(0.5, 3, WIDTH) + 1.0
    moments = _fake_layer(p, torch.randn(TOKENS, HEADS * HD))
    energy = mlp_channel_energy("obs", [], down.weight, moments)
    with torch.no_grad():
        for j in range(WIDTH):
            masked = p.clone()
            masked[:, j] = 0
            err = (down(p) - down(masked)).pow(2).sum()
            assert energy[j] == pytest.approx(err.item(), rel=1e-4)


def test_flap_energy_is_the_error_left_after_bias_compensation():
    down = nn.Linear(WIDTH, HIDDEN, bias=True)
    p = torch.randn(TOKENS, WIDTH) * 2 + torch.linspace(-3, 3, WIDTH)
    moments = _fake_layer(p, torch.randn(TOKENS, HEADS * HD))
    energy = mlp_channel_energy("flap", [], down.weight, moments)
    with torch.no_grad():
        for j in range(WIDTH):
            compensated = nn.Linear(WIDTH, HIDDEN)
            compensated.weight.copy_(down.weight)
            compensated.weight[:, j] = 0
            compensated.bias.copy_(down.bias + down.weight[:, j] * p[:, j].mean())
            err = (down(p) - compensated(p)).pow(2).sum()
            assert energy[j] == pytest.approx(err.item(), rel=1e-3)


def test_head_energies_sum_their_channels_and_groups():
    o = torch.randn(HIDDEN, HEADS * HD)
    a = torch.randn(TOKENS, HEADS * HD) + 0.5
    moments = _fake_layer(torch.randn(TOKENS, WIDTH), a)
    q, k, v = torch.randn(HEADS * HD, HIDDEN), torch.randn(KV * HD, HIDDEN), torch.randn(KV * HD, HIDDEN)
    per_head = head_energy("obs", "query", q, k, v, o, HD, moments)
    for h in range(HEADS):
        cols = range(h * HD, (h + 1) * HD)
        direct = sum(o[:, c].pow(2).sum() * a[:, c].pow(2).sum() for c in cols)
        assert per_head[h] == pytest.approx(direct.item(), rel=1e-4)
    groups = head_energy("obs", "kv_group", q, k, v, o, HD, moments)
    assert torch.allclose(groups, per_head.reshape(KV, -1).sum(1))


def test_layer_energy_and_normalisation():
    assert layer_energy(torch.tensor([2.0, 4.0]), 3) == pytest.approx(1.0)
    z = normalise([1.0, 10.0, 100.0])
    assert z == pytest.approx([-1.0, 0.0, 1.0])  # log spacing is even, then standardised
    assert normalise([5.0, 5.0]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise([1.0], "softmax")
