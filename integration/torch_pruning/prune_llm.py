"""Prune a Hugging Face causal LM with a Torch-Pruning pruner, in the style of Torch-Pruning's
own `examples/LLMs/prune_llm.py`, with its stock importance, StructPrune's, or StructPrune's solver.

* `--importance magnitude`: Torch-Pruning's `GroupMagnitudeImportance(p=2, group_reduction="mean")`
  with the uniform LLM recipe (the same ratio for every layer's MLP and heads, hidden size kept).
* `--importance structprune`: `StructPruneImportance` (Wanda-group scores from recorded
  calibration statistics) with StructPrune's per-layer allocation (`pruner_kwargs`).
* `--pruner structprune`: `StructPrunePruner`, a BasePruner subclass whose `step()` runs
  StructPrune's allocation and layer-wise solver (head choice + o_proj refit, ADMM MLP solver)
  and cuts through per-layer DependencyGraphs: the model `prune_model` gives with the same config.

All prune the same share of the attention and MLP parameters; the first two through the same
BasePruner (no weight updates). The script evaluates perplexity, saves the model (`save_pruned`)
and writes a JSON report.

    .venv/bin/python integration/torch_pruning/prune_llm.py --importance structprune --sparsity 0.3
    .venv/bin/python integration/torch_pruning/prune_llm.py --pruner structprune --sparsity 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM, AutoTokenizer

from struprune_plugin.allocation import allocate_uniform
from struprune_plugin.architectures import geometry_of, model_view, prunable_parameter_count
from struprune_plugin.checkpoint import save_pruned
from struprune_plugin.cli import evaluate_texts
from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
from struprune_plugin.engine import PruneConfig, unit_spaces
from struprune_plugin.memory import RssSampler
from struprune_plugin.outputs import check_output_folder
from struprune_plugin.tp_adapter import (
    StructPruneImportance,
    finish,
    kwargs_for_counts,
    pruner_kwargs,
    traceable,
)
from struprune_plugin.tp_pruner import StructPrunePruner
from struprune_plugin.zoo import resolve_model


def uniform_kwargs(model, sparsity: float) -> dict:
    """Torch-Pruning's uniform LLM recipe (the same ratio for every layer's MLP and heads), with
    the exact budget StructPrune's rows use."""
    geometries = [geometry_of(lv) for lv in model_view(model).layer_views()]
    spaces = unit_spaces(geometries, PruneConfig(min_query_per_kv=2))
    return kwargs_for_counts(model, allocate_uniform(spaces, prunable_parameter_count(model), sparsity))


def update_results(stem: Path, report: dict, model: str) -> None:
    """One row per (pruner, importance, sparsity, temperature) in a JSON list, and the Markdown
    table made from it. Rows written before `--pruner` existed are BasePruner rows."""
    path = stem.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.exists() else []

    def key(r):
        return (r.get("pruner", "base"), r["importance"], r["requested_sparsity"], r.get("temperature"))

    rows = [r for r in rows if key(r) != key(report)] + [report]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))

    def label(r):
        if r.get("pruner") == "structprune":
            t = r.get("temperature", math.inf)
            allocation = "uniform (T = inf)" if t == math.inf else f"T = {t:g}"
            return f"StructPrunePruner: allocation {allocation} + layer-wise solver (refits)"
        if r["importance"] == "magnitude":
            return "Torch-Pruning GroupMagnitudeImportance, uniform ratios"
        t = r.get("temperature", 1.0)
        allocation = (
            "uniform ratios (T = inf)" if t == float("inf") else f"StructPrune allocation (T = {t:g})"
        )
        return f"StructPruneImportance, {allocation}"

    lines = [
        "# Torch-Pruning pruners: stock importance vs StructPrune (`integration/torch_pruning/prune_llm.py`)",
        "",
        f"Model {model}. The importance rows go through the same `tp.pruner.BasePruner` (hidden size "
        "kept, query heads evenly within KV groups, at least two per K/V head; no weight updates). "
        "The StructPrunePruner row is a BasePruner subclass whose `step()` runs StructPrune's "
        "allocation and layer-wise solver (`prune_model`'s defaults: heads by energy with o_proj "
        "refit, ADMM MLP solver) and cuts through per-layer DependencyGraphs; it is the model "
        "`prune_model` gives (quality.md's structprune row). Calibration for StructPrune "
        "128 x 512 tokens of the Wikipedia train split (seed 0); perplexity protocol as in quality.md. "
        "Time and peak RSS cover allocation, recording, graph building, solving and pruning, on 2 CPU "
        "cores shared with another benchmark, one thread.",
        "",
        "| pruner / importance + allocation | sparsity (req / achieved) | params | ppl wiki | ppl news | prune s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r["requested_sparsity"],
            r.get("pruner", "base"),
            r["importance"],
            -(r.get("temperature") or 0),
        ),
    ):
        ppl = r["perplexity"]
        lines.append(
            f"| {label(r)} | {r['requested_sparsity']:.2f} / {r['achieved_sparsity']:.4f} | "
            f"{r['params']:,} | {ppl.get('wiki_test', float('nan')):.2f} | {ppl.get('news', float('nan')):.2f} | "
            f"{r['prune_seconds']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--pruner",
        choices=("base", "structprune"),
        default="base",
        help="base: tp.pruner.BasePruner with --importance; structprune: StructPrunePruner (allocation "
        "+ layer-wise solver, the model prune_model gives)",
    )
    parser.add_argument(
        "--importance",
        choices=("magnitude", "structprune"),
        default="structprune",
        help="BasePruner's importance (--pruner base only)",
    )
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument(
        "--temperature",
        type=float,
        default=math.inf,
        help="StructPrune allocation temperature; inf = uniform, finite = the default rule (energy-relative, each layer within 0.8 to 1.2 times the mean kept share; rows stored with T = 1 before it became the default ran the absolute-energy softmax)",
    )
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--texts", default="wiki_test,news")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--results",
        type=lambda value: Path(value) if value else None,  # Path("") would be "." and truthy
        default=Path(__file__).resolve().parents[1] / "results" / "torch_pruning",
        help="stem of the shared results table (.json/.md); '' to skip",
    )
    args = parser.parse_args()
    if args.pruner == "structprune" and args.importance != "structprune":
        parser.error("--importance is BasePruner's; StructPrunePruner's solver decides what goes")
    folder = resolve_model(args.model)
    kind = "solver" if args.pruner == "structprune" else args.importance
    output = (
        args.output or Path("runs/torch_pruning") / f"{folder.name}-tp-{kind}-{round(args.sparsity * 100)}"
    )
    check_output_folder(output, [folder], overwrite=True)  # before the work, not after it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    corpus = ensure_texts()
    calib = sample_calibration(
        tokenize(tokenizer, corpus.read("wiki_train")), args.calib_samples, args.calib_len
    )
    example = calib[:1, :16]
    prunable_before = prunable_parameter_count(model)
    start = time.perf_counter()
    with RssSampler() as rss:
        if args.pruner == "structprune":
            pruner = StructPrunePruner(
                model,
                example,
                calib,
                pruning_ratio=args.sparsity,
                config=PruneConfig(temperature=args.temperature),
                progress=True,
            )
            pruner.step()  # prune_model's bookkeeping included: no finish() needed
            allocation = {
                "counts": {
                    "heads": [r.heads[0] - r.heads[1] for r in pruner.result.layers],
                    "mlp": [r.mlp[0] - r.mlp[1] for r in pruner.result.layers],
                }
            }
        elif args.importance == "magnitude":
            importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
            kwargs, allocation = uniform_kwargs(model, args.sparsity), None
        else:
            config = PruneConfig(temperature=args.temperature)
            kwargs = pruner_kwargs(model, calib, args.sparsity, config, progress=True)
            allocation = kwargs.pop("allocation")
            importance = StructPruneImportance()
            with torch.no_grad(), importance.record(model):  # full model resident: Torch-Pruning's way
                for batch in calib.split(8):
                    model(input_ids=batch, use_cache=False)
        if args.pruner == "base":
            with traceable(model):
                pruner = tp.pruner.BasePruner(model, example, importance, **kwargs)
            for group in pruner.step(interactive=True):
                group.prune()
            finish(model)
    seconds = time.perf_counter() - start
    achieved = 1 - prunable_parameter_count(model) / prunable_before
    print(f"pruned {achieved:.4f} of the prunable parameters in {seconds:.0f} s", file=sys.stderr)
    eval_args = argparse.Namespace(
        texts=args.texts.split(","),
        bos="auto",
        eval_seq_len=512,
        eval_stride=None,
        eval_max_windows=None,
        eval_batch_size=4,
        device="cpu",
    )
    ppl = evaluate_texts(model, tokenizer, eval_args, progress=False)
    views = model_view(model).layer_views()
    report = {
        "pruner": args.pruner,
        "importance": "solver" if args.pruner == "structprune" else args.importance,
        "temperature": args.temperature if args.importance == "structprune" else None,
        "requested_sparsity": args.sparsity,
        "achieved_sparsity": achieved,
        "params": sum(p.numel() for p in model.parameters()),
        "prune_seconds": seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "perplexity": {k: v["ppl"] for k, v in ppl.items()},
        "layers": [(lv.num_heads, lv.intermediate_size) for lv in views],
        "allocation": allocation["counts"] if allocation else None,
        "threads": torch.get_num_threads(),
        "calibration": {
            "split": "wiki_train",
            "samples": args.calib_samples,
            "seq_len": args.calib_len,
            "seed": 0,
        },
    }
    # the report goes into the folder as part of the save, so the folder's manifest lists it and a
    # later run's --overwrite may replace it
    save_pruned(
        model,
        output,
        tokenizer=tokenizer,
        overwrite=True,
        write_extras=lambda tmp: (tmp / "tp_report.json").write_text(json.dumps(report, indent=1)),
    )
    if args.results:
        update_results(args.results, report, args.model)
    print(json.dumps({k: v for k, v in report.items() if k not in ("layers", "allocation")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
