"""Prune time against one dense forward pass over the same calibration tokens.

The issue's yardstick: pruning a model should cost at most 3x one dense forward over its
calibration tokens on the same machine. Both are timed in one process, on the same windows,
the forward before and after the pruning (their mean is the reference, which evens out drift in
the machine's load). The forward is the model's own (all positions' logits, as a calibration
forward computes them), batch by batch like the engine.

The whole measurement runs inside a `results_store.RunRecord`: the row records the commit, the
machine, the library versions and whether other jobs shared the machine, and under `run` the
pruning's resolved settings, calibration and per-layer widths.

    .venv/bin/python integration/benchmark_prune_speed.py --model smollm2 --sparsity 0.3
    .venv/bin/python integration/benchmark_prune_speed.py --report-only   # rewrite the .md

Writes integration/results/prune_speed.{json,md} (rows replaced by model, sparsity, device,
machine and commit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from benchmark_scale import prune_report, resolved_allocation, text_calibration  # noqa: E402
from results_table import allocation_of, libraries_of, machine_of, mark, rows_of, shared_note  # noqa: E402

if TYPE_CHECKING:
    import torch

RESULTS = ROOT / "integration" / "results" / "prune_speed"
CALIBRATION_SPLIT = "wiki_train"


def dense_forward_seconds(model, ids: torch.Tensor, batch_size: int, device: str = "cpu") -> float:
    """Wall time of the model's forward over `ids`, batch by batch, on `device` (the model and
    the windows are moved there first, outside the timing; a GPU is synchronised at the end)."""
    import torch

    model.to(device)
    batches = [b.to(device) for b in ids.split(batch_size)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.to("cpu")
    return seconds


def _forward(row: dict[str, Any]) -> str:
    """The reference forward: the mean, and the two timings it averages."""
    before, after = row.get("forward_seconds_before_after") or (None, None)
    text = f"{row['forward_seconds']:.1f}{mark(row)}"
    return f"{text} ({before:.1f} / {after:.1f})" if before is not None else text


def render(rows: list[dict[str, Any]]) -> str:
    """prune_speed.md from the stored rows: every figure and label read from them."""
    lines = [
        "# Prune time against one dense forward (`integration/benchmark_prune_speed.py`)",
        "",
        "StructPrune through `prune_model`, one process: the dense forward over the calibration "
        "windows is timed before and after the pruning and averaged (both timings in brackets); "
        "ratio = prune s / that mean. `allocation`: the layer allocation the row recorded (rows "
        "measured before rows recorded their settings: not recorded). `commit`: the code the row "
        "ran (`+`: with uncommitted changes); `label`: the code label rows stored before the commit "
        "was recorded. `torch`: the version the row's record names (rows measured before that: the pin "
        "pyproject.toml held at the commit, not necessarily what the machine had installed).",
        "",
        "| model | sparsity | device | machine | threads | calib tokens | allocation | torch | "
        "dense forward s (before / after) | prune s | ratio | commit | label |",
        "|---|---:|---|---|---:|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.2f} | {r.get('device') or 'not recorded'} | {machine_of(r)} | "
            f"{r['threads']} | {r['calib_tokens']} | {allocation_of(r)} | {libraries_of(r, ['torch'])} | "
            f"{_forward(r)} | {r['prune_seconds']:.1f}{mark(r)} | **{r['ratio']:.2f}** | "
            f"{results_store.short(r.get('provenance'))} | {r.get('code') or ''} |"
        )
    lines += shared_note(rows)
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (stem `prune_speed`)."""
    return render(rows_of(data))


def row_key(row: dict[str, Any]) -> tuple:
    """Rows are replaced by model, sparsity, device, machine and code (old label or commit)."""
    code = row.get("code") or results_store.short(row.get("provenance"))
    return (row["model"], row["sparsity"], row.get("device"), machine_of(row), code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (forward and pruning both run there)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the .md from the stored JSON")
    args = p.parse_args()
    if args.report_only:
        rows = results_store.load_rows(RESULTS.with_suffix(".json"))
        results_store.write_atomic(RESULTS.with_suffix(".md"), render(rows))
        return
    import torch
    from transformers import AutoTokenizer

    from struprune_plugin.checkpoint import load_pruned
    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize
    from struprune_plugin.engine import PruneConfig, prune_model
    from struprune_plugin.zoo import resolve_model

    folder = resolve_model(args.model)
    model, tok = load_pruned(folder), AutoTokenizer.from_pretrained(folder)
    ids = sample_calibration(
        tokenize(tok, ensure_texts().read(CALIBRATION_SPLIT)), args.calib_samples, args.calib_len, 0
    )
    if args.device.startswith("cuda"):  # a first forward loads the kernels: not part of either figure
        dense_forward_seconds(model, ids[: args.batch_size], args.batch_size, args.device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with results_store.RunRecord() as record:
        before = dense_forward_seconds(model, ids, args.batch_size, args.device)
        print(f"dense forward {before:.1f}s", flush=True)
        result = prune_model(
            model, ids, PruneConfig(sparsity=args.sparsity, batch_size=args.batch_size, device=args.device)
        )
        after = dense_forward_seconds(model, ids, args.batch_size, args.device)
    forward = (before + after) / 2
    calibration = text_calibration(CALIBRATION_SPLIT, args.calib_samples, args.calib_len)
    row = {
        "model": folder.name,
        "sparsity": args.sparsity,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "calib_tokens": args.calib_samples * args.calib_len,
        "forward_seconds": forward,
        "forward_seconds_before_after": [before, after],
        "prune_seconds": result.seconds,
        "ratio": result.seconds / forward,
        "allocation": resolved_allocation(result),
        "run": results_store.from_prune_report(prune_report(result, calibration, dtype)),
        "provenance": record.provenance,
    }
    rows = results_store.store_rows(RESULTS, [row], key=row_key, render=render)
    print(render(rows))


if __name__ == "__main__":
    main()
