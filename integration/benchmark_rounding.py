"""Rounding benchmark: what keeping every MLP width a multiple of 1 / 8 / 64 / 128 channels
(`--mlp-round-to`) costs in perplexity and buys in speed.

Two parts, each resumable and written to `results/rounding.{json,md}`:

* `quality`: `struprune prune` on SmolLM2 with the uniform allocation (`--temperature inf`, equal
  widths) and `--mlp-round-to R`, full evaluation texts; rounding moves the budget by up to half a
  step per layer, so the table shows the achieved sparsity and parameter count next to the
  perplexities.
* `speed`: the widths each rounding gives (the engine's own allocation, computed on a meta-device
  model, so no weights are needed) built with random weights in the chosen dtype on the chosen
  device: prefill (one 512-token forward) and batch-1 decode (tokens after a 512-token prompt,
  KV cache on) tokens/s. The models take turns, round after round, and the medians are compared
  with R = 1 in the same run. Shapes: SmolLM2-135M and LLaMA-2-7B.

Every row is measured inside a `results_store.RunRecord` (commit, machine, library versions, and
whether other jobs shared the machine: times measured then are marked) and stored through
`results_store.store_rows`; quality rows also keep their prune report's resolved settings and
per-layer widths (`run`).

    .venv/bin/python integration/benchmark_rounding.py quality --sparsity 0.3
    .venv/bin/python integration/benchmark_rounding.py speed --device cuda --dtype bfloat16
    .venv/bin/python integration/benchmark_rounding.py render
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import results_store
from benchmark_quality import Row, run_row
from results_store import RESULTS
from results_table import former_default, mark, provenance_legend, rows_of

if TYPE_CHECKING:  # torch is imported where models are built, so rendering needs none
    import torch

STEM = "rounding"
OUT = RESULTS / STEM
ROUNDINGS = (1, 8, 64, 128)
#: Shapes timed by the speed part: the published configs of SmolLM2-135M and LLaMA-2-7B (written
#: out, so the speed part needs no model files, e.g. on a GPU machine without the zoo's wheels).
SHAPES = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


def key(row: dict[str, Any]) -> tuple:
    """A row's identity in rounding.json (a new measurement of it replaces the stored one)."""
    return (
        row["part"],
        row.get("shape"),
        row["sparsity"],
        row["round_to"],
        row.get("device"),
        row.get("dtype"),
    )


def _write_md(_rows: list[dict[str, Any]] | None = None) -> str:
    """Write rounding.md from the JSON as stored (so it is what `render_markdown` gives)."""
    text = render_markdown(STEM, json.loads(OUT.with_suffix(".json").read_text(encoding="utf-8")))
    results_store.write_atomic(OUT.with_suffix(".md"), text)
    return text


def store(rows: list[dict[str, Any]]) -> None:
    results_store.store_rows(OUT.with_suffix(".json"), rows, key=key, render=_write_md)


def base_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def rounded_config(config, sparsity: float, round_to: int | None):
    """The config of the model StructPrune's uniform allocation gives at this rounding (equal widths)."""
    import torch
    from transformers import AutoModelForCausalLM

    from struprune_plugin.engine import PruneConfig, allocate_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts, _ = allocate_layers(
        model,
        torch.zeros((1, 8), dtype=torch.long),
        PruneConfig(sparsity=sparsity, mlp_round_to=round_to, temperature=math.inf),
    )
    if len(set(counts["mlp"])) != 1 or any(counts.get("heads", [0])):
        raise RuntimeError(f"expected equal MLP-only widths, got {counts}")
    out = config.to_dict()
    out["intermediate_size"] = config.intermediate_size - counts["mlp"][0]
    return type(config).from_dict(out)


def time_models(models: dict[int, torch.nn.Module], device: str, rounds: int, prompt: int, new: int) -> dict:
    """Median prefill and decode tokens/s per model; the models take turns within each round."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ids = torch.randint(0, 1000, (1, prompt), device=device)
    times: dict[int, dict[str, list[float]]] = {r: {"prefill": [], "decode": []} for r in models}
    for n in range(rounds + 1):  # round 0 warms up
        for r, model in models.items():
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                t1 = time.perf_counter()
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(new):
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                t2 = time.perf_counter()
            if n:
                times[r]["prefill"].append(prompt / (t1 - t0))
                times[r]["decode"].append(new / (t2 - t1))
    return {r: {k: statistics.median(v) for k, v in t.items()} for r, t in times.items()}


def cmd_speed(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    for shape in args.shape:
        base = base_config(shape)
        for sparsity in args.sparsity:
            configs = {r: rounded_config(base, sparsity, r) for r in ROUNDINGS}
            # one record per timed set: the models take turns, so they share the machine's state
            with results_store.RunRecord() as record:
                models = {}
                for r, config in configs.items():
                    torch.manual_seed(0)
                    with torch.device(args.device):
                        models[r] = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
                speed = time_models(models, args.device, args.rounds, args.prompt, args.new_tokens)
            rows = []
            for r, config in configs.items():
                params = sum(p.numel() for p in models[r].parameters())
                rows.append(
                    {
                        "part": "speed",
                        "shape": shape,
                        "sparsity": sparsity,
                        "round_to": r,
                        "device": args.device_label,
                        "dtype": args.dtype,
                        "intermediate_size": config.intermediate_size,
                        "params": params,
                        "prefill_tok_s": speed[r]["prefill"],
                        "decode_tok_s": speed[r]["decode"],
                        "prefill_vs_1": speed[r]["prefill"] / speed[1]["prefill"],
                        "decode_vs_1": speed[r]["decode"] / speed[1]["decode"],
                        "rounds": args.rounds,
                        "prompt": args.prompt,
                        "new_tokens": args.new_tokens,
                        "provenance": record.provenance,
                    }
                )
                print({k: v for k, v in rows[-1].items() if k != "provenance"}, flush=True)
            store(rows)  # one timed set at a time: an interrupted run keeps what it measured
            del models
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


def cmd_quality(args: argparse.Namespace) -> None:
    done = {
        (r["sparsity"], r["round_to"])
        for r in results_store.load_rows(OUT.with_suffix(".json"))
        if r["part"] == "quality"
    }
    args.runs, args.model, args.device = Path("runs/rounding"), "smollm2", "cpu"
    for sparsity in args.sparsity:
        for r in args.round_to:
            if (sparsity, r) in done:
                continue
            row = Row(
                f"round-{r}-{round(sparsity * 100)}",
                "structprune",
                sparsity,
                ["--temperature", "inf", "--mlp-round-to", str(r)],
            )
            with results_store.RunRecord() as record:
                result = run_row(row, args)
            report = json.loads((args.runs / row.name / "struprune_report.json").read_text())
            widths = sorted({layer["mlp"][1] for layer in result["layers"]})
            stored = {
                "part": "quality",
                "shape": "smollm2",
                "sparsity": sparsity,
                "round_to": r,
                "flags": row.flags,
                "intermediate_size": widths,
                "achieved": result["achieved"],
                "params": result["params"],
                "ppl": {"wiki_test": result["ppl_wiki"], "news": result["ppl_news"]},
                "prune_seconds": result["prune_seconds"],
                "calib_samples": args.calib_samples,
                "run": results_store.from_prune_report(report),
                "provenance": record.provenance,
            }
            print({k: v for k, v in stored.items() if k not in ("run", "provenance")}, flush=True)
            store([stored])  # one row at a time: an interrupted run keeps what it measured


def allocation_label(row: dict[str, Any]) -> str:
    """Every quality row ran the uniform allocation: written out (`--temperature inf`, stored in
    `flags`) since uniform stopped being the default; rows without it ran it as the former default
    (the script passed only `--mlp-round-to` then)."""
    flags = row.get("flags") or []
    return "uniform (former default)" if former_default(row) or "--temperature" not in flags else "uniform"


def _order(r: dict[str, Any]) -> tuple:
    return (r["part"], r.get("shape", ""), r["sparsity"], r.get("device", ""), r["round_to"])


def render_markdown(stem: str, data: Any) -> str:
    """`rounding.md`, exactly as this script writes it, from the parsed `rounding.json`."""
    if stem != STEM:
        raise ValueError(f"benchmark_rounding.py renders {STEM!r}, not {stem!r}")
    rows = sorted(rows_of(data), key=_order)
    lines = [
        "# Rounding benchmark (`integration/benchmark_rounding.py`)",
        "",
        "MLP widths kept a multiple of R channels (`--mlp-round-to R`), StructPrune with the uniform",
        "allocation (equal widths). Rounding moves the budget by up to half a step per layer.",
        "",
    ]
    quality = [r for r in rows if r["part"] == "quality"]
    if quality:
        lines += [
            "## Perplexity (SmolLM2-135M-Instruct, full evaluation texts)",
            "",
            "Other settings: the defaults of each row's commit. " + provenance_legend(quality, timed=False),
            "",
            "| sparsity | R | allocation | MLP width | achieved | params | ppl wiki | ppl news | calib windows "
            "| commit |",
            "|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in quality:
            lines.append(
                f"| {r['sparsity']:.2f} | {r['round_to']} | {allocation_label(r)} | "
                f"{', '.join(map(str, r['intermediate_size']))} | "
                f"{r['achieved']:.4f} | {r['params']:,} | {r['ppl']['wiki_test']:.2f} | "
                f"{r['ppl']['news']:.2f} | {r['calib_samples']} | {results_store.short(r.get('provenance'))} |"
            )
        lines.append("")
    speed = [r for r in rows if r["part"] == "speed"]
    if speed:
        protocol = sorted({(r["rounds"], r["prompt"], r["new_tokens"]) for r in speed})
        lines += [
            "## Speed (random weights of the rounded shapes; medians, models taking turns)",
            "",
            "Medians over "
            + "; ".join(
                f"{rounds} rounds of a {prompt}-token prefill and {new} decode tokens"
                for rounds, prompt, new in protocol
            )
            + ". "
            + provenance_legend(speed, figure="a speed", bound="a lower bound"),
            "",
            "| device | dtype | shape | sparsity | R | MLP width | params | prefill tok/s | vs R=1 "
            "| decode tok/s | vs R=1 | commit |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in speed:
            lines.append(
                f"| {r['device']} | {r['dtype']} | {r['shape']} | {r['sparsity']:.2f} | {r['round_to']} | "
                f"{r['intermediate_size']} | {r['params'] / 1e6:.1f}M | {r['prefill_tok_s']:.1f}{mark(r)} | "
                f"{r['prefill_vs_1']:.3f} | {r['decode_tok_s']:.1f}{mark(r)} | {r['decode_vs_1']:.3f} | "
                f"{results_store.short(r.get('provenance'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--sparsity", type=float, nargs="+", default=[0.3])
    q.add_argument("--round-to", type=int, nargs="+", default=list(ROUNDINGS))
    q.add_argument("--calib-samples", type=int, default=128)
    s = sub.add_parser("speed")
    s.add_argument("--device", default="cpu")
    s.add_argument(
        "--device-label", default=None, help="the machine, for the table (default: the device name)"
    )
    s.add_argument("--dtype", default="float32")
    s.add_argument("--shape", nargs="+", default=["smollm2", "llama2-7b"], choices=list(SHAPES))
    s.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--prompt", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=64)
    sub.add_parser("render", help="write rounding.md from rounding.json")
    args = p.parse_args()
    if args.part == "speed":
        if args.device_label is None:
            import torch

            args.device_label = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        cmd_speed(args)
    elif args.part == "quality":
        cmd_quality(args)
    else:
        print(_write_md())


if __name__ == "__main__":
    main()
