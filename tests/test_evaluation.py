"""Perplexity protocol against HF's own loss computed window by window."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import VOCAB, make_model
from struprune_plugin.errors import CalibrationDataError
from struprune_plugin.evaluation import perplexity


def _hf_nll(model, window: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(input_ids=window[None], labels=window[None]).loss.item()
    return loss * (window.numel() - 1), window.numel() - 1


def test_non_overlapping_windows_match_hf_loss():
    model = make_model("llama")
    ids = torch.randint(0, VOCAB, (100,))
    got = perplexity(model, ids, seq_len=32, batch_size=2, progress=False)
    nll, n = 0.0, 0
    for b in range(0, 100 - 32 + 1, 32):  # 3 full windows, tail of 4 dropped
        a, c = _hf_nll(model, ids[b : b + 32])
        nll, n = nll + a, n + c
    assert got.windows == 3 and got.tokens == n
    assert got.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_bos_scores_every_text_token():
    model = make_model("llama")
    ids = torch.randint(3, VOCAB, (64,))
    got = perplexity(model, ids, seq_len=32, bos_token_id=1, progress=False)
    nll = 0.0
    for b in (0, 32):
        window = torch.cat([torch.tensor([1]), ids[b : b + 32]])
        nll += _hf_nll(model, window)[0]
    assert got.tokens == 64
    assert got.ppl == pytest.approx(math.exp(nll / 64), rel=1e-5)


def test_strided_windows_score_each_token_once():
    model = make_model("llama")
    ids = torch.randint(0, VOCAB, (80,))
    got = perplexity(model, ids, seq_len=32, stride=16, progress=False)
    # windows at 0,16,32,48: first scores 31 tokens, the others their last 16 each
    assert got.windows == 4 and got.tokens == 31 + 3 * 16
    with torch.no_grad():
        full = model(input_ids=ids[None, :32]).logits[0]
        nll = torch.nn.functional.cross_entropy(full[:-1], ids[1:32], reduction="sum").item()
        for b in (16, 32, 48):
            out = model(input_ids=ids[None, b : b + 32]).logits[0]
            nll += torch.nn.functional.cross_entropy(out[15:31], ids[b + 16 : b + 32], reduction="sum").item()
    assert got.ppl == pytest.approx(math.exp(nll / got.tokens), rel=1e-5)


def test_text_shorter_than_a_window():
    with pytest.raises(CalibrationDataError, match="shorter than one window"):
        perplexity(make_model("llama"), torch.arange(10), seq_len=32, progress=False)
