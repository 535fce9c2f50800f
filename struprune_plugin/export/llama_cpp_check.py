"""Run a GGUF export in llama.cpp (llama-cpp-python) and compare it with the PyTorch model it came
from: the logits of a prompt and a greedy continuation. Used by the tests and by
`integration/gguf_check.py`, whose table (integration/results/gguf.md) records the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def open_gguf(path: str | Path, n_ctx: int = 256, threads: int = 2, f32_cache: bool = True):
    """llama.cpp on `path`, every position's logits kept. The KV cache is f32 by default (llama.cpp
    uses f16), so a comparison measures the export rather than the cache's rounding."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads, verbose=False, seed=0, **cache
    )


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def llama_cpp_greedy(llm, tokens: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def torch_greedy(model, tokens: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(tokens) :].tolist()


def compare_with_torch(
    model, gguf_path: str | Path, prompt: list[int], new_tokens: int = 32, **llama
) -> dict:
    """Max |logit difference| (absolute, and relative to the PyTorch logits' largest magnitude)
    over the prompt's positions, and how many greedy tokens agree before the first difference."""
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0].double().numpy()
    llm = open_gguf(gguf_path, **llama)
    got = llama_cpp_logits(llm, prompt)
    diff = float(np.abs(got - expected).max())
    ours, theirs = llama_cpp_greedy(llm, prompt, new_tokens), torch_greedy(model, prompt, new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens)
    return {
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / float(np.abs(expected).max()),
        "greedy_tokens_equal": agree,
        "new_tokens": new_tokens,
    }
