"""Scale benchmark: prune a LLaMA-2-7B-shaped model larger than comfortable for this machine with
the out-of-core engine (`struprune prune --stream-weights`), and measure what the method promises:
peak memory of about one decoder layer, whatever the depth.

The model has random weights (speed and memory depend on shapes, not values), is written layer
by layer as bf16 safetensors shards (never whole in memory), and is pruned at 30 % in a fresh
process so that its peak RSS is the pruning's alone. Reported per run: parameters, bytes on disk,
peak RSS (sampled during pruning, and the child's high-water mark), seconds per pruned layer and
per dense (skipped) layer, CUDA peak on a GPU, and an extrapolation to LLaMA-2-70B dims (bytes
shown in GiB, 2**30, throughout).

On a small CPU machine pruning every layer of a 7B model takes hours, so `--prune-layers K`
prunes the first K layers and streams the others through unchanged (`skip_layers`): the memory
figure still covers the whole 32-layer model, and the per-layer time is measured on the K pruned
ones. On a GPU every layer is pruned.

Every row is measured inside a `results_store.RunRecord` opened in this process around the child
(so the child's CPU time counts as the run's own when contention is measured) and carries the
child's resolved pruning settings and per-layer widths under `run`.

    .venv/bin/python integration/benchmark_scale.py --prune-layers 2             # this CPU
    .venv/bin/python integration/benchmark_scale.py --device cuda --prune-layers 32
    .venv/bin/python integration/benchmark_scale.py --report-only                # rewrite scale.md

Results: integration/results/scale.{json,md} (one object per run; rows are replaced by key).
The helpers for what rows record of a pruning run (`prune_report`, `resolved_allocation`,
`text_calibration`, `random_calibration`) are shared with the other memory, speed and host
benchmarks; how tables show rows and their provenance is `results_table`'s, shared by every script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from results_table import allocation_of, machine_of, mark, rows_of, shared_note  # noqa: E402

if TYPE_CHECKING:
    import torch

    from struprune_plugin.engine import PruneResult

RESULTS = ROOT / "integration" / "results" / "scale"

SHAPES = {
    # TinyLlama-1.1B's shape: the largest whose O(N) global reference (fp32 weights + gradients)
    # fits a 24 GB machine; benchmark_global_memory.py uses it.
    "tinyllama-1.1b": dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, layers=22, vocab=32000),
    "tiny-test": dict(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, vocab=1000),
    "llama2-7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000),
    "llama2-70b": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=32000),
}


def layer_params(s: dict[str, int]) -> int:
    head_dim = s["hidden"] // s["heads"]
    attn = 2 * s["hidden"] * s["hidden"] + 2 * s["hidden"] * s["kv_heads"] * head_dim
    return attn + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"]


def total_params(s: dict[str, int]) -> int:
    return s["layers"] * layer_params(s) + 2 * s["vocab"] * s["hidden"] + s["hidden"]


def write_random_model(folder: Path, shape: str, dtype: torch.dtype) -> None:
    """A LLaMA checkpoint of `shape` with random weights, written one layer per shard, so the
    writer holds one layer at a time too. Reused when the folder is complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    s = SHAPES[shape]
    if (folder / "model.safetensors.index.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        num_hidden_layers=s["layers"],
        vocab_size=s["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.dtype = dtype
    config.save_pretrained(tmp)
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    gen = torch.Generator().manual_seed(0)
    n = s["layers"] + 1
    weight_map, total = {}, 0

    def rand(*shape_, std=0.02):
        return (torch.randn(*shape_, generator=gen) * std).to(dtype)

    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < s["layers"]:
            p = f"model.layers.{i}."
            std_out = 0.02 / (2 * s["layers"]) ** 0.5  # GPT-2's depth scaling keeps the stream finite
            tensors = {
                p + "self_attn.q_proj.weight": rand(s["hidden"], s["hidden"]),
                p + "self_attn.k_proj.weight": rand(kv, s["hidden"]),
                p + "self_attn.v_proj.weight": rand(kv, s["hidden"]),
                p + "self_attn.o_proj.weight": rand(s["hidden"], s["hidden"], std=std_out),
                p + "mlp.gate_proj.weight": rand(s["intermediate"], s["hidden"]),
                p + "mlp.up_proj.weight": rand(s["intermediate"], s["hidden"]),
                p + "mlp.down_proj.weight": rand(s["hidden"], s["intermediate"], std=std_out),
                p + "input_layernorm.weight": torch.ones(s["hidden"], dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(s["hidden"], dtype=dtype),
            }
        else:
            tensors = {
                "model.embed_tokens.weight": rand(s["vocab"], s["hidden"]),
                "model.norm.weight": torch.ones(s["hidden"], dtype=dtype),
                "lm_head.weight": rand(s["vocab"], s["hidden"]),
            }
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        print(f"wrote {name}", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


#: The dtype the random checkpoint is written in (and the pruning runs in).
DTYPE = "bfloat16"


# -- what rows record of a pruning run (shared with the other benchmark scripts) -----------------


def random_calibration(samples: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """A row's `run.calibration` for random token ids (no text, so no split or digest to name)."""
    return {"kind": "random token ids", "samples": samples, "seq_len": seq_len, "vocab": vocab, "seed": seed}


def text_calibration(split: str, samples: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    """A row's `run.calibration` for windows of a built-in text split, as `struprune prune` records
    it (the split and its digest, so a changed corpus shows)."""
    from struprune_plugin.data import TEXT_SHA256

    return {
        "split": split,
        "source": split,
        "kind": "built-in",
        "sha256": TEXT_SHA256.get(split),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "bos": False,
    }


def prune_report(result: PruneResult, calibration: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    """The fields of a `struprune prune` report for a run made in-process (`prune_model`,
    `prune_checkpoint`, `StructPrunePruner`), built the way the CLI builds them, so that
    `results_store.from_prune_report` records a benchmark's run exactly as it records the CLI's:
    resolved settings, calibration, dtype, device, requested and achieved sparsity, per-layer widths.
    The settings pass through JSON once, so a value JSON cannot hold (an Allocator instance) is
    stored as its text instead of making the row unwritable."""
    config = result.config
    settings = {k: v for k, v in vars(config).items() if k not in ("method", "device")}
    return {
        "calibration": calibration,
        "pruning": {
            "method": config.method,
            "settings": json.loads(json.dumps(settings, default=str)),
            "dtype": dtype,
            "device": config.device,
            "requested_sparsity": result.requested_sparsity,
            "achieved_sparsity": result.achieved_sparsity,
        },
        "layers": [asdict(layer) for layer in result.layers],
    }


def resolved_allocation(result: PruneResult) -> str | None:
    """The layer allocation rule a run used, as resolved ("auto" named), for solver methods."""
    return (result.allocation or {}).get("allocation")


# -- this benchmark ------------------------------------------------------------------------------


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def child(args: argparse.Namespace) -> None:
    """The pruning run itself, in its own process: prints one JSON line."""
    import torch

    from struprune_plugin.engine import PruneConfig
    from struprune_plugin.streaming import prune_checkpoint

    torch.manual_seed(0)
    s = SHAPES[args.shape]
    ids = torch.randint(0, s["vocab"], (args.calib_samples, args.calib_len))
    skip = tuple(range(args.prune_layers, s["layers"]))
    config = PruneConfig(
        sparsity=args.sparsity,
        device=args.device,
        batch_size=args.batch_size,
        skip_layers=skip,
        solver_tokens=args.solver_tokens,
        temperature=math.inf,  # uniform, as the stored rows were measured (before the allocation default)
    )
    t0 = time.perf_counter()
    result = prune_checkpoint(args.model_dir, args.output, ids, config, overwrite=True, progress=True)
    seconds = time.perf_counter() - t0
    pruned = [r.seconds for r in result.layers if r.index not in skip]
    dense = [r.seconds for r in result.layers if r.index in skip]
    calibration = random_calibration(args.calib_samples, args.calib_len, s["vocab"])
    out = {
        "seconds": seconds,
        "seconds_per_layer": sum(pruned) / len(pruned),
        "seconds_per_dense_layer": sum(dense) / len(dense) if dense else None,
        "achieved_sparsity_of_pruned_layers": result.achieved_sparsity,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "child_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "allocation": resolved_allocation(result),
        "run": results_store.from_prune_report(prune_report(result, calibration, DTYPE)),
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(out), flush=True)


def extrapolate(row: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-2-70B from the measured 7B figures: peak memory as the 7B peak's per-layer part
    scaled by the solver's dominant footprint (a float32 layer plus its float64 MLP Grams, I^2),
    plus the embeddings; time per layer scaled by the solver's dominant work (the I x I Cholesky
    solves, I^3, and the token-sized GEMMs, tokens x d x I), split in the 7B run's proportion of
    an assumed 50/50. These are estimates, not measurements."""
    a, b = SHAPES[row["shape"]], SHAPES["llama2-70b"]

    def footprint(s: dict[str, int]) -> int:
        return 4 * layer_params(s) + 3 * 8 * s["intermediate"] ** 2

    embed_a = 2 * a["vocab"] * a["hidden"] * 2
    per_layer_peak = max(row["peak_rss_bytes"] - embed_a, 0)
    peak_b = per_layer_peak * footprint(b) / footprint(a) + 2 * b["vocab"] * b["hidden"] * 2
    cubic = (b["intermediate"] / a["intermediate"]) ** 3
    token = (b["hidden"] * b["intermediate"]) / (a["hidden"] * a["intermediate"])
    t_layer = row["seconds_per_layer"] * (0.5 * cubic + 0.5 * token)
    model_b = total_params(b) * 2
    return {
        "params": total_params(b),
        "model_bytes": model_b,
        "peak_rss_bytes_estimate": peak_b,
        "peak_share_of_model": peak_b / model_b,
        "seconds_per_layer_estimate": t_layer,
        "hours_all_layers_estimate": t_layer * b["layers"] / 3600,
    }


def render(rows: list[dict[str, Any]]) -> str:
    """scale.md from the stored rows: every figure read from them (bytes in GiB, 2**30)."""
    gib = 2**30
    shapes = ", ".join(f"`{s}`" for s in _distinct(r["shape"] for r in rows))
    dtypes = ", ".join(_distinct(r["dtype"] for r in rows))
    sparsities = " / ".join(f"{s:.0%}" for s in _distinct(r["sparsity"] for r in rows))
    lines = [
        "# Scale benchmark (`integration/benchmark_scale.py`)",
        "",
        f"LLaMA-shaped models ({shapes}; random {dtypes} weights, one safetensors shard per layer) "
        f"pruned at {sparsities} by the out-of-core engine (`--stream-weights`): one decoder layer in "
        "memory at a time. Layers past `pruned layers` stream through unchanged (`skip_layers`), so "
        "the memory figure covers the whole model while the time per layer is measured on the pruned "
        "ones. Bytes in GiB (2^30). `commit`: the code the row ran (`+`: with uncommitted changes).",
        "",
        "| device | machine | commit | allocation | dtype | params | model bytes | pruned layers | "
        "calib tokens | peak RSS | peak / model | CUDA peak | s / pruned layer | s / dense layer | total s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cuda = f"{r['cuda_peak_bytes'] / gib:.2f} GiB" if r.get("cuda_peak_bytes") else ""
        dense = f"{r['seconds_per_dense_layer']:.1f}{mark(r)}" if r.get("seconds_per_dense_layer") else ""
        lines.append(
            f"| {r['device']} | {machine_of(r)} | {results_store.short(r.get('provenance'))} | "
            f"{allocation_of(r)} | {r['dtype']} | {r['params'] / 1e9:.2f}B | "
            f"{r['model_bytes'] / gib:.2f} GiB | {r['pruned_layers']}/{r['layers']} | {r['calib_tokens']} | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['peak_rss_bytes'] / r['model_bytes']:.1%} | {cuda} | "
            f"{r['seconds_per_layer']:.1f}{mark(r)} | {dense} | {r['seconds']:.0f}{mark(r)} |"
        )
    target = SHAPES["llama2-70b"]
    lines += ["", "## Extrapolation to LLaMA-2-70B dims (estimates from the measured rows)", ""]
    lines += [
        "| from run | commit | 70B params | model bytes | peak RSS (est.) | peak / model | s / layer (est.) | "
        f"hours, {target['layers']} layers (est.) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e = r["extrapolation_70b"]
        lines.append(
            f"| {r['device']} {machine_of(r)} | {results_store.short(r.get('provenance'))} | "
            f"{e['params'] / 1e9:.1f}B | {e['model_bytes'] / gib:.0f} GiB | "
            f"{e['peak_rss_bytes_estimate'] / gib:.1f} GiB | {e['peak_share_of_model']:.1%} | "
            f"{e['seconds_per_layer_estimate']:.0f}{mark(r)} | {e['hours_all_layers_estimate']:.1f}{mark(r)} |"
        )
    lines += ["", (extrapolate.__doc__ or "").replace("\n    ", " ").strip()]
    lines += shared_note(rows)
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `scale`)."""
    return render(rows_of(data))


def row_key(row: dict[str, Any]) -> tuple:
    """Rows are replaced by shape, device, machine, pruned layers and calibration size."""
    return (row["shape"], row["device"], machine_of(row), row["pruned_layers"], row["calib_tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("llama2-7b",), default="llama2-7b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--prune-layers", type=int, default=None, help="prune the first K layers (default: all)")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--solver-tokens", type=int, default=8192)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    p.add_argument("--keep-output", action="store_true", help="keep the pruned folder (it is large)")
    p.add_argument(
        "--report-only",
        "--render",
        dest="render",
        action="store_true",
        help="only rewrite scale.md from scale.json",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    s = SHAPES[args.shape]
    args.prune_layers = min(args.prune_layers or s["layers"], s["layers"])
    if args.child:
        child(args)
        return
    if args.render:
        rows = results_store.load_rows(RESULTS.with_suffix(".json"))
        results_store.write_atomic(RESULTS.with_suffix(".md"), render(rows))
        return
    import torch

    model_dir = args.work / f"{args.shape}-bf16"
    write_random_model(model_dir, args.shape, getattr(torch, DTYPE))
    output = args.work / f"{args.shape}-pruned"
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--output", str(output)]
    for name in (
        "shape",
        "device",
        "sparsity",
        "prune_layers",
        "calib_samples",
        "calib_len",
        "batch_size",
        "solver_tokens",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # The record is opened here, around the child: its CPU time is this run's own, not contention.
    with results_store.RunRecord() as record:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    measured = json.loads(line.removeprefix("RESULT "))
    if not args.keep_output:
        shutil.rmtree(output, ignore_errors=True)
    row = {
        "shape": args.shape,
        "device": args.device,
        "dtype": DTYPE,
        "params": total_params(s),
        "model_bytes": folder_bytes(model_dir),
        "layers": s["layers"],
        "pruned_layers": args.prune_layers,
        "calib_tokens": args.calib_samples * args.calib_len,
        "sparsity": args.sparsity,
        "threads": torch.get_num_threads(),
        **measured,
        "peak_rss_bytes": max(measured["peak_memory_bytes"], measured["child_maxrss_bytes"])
        if not args.device.startswith("cuda")
        else measured["child_maxrss_bytes"],
    }
    row["extrapolation_70b"] = extrapolate(row)
    row["provenance"] = record.provenance
    rows = results_store.store_rows(RESULTS, [row], key=row_key, render=render)
    print(render(rows))


if __name__ == "__main__":
    main()
