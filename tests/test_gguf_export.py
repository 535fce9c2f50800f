"""GGUF export run in a real llama.cpp (llama-cpp-python built from source, see
scripts/install_llama_cpp.sh): logits and greedy continuations against PyTorch's, for dense,
uniformly pruned and non-uniformly pruned models (both head units), plus the file's metadata and
the tokenizer, and the errors for what the format cannot express."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_TRAINED
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.errors import OutputExistsError
from struprune_plugin.export.gguf_model import GGUFExportError, export_gguf, permute_for_ggml_rope
from struprune_plugin.export.gguf_vocab import GGUFVocabularyError, pre_tokenizer_name
from struprune_plugin.export.llama_cpp_check import compare_with_torch, llama_cpp_logits, open_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python: bash scripts/install_llama_cpp.sh")

PROMPT = [1, 417, 1022, 88, 2500, 7, 3001, 12, 640, 9, 1500, 33]
NEW_TOKENS = 32


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TRAINED)


def _calib() -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = _tokenizer()(text, return_tensors="pt").input_ids[0]
    return ids[: 8 * 48].reshape(8, 48)


def _check_against_torch(folder, gguf_path, tol: float = 1e-4, prompt=PROMPT) -> None:
    result = compare_with_torch(load_pruned(folder, dtype=torch.float32), gguf_path, prompt, NEW_TOKENS)
    assert result["max_rel_logit_diff"] <= tol, result
    assert result["greedy_tokens_equal"] == NEW_TOKENS, result


def _pruned(tmp_path, name: str, **config):
    model = load_pruned(TINY_TRAINED)
    result = prune_model(model, _calib(), PruneConfig(admm_iterations=1, **config), progress=False)
    return save_pruned(result.model, tmp_path / name, tokenizer=_tokenizer())


def test_dense_tiny_model_matches_torch(tmp_path):
    info = export_gguf(TINY_TRAINED, tmp_path / "dense.gguf", "f32")
    assert info.architecture == "llama"
    _check_against_torch(TINY_TRAINED, info.path)


def test_uniformly_pruned_model_is_a_stock_llama_file(tmp_path):
    folder = _pruned(tmp_path, "uniform", method="structprune", sparsity=0.4, equal_widths=True)
    info = export_gguf(folder, tmp_path / "uniform.gguf", "f32")
    assert info.architecture == "llama" and len(set(info.feed_forward_length)) == 1
    _check_against_torch(folder, info.path)


@pytest.mark.parametrize("head_unit", ["query", "kv_group"])
def test_non_uniform_pruned_model_is_a_deci_file_that_matches_torch(tmp_path, head_unit):
    folder = _pruned(
        tmp_path,
        head_unit,
        method="structprune",
        sparsity=0.5,
        temperature=0.5,
        kind_split="ratio",
        head_unit=head_unit,
    )
    info = export_gguf(folder, tmp_path / f"{head_unit}.gguf", "f32")
    assert info.architecture == "deci"
    assert len(set(info.feed_forward_length)) > 1 or len(set(info.head_count)) > 1
    assert min(info.head_count) < 8  # heads were removed
    _check_against_torch(folder, info.path)


def test_q_and_k_rows_are_permuted_like_llama_cpps_converter():
    # GGML's RoPE rotates adjacent pairs; HF rotates the halves: row r of half h goes to 2r + h
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    out = permute_for_ggml_rope(w, 2)
    for head in range(2):
        for r in range(4):
            for h in range(2):
                assert torch.equal(out[head * 8 + 2 * r + h], w[head * 8 + h * 4 + r])


def test_f16_and_q8_0_files_load_and_stay_close(tmp_path):
    folder = _pruned(tmp_path, "q", method="structprune", sparsity=0.5, temperature=0.5)
    model = load_pruned(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0].double().numpy()
    for outtype, tol in (("f16", 0.01), ("q8_0", 0.05)):
        info = export_gguf(folder, tmp_path / f"{outtype}.gguf", outtype)
        got = llama_cpp_logits(open_gguf(info.path, f32_cache=False), PROMPT)
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err < tol, (outtype, err)
        if outtype == "q8_0":  # pruned widths not divisible by 32 cannot be Q8_0 rows
            widths = [w for w in info.feed_forward_length if w % 32]
            assert bool(info.f16_fallbacks) == bool(widths)


def test_tokenizer_metadata_tokenizes_like_the_hf_tokenizer(tmp_path):
    info = export_gguf(TINY_TRAINED, tmp_path / "t.gguf", "f32")
    assert info.vocabulary["pre"] == "gpt-2"
    llm = llama_cpp.Llama(str(info.path), vocab_only=True, verbose=False)
    tok = _tokenizer()
    text = "Hello world!  It's 2026: prices rose 3.5% (12345 units)\n\tnaïve café — ok?"
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=False)
        == tok(text, add_special_tokens=False).input_ids
    )


def test_unsupported_inputs_are_refused(tmp_path):
    folder = tmp_path / "biased"
    model = load_pruned(TINY_TRAINED)
    model.config.attention_bias = True
    save_pruned(model, folder, tokenizer=_tokenizer())
    with pytest.raises(GGUFExportError, match="attention_bias"):
        export_gguf(folder, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="outtype"):
        export_gguf(TINY_TRAINED, tmp_path / "x.gguf", "q4_k")
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_gguf(TINY_TRAINED, tmp_path / "exists.gguf")
    assert not list(tmp_path.glob(".x.gguf*"))  # nothing half-written left behind
    with pytest.raises(GGUFVocabularyError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    data = json.loads((TINY_TRAINED / "tokenizer.json").read_text())
    assert pre_tokenizer_name(data) == "gpt-2"


@pytest.mark.slow
def test_smollm2_dense_uniform_and_non_uniform_match_torch(tmp_path):
    """The real default model through llama.cpp: dense, equal widths (stock llama) and a
    temperature allocation with the ratio split (deci, heads removed), 32 greedy tokens each."""
    from transformers import AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.zoo import ensure_smollm2

    folder = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize(tokenizer, ensure_texts().read("wiki_train"))
    calib = sample_calibration(ids, 4, 64, seed=0)
    prompt = ids[:24].tolist()
    model = load_pruned(folder)
    cases = {"dense": (folder, "llama")}
    for name, config in {
        "uniform": PruneConfig(method="structprune", sparsity=0.3, admm_iterations=0, equal_widths=True),
        "deci": PruneConfig(
            method="structprune", sparsity=0.3, admm_iterations=0, temperature=0.5, kind_split="ratio"
        ),
    }.items():
        result = prune_model(model, calib, config, progress=False)
        cases[name] = (
            save_pruned(result.model, tmp_path / name, tokenizer=tokenizer),
            name.replace("uniform", "llama"),
        )
    for name, (path, arch) in cases.items():
        info = export_gguf(path, tmp_path / f"{name}.gguf", "f32")
        assert info.architecture == arch, name
        _check_against_torch(path, info.path, prompt=prompt)


@pytest.mark.slow
def test_gemma3_dense_and_pruned_match_torch_and_tokenize_alike(tmp_path):
    """Gemma-3-270M through llama.cpp's gemma3 graph (sliding-window layers, GELU, (1 + w) norms,
    SentencePiece vocabulary): tokens equal the HF tokenizer's, logits close to PyTorch's and 32
    greedy tokens equal, dense and pruned with StructPrune's default (equal widths)."""
    from transformers import AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.zoo import ensure_gemma3_270m

    folder = ensure_gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = export_gguf(folder, tmp_path / "dense.gguf", "f32")
    assert (dense.architecture, dense.vocabulary["model"]) == ("gemma3", "llama")
    vocab = llama_cpp.Llama(str(dense.path), vocab_only=True, verbose=False)
    for text in ("Hello world!  It's 2026: prices rose 3.5% (12345 units)\n\tnaïve café — ok?", "  a\n\nb  "):
        assert (
            vocab.tokenize(text.encode(), add_bos=False, special=False)
            == tokenizer(text, add_special_tokens=False).input_ids
        )
    ids = tokenize(tokenizer, ensure_texts().read("wiki_train"))
    prompt = [tokenizer.bos_token_id, *ids[:23].tolist()]
    # llama.cpp's GELU and f32 sums differ a little more from PyTorch's than on Llama models
    _check_against_torch(folder, dense.path, tol=2e-3, prompt=prompt)
    calib = sample_calibration(ids, 4, 64, seed=0, bos_token_id=tokenizer.bos_token_id)
    result = prune_model(
        load_pruned(folder),
        calib,
        PruneConfig(sparsity=0.3, admm_iterations=0, equal_widths=True),
        progress=False,
    )
    pruned = save_pruned(result.model, tmp_path / "pruned", tokenizer=tokenizer)
    info = export_gguf(pruned, tmp_path / "pruned.gguf", "f32")
    assert info.architecture == "gemma3" and len(set(info.feed_forward_length)) == 1
    assert info.feed_forward_length[0] < 2048
    _check_against_torch(pruned, info.path, tol=2e-3, prompt=prompt)


def test_gemma3_with_per_layer_widths_is_refused(tmp_path):
    from conftest import halve_mlp, make_model

    model = make_model("gemma3", layers=2)
    halve_mlp(model.model.layers[0].mlp)
    folder = save_pruned(model, tmp_path / "g")
    with pytest.raises(GGUFExportError, match="gemma3 graph builds every layer"):
        export_gguf(folder, tmp_path / "g.gguf")
