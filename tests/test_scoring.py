"""Group scores against a direct, loop-based computation over each group's weights."""

from __future__ import annotations

import pytest
import torch

from struprune_plugin.groups import LayerGeometry, choose_heads, query_heads_of_kv
from struprune_plugin.scoring import LayerInputs, head_scores, mlp_channel_scores

torch.manual_seed(0)
H, N_MLP, NQ, NKV, HD = 12, 10, 6, 2, 4
W = {
    "gate": torch.randn(N_MLP, H),
    "up": torch.randn(N_MLP, H),
    "down": torch.randn(H, N_MLP),
    "q": torch.randn(NQ * HD, H),
    "k": torch.randn(NKV * HD, H),
    "v": torch.randn(NKV * HD, H),
    "o": torch.randn(H, NQ * HD),
}
NORMS = LayerInputs(
    attn_in=torch.rand(H) + 0.1,
    o_in=torch.rand(NQ * HD) + 0.1,
    mlp_in=torch.rand(H) + 0.1,
    mlp_hidden=torch.rand(N_MLP) + 0.1,
)


def _group_score(method, pieces):
    """pieces: list of (weights [*], matching input norms [*]) covering the group."""
    if method == "magnitude":
        return torch.cat([w.flatten() for w, _ in pieces]).pow(2).sum().sqrt()
    return sum((w.abs() * n).sum() for w, n in pieces)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp"])
def test_mlp_channel_scores(method):
    got = mlp_channel_scores(method, [W["gate"], W["up"]], W["down"], NORMS)
    for j in range(N_MLP):
        pieces = [
            (W["gate"][j], NORMS.mlp_in),
            (W["up"][j], NORMS.mlp_in),
            (W["down"][:, j], NORMS.mlp_hidden[j]),
        ]
        assert got[j] == pytest.approx(_group_score(method, pieces).item(), rel=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp"])
def test_head_scores(method):
    rows = lambda h: slice(h * HD, (h + 1) * HD)  # noqa: E731
    query = head_scores(method, "query", W["q"], W["k"], W["v"], W["o"], HD, NORMS)
    groups = head_scores(method, "kv_group", W["q"], W["k"], W["v"], W["o"], HD, NORMS)

    def q_pieces(h):
        return [(W["q"][rows(h)], NORMS.attn_in), (W["o"][:, rows(h)], NORMS.o_in[rows(h)])]

    for h in range(NQ):
        assert query[h] == pytest.approx(_group_score(method, q_pieces(h)).item(), rel=1e-5)
    for g in range(NKV):
        pieces = [p for h in query_heads_of_kv([g], NQ // NKV) for p in q_pieces(h)]
        pieces += [(W["k"][rows(g)], NORMS.attn_in), (W["v"][rows(g)], NORMS.attn_in)]
        assert groups[g] == pytest.approx(_group_score(method, pieces).item(), rel=1e-5)


def test_query_heads_removed_evenly_and_lowest_first():
    g = LayerGeometry(
        hidden=H,
        num_heads=NQ,
        num_kv_heads=NKV,
        head_dim=HD,
        intermediate=N_MLP,
        mlp_in_count=2,
        mlp_in_bias=False,
        qkv_bias=False,
        prunable_params=0,
    )
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])  # group 0: heads 0-2, group 1: heads 3-5
    kept, kv = choose_heads("query", scores, 2, g)
    assert kept == [0, 2, 4, 5] and kv == [0, 1]  # lowest of each group (1 and 3) removed
    kept, kv = choose_heads("kv_group", torch.tensor([1.0, 2.0]), 1, g)
    assert kv == [1] and kept == [3, 4, 5]
