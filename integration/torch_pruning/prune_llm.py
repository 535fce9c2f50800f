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

Pruning and evaluation run inside a `results_store.RunRecord`. Each row records under `run` what
it ran with: the importance and its settings, the BasePruner arguments as resolved (ratio dicts
keyed by module name), StructPrune's engine settings where it allocates or solves, the calibration,
dtype, device, requested and achieved sparsity, and each layer's widths before and after.

    .venv/bin/python integration/torch_pruning/prune_llm.py --importance structprune --sparsity 0.3
    .venv/bin/python integration/torch_pruning/prune_llm.py --pruner structprune --sparsity 0.3
    .venv/bin/python integration/torch_pruning/prune_llm.py --report-only   # rewrite the .md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (str(ROOT), str(ROOT / "integration")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from benchmark_scale import prune_report, text_calibration  # noqa: E402
from results_table import FORMER_DEFAULT, calibration_text, former_default, mark, rows_of, shared_note  # noqa: E402

RESULTS = ROOT / "integration" / "results" / "torch_pruning"
CALIBRATION_SPLIT = "wiki_train"


def uniform_kwargs(model, sparsity: float) -> dict:
    """Torch-Pruning's uniform LLM recipe (the same ratio for every layer's MLP and heads), with
    the exact budget StructPrune's rows use."""
    from struprune_plugin.allocation import allocate_uniform
    from struprune_plugin.architectures import geometry_of, model_view, prunable_parameter_count
    from struprune_plugin.engine import PruneConfig, unit_spaces
    from struprune_plugin.tp_adapter import kwargs_for_counts

    geometries = [geometry_of(lv) for lv in model_view(model).layer_views()]
    spaces = unit_spaces(geometries, PruneConfig(min_query_per_kv=2))
    return kwargs_for_counts(model, allocate_uniform(spaces, prunable_parameter_count(model), sparsity))


def widths(model) -> list[tuple[int, int, int]]:
    """Every decoder layer's (query heads, KV heads, MLP channels)."""
    from struprune_plugin.architectures import model_view

    return [(lv.num_heads, lv.num_kv_heads, lv.intermediate_size) for lv in model_view(model).layer_views()]


def module_names(model) -> dict[int, str]:
    """id -> qualified name of every module and parameter, taken before pruning (surgery keeps
    the objects), so resolved arguments can name what they point at."""
    names = {id(m): name or "<model>" for name, m in model.named_modules()}
    names.update({id(p): name for name, p in model.named_parameters()})
    return names


def described(value: Any, names: dict[int, str]) -> Any:
    """A JSON-safe copy of a pruner argument: modules and parameters by name (dict keys too),
    callables (forward_fn, output_transform) left out as None, other objects as their text."""
    if id(value) in names:
        return names[id(value)]
    if isinstance(value, dict):
        return {str(described(k, names)): described(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [described(v, names) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return None if callable(value) else str(value)


def importance_settings(importance: Any) -> dict[str, Any]:
    """An importance's class and the plain settings it holds (p, group reduction, normaliser, energy,
    target types): what decides its scores besides the recorded statistics."""
    plain = {k: v for k, v in vars(importance).items() if isinstance(v, (str, int, float, bool)) or v is None}
    targets = getattr(importance, "target_types", None)
    if targets:
        plain["target_types"] = [t.__name__ for t in targets]
    return {"class": type(importance).__name__, **plain}


def settings_of(config: Any) -> dict[str, Any]:
    """A PruneConfig's settings as `struprune prune` reports them (JSON-safe)."""
    settings = {k: v for k, v in vars(config).items() if k not in ("method", "device")}
    return json.loads(json.dumps(settings, default=str))


def base_run(
    args: argparse.Namespace,
    calibration: dict[str, Any],
    achieved: float,
    before: list[tuple[int, int, int]],
    after: list[tuple[int, int, int]],
    importance: Any,
    kwargs: dict[str, Any],
    names: dict[int, str],
    config: Any | None,
) -> dict[str, Any]:
    """A BasePruner row's `run`: `from_prune_report` of the report a `struprune prune` run would
    write (settings: StructPrune's engine settings where it allocated, else none), plus the
    importance's settings and the BasePruner arguments as resolved."""
    report = {
        "calibration": calibration,
        "pruning": {
            "method": f"torch-pruning BasePruner + {type(importance).__name__}",
            "settings": settings_of(config) if config is not None else None,
            "dtype": "float32",
            "device": "cpu",
            "requested_sparsity": args.sparsity,
            "achieved_sparsity": achieved,
        },
        "layers": [
            {"index": i, "heads": [b[0], a[0]], "kv_heads": [b[1], a[1]], "mlp": [b[2], a[2]]}
            for i, (b, a) in enumerate(zip(before, after))
        ],
    }
    return {
        **results_store.from_prune_report(report),
        "importance": importance_settings(importance),
        "pruner_kwargs": {k: v for k, v in described(kwargs, names).items() if v is not None},
    }


def label(r: dict[str, Any]) -> str:
    """A row's pruner / importance + allocation: the allocation rule and temperature it recorded;
    "not recorded" where an old row stored none (no default is assumed for it)."""
    if former_default(r):
        allocation = FORMER_DEFAULT
    elif "temperature" not in r or r["temperature"] is None:
        allocation = "StructPrune allocation, temperature not recorded"
    elif r["temperature"] == math.inf:
        allocation = "uniform (T = inf)" if r.get("pruner") == "structprune" else "uniform ratios (T = inf)"
    else:
        allocation = f"{r.get('allocation_rule') or 'StructPrune allocation'} (T = {r['temperature']:g})"
    if r.get("pruner") == "structprune":
        return f"StructPrunePruner: allocation {allocation} + layer-wise solver (refits)"
    if r["importance"] == "magnitude":
        return "Torch-Pruning GroupMagnitudeImportance, uniform ratios"
    return f"StructPruneImportance, {allocation}"


def _calibration(rows: list[dict[str, Any]]) -> str:
    """The calibration the StructPrune rows recorded (joined where they differ)."""
    texts = dict.fromkeys(calibration_text(c) for c in (r.get("calibration") for r in rows) if c)
    return " / ".join(texts) if texts else "not recorded"


def _models(rows: list[dict[str, Any]]) -> str:
    models = dict.fromkeys(r["model"] for r in rows if r.get("model"))
    missing = sum(not r.get("model") for r in rows)
    parts = [f"Model {' / '.join(models)}."] if models else []
    if missing:
        parts.append(f"The model is not recorded for the {missing} rows measured before rows recorded it.")
    return " ".join(parts)


def render(rows: list[dict[str, Any]]) -> str:
    """torch_pruning.md from the stored rows: every figure and setting read from them."""
    lines = [
        "# Torch-Pruning pruners: stock importance vs StructPrune (`integration/torch_pruning/prune_llm.py`)",
        "",
        f"{_models(rows)} The importance rows go through the same `tp.pruner.BasePruner` (hidden size "
        "kept, query heads evenly within KV groups, at least two per K/V head; no weight updates). "
        "The StructPrunePruner row is a BasePruner subclass whose `step()` runs StructPrune's "
        "allocation and layer-wise solver (`prune_model`'s defaults: heads by energy with o_proj "
        "refit, ADMM MLP solver) and cuts through per-layer DependencyGraphs; it is the model "
        f"`prune_model` gives. Calibration {_calibration(rows)}; perplexity protocol as in quality.md. "
        "Time and peak RSS cover allocation, recording, graph building, solving and pruning. "
        "`commit`: the code the row ran (`+`: with uncommitted changes).",
        "",
        "| pruner / importance + allocation | sparsity (req / achieved) | params | ppl wiki | ppl news | "
        "prune s | peak MiB | threads | commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
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
            f"{r['prune_seconds']:.0f}{mark(r)} | {r['peak_rss_mib']:.0f} | {r.get('threads') or 'not recorded'} | "
            f"{results_store.short(r.get('provenance'))} |"
        )
    lines += shared_note(rows)
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `torch_pruning`)."""
    return render(rows_of(data))


def row_key(r: dict[str, Any]) -> tuple:
    """One row per (pruner, importance, sparsity, temperature); rows written before `--pruner`
    existed are BasePruner rows."""
    return (r.get("pruner", "base"), r["importance"], r["requested_sparsity"], r.get("temperature"))


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
        default=RESULTS,
        help="stem of the shared results table (.json/.md); '' to skip",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the results .md from the stored JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        stem = args.results or RESULTS
        rows = results_store.load_rows(stem.with_suffix(".json"))
        results_store.write_atomic(stem.with_suffix(".md"), render(rows))
        return 0
    if args.pruner == "structprune" and args.importance != "structprune":
        parser.error("--importance is BasePruner's; StructPrunePruner's solver decides what goes")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports the hub
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.architectures import prunable_parameter_count
    from struprune_plugin.checkpoint import save_pruned
    from struprune_plugin.cli import evaluate_texts
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.engine import PruneConfig, resolved_allocation_name
    from struprune_plugin.memory import RssSampler
    from struprune_plugin.outputs import check_output_folder
    from struprune_plugin.tp_adapter import StructPruneImportance, finish, pruner_kwargs, traceable
    from struprune_plugin.tp_pruner import StructPrunePruner
    from struprune_plugin.zoo import resolve_model

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
        tokenize(tokenizer, corpus.read(CALIBRATION_SPLIT)), args.calib_samples, args.calib_len
    )
    calibration = text_calibration(CALIBRATION_SPLIT, args.calib_samples, args.calib_len)
    example = calib[:1, :16]
    prunable_before = prunable_parameter_count(model)
    widths_before, names = widths(model), module_names(model)
    config = None if args.importance == "magnitude" else PruneConfig(temperature=args.temperature)
    with results_store.RunRecord() as record:
        start = time.perf_counter()
        with RssSampler() as rss:
            if args.pruner == "structprune":
                pruner = StructPrunePruner(
                    model, example, calib, pruning_ratio=args.sparsity, config=config, progress=True
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
    if args.pruner == "structprune":
        run = {
            **results_store.from_prune_report(prune_report(pruner.result, calibration, "float32")),
            "pruner_kwargs": {"pruning_ratio": args.sparsity},
        }
    else:
        run = base_run(
            args, calibration, achieved, widths_before, widths(model), importance, kwargs, names, config
        )
    after = widths(model)
    report = {
        "model": folder.name,
        "pruner": args.pruner,
        "importance": "solver" if args.pruner == "structprune" else args.importance,
        "temperature": args.temperature if args.importance == "structprune" else None,
        "allocation_rule": resolved_allocation_name(config) if config is not None else None,
        "requested_sparsity": args.sparsity,
        "achieved_sparsity": achieved,
        "params": sum(p.numel() for p in model.parameters()),
        "prune_seconds": seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "perplexity": {k: v["ppl"] for k, v in ppl.items()},
        "layers": [(heads, mlp) for heads, _, mlp in after],
        "allocation": allocation["counts"] if allocation else None,
        "threads": torch.get_num_threads(),
        "calibration": {
            "split": CALIBRATION_SPLIT,
            "samples": args.calib_samples,
            "seq_len": args.calib_len,
            "seed": 0,
        },
        "run": run,
        "provenance": record.provenance,
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
        results_store.store_rows(args.results, [report], key=row_key, render=render)
    print(json.dumps({k: v for k, v in report.items() if k not in ("layers", "allocation", "run")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
