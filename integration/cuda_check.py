"""CUDA check: the engine on a GPU gives the CPU run's result, and its GPU memory against one
decoder layer's.

Prunes the committed tiny trained model (tests/fixtures) with StructPrune's defaults on `cpu` and
on `cuda` from the same calibration windows, and compares the kept widths (must be equal) and the
pruned weights (float tolerance: the GPU sums in another order), then the logits of both pruned
models on held-out ids. A LLaMA-2-7B-shaped decoder stack (random weights, a few layers, float32
on the GPU) is pruned too: the CUDA peak memory against one layer's bytes and the time per layer.
Writes `results/cuda_check.{json,md}`; run only where a GPU is present. The JSON is one object (one
row): both measurements run inside one `results_store.RunRecord`, whose provenance (commit, machine,
library versions, whether other jobs shared the machine) the object carries, and each part keeps its
pruning's resolved settings and per-layer widths (`run`). The .md is `render_markdown` of the JSON.

    .venv/bin/python integration/cuda_check.py [--layers 4]
    .venv/bin/python integration/cuda_check.py --report-only  # the .md from the JSON (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "integration"))
import results_store  # noqa: E402
from results_store import RESULTS  # noqa: E402
from results_table import DAGGER, mark, predates_note, rows_of  # noqa: E402

STEM = "cuda_check"
OUT = RESULTS / STEM


def tiny_comparison() -> dict[str, Any]:
    import torch
    from gguf_check import run_summary

    from conftest import TINY_TRAINED
    from struprune_plugin import PruneConfig, load_pruned, prune_model

    torch.manual_seed(0)
    calib = torch.randint(3, 4096, (16, 128))
    held_out = torch.randint(3, 4096, (2, 64))
    results = {}
    for device in ("cpu", "cuda"):
        model = load_pruned(TINY_TRAINED)
        result = prune_model(
            model, calib, PruneConfig(sparsity=0.3, device=device, batch_size=4), progress=False
        )
        results[device] = result
    cpu, gpu = results["cpu"].model.cpu(), results["cuda"].model.cpu()
    widths = [[(r.heads, r.kv_heads, r.mlp) for r in results[d].layers] for d in ("cpu", "cuda")]
    weight_diff = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for (_, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters())
    )
    with torch.no_grad():
        la, lb = gpu(input_ids=held_out).logits, cpu(input_ids=held_out).logits
    return {
        "widths_equal": widths[0] == widths[1],
        "max_rel_weight_diff": weight_diff,
        "max_rel_logit_diff": ((la - lb).abs().max() / lb.abs().max()).item(),
        "cuda_peak_mib": results["cuda"].peak_memory_bytes / 2**20
        if results["cuda"].peak_memory_bytes
        else None,
        "prune_seconds": {d: results[d].seconds for d in ("cpu", "cuda")},
        "run": run_summary(
            results["cuda"], {"source": "random ids", "samples": 16, "seq_len": 128, "seed": 0}
        ),
    }


def llama7b_stack(layers: int, tokens: int) -> dict[str, Any]:
    import torch
    from benchmark_rounding import SHAPES
    from gguf_check import run_summary
    from transformers import LlamaConfig, LlamaForCausalLM

    from struprune_plugin import PruneConfig, prune_model

    config = LlamaConfig(**{**SHAPES["llama2-7b"], "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()  # on the CPU: the engine moves one layer at a time
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    calib = torch.randint(0, 32000, (tokens // 512, 512))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = prune_model(model, calib, PruneConfig(sparsity=0.3, device="cuda", batch_size=4), progress=True)
    seconds = time.perf_counter() - start
    return {
        "layers": layers,
        "calib_tokens": calib.numel(),
        "layer_mib": layer_bytes / 2**20,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
        "seconds": seconds,
        "seconds_per_layer": [r.seconds for r in result.layers],
        "achieved": result.achieved_sparsity,
        "run": run_summary(
            result, {"source": "random ids", "samples": tokens // 512, "seq_len": 512, "seed": 0}
        ),
    }


def _settings_text(part: dict[str, Any], provenance: dict[str, Any] | None) -> str:
    """The pruning settings a part ran with: its recorded `run` where stored, else the defaults of
    the row's commit (older rows stored none)."""
    settings = (part.get("run") or {}).get("settings")
    if not settings:
        return f"StructPrune's defaults at commit {results_store.short(provenance)}"
    return (
        f"allocation {settings.get('allocation')}, temperature {settings.get('temperature')}, "
        f"kind split {settings.get('kind_split')}, MLP rounding {settings.get('mlp_round_to')}"
    )


def render_markdown(stem: str, data: Any) -> str:
    """`cuda_check.md`, exactly as this script writes it, from the parsed `cuda_check.json` (one
    object, treated as one row)."""
    if stem != STEM:
        raise ValueError(f"cuda_check.py renders {STEM!r}, not {stem!r}")
    row = rows_of(data)[-1]
    prov = row.get("provenance")
    t, s = row["tiny"], row["llama7b_stack"]
    dagger = mark(row)
    contention = ((prov or {}).get("contention") or {}).get("shared")
    lines = [
        "# CUDA check (`integration/cuda_check.py`)",
        "",
        f"{row['device']}, torch {row['torch']}. Commit {results_store.short(prov)}{predates_note([row])}.",
        "",
        f"Tiny trained model at 30 % ({_settings_text(t, prov)}), same calibration on cpu and cuda:",
        f"widths equal: {t['widths_equal']}; max relative weight difference {t['max_rel_weight_diff']:.2e}; "
        f"max relative logit difference {t['max_rel_logit_diff']:.2e}.",
        "",
        f"LLaMA-2-7B-shaped stack, {s['layers']} layers, random weights, float32, {s['calib_tokens']} "
        f"calibration tokens, 30 % ({_settings_text(s, prov)}): CUDA peak {s['cuda_peak_mib']:.0f} MiB "
        f"against one layer's {s['layer_mib']:.0f} MiB ({s['cuda_peak_mib'] / s['layer_mib']:.2f} x); "
        f"{sum(s['seconds_per_layer']) / len(s['seconds_per_layer']):.1f} s per layer{dagger}; "
        f"achieved sparsity {s['achieved']:.4f}.",
        "",
    ]
    if dagger:
        lines += [f"{DAGGER}: timed while other jobs shared the machine, so the time is an upper bound.", ""]
    elif contention is None:
        lines += ["Whether other jobs shared the machine was not recorded for this row.", ""]
    return "\n".join(lines)


def _write_md() -> str:
    """Write cuda_check.md from cuda_check.json as stored (so it is what `render_markdown` gives)."""
    text = render_markdown(STEM, json.loads(OUT.with_suffix(".json").read_text(encoding="utf-8")))
    results_store.write_atomic(OUT.with_suffix(".md"), text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--report-only", action="store_true", help="write cuda_check.md from the JSON")
    args = p.parse_args()
    if args.report_only:
        print(_write_md())
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: this check runs where a GPU is present")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with results_store.RunRecord() as record:
        out["tiny"] = tiny_comparison()
        print(json.dumps({k: v for k, v in out["tiny"].items() if k != "run"}, indent=1), flush=True)
        out["llama7b_stack"] = llama7b_stack(args.layers, args.tokens)
        print(json.dumps({k: v for k, v in out["llama7b_stack"].items() if k != "run"}, indent=1), flush=True)
    out["provenance"] = record.provenance
    # one object, not a {"rows": [...]} file: results_store.store_rows keeps files of rows, so the
    # object is checked against the same provenance schema and written atomically here
    missing = results_store.check_provenance(out)
    if missing:
        raise ValueError(f"cuda_check row lacks {missing}")
    results_store.write_atomic(OUT.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    print(_write_md())


if __name__ == "__main__":
    main()
