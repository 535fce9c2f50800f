"""Speed benchmark: dense vs pruned SmolLM2, prefill and decode tokens/s, PyTorch and ONNX Runtime.

For every model (the dense SmolLM2 and the pruned folders the quality benchmark wrote,
runs/quality/structprune-{20,30,50}): parameters, checkpoint size, and

* prefill: one forward over a 512-token prompt (batch 1), tokens/s = 512 / median time;
* decode: greedy generation of 64 tokens after a 64-token prompt with the KV cache;
  tokens/s = 64 / (median generate time - median prefill time of that prompt).

`--backend torch` runs in the main environment; `--backend ort` exports each folder with
Optimum (struprune_plugin.onnx_export) and runs `ORTModelForCausalLM`, so it needs the export
environment (`bash scripts/install_export_env.sh`). Rows of both backends accumulate in
integration/results/speed.{json,md}. The target: speed-up >= 0.9 x (dense / pruned parameters).

    .venv/bin/python integration/benchmark_speed.py --backend torch
    .venv-export/bin/python integration/benchmark_speed.py --backend ort
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from struprune_plugin.zoo import resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "integration" / "results" / "speed"
DEFAULT_PRUNED = [ROOT / "runs" / "quality" / f"structprune-{p}" for p in (20, 30, 50)]


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(backend: str, folder: Path, work: Path, threads: int):
    """The model to time, and its parameter count (read from the PyTorch model)."""
    from transformers import AutoModelForCausalLM

    import struprune_plugin  # noqa: F401  (registers the pruned model classes)

    torch_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in torch_model.parameters())
    if backend == "torch":
        return torch_model, params
    from struprune_plugin.onnx_export import export_onnx, ort_model_class

    onnx_dir = work / f"{folder.name}-onnx"
    if not (onnx_dir / "model.onnx").exists():
        export_onnx(folder, onnx_dir)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return ort_model_class().from_pretrained(onnx_dir, session_options=options), params


def measure(model, vocab: int, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, vocab, (1, args.prefill_len), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=gen)

    def forward(ids):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    def generate():
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
            )

    prefill = median_seconds(lambda: forward(long_prompt), args.repeats)
    prompt_prefill = median_seconds(lambda: forward(prompt), args.repeats)
    total = median_seconds(generate, args.repeats)
    return {
        "prefill_tok_s": args.prefill_len / prefill,
        "decode_tok_s": args.new_tokens / max(total - prompt_prefill, 1e-9),
        "prefill_s": prefill,
        "generate_s": total,
    }


def checkpoint_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def render(rows: list[dict]) -> str:
    lines = [
        "# Speed benchmark (`integration/benchmark_speed.py`)",
        "",
        "Batch 1, float32, CPU. Prefill: one forward over 512 tokens. Decode: 64 greedy tokens after a "
        "64-token prompt with the KV cache (generate time minus the prompt's prefill). Medians of the "
        "repeats. Target: speed-up >= 0.9 x (dense / pruned parameters).",
        "",
        "| backend | model | params | checkpoint MiB | prefill tok/s | decode tok/s | prefill x | decode x | params ratio | target met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for backend in ("torch", "ort"):
        group = [r for r in rows if r["backend"] == backend]
        dense = next((r for r in group if r["model"] == "dense"), None)
        for r in sorted(group, key=lambda r: -r["params"]):
            if dense is None:
                continue
            px = r["prefill_tok_s"] / dense["prefill_tok_s"]
            dx = r["decode_tok_s"] / dense["decode_tok_s"]
            ratio = dense["params"] / r["params"]
            met = "" if r is dense else ("yes" if min(px, dx) >= 0.9 * ratio else "no")
            lines.append(
                f"| {backend} ({r['threads']} threads) | {r['model']} | {r['params']:,} | "
                f"{r['checkpoint_mib']:.0f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                f"{px:.2f} | {dx:.2f} | {ratio:.2f} | {met} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "ort"), default="torch")
    parser.add_argument("--pruned", type=Path, nargs="*", default=DEFAULT_PRUNED)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="stem of the .json/.md results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    models = [("dense", resolve_model("smollm2"))]
    for folder in args.pruned:
        if not (folder / "config.json").exists():
            print(f"skipping {folder}: not there (run integration/benchmark_quality.py first)")
            continue
        models.append((folder.name, folder))
    path = args.out.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.exists() else []
    for name, folder in models:
        model, params = load(args.backend, folder, args.work, args.threads)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        row = {
            "backend": args.backend,
            "model": name,
            "params": params,
            "checkpoint_mib": checkpoint_mib(folder),
            "threads": args.threads,
            **measure(model, vocab, args),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
        print(json.dumps({k: v for k, v in row.items() if k != "machine"}))
        rows = [r for r in rows if (r["backend"], r["model"]) != (args.backend, name)] + [row]
        del model
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    table = render(rows)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
