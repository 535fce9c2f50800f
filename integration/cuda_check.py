"""CUDA check: the engine on a GPU gives the CPU run's result, and its GPU memory stays near one
decoder layer.

Prunes the committed tiny trained model (tests/fixtures) with StructPrune's default on `cpu` and
on `cuda` from the same calibration windows, and compares the kept widths (must be equal) and the
pruned weights (float tolerance: the GPU sums in another order), then the logits of both pruned
models on held-out ids. A LLaMA-2-7B-shaped decoder stack (random weights, a few layers, float32
on the GPU) is pruned too: the CUDA peak memory against one layer's bytes and the time per layer.
Writes `results/cuda_check.{json,md}`; run only where a GPU is present.

    .venv/bin/python integration/cuda_check.py [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "integration"))
OUT = ROOT / "integration" / "results" / "cuda_check"


def tiny_comparison() -> dict:
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
    }


def llama7b_stack(layers: int, tokens: int) -> dict:
    from benchmark_rounding import SHAPES
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
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: this check runs where a GPU is present")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out["tiny"] = tiny_comparison()
    print(json.dumps(out["tiny"], indent=1), flush=True)
    out["llama7b_stack"] = llama7b_stack(args.layers, args.tokens)
    print(json.dumps(out["llama7b_stack"], indent=1), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    t, s = out["tiny"], out["llama7b_stack"]
    OUT.with_suffix(".md").write_text(
        "\n".join(
            [
                "# CUDA check (`integration/cuda_check.py`)",
                "",
                f"{out['device']}, torch {out['torch']}.",
                "",
                "Tiny trained model, StructPrune default at 30 %, same calibration on cpu and cuda:",
                f"widths equal: {t['widths_equal']}; max relative weight difference {t['max_rel_weight_diff']:.2e}; "
                f"max relative logit difference {t['max_rel_logit_diff']:.2e}.",
                "",
                f"LLaMA-2-7B-shaped stack, {s['layers']} layers, random weights, float32, {s['calib_tokens']} "
                f"calibration tokens, 30 %: CUDA peak {s['cuda_peak_mib']:.0f} MiB against one layer's "
                f"{s['layer_mib']:.0f} MiB ({s['cuda_peak_mib'] / s['layer_mib']:.2f} x); "
                f"{sum(s['seconds_per_layer']) / len(s['seconds_per_layer']):.1f} s per layer; "
                f"achieved sparsity {s['achieved']:.4f}.",
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
