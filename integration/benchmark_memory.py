"""Memory scaling: peak working memory of a pruning run against model size, StructPrune vs the
references (energy-threshold: every group's score resident; global-taylor: the whole model with its
gradients).

A series of randomly initialised LLaMA configurations grows in depth and width together (shaped
like the LLaMA-1 family, 7B -> 65B: width x2, depth x2.5, scaled down). Every point runs in its
own process: the model is built, the calibration batches are made, then the pruning run is
measured. On CPU the figure is the run's peak RSS minus the RSS just before it started (the model
itself is resident before and is pruned in place, so this is the working set the method adds:
one resident layer's activations, statistics and solver state, plus whatever it keeps across
layers). On a GPU it is CUDA max allocated during the run (the model stays on the CPU, layers
visit the device one at a time). The fitted log-log slope against total parameters is reported.
Workers run with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the RSS at once.

Each point is measured inside a `results_store.RunRecord` opened in this process around the worker
(its CPU time is the run's own, not contention) and carries the worker's resolved pruning
settings, calibration and per-layer widths under `run`.

    .venv/bin/python integration/benchmark_memory.py [--device cuda] [--methods global-taylor]
    .venv/bin/python integration/benchmark_memory.py --report-only   # rewrite the .md (and plot)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from benchmark_scale import prune_report, random_calibration, resolved_allocation  # noqa: E402
from results_table import rows_of  # noqa: E402

RESULTS = HERE / "results" / "memory_scaling"
# (hidden, layers, heads, kv heads, intermediate): LLaMA-1 proportions (7B/13B/33B/65B are
# 4096x32, 5120x40, 6656x60, 8192x80) with width / 16 and depth / 4, plus a smaller first point.
CONFIGS = [
    (192, 6, 6, 2, 512),
    (256, 8, 8, 2, 688),
    (320, 10, 10, 2, 864),
    (416, 15, 13, 1, 1120),
    (512, 20, 16, 2, 1376),
]
#: The methods' column order (others follow in the order run).
METHOD_ORDER = ("structprune", "energy-threshold", "global-taylor")
#: The settings every point runs with (recorded per row under `run`).
SPARSITY = 0.3
ADMM_ITERATIONS = 2


def worker(args: argparse.Namespace) -> None:
    """One point in its own process: prints one JSON line (the last line of its stdout)."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from struprune_plugin.engine import PruneConfig, prune_model

    hidden, layers, heads, kv, inter = CONFIGS[args.worker]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=32,
        intermediate_size=inter,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    calib = torch.randint(
        0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    gc.collect()
    before = psutil.Process().memory_info().rss
    cfg = PruneConfig(
        method=args.method, sparsity=SPARSITY, device=args.device, admm_iterations=ADMM_ITERATIONS
    )
    result = prune_model(model, calib, cfg, inplace=True, progress=False)
    peak = result.peak_memory_bytes - (before if result.peak_memory_kind == "cpu_peak_rss" else 0)
    calibration = random_calibration(args.samples, args.seq_len, args.vocab)
    print(
        json.dumps(
            {
                "config": CONFIGS[args.worker],
                "method": args.method,
                "params": params,
                "layer_params": layer_params,
                "model_mib": params * 4 / 2**20,
                "working_mib": peak / 2**20,
                "peak_kind": result.peak_memory_kind,
                "seconds": result.seconds,
                "achieved": result.achieved_sparsity,
                "allocation": resolved_allocation(result),
                "run": results_store.from_prune_report(prune_report(result, calibration, "float32")),
            }
        )
    )


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    xs, ys = [math.log(p) for p, _ in points], [math.log(m) for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def column(row: dict[str, Any]) -> str:
    """A row's method column: StructPrune rows measured under the former default say so (their
    figures predate today's default allocation), so no reader takes them for today's."""
    if (row.get("provenance") or {}).get("measured_default"):
        return f"{row['method']} (uniform allocation, the former default)"
    return row["method"]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns in METHOD_ORDER, then the others in the order stored."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    names = list(dict.fromkeys(column(r) for r in rows))
    methods = {column(r): r["method"] for r in rows}
    return sorted(names, key=lambda c: (rank.get(methods[c], len(rank)), names.index(c)))


def slopes_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each column's fitted log-log slope of working memory against total parameters."""
    return {
        c: slope([(r["params"], r["working_mib"]) for r in rows if column(r) == c])
        for c in columns(rows)
        if sum(column(r) == c for r in rows) >= 2
    }


def _settings(rows: list[dict[str, Any]]) -> str:
    """What the rows record about how they ran, joined; rows without a `run` say so."""
    recorded = [r["run"] for r in rows if r.get("run")]
    parts = []
    requested = dict.fromkeys(f"{run['requested_sparsity']:.0%}" for run in recorded)
    if requested:
        parts.append(f"requested sparsity {' / '.join(requested)}")
    low, high = (f"{f(r['achieved'] for r in rows):.4f}" for f in (min, max))
    parts.append(f"achieved sparsity {low}" + (f" to {high}" if high != low else ""))
    admm = dict.fromkeys(str((run.get("settings") or {}).get("admm_iterations")) for run in recorded)
    if admm:
        parts.append(f"{' / '.join(admm)} ADMM iterations")
    calib = dict.fromkeys(
        f"{c['samples']} x {c['seq_len']} random tokens"
        for c in (run.get("calibration") for run in recorded)
        if c
    )
    if calib:
        parts.append(f"calibration {' / '.join(calib)}")
    devices = dict.fromkeys(str(run.get("device")) for run in recorded)
    if devices:
        parts.append(f"device {' / '.join(devices)}")
    missing = len(rows) - len(recorded)
    if missing:
        parts.append(
            f"calibration, solver settings and device are not recorded for the {missing} of {len(rows)} "
            "points measured before rows recorded them (see the commit row)"
        )
    return "; ".join(parts)


def render(rows: list[dict[str, Any]]) -> str:
    """memory_scaling.md from the stored rows (every figure read or fitted from them)."""
    cols = columns(rows)
    kinds = dict.fromkeys(r["peak_kind"] for r in rows)
    what = " / ".join(
        "peak RSS above the pre-run RSS" if k == "cpu_peak_rss" else "CUDA max allocated" for k in kinds
    )
    lines = [
        "# Memory scaling (`integration/benchmark_memory.py`)",
        "",
        f"Random LLaMA configs (LLaMA-1 proportions): {_settings(rows)}. Working memory = {what}, "
        "one process per point.",
        "",
        "| hidden x layers | params | one layer | model (fp32) | " + " | ".join(cols) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(cols),
    ]
    configs = list(dict.fromkeys(tuple(r["config"]) for r in rows))
    for cfg in sorted(configs, key=lambda c: next(r["params"] for r in rows if tuple(r["config"]) == c)):
        per = {column(r): r for r in rows if tuple(r["config"]) == cfg}
        r0 = next(iter(per.values()))
        cells = " | ".join(f"{per[c]['working_mib']:.0f} MiB" if c in per else "" for c in cols)
        lines.append(
            f"| {cfg[0]} x {cfg[1]} | {r0['params'] / 1e6:.1f}M | {r0['layer_params'] / 1e6:.2f}M | "
            f"{r0['model_mib']:.0f} MiB | {cells} |"
        )
    commits = [
        ", ".join(dict.fromkeys(results_store.short(r.get("provenance")) for r in rows if column(r) == c))
        for c in cols
    ]
    lines.append("| commit | | | | " + " | ".join(commits) + " |")
    lines += ["", "Fitted log-log slope of working memory against total parameters:", ""]
    lines += [f"- {c}: {s:.2f}" for c, s in slopes_of(rows).items()]
    # one point per config: the layer sizes of the configs measured, whichever method measured them
    layers = {tuple(r["config"]): (r["params"], r["layer_params"]) for r in rows}
    layer_slope = slope(list(layers.values()))
    lines.append(f"- (one decoder layer's parameters: {layer_slope:.2f}; the whole model: 1.00)")
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `memory_scaling`)."""
    return render(rows_of(data))


def row_key(row: dict[str, Any]) -> tuple:
    """A stored point is replaced by a new one of the same method and config."""
    return (row["method"], tuple(row["config"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["structprune", "energy-threshold"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the .md and plot from the stored JSON"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)
    json_path = args.out.with_suffix(".json")
    if args.report_only:
        rows = results_store.load_rows(json_path)
        results_store.write_atomic(args.out.with_suffix(".md"), render(rows))
        _plot(rows, args.out.with_name(args.out.name + ".png"))
        return None
    # glibc otherwise serves allocations up to 32 MiB from its heap and keeps them after free, so
    # RSS would report the history of freed buffers instead of what is alive at the peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for i in range(len(CONFIGS)):
            cmd = [sys.executable, __file__, "--worker", str(i), "--method", method, "--device", args.device]
            cmd += [
                "--samples",
                str(args.samples),
                "--seq-len",
                str(args.seq_len),
                "--vocab",
                str(args.vocab),
            ]
            # The record is opened here, around the worker: its CPU time is this run's own work.
            with results_store.RunRecord() as record:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row = {**json.loads(out.strip().splitlines()[-1]), "provenance": record.provenance}
            # store_rows re-reads the file and keeps the rows of methods not run now; the slopes
            # stored beside the rows are refitted over all of them.
            stored = results_store.load_rows(json_path)
            merged = [r for r in stored if row_key(r) != row_key(row)] + [row]
            rows = results_store.store_rows(
                args.out, [row], key=row_key, render=render, meta={"slopes": slopes_of(merged)}
            )
            print(
                f"{method:12s} {row['params'] / 1e6:8.1f}M params  working {row['working_mib']:8.1f} MiB",
                flush=True,
            )
    _plot(rows, args.out.with_name(args.out.name + ".png"))
    print(render(rows))
    return None


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Working memory against parameters, one line per table column, and the whole model's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for c in columns(rows):
        pts = sorted((r["params"], r["working_mib"]) for r in rows if column(r) == c)
        ax.plot(*zip(*pts), marker="o", label=c)
    pts = sorted({(r["params"], r["model_mib"]) for r in rows})
    ax.plot(*zip(*pts), ls="--", color="grey", label="whole model (fp32)")
    ax.set(xscale="log", yscale="log", xlabel="total parameters", ylabel="MiB")
    ax.set_title("Working memory of a pruning run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
