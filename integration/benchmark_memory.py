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

    .venv/bin/python integration/benchmark_memory.py [--device cuda] [--methods global-taylor]
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

HERE = Path(__file__).resolve().parent
# (hidden, layers, heads, kv heads, intermediate): LLaMA-1 proportions (7B/13B/33B/65B are
# 4096x32, 5120x40, 6656x60, 8192x80) with width / 16 and depth / 4, plus a smaller first point.
CONFIGS = [
    (192, 6, 6, 2, 512),
    (256, 8, 8, 2, 688),
    (320, 10, 10, 2, 864),
    (416, 15, 13, 1, 1120),
    (512, 20, 16, 2, 1376),
]


def worker(args) -> None:
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
    cfg = PruneConfig(method=args.method, sparsity=0.3, device=args.device, admm_iterations=2)
    result = prune_model(model, calib, cfg, inplace=True, progress=False)
    peak = result.peak_memory_bytes - (before if result.peak_memory_kind == "cpu_peak_rss" else 0)
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
            }
        )
    )


def slope(points: list[tuple[float, float]]) -> float:
    xs, ys = [math.log(p) for p, _ in points], [math.log(m) for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["structprune", "energy-threshold"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory_scaling")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)
    # glibc otherwise serves allocations up to 32 MiB from its heap and keeps them after free, so
    # RSS would report the history of freed buffers instead of what is alive at the peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # Rows of methods not run now are kept from the stored file (the threshold reference's rows
    # under its first name, "global", become "energy-threshold").
    stored_path = args.out.with_suffix(".json")
    stored = json.loads(stored_path.read_text())["rows"] if stored_path.exists() else []
    for r in stored:
        r["method"] = {"global": "energy-threshold"}.get(r["method"], r["method"])
    rows = [r for r in stored if r["method"] not in args.methods]
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
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{method:12s} {r['params'] / 1e6:8.1f}M params  working {r['working_mib']:8.1f} MiB",
                flush=True,
            )
    methods = [
        m for m in ("structprune", "energy-threshold", "global-taylor") if any(r["method"] == m for r in rows)
    ]
    methods += [m for m in args.methods if m not in methods]
    slopes = {m: slope([(r["params"], r["working_mib"]) for r in rows if r["method"] == m]) for m in methods}
    layer_slope = slope([(r["params"], r["layer_params"]) for r in rows if r["method"] == methods[0]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "slopes": slopes}, indent=1))
    kind = rows[0]["peak_kind"]
    what = "peak RSS above the pre-run RSS" if kind == "cpu_peak_rss" else "CUDA max allocated"
    lines = [
        "# Memory scaling (`integration/benchmark_memory.py`)",
        "",
        f"Random LLaMA configs (LLaMA-1 proportions), 30 % sparsity, 2 ADMM iterations, calibration "
        f"{args.samples} x {args.seq_len} tokens, device {args.device}; working memory = {what}, one "
        "process per point.",
        "",
        "| hidden x layers | params | one layer | model (fp32) | " + " | ".join(methods) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for cfg in CONFIGS:
        per = {r["method"]: r for r in rows if tuple(r["config"]) == tuple(cfg)}
        r0 = per[methods[0]]
        cells = " | ".join(f"{per[m]['working_mib']:.0f} MiB" for m in methods)
        lines.append(
            f"| {cfg[0]} x {cfg[1]} | {r0['params'] / 1e6:.1f}M | {r0['layer_params'] / 1e6:.2f}M | "
            f"{r0['model_mib']:.0f} MiB | {cells} |"
        )
    lines += ["", "Fitted log-log slope of working memory against total parameters:", ""]
    lines += [f"- {m}: {s:.2f}" for m, s in slopes.items()]
    lines.append(f"- (one decoder layer's parameters: {layer_slope:.2f}; the whole model: 1.00)")
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    _plot(rows, methods, args.out.with_name(args.out.name + ".png"))
    print(table)


def _plot(rows, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in methods:
        pts = sorted((r["params"], r["working_mib"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
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
