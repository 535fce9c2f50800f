"""GGUF export checked in llama.cpp: logit differences and greedy agreement against PyTorch.

For the tiny test model and SmolLM2-135M, dense, pruned with equal widths (stock `llama` file) and
pruned per layer (`deci` file, query-head and KV-group units): each folder is exported as f32, f16
and q8_0, run in llama.cpp (llama-cpp-python built from source) and compared with the PyTorch
model on a prompt of real text: the largest |logit difference| over the prompt's positions
(relative to the largest |logit|) and how many of 32 greedy tokens agree before the first
difference. f32 files run with an f32 KV cache (the export's own error); f16 and q8_0 files with
llama.cpp's default f16 cache, as users run them. The pruning uses little calibration (it checks
the export, not the pruning's quality).

Every row is measured inside a `results_store.RunRecord` (commit, machine, library versions) and
keeps the pruning's resolved settings, calibration and per-layer widths (`run`, none for the dense
folders); rows are stored through `results_store.store_rows`, and the .md, including its note on
the q8_0 files, is computed from the JSON by `render_markdown`.

    .venv/bin/python integration/gguf_check.py                # -> integration/results/gguf.{json,md}
    .venv/bin/python integration/gguf_check.py --report-only  # the .md from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store
from results_store import RESULTS
from results_table import backfilled, provenance_legend

STEM = "gguf"
OUT = RESULTS / STEM
MODELS = ("tiny", "smollm2")
OUTTYPES = ("f32", "f16", "q8_0")
#: Calibration of the pruned folders: windows x tokens from the Wikipedia train split, seed 0.
CALIB_SAMPLES, CALIB_LEN, CALIB_SEED = 8, 64, 0
ADMM_ITERATIONS = 1
#: Prompt tokens (Wikipedia test split) and greedy tokens compared.
PROMPT_TOKENS, NEW_TOKENS = 48, 32
CASES = {
    "dense": None,
    "equal widths": dict(sparsity=0.3, equal_widths=True),
    "per layer, query heads": dict(sparsity=0.3, temperature=0.5, kind_split="ratio", head_unit="query"),
    "per layer, KV groups": dict(sparsity=0.3, temperature=0.5, kind_split="ratio", head_unit="kv_group"),
}


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    """A row's identity in gguf.json (a new measurement of it replaces the stored one)."""
    return (row["model"], row["case"], row["outtype"])


def run_summary(result: Any, calibration: dict[str, Any]) -> dict[str, Any]:
    """What `results_store.from_prune_report` records of a `struprune prune` run, for a pruning run
    in this process: the resolved settings (as the CLI's report writes them), calibration, dtype,
    device, requested and achieved sparsity and per-layer widths."""
    config = result.config
    report = {
        "pruning": {
            "method": config.method,
            "settings": {k: v for k, v in vars(config).items() if k not in ("method", "device")},
            "dtype": str(next(result.model.parameters()).dtype).removeprefix("torch."),
            "device": config.device,
            "requested_sparsity": result.requested_sparsity,
            "achieved_sparsity": result.achieved_sparsity,
        },
        "calibration": calibration,
        "layers": result.summary()["layers"],
    }
    # JSON-safe (tuples, allocator objects): stored exactly as it will read back
    return json.loads(json.dumps(results_store.from_prune_report(report), default=str))


def folders(model_name: str, work: Path) -> Iterator[tuple[str, Path, list[int], dict[str, Any] | None]]:
    """(case, folder, prompt ids, pruning run summary or None) for each case of `model_name`."""
    from transformers import AutoTokenizer

    from struprune_plugin.checkpoint import load_pruned, save_pruned
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.engine import PruneConfig, prune_model
    from struprune_plugin.zoo import resolve_model

    source = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenize(tokenizer, ensure_texts().read("wiki_train"))
    calib = sample_calibration(ids, CALIB_SAMPLES, CALIB_LEN, seed=CALIB_SEED)
    calibration = {"split": "wiki_train", "samples": CALIB_SAMPLES, "seq_len": CALIB_LEN, "seed": CALIB_SEED}
    prompt = tokenize(tokenizer, ensure_texts().read("wiki_test"))[:PROMPT_TOKENS].tolist()
    model = load_pruned(source)
    for case, config in CASES.items():
        if config is None:
            yield case, Path(source), prompt, None
            continue
        result = prune_model(
            model, calib, PruneConfig(admm_iterations=ADMM_ITERATIONS, **config), progress=False
        )
        folder = save_pruned(result.model, work / f"{model_name}-{case}", tokenizer=tokenizer)
        yield case, Path(folder), prompt, run_summary(result, calibration)


def measure(model_name: str, work: Path) -> list[dict[str, Any]]:
    """Every case and file type of one model; each row's export and comparison inside a RunRecord."""
    import torch

    from struprune_plugin.checkpoint import load_pruned
    from struprune_plugin.export.gguf_model import export_gguf
    from struprune_plugin.export.llama_cpp_check import compare_with_torch

    rows = []
    for case, folder, prompt, run in folders(model_name, work):
        model = load_pruned(folder, dtype=torch.float32)
        for outtype in OUTTYPES:
            with results_store.RunRecord() as record:
                info = export_gguf(folder, work / f"{folder.name}-{outtype}.gguf", outtype, overwrite=True)
                check = compare_with_torch(model, info.path, prompt, NEW_TOKENS, f32_cache=outtype == "f32")
            rows.append(
                {
                    "model": model_name,
                    "case": case,
                    "outtype": outtype,
                    "architecture": info.architecture,
                    "heads": sorted(set(info.head_count)),
                    "mlp_widths": [min(info.feed_forward_length), max(info.feed_forward_length)],
                    "f16_fallbacks": len(info.f16_fallbacks),
                    "prompt_tokens": len(prompt),
                    **check,
                    "run": run,
                    "provenance": record.provenance,
                }
            )
            print(
                json.dumps({k: v for k, v in rows[-1].items() if k not in ("run", "provenance")}), flush=True
            )
    return rows


# --- rendering: a pure function of the stored JSON ------------------------------------------------


def _versions(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """llama-cpp-python as the rows' provenance recorded it; for rows measured before rows carried
    one (their backfilled provenance holds only the project's pins), the file's `meta`, which that
    run wrote."""
    meta = data.get("meta") or {}
    found = {
        ((r.get("provenance") or {}).get("libraries") or {}).get("llama-cpp-python")
        or (meta.get("llama_cpp_python") if backfilled(r) else None)
        for r in rows
    }
    return " / ".join(sorted(str(v) for v in found if v)) or "(version not recorded)"


def _calibration(rows: list[dict[str, Any]]) -> str:
    """The pruned folders' calibration and ADMM iterations: the rows' `run` where recorded, else
    this script's protocol (the rows before `run` was stored used it too)."""
    found = set()
    for r in rows:
        if r["case"] == "dense":
            continue
        run = r.get("run") or {}
        calib = run.get("calibration") or {"samples": CALIB_SAMPLES, "seq_len": CALIB_LEN}
        admm = (run.get("settings") or {}).get("admm_iterations", ADMM_ITERATIONS)
        found.add((calib.get("samples"), calib.get("seq_len"), admm))
    return "; ".join(
        f"{samples} x {seq_len} calibration tokens and {admm} ADMM iteration{'s' * (admm != 1)}"
        for samples, seq_len, admm in sorted(found)
    )


def _q8_note(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: how far the q8_0 files are from PyTorch, dense against pruned."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        q8 = [r for r in rows if r["model"] == model and r["outtype"] == "q8_0"]
        dense = [r for r in q8 if r["case"] == "dense"]
        pruned = [r for r in q8 if r["case"] != "dense"]
        if not dense or not pruned:
            continue
        d = dense[0]
        worst = max(pruned, key=lambda r: r["max_rel_logit_diff"])
        best = min(pruned, key=lambda r: r["max_rel_logit_diff"])
        fewest = min(pruned, key=lambda r: r["greedy_tokens_equal"])
        most = max(pruned, key=lambda r: r["greedy_tokens_equal"])
        lines.append(
            f"- {model}: dense {d['max_rel_logit_diff']:.1e}, {d['greedy_tokens_equal']}/{d['new_tokens']} "
            f"greedy tokens equal; pruned {best['max_rel_logit_diff']:.1e} to "
            f"{worst['max_rel_logit_diff']:.1e} (largest: {worst['case']}), "
            f"{fewest['greedy_tokens_equal']}/{fewest['new_tokens']} to "
            f"{most['greedy_tokens_equal']}/{most['new_tokens']} greedy tokens equal "
            f"(fewest: {fewest['case']})."
        )
    return lines


def render_markdown(stem: str, data: Any) -> str:
    """`gguf.md`, exactly as this script writes it, from the parsed `gguf.json`."""
    if stem != STEM:
        raise ValueError(f"gguf_check.py renders {STEM!r}, not {stem!r}")
    data = data if isinstance(data, dict) else {"rows": data}
    rows = data["rows"]
    prompts = sorted({r.get("prompt_tokens", PROMPT_TOKENS) for r in rows})
    new = sorted({r["new_tokens"] for r in rows})
    lines = [
        "# GGUF export in llama.cpp (`integration/gguf_check.py`)",
        "",
        f"llama-cpp-python {_versions(data, rows)} built from source, CPU. Prompt: "
        f"{' / '.join(map(str, prompts))} tokens of the Wikipedia test split; "
        f"{' / '.join(map(str, new))} greedy tokens. f32 files with an f32 KV cache, f16/q8_0 with "
        "llama.cpp's default f16 cache. `f16 fallbacks`: q8_0 tensors kept in f16 because their rows "
        "do not split into blocks of 32.",
        "",
        provenance_legend(rows, timed=False),
        "",
        "| model | case | file | arch | heads | MLP widths | f16 fallbacks | max rel logit diff "
        "| greedy tokens equal | commit |",
        "|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['case']} | {r['outtype']} | {r['architecture']} | "
            f"{'/'.join(map(str, r['heads']))} | {r['mlp_widths'][0]}-{r['mlp_widths'][1]} | "
            f"{r.get('f16_fallbacks', '')} | {r['max_rel_logit_diff']:.1e} | "
            f"{r['greedy_tokens_equal']}/{r['new_tokens']} | {results_store.short(r.get('provenance'))} |"
        )
    note = _q8_note(rows)
    if note:
        lines += [
            "",
            f"The pruned folders come from {_calibration(rows)} (they check the export, not the",
            "pruning). The q8_0 files against PyTorch (max relative logit difference, greedy tokens):",
            "",
            *note,
        ]
    return "\n".join(lines) + "\n"


def _write_md(_rows: list[dict[str, Any]] | None = None) -> str:
    """Write gguf.md from gguf.json as stored (so it is what `render_markdown` gives)."""
    text = render_markdown(STEM, json.loads(OUT.with_suffix(".json").read_text(encoding="utf-8")))
    results_store.write_atomic(OUT.with_suffix(".md"), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report-only", action="store_true", help="write gguf.md from gguf.json")
    args = parser.parse_args()
    if not args.report_only:
        # No file-level meta is written: each new row's provenance records llama-cpp-python and the
        # machine. The file's `meta` describes only the rows measured before rows carried one.
        with tempfile.TemporaryDirectory() as tmp:
            for model_name in MODELS:
                rows = measure(model_name, Path(tmp))
                results_store.store_rows(OUT.with_suffix(".json"), rows, key=key, render=_write_md)
    print(_write_md())


if __name__ == "__main__":
    main()
