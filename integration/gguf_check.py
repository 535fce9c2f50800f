"""GGUF export checked in llama.cpp: logit differences and greedy agreement against PyTorch.

For the tiny test model and SmolLM2-135M, dense, pruned with equal widths (stock `llama` file) and
pruned per layer (`deci` file, query-head and KV-group units): each folder is exported as f32, f16
and q8_0, run in llama.cpp (llama-cpp-python built from source) and compared with the PyTorch
model on a prompt of real text: the largest |logit difference| over the prompt's positions
(relative to the largest |logit|) and how many of 32 greedy tokens agree before the first
difference. f32 files run with an f32 KV cache (the export's own error); f16 and q8_0 files with
llama.cpp's default f16 cache, as users run them. The pruning uses little calibration (it checks
the export, not the pruning's quality).

    .venv/bin/python integration/gguf_check.py     # -> integration/results/gguf.{json,md}
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch

from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.export.gguf_model import export_gguf
from struprune_plugin.export.llama_cpp_check import compare_with_torch
from struprune_plugin.outputs import write_text_atomic
from struprune_plugin.zoo import resolve_model

OUT = Path(__file__).resolve().parent / "results" / "gguf"
CASES = {
    "dense": None,
    "equal widths": dict(sparsity=0.3, equal_widths=True),
    "per layer, query heads": dict(sparsity=0.3, temperature=0.5, kind_split="ratio", head_unit="query"),
    "per layer, KV groups": dict(sparsity=0.3, temperature=0.5, kind_split="ratio", head_unit="kv_group"),
}


def folders(model_name: str, work: Path):
    from transformers import AutoTokenizer

    source = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenize(tokenizer, ensure_texts().read("wiki_train"))
    calib = sample_calibration(ids, 8, 64, seed=0)
    prompt = tokenize(tokenizer, ensure_texts().read("wiki_test"))[:48].tolist()
    model = load_pruned(source)
    for case, config in CASES.items():
        if config is None:
            yield case, source, prompt
            continue
        result = prune_model(model, calib, PruneConfig(admm_iterations=1, **config), progress=False)
        yield case, save_pruned(result.model, work / f"{model_name}-{case}", tokenizer=tokenizer), prompt


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model_name in ("tiny", "smollm2"):
            for case, folder, prompt in folders(model_name, work):
                model = load_pruned(folder, dtype=torch.float32)
                for outtype in ("f32", "f16", "q8_0"):
                    info = export_gguf(
                        folder, work / f"{folder.name}-{outtype}.gguf", outtype, overwrite=True
                    )
                    check = compare_with_torch(model, info.path, prompt, 32, f32_cache=outtype == "f32")
                    rows.append(
                        {
                            "model": model_name,
                            "case": case,
                            "outtype": outtype,
                            "architecture": info.architecture,
                            "heads": sorted(set(info.head_count)),
                            "mlp_widths": [min(info.feed_forward_length), max(info.feed_forward_length)],
                            "f16_fallbacks": len(info.f16_fallbacks),
                            **check,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    import llama_cpp

    meta = {"llama_cpp_python": llama_cpp.__version__, "platform": platform.platform()}
    write_text_atomic(OUT.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# GGUF export in llama.cpp (`integration/gguf_check.py`)",
        "",
        f"llama-cpp-python {meta['llama_cpp_python']} built from source, CPU. Prompt: 48 tokens of the "
        "Wikipedia test split; 32 greedy tokens. f32 files with an f32 KV cache, f16/q8_0 with "
        "llama.cpp's default f16 cache.",
        "",
        "| model | case | file | arch | heads | MLP widths | max rel logit diff | greedy tokens equal |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['case']} | {r['outtype']} | {r['architecture']} | "
            f"{'/'.join(map(str, r['heads']))} | {r['mlp_widths'][0]}-{r['mlp_widths'][1]} | "
            f"{r['max_rel_logit_diff']:.1e} | {r['greedy_tokens_equal']}/{r['new_tokens']} |"
        )
    write_text_atomic(OUT.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
