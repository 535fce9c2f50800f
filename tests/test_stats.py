"""The hooked recorder's statistics against the same numbers computed from the raw activations."""

import torch
from torch import nn

from struprune_plugin.stats import InputRecorder


def test_recorder_sees_every_token_exactly_once():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    batches = [torch.randn(2, 5, 6), torch.randn(3, 4, 6)]
    with torch.no_grad(), InputRecorder({"x": linear}, 0, grams=("x",), keep_inputs=("x",)) as rec:
        for b in batches:
            linear(b)
    flat = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    stats = rec.stats["x"]
    assert stats.tokens == flat.shape[0] == 22
    torch.testing.assert_close(stats.sum_x, flat.sum(0))
    torch.testing.assert_close(stats.sum_sq, flat.pow(2).sum(0))
    torch.testing.assert_close(stats.gram, flat.T @ flat)
    torch.testing.assert_close(torch.cat(stats.inputs).double(), flat)
    torch.testing.assert_close(stats.variance().double(), flat.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    assert not linear._forward_pre_hooks  # hooks removed on exit
