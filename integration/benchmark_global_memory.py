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
    .venv/bin/python integration/benchmark_global_memory.py --report-only   # rewrite the .md
    .venv/bin/python integration/benchmark_global_memory.py --shape tiny-test --calib-samples 2 \
        --calib-len 32 --work /tmp/gm --results /tmp/gm/results   # a one-minute smoke run

Each row is measured inside a `results_store.RunRecord` opened in this process around the child
(the child's CPU time is the run's own, not contention) and carries the child's resolved pruning
settings, calibration and per-layer widths under `run`.

Results: integration/results/global_memory.{json,md} (one row per method; rows replaced by key).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from benchmark_scale import (  # noqa: E402
    SHAPES,
    folder_bytes,
    prune_report,
    random_calibration,
    resolved_allocation,
    total_params,
    write_random_model,
)
from results_table import allocation_of, machine_of, mark, rows_of, shared_note  # noqa: E402

RESULTS = ROOT / "integration" / "results" / "global_memory"
METHODS = ("global-taylor", "structprune", "structprune-streamed")
DTYPE = "float32"


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


def child(args: argparse.Namespace) -> None:
    """One method in its own process: prints one JSON line."""
    import torch

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

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, DTYPE))
        model.eval()
    rss_before = status_bytes("VmRSS")
    exact = reset_high_water_mark()
    t0 = time.perf_counter()
    if model is None:
        result = prune_checkpoint(args.model_dir, args.output, ids, config, overwrite=True, progress=True)
    else:
        result = prune_model(model, ids, config, inplace=True, progress=True)
    seconds = time.perf_counter() - t0
    calibration = random_calibration(args.calib_samples, args.calib_len, s["vocab"])
    out = {
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": status_bytes("VmHWM"),
        "peak_is_exact": exact,
        "sampled_peak_bytes": result.peak_memory_bytes,
        "achieved_sparsity": result.achieved_sparsity,
        "allocation": resolved_allocation(result),
        "run": results_store.from_prune_report(prune_report(result, calibration, DTYPE)),
    }
    print("RESULT " + json.dumps(out), flush=True)


def render(rows: list[dict[str, Any]]) -> str:
    """global_memory.md from the stored rows (bytes in GiB, 2**30)."""
    gib = 2**30
    ref = {(r["shape"], r["calib_tokens"]): r for r in rows if r["method"] == "global-taylor"}
    shapes = ", ".join(dict.fromkeys(f"`{r['shape']}`" for r in rows))
    dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in rows))
    sparsities = " / ".join(dict.fromkeys(f"{r['sparsity']:.0%}" for r in rows))
    lines = [
        "# StructPrune against the O(N) global reference: peak memory (`integration/benchmark_global_memory.py`)",
        "",
        f"Random-weight LLaMA of shape {shapes}, {dtypes}, sparsity {sparsities}. Peak RSS over the "
        "pruning call alone (VmHWM reset just before it, model loading not counted; the resident "
        "model is counted for the methods that hold it). Each method in its own fresh process, "
        "the same checkpoint and calibration ids. StructPrune rows prune the first `pruned layers` "
        "with the solver and carry the rest through dense (the peak is reached inside one layer); "
        "the reference prunes every layer. `RSS before` is small because transformers maps the "
        "safetensors shards lazily: the model's pages become resident during the call and count in "
        "its peak. Bytes in GiB (2^30). `commit`: the code the row ran (`+`: with uncommitted changes).",
        "",
        "| method | allocation | machine | commit | params | model bytes | calib tokens | pruned layers | "
        "RSS before | peak RSS | peak / reference's | seconds |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = ref.get((r["shape"], r["calib_tokens"]))
        share = f"{r['peak_rss_bytes'] / g['peak_rss_bytes']:.2f}" if g else ""
        lines.append(
            f"| {r['method']} | {allocation_of(r)} | {machine_of(r)} | {results_store.short(r.get('provenance'))} | "
            f"{r['params'] / 1e9:.2f}B | {r['model_bytes'] / gib:.2f} GiB | {r['calib_tokens']} | "
            f"{r['pruned_layers']}/{r['layers']} | {r['rss_before_bytes'] / gib:.2f} GiB | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB | {share} | {r['seconds']:.0f}{mark(r)} |"
        )
    lines += shared_note(rows)
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `global_memory`)."""
    return render(rows_of(data))


def row_key(row: dict[str, Any]) -> tuple:
    """Rows are replaced by method, shape, machine and calibration size."""
    return (row["method"], row["shape"], machine_of(row), row["calib_tokens"])


def main() -> None:
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
    p.add_argument("--results", type=Path, default=RESULTS, help="results stem (.json and .md are added)")
    p.add_argument(
        "--report-only",
        "--render",
        dest="render",
        action="store_true",
        help="only rewrite the Markdown from the JSON",
    )
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
    stem = args.results
    if args.render:
        rows = results_store.load_rows(stem.with_suffix(".json"))
        results_store.write_atomic(stem.with_suffix(".md"), render(rows))
        return
    import torch

    model_dir = args.work / f"{args.shape}-fp32"
    write_random_model(model_dir, args.shape, getattr(torch, DTYPE))
    for method in args.methods:
        output = args.work / f"{args.shape}-{method}-pruned"
        cmd = [sys.executable, __file__, "--child", "--method", method, "--model-dir", str(model_dir)]
        cmd += ["--output", str(output), "--shape", args.shape, "--sparsity", str(args.sparsity)]
        cmd += ["--prune-layers", str(args.prune_layers), "--calib-samples", str(args.calib_samples)]
        cmd += ["--calib-len", str(args.calib_len), "--batch-size", str(args.batch_size)]
        print(f"== {method}", flush=True)
        # The record is opened here, around the child: its CPU time is this run's own work.
        with results_store.RunRecord() as record:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        shutil.rmtree(output, ignore_errors=True)
        row = {
            "method": method,
            "shape": args.shape,
            "dtype": DTYPE,
            "params": total_params(s),
            "model_bytes": folder_bytes(model_dir),
            "layers": s["layers"],
            "pruned_layers": s["layers"] if method == "global-taylor" else args.prune_layers,
            "calib_tokens": args.calib_samples * args.calib_len,
            "sparsity": args.sparsity,
            "threads": torch.get_num_threads(),
            **json.loads(line.removeprefix("RESULT ")),
            "provenance": record.provenance,
        }
        rows = results_store.store_rows(stem, [row], key=row_key, render=render)
        print(render(rows), flush=True)


if __name__ == "__main__":
    main()
