"""Magnitude and Wanda-sp on the default real model at several sparsities: one table.

Each configuration runs the `struprune prune` command in its own process (so memory figures do not
mix) and writes its folder under --runs; the summary goes to integration/results/ as JSON and
Markdown. Usage:

    .venv/bin/python integration/foundation_baselines.py [--sparsities 0.2 0.5] [--methods magnitude wanda-sp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda-sp"])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "foundation_baselines")
    parser.add_argument("extra", nargs="*", help="passed on to `struprune prune` after --")
    args = parser.parse_args()
    rows = []
    for sparsity in args.sparsities:
        for method in args.methods:
            folder = args.runs / f"{args.model}-{method}-{round(sparsity * 100)}"
            cmd = [
                sys.executable,
                "-m",
                "struprune_plugin.cli",
                "prune",
                "--model",
                args.model,
                "--method",
                method,
                "--sparsity",
                str(sparsity),
                "--calib-samples",
                str(args.calib_samples),
                "--output",
                str(folder),
                "--overwrite",
                "--no-progress",
                *args.extra,
            ]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            report = json.loads((folder / "struprune_report.json").read_text())
            ppl = report.get("perplexity", {})
            rows.append(
                {
                    "method": method,
                    "requested": sparsity,
                    "achieved": report["pruning"]["achieved_sparsity"],
                    "params": report["params"]["total_after"],
                    "params_dense": report["params"]["total_before"],
                    "ppl_wiki_dense": ppl.get("wiki_test", {}).get("dense", {}).get("ppl"),
                    "ppl_wiki": ppl.get("wiki_test", {}).get("pruned", {}).get("ppl"),
                    "ppl_news_dense": ppl.get("news", {}).get("dense", {}).get("ppl"),
                    "ppl_news": ppl.get("news", {}).get("pruned", {}).get("ppl"),
                    "prune_seconds": report["pruning"]["seconds"],
                    "eval_seconds": report.get("eval_seconds"),
                    "peak_mib": report["pruning"]["peak_memory_bytes"] / 2**20,
                    "peak_kind": report["pruning"]["peak_memory_kind"],
                    "calibration": report.get("calibration"),
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"Model {args.model}; calibration {args.calib_samples} x 512 tokens (Wikipedia train split, seed 0); "
        "ppl: 512-token non-overlapping windows, no BOS, full Wikipedia-subset test split and news text.",
        "",
        "| method | sparsity (req / achieved) | params | ppl wiki | ppl news | prune s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    if rows:
        r0 = rows[0]
        lines.append(
            f"| dense | 0 | {r0['params_dense']:,} | {fmt(r0['ppl_wiki_dense'])} | "
            f"{fmt(r0['ppl_news_dense'])} | | |"
        )
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['requested']:.2f} / {r['achieved']:.4f} | {r['params']:,} | {fmt(r['ppl_wiki'])} "
            f"| {fmt(r['ppl_news'])} | {r['prune_seconds']:.1f} | {r['peak_mib']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
