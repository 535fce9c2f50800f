"""How unevenly the refits' input Grams are scaled, per layer: why damping hurts.

Every least-squares refit adds `damping x mean(diag G)` to its Gram's diagonal. Where a few
channels carry massive activations, the mean diagonal is far above a typical channel's, and the
ridge then shrinks most weights towards zero. This measures, on the dense model and a calibration
sample, mean(diag) / median(diag) of o_proj's and down_proj's input second moments per layer, and
the shrink factor 1 / (1 + damping x mean / median) the median channel would get at damping 0.01.

    .venv/bin/python integration/gram_spread.py [--model smollm2] [--windows 8]

Writes integration/results/gram_spread_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.architectures import model_view
    from struprune_plugin.data import ensure_texts
    from struprune_plugin.zoo import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=8, help="512-token windows from the Wikipedia train split")
    p.add_argument("--damping", type=float, default=0.01)
    args = p.parse_args()
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = ensure_texts().read("wiki_train")
    ids = tok(text[: 60 * 512 * args.windows], return_tensors="pt").input_ids[:, : 512 * args.windows]
    ids = ids.reshape(args.windows, 512)
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def recorder(key):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0)

        return hook

    views = model_view(model).layer_views()
    for i, lv in enumerate(views):
        lv.o.register_forward_pre_hook(recorder((i, "o_proj")))
        lv.mlp_out.register_forward_pre_hook(recorder((i, "down_proj")))
    with torch.no_grad():
        for batch in ids.split(2):
            model(input_ids=batch)
    rows = []
    for (layer, name), diag in sorted(sums.items()):
        ratio = float(diag.mean() / diag.median())
        rows.append(
            {
                "layer": layer,
                "projection": name,
                "mean_over_median_diag": ratio,
                "median_channel_shrink": 1 / (1 + args.damping * ratio),
            }
        )
    print(f"| layer | projection | mean / median diag | median channel's shrink at damping {args.damping} |")
    print("|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['projection']} | {r['mean_over_median_diag']:.1f} | {r['median_channel_shrink']:.3f} |"
        )
    out = ROOT / "integration" / "results" / f"gram_spread_{args.model}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"model": args.model, "windows": args.windows, "damping": args.damping, "rows": rows}, indent=1
        )
    )
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
