"""How unevenly the refits' input Grams are scaled, per layer: why damping hurts.

Every least-squares refit adds `damping x mean(diag G)` to its Gram's diagonal. Where a few
channels carry massive activations, the mean diagonal is far above a typical channel's, and the
ridge then shrinks most weights towards zero. This measures, on the dense model and a calibration
sample, mean(diag) / median(diag) of o_proj's and down_proj's input second moments per layer, and
the shrink factor 1 / (1 + damping x mean / median) the median channel would get at the damping.

The forward passes run inside a `results_store.RunRecord`, so every row carries its provenance
(commit, machine, library versions); rows are stored through `results_store.store_rows`.

    .venv/bin/python integration/gram_spread.py [--model smollm2] [--windows 8]
    .venv/bin/python integration/gram_spread.py --report-only [--model smollm2]  # the .md from the JSON

Writes integration/results/gram_spread_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store
from results_store import RESULTS
from results_table import predates_note

PREFIX = "gram_spread_"


def key(row: dict[str, Any]) -> tuple[int, str]:
    """A row's identity in the JSON (a new measurement of it replaces the stored one)."""
    return (row["layer"], row["projection"])


def measure(model_name: str, windows: int, damping: float) -> list[dict[str, Any]]:
    """The spread of o_proj's and down_proj's input second moments per layer, on `windows`
    512-token windows of the Wikipedia train split."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.architectures import model_view
    from struprune_plugin.data import ensure_texts
    from struprune_plugin.zoo import resolve_model

    with results_store.RunRecord() as record:
        path = resolve_model(model_name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        text = ensure_texts().read("wiki_train")
        ids = tok(text[: 60 * 512 * windows], return_tensors="pt").input_ids[:, : 512 * windows]
        ids = ids.reshape(windows, 512)
        sums: dict[tuple[int, str], torch.Tensor] = {}

        def recorder(slot: tuple[int, str]):
            def hook(_module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[slot] = sums.get(slot, 0) + x.pow(2).sum(0)

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
                "median_channel_shrink": 1 / (1 + damping * ratio),
                "provenance": record.provenance,
            }
        )
    return rows


def render_markdown(stem: str, data: Any) -> str:
    """`gram_spread_<model>.md`, exactly as this script writes it, from the parsed JSON: per layer,
    both projections side by side, and the extremes."""
    if not stem.startswith(PREFIX):
        raise ValueError(f"gram_spread.py renders {PREFIX}<model>, not {stem!r}")
    rows = data["rows"]
    by = {key(r): r for r in rows}
    projections = ("o_proj", "down_proj")
    commits = sorted({results_store.short(r.get("provenance")) for r in rows})
    lines = [
        f"# Gram spread, {data.get('model', stem.removeprefix(PREFIX))} (`integration/gram_spread.py`)",
        "",
        "mean(diag) / median(diag) of each refit's input second moments (the Gram the ridge is scaled",
        f"by), on the dense model and {data.get('windows')} windows of 512 tokens of the Wikipedia train",
        "split, and the factor 1 / (1 + damping x mean / median) the median channel's weights are",
        f"shrunk by at damping {data.get('damping')}.",
        "",
    ]
    for proj in projections:
        here = [r for r in rows if r["projection"] == proj]
        if not here:
            continue
        top = max(here, key=lambda r: r["mean_over_median_diag"])
        median = statistics.median(r["mean_over_median_diag"] for r in here)
        lines.append(
            f"- {proj}: median over layers {median:.1f}; largest {top['mean_over_median_diag']:.1f} "
            f"(layer {top['layer']}, median channel's shrink {top['median_channel_shrink']:.3f})."
        )
    lines += [
        "",
        f"Commit: {', '.join(commits)}{predates_note(rows)}.",
        "",
        "| layer | o_proj mean / median | o_proj shrink | down_proj mean / median | down_proj shrink |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in sorted({r["layer"] for r in rows}):
        cells = []
        for proj in projections:
            r = by.get((layer, proj))
            cells += (
                [f"{r['mean_over_median_diag']:.1f}", f"{r['median_channel_shrink']:.3f}"] if r else ["", ""]
            )
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _writer(stem: str):
    """Write `<stem>.md` from `<stem>.json` as stored (so it is what `render_markdown` gives)."""

    def write(_rows: list[dict[str, Any]] | None = None) -> str:
        path = RESULTS / f"{stem}.json"
        text = render_markdown(stem, json.loads(path.read_text(encoding="utf-8")))
        results_store.write_atomic(path.with_suffix(".md"), text)
        return text

    return write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=8, help="512-token windows from the Wikipedia train split")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--report-only", action="store_true", help="write the .md from the stored JSON")
    args = p.parse_args()
    stem = f"{PREFIX}{args.model}"
    write = _writer(stem)
    if not args.report_only:
        rows = measure(args.model, args.windows, args.damping)
        meta = {"model": args.model, "windows": args.windows, "damping": args.damping}
        results_store.store_rows(RESULTS / f"{stem}.json", rows, key=key, render=write, meta=meta)
    print(write())


if __name__ == "__main__":
    main()
