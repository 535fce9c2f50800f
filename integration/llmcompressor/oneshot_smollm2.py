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

The run (oneshot, reload, evaluation) is measured inside a `results_store.RunRecord`. Each row
records under `run` what it ran with: every modifier of the recipe with its arguments as
llm-compressor resolved them (defaults filled in), StructPrune's engine settings those stand for,
the calibration, dtype, device, requested and achieved sparsity, and each layer's widths before and
after.

    .venv/bin/python integration/llmcompressor/oneshot_smollm2.py
    .venv/bin/python integration/llmcompressor/oneshot_smollm2.py --row wanda
    .venv/bin/python integration/llmcompressor/oneshot_smollm2.py --report-only   # rewrite the .md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (str(ROOT), str(ROOT / "integration")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from benchmark_scale import text_calibration  # noqa: E402
from results_table import FORMER_DEFAULT, calibration_text, former_default, mark, rows_of, shared_note  # noqa: E402

RESULTS = ROOT / "integration" / "results" / "llmcompressor"
CALIBRATION_SPLIT = "wiki_train"
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

    from struprune_plugin.errors import RecipeError
    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    if not any(isinstance(m, StructPruneModifier) for m in Recipe.create_instance(str(path)).modifiers):
        raise RecipeError(
            f"{path} has no StructPruneModifier, so the structprune row would record a dense model. Fix: "
            "pass a StructPrune recipe with --recipe, e.g. recipes/structprune_30.yaml"
        )


def zero_fraction(model) -> float:
    """Share of zero weights in the attention and MLP linears (unstructured rows' real sparsity)."""
    from struprune_plugin.architectures import model_view

    zeros = total = 0
    for lv in model_view(model).layer_views():
        for lin in lv.linears:
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total


def widths(model) -> list[tuple[int, int, int]]:
    """Every decoder layer's (query heads, KV heads, MLP channels)."""
    from struprune_plugin.architectures import model_view

    return [(lv.num_heads, lv.num_kv_heads, lv.intermediate_size) for lv in model_view(model).layer_views()]


def resolved_modifiers(recipe: str) -> list[dict[str, Any]]:
    """Every modifier the recipe builds, with all its arguments as llm-compressor resolves them
    (defaults filled in; its lifecycle flags, the fields ending in `_`, left out): what the run
    used, whatever the recipe file says later. Values JSON cannot hold are stored as text."""
    from llmcompressor.recipe import Recipe

    out = []
    for modifier in Recipe.create_instance(recipe).modifiers:
        arguments = {k: v for k, v in modifier.model_dump().items() if not k.endswith("_")}
        out.append(
            {"modifier": type(modifier).__name__, "arguments": json.loads(json.dumps(arguments, default=str))}
        )
    return out


def engine_settings(recipe: str) -> dict[str, Any] | None:
    """The StructPrune engine settings the recipe's StructPruneModifier stands for
    (`StructPruneModifier.prune_config`), as `struprune prune` reports them; None without one."""
    from llmcompressor.recipe import Recipe

    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    for modifier in Recipe.create_instance(recipe).modifiers:
        if isinstance(modifier, StructPruneModifier):
            config = vars(modifier.prune_config())
            settings = {k: v for k, v in config.items() if k not in ("method", "device")}
            return json.loads(json.dumps(settings, default=str))
    return None


def run_record(
    recipe: str,
    structured: bool,
    calibration: dict[str, Any],
    dtype: str,
    requested: float,
    achieved: float,
    before: list[tuple[int, int, int]],
    after: list[tuple[int, int, int]],
) -> dict[str, Any]:
    """A row's `run`: `results_store.from_prune_report` of the report a `struprune prune` run would
    write (settings: the engine's for the StructPrune row, the modifier's arguments for the
    unstructured ones), plus every modifier's resolved arguments."""
    modifiers = resolved_modifiers(recipe)
    report = {
        "calibration": calibration,
        "pruning": {
            "method": "structprune" if structured else modifiers[0]["modifier"],
            "settings": engine_settings(recipe) if structured else modifiers[0]["arguments"],
            "dtype": dtype,
            "device": "cpu",
            "requested_sparsity": requested,
            "achieved_sparsity": achieved,
        },
        "layers": [
            {"index": i, "heads": [b[0], a[0]], "kv_heads": [b[1], a[1]], "mlp": [b[2], a[2]]}
            for i, (b, a) in enumerate(zip(before, after))
        ],
    }
    return {**results_store.from_prune_report(report), "modifiers": modifiers}


def modifier_label(row: dict[str, Any]) -> str:
    """A row's modifier: StructPrune rows measured under the former default say so; rows that
    recorded their engine settings name the allocation they ran."""
    if former_default(row):
        return f"{row['modifier']} ({FORMER_DEFAULT})"
    settings = (row.get("run") or {}).get("settings") or {}
    if row["kind"] == "structured" and settings.get("allocation"):
        temperature = settings.get("temperature")
        at = f", T = {temperature:g}" if isinstance(temperature, (int, float)) else ""
        return f"{row['modifier']} ({settings['allocation']}{at})"
    return row["modifier"]


def _recorded(rows: list[dict[str, Any]], fields: dict[str, Callable[[dict[str, Any]], str | None]]) -> str:
    """The distinct values the rows recorded for each field, then the fields some rows lack (rows
    measured before rows recorded them), so the header claims nothing the rows do not say."""
    known, unknown, lacking = [], [], 0
    for what, value in fields.items():
        values = dict.fromkeys(v for v in map(value, rows) if v is not None)
        if values:
            known.append(f"{what} {' / '.join(values)}")
        missing = sum(value(r) is None for r in rows)
        if missing:
            unknown.append(what)
            lacking = max(lacking, missing)
    parts = ["; ".join(known)] if known else []
    if unknown:
        parts.append(
            f"not recorded for the {lacking} rows measured before rows recorded them: {', '.join(unknown)}"
        )
    return "".join(f"{part[:1].upper()}{part[1:]}. " for part in parts).rstrip()


def _calibration(row: dict[str, Any]) -> str | None:
    calibration = (row.get("run") or {}).get("calibration")
    return calibration_text(calibration) if calibration else None


def _setup(row: dict[str, Any]) -> str | None:
    run = row.get("run") or {}
    return f"{run['dtype']} on {run['device']}" if run.get("dtype") else None


def render(rows: list[dict[str, Any]]) -> str:
    """llmcompressor.md from the stored rows: every figure and setting read from them."""
    setup = _recorded(
        rows, {"model": lambda r: r.get("model"), "dtype and device": _setup, "calibration": _calibration}
    )
    lines = [
        "# llm-compressor `oneshot` (`integration/llmcompressor/oneshot_smollm2.py`)",
        "",
        f"{setup} Calibration ids are given to `oneshot` as a local "
        "`datasets.Dataset`. Perplexity protocol as in quality.md. Sparsity: removed (structured) or "
        "zeroed (unstructured) share of the attention and MLP linears' weights, so every row keeps "
        "the same number of non-zero weights; only the structured row is a smaller model. Time and "
        "peak RSS cover the `oneshot` call. `commit`: the code the row ran (`+`: with uncommitted "
        "changes).",
        "",
        "| modifier | kind | sparsity | params stored | ppl wiki | ppl news | oneshot s | peak MiB | threads | commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: r["name"]):
        ppl = r["perplexity"]
        lines.append(
            f"| {modifier_label(r)} | {r['kind']} | {r['sparsity']:.4f} | {r['params']:,} | "
            f"{ppl.get('wiki_test', float('nan')):.2f} | {ppl.get('news', float('nan')):.2f} | "
            f"{r['oneshot_seconds']:.0f}{mark(r)} | {r['peak_rss_mib']:.0f} | {r['threads']} | "
            f"{results_store.short(r.get('provenance'))} |"
        )
    lines += shared_note(rows)
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `llmcompressor`)."""
    return render(rows_of(data))


def _relative(path: Path) -> str:
    """A path as rows record it: relative to the repository where it lies inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


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
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the .md from the stored JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        rows = results_store.load_rows(RESULTS.with_suffix(".json"))
        results_store.write_atomic(RESULTS.with_suffix(".md"), render(rows))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports the hub
    import datasets
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import struprune_plugin  # noqa: F401  (registers StructPruneModifier with llm-compressor)
    from struprune_plugin.architectures import prunable_parameter_count
    from struprune_plugin.checkpoint import load_pruned
    from struprune_plugin.cli import evaluate_texts
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.errors import RecipeError
    from struprune_plugin.memory import RssSampler
    from struprune_plugin.zoo import resolve_model

    if args.row == "structprune":
        check_recipe(args.recipe)  # in a second, not after loading the model and the data
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = sample_calibration(
        tokenize(tokenizer, ensure_texts().read(CALIBRATION_SPLIT)), args.calib_samples, args.calib_len
    )
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    prunable_before = prunable_parameter_count(model)
    widths_before = widths(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    structured = args.row == "structprune"
    recipe = str(args.recipe) if structured else baseline_recipe(args.row, args.sparsity)
    output = args.output or ROOT / "runs" / "llmcompressor" / f"{folder.name}-{args.row}"
    with results_store.RunRecord() as record:
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
    calibration = text_calibration(CALIBRATION_SPLIT, args.calib_samples, args.calib_len)
    requested = (engine_settings(recipe) or {}).get("sparsity") if structured else args.sparsity
    row = {
        "name": f"{args.row}-{round(args.sparsity * 100) if not structured else args.recipe.stem}",
        "model": folder.name,
        "modifier": "StructPruneModifier" if structured else BASELINES[args.row],
        "kind": "structured" if structured else "unstructured",
        "recipe": recipe if not structured else _relative(args.recipe),
        "sparsity": sparsity,
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": {k: v["ppl"] for k, v in ppl.items()},
        "oneshot_seconds": seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "reload_max_logit_diff": diff,
        "threads": torch.get_num_threads(),
        "run": run_record(
            recipe, structured, calibration, dtype, requested, sparsity, widths_before, widths(model)
        ),
        "provenance": record.provenance,
    }
    if not args.no_results:
        results_store.store_rows(RESULTS, [row], key=lambda r: r["name"], render=render)
    print(json.dumps({k: v for k, v in row.items() if k not in ("run", "provenance")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
