"""llm-compressor `oneshot` on SmolLM2 with a recipe, on CPU, from local data only.

Runs one row and adds it to integration/results/llmcompressor.{json,md}:

* `--row structprune` (default): a StructPrune recipe (`--recipe`, default recipes/structprune_30.yaml);
  the pruned model is written to `output_dir` by oneshot, reloaded from there with `load_pruned`,
  checked against the in-memory model, and evaluated. A run that leaves the model dense stops
  with an error instead of recording a row (the recipe's modifier never ran).
* `--row wanda` / `--row sparsegpt`: llm-compressor's own `WandaPruningModifier` /
  `SparseGPTModifier`, unstructured, at the same sparsity of the same linears, so the same number
  of weights survive (as zeros inside dense matrices: no smaller model, no speed-up). Evaluated in
  memory (the masked model).

Calibration: 128 windows x 512 tokens of the Wikipedia train split (seed 0), as a local
`datasets.Dataset` of token ids; perplexity protocol as in the quality benchmark.

    .venv/bin/python integration/llmcompressor/oneshot_smollm2.py
    .venv/bin/python integration/llmcompressor/oneshot_smollm2.py --row wanda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import struprune_plugin  # noqa: F401  (registers StructPruneModifier with llm-compressor)
from struprune_plugin.architectures import model_view, prunable_parameter_count
from struprune_plugin.checkpoint import load_pruned
from struprune_plugin.cli import evaluate_texts
from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
from struprune_plugin.errors import RecipeError
from struprune_plugin.memory import RssSampler
from struprune_plugin.zoo import resolve_model

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "integration" / "results" / "llmcompressor"


BASELINES = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def baseline_recipe(row: str, sparsity: float) -> str:
    name = BASELINES[row]
    return f"""
sparsity_stage:
  sparsity_modifiers:
    {name}:
      sparsity: {sparsity}
      mask_structure: "0:0"
      targets: [Linear]
      ignore: [lm_head]
"""


def check_recipe(path: Path) -> None:
    """The structprune row needs a recipe that llm-compressor parses into a StructPruneModifier.
    Parsing refuses entries under keys llm-compressor skips (see recipes/README.md); a recipe with
    no such entry at all (e.g. a Wanda one) would still run, on the dense model."""
    from llmcompressor.recipe import Recipe

    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    if not any(isinstance(m, StructPruneModifier) for m in Recipe.create_instance(str(path)).modifiers):
        raise RecipeError(
            f"{path} has no StructPruneModifier, so the structprune row would record a dense model. Fix: "
            "pass a StructPrune recipe with --recipe, e.g. recipes/structprune_30.yaml"
        )


def zero_fraction(model) -> float:
    """Share of zero weights in the attention and MLP linears (unstructured rows' real sparsity)."""
    zeros = total = 0
    for lv in model_view(model).layer_views():
        for lin in lv.linears:
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total


def update_results(row: dict) -> None:
    path = RESULTS.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)
    lines = [
        "# llm-compressor `oneshot` on SmolLM2 (`integration/llmcompressor/oneshot_smollm2.py`)",
        "",
        "SmolLM2-135M-Instruct, float32, CPU. Calibration 128 x 512 tokens of the Wikipedia train split "
        "(seed 0) as a local `datasets.Dataset`, sequential pipeline. Perplexity protocol as in "
        "quality.md. Sparsity: removed (structured) or zeroed (unstructured) share of the attention "
        "and MLP linears' weights, so every row keeps the same number of non-zero weights; only the "
        "structured row is a smaller model. Time and peak RSS cover the `oneshot` call.",
        "",
        "| modifier | kind | sparsity | params stored | ppl wiki | ppl news | oneshot s | peak MiB | threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["name"]):
        ppl = r["perplexity"]
        lines.append(
            f"| {r['modifier']} | {r['kind']} | {r['sparsity']:.4f} | {r['params']:,} | "
            f"{ppl.get('wiki_test', float('nan')):.2f} | {ppl.get('news', float('nan')):.2f} | "
            f"{r['oneshot_seconds']:.0f} | {r['peak_rss_mib']:.0f} | {r['threads']} |"
        )
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=("structprune", "wanda", "sparsegpt"), default="structprune")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "structprune_30.yaml")
    parser.add_argument("--sparsity", type=float, default=0.3, help="for the unstructured rows")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--texts", default="wiki_test,news")
    parser.add_argument("--eval-max-windows", type=int, default=None, help="cap for a quick check")
    parser.add_argument("--output", type=Path, default=None, help="oneshot output_dir (structprune row)")
    parser.add_argument("--no-results", action="store_true", help="do not add the row to the results table")
    args = parser.parse_args()

    from llmcompressor import oneshot

    if args.row == "structprune":
        check_recipe(args.recipe)  # in a second, not after loading the model and the data
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = sample_calibration(
        tokenize(tokenizer, ensure_texts().read("wiki_train")), args.calib_samples, args.calib_len
    )
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    prunable_before = prunable_parameter_count(model)
    structured = args.row == "structprune"
    recipe = str(args.recipe) if structured else baseline_recipe(args.row, args.sparsity)
    output = args.output or ROOT / "runs" / "llmcompressor" / f"{folder.name}-{args.row}"
    start = time.perf_counter()
    with RssSampler() as rss:
        model = oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=len(ids),
            max_seq_length=args.calib_len,
            shuffle_calibration_samples=False,
            output_dir=str(output) if structured else None,
        )
    seconds = time.perf_counter() - start
    if structured:
        sparsity = 1 - prunable_parameter_count(model) / prunable_before
        if sparsity <= 0:  # no row for a dense model, whatever the reason
            raise RecipeError(
                f"oneshot left the model dense with {args.recipe}. Fix: give its StructPruneModifier a "
                "sparsity above 0, nested as '<name>_stage:' -> '<name>_modifiers:' -> 'StructPruneModifier:'"
            )
        reloaded = load_pruned(output)
        probe = ids[:2, :64]
        with torch.no_grad():
            diff = (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
        print(f"saved folder {output} reloads; max logit difference {diff:.2e}", file=sys.stderr)
        model = reloaded
    else:
        sparsity, diff = zero_fraction(model), None
    eval_args = argparse.Namespace(
        texts=args.texts.split(","),
        bos="auto",
        eval_seq_len=512,
        eval_stride=None,
        eval_max_windows=args.eval_max_windows,
        eval_batch_size=4,
        device="cpu",
    )
    ppl = evaluate_texts(model, tokenizer, eval_args, progress=False)
    row = {
        "name": f"{args.row}-{round(args.sparsity * 100) if not structured else args.recipe.stem}",
        "modifier": "StructPruneModifier" if structured else BASELINES[args.row],
        "kind": "structured" if structured else "unstructured",
        "recipe": recipe if not structured else str(args.recipe.relative_to(ROOT)),
        "sparsity": sparsity,
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": {k: v["ppl"] for k, v in ppl.items()},
        "oneshot_seconds": seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "reload_max_logit_diff": diff,
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if not args.no_results:
        update_results(row)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
