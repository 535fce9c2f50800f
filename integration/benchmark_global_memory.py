"""Peak memory of StructPrune against the O(N) global reference (`global-taylor`) on one model
large enough for the difference to show, measured the same way in the same kind of process.

The memory benchmark (`benchmark_memory.py`) stops at 56M parameters, where one window's
activations and fixed costs still dominate and the reference's gradient buffers (one float per
parameter) have only just overtaken StructPrune's working set. Here the model has TinyLlama-1.1B's
shape (2048 x 22, MLP 5632, 32 query heads over 4 K/V heads): the largest whose reference, whole
model resident in float32 with its gradients, fits this 24 GB machine. Weights are random (memory
depends on shapes, not values), written once as float32 safetensors, one shard per layer.

Every method runs in its own fresh process on the same checkpoint and the same calibration ids:

- `global-taylor`: the model loaded whole, gradient of the whole model's loss, one ranking, refits;
- `structprune`: StructPrune's default, the model loaded whole (as `struprune prune` does);
- `structprune-streamed`: StructPrune's default with `--stream-weights` (`prune_checkpoint`): one
  decoder layer read from the shards at a time, which is what its memory claim is about.

The figure is the process's peak RSS over the pruning call alone: the kernel's high-water mark
(VmHWM) is reset just before the call (`/proc/self/clear_refs`), so loading the model is not
counted, and the model's own bytes are, for the methods that hold it. On a small CPU
`--prune-layers K` prunes only the first K layers with StructPrune's solver and carries the others
through dense (their energies are still measured and they are still read, run and written): the
peak is reached inside any one layer, so it covers the whole model, and the time is not the
point here. The reference always prunes every layer (its peak is the gradient pass).

    .venv/bin/python integration/benchmark_global_memory.py --prune-layers 2
    .venv/bin/python integration/benchmark_global_memory.py --render
    .venv/bin/python integration/benchmark_global_memory.py --shape tiny-test --calib-samples 2 \
        --calib-len 32 --work /tmp/gm --results /tmp/gm/results   # a one-minute smoke run

Results: integration/results/global_memory.{json,md} (one row per method; rows replaced by key).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration"))
RESULTS = ROOT / "integration" / "results" / "global_memory"
METHODS = ("global-taylor", "structprune", "structprune-streamed")


def reset_high_water_mark() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """One method in its own process: prints one JSON line."""
    from benchmark_scale import SHAPES

    from struprune_plugin.engine import PruneConfig, prune_model
    from struprune_plugin.streaming import prune_checkpoint

    s = SHAPES[args.shape]
    ids = torch.randint(
        0, s["vocab"], (args.calib_samples, args.calib_len), generator=torch.Generator().manual_seed(0)
    )
    skip = () if args.method == "global-taylor" else tuple(range(args.prune_layers, s["layers"]))
    config = PruneConfig(
        method="global-taylor" if args.method == "global-taylor" else "structprune",
        sparsity=args.sparsity,
        batch_size=args.batch_size,
        skip_layers=skip,
    )
    model = None
    if args.method != "structprune-streamed":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model.eval()
    rss_before = status_bytes("VmRSS")
    exact = reset_high_water_mark()
    t0 = time.perf_counter()
    if model is None:
        result = prune_checkpoint(args.model_dir, args.output, ids, config, overwrite=True, progress=True)
    else:
        result = prune_model(model, ids, config, inplace=True, progress=True)
    seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": status_bytes("VmHWM"),
        "peak_is_exact": exact,
        "sampled_peak_bytes": result.peak_memory_bytes,
        "achieved_sparsity": result.achieved_sparsity,
        "allocation": (result.allocation or {}).get("allocation"),
    }
    print("RESULT " + json.dumps(out), flush=True)


def render(rows: list[dict]) -> str:
    gib = 2**30
    ref = {(r["shape"], r["calib_tokens"]): r for r in rows if r["method"] == "global-taylor"}
    lines = [
        "# StructPrune against the O(N) global reference: peak memory (`integration/benchmark_global_memory.py`)",
        "",
        "Random-weight LLaMA of TinyLlama-1.1B's shape, float32, 30 % sparsity. Peak RSS over the "
        "pruning call alone (VmHWM reset just before it, model loading not counted; the resident "
        "model is counted for the methods that hold it). Each method in its own fresh process, "
        "the same checkpoint and calibration ids. StructPrune rows prune the first `pruned layers` "
        "with the solver and carry the rest through dense (the peak is reached inside one layer); "
        "the reference prunes every layer. `RSS before` is small because transformers maps the "
        "safetensors shards lazily: the model's pages become resident during the call and count in "
        "its peak. Seconds are wall time with other jobs on the cores (not the point here).",
        "",
        "| method | machine | params | model bytes | calib tokens | pruned layers | RSS before | peak RSS | "
        "peak / reference's | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = ref.get((r["shape"], r["calib_tokens"]))
        share = f"{r['peak_rss_bytes'] / g['peak_rss_bytes']:.2f}" if g else ""
        lines.append(
            f"| {r['method']} | {r['machine']} | {r['params'] / 1e9:.2f}B | {r['model_bytes'] / gib:.2f} GiB | "
            f"{r['calib_tokens']} | {r['pruned_layers']}/{r['layers']} | {r['rss_before_bytes'] / gib:.2f} GiB | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB | {share} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmark_scale import (
        SHAPES,
        folder_bytes,
        load_results,
        save_results,
        total_params,
        write_random_model,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tinyllama-1.1b", "tiny-test"), default="tinyllama-1.1b")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument(
        "--prune-layers", type=int, default=None, help="StructPrune: prune the first K layers (default: all)"
    )
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "global_memory")
    p.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores")
    p.add_argument("--results", type=Path, default=RESULTS, help="results stem (.json and .md are added)")
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    s = SHAPES[args.shape]
    args.prune_layers = min(args.prune_layers or s["layers"], s["layers"])
    if args.child:
        child(args)
        return
    if args.render:
        save_results(args.results, load_results(args.results), render)
        return
    model_dir = args.work / f"{args.shape}-fp32"
    write_random_model(model_dir, args.shape, torch.float32)
    for method in args.methods:
        output = args.work / f"{args.shape}-{method}-pruned"
        cmd = [sys.executable, __file__, "--child", "--method", method, "--model-dir", str(model_dir)]
        cmd += ["--output", str(output), "--shape", args.shape, "--sparsity", str(args.sparsity)]
        cmd += ["--prune-layers", str(args.prune_layers), "--calib-samples", str(args.calib_samples)]
        cmd += ["--calib-len", str(args.calib_len), "--batch-size", str(args.batch_size)]
        print(f"== {method}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        shutil.rmtree(output, ignore_errors=True)
        row = {
            "method": method,
            "shape": args.shape,
            "machine": args.machine,
            "dtype": "float32",
            "params": total_params(s),
            "model_bytes": folder_bytes(model_dir),
            "layers": s["layers"],
            "pruned_layers": s["layers"] if method == "global-taylor" else args.prune_layers,
            "calib_tokens": args.calib_samples * args.calib_len,
            "sparsity": args.sparsity,
            "threads": torch.get_num_threads(),
            **json.loads(line.removeprefix("RESULT ")),
        }
        key = (row["method"], row["shape"], row["machine"], row["calib_tokens"])
        rows = [
            r
            for r in load_results(args.results)
            if (r["method"], r["shape"], r["machine"], r["calib_tokens"]) != key
        ]
        save_results(args.results, [*rows, row], render)
        print(render([*rows, row]), flush=True)


if __name__ == "__main__":
    main()
