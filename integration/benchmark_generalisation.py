"""Generalisation benchmark: does the solver fit the calibration text at the expense of others?

StructPrune's least-squares refits fit at most `--solver-tokens` calibration tokens per layer
(Wikipedia). Each row prunes SmolLM2 (or, with `--model gemma3-270m`, Gemma-3-270M, whose rows are
named `gemma3-270m/<row>`) with one setting changed from `base` (solver tokens,
damping, calibration windows, or uniform allocation) and measures perplexity in domain (Wikipedia
test) and out of domain (news, and newsgroups: informal Usenet posts), next to FLAP, which refits nothing. Rows are `struprune
prune` runs (full evaluation texts); resumable. Each row carries its provenance (commit, machine,
library versions, whether other jobs shared the machine) and the prune report's resolved settings
and per-layer widths (`run`). Writes `results/generalisation.{json,md}` through `results_store`.

    .venv/bin/python integration/benchmark_generalisation.py --list
    .venv/bin/python integration/benchmark_generalisation.py --rows base-30 tokens-32768-30
    .venv/bin/python integration/benchmark_generalisation.py --model gemma3-270m --rows damping-0.001-30
    .venv/bin/python integration/benchmark_generalisation.py --report-only  # the .md from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store
from benchmark_quality import MODELS, Row, run_row
from results_store import RESULTS
from results_table import former_default, machine_summary, mark, provenance_legend, rows_of

STEM = "generalisation"
OUT = RESULTS / STEM
TEXTS = "wiki_test,news,newsgroups"
#: The allocation every StructPrune row runs with (the default: the relative-energy softmax, each
#: layer's keep share within 0.8 to 1.2 times the mean), spelled out so the rows stay what they ran
#: if the default moves; rows differ only in the setting their name gives.
BASE = [
    "--allocation",
    "energy-relative",
    "--temperature",
    "1",
    "--allocation-option",
    "relative_deviation=0.2",
]
#: variant -> (method, flags, calibration windows)
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    "base": ("structprune", BASE, 128),
    "uniform": ("structprune", ["--temperature", "inf"], 128),
    "tokens-32768": ("structprune", [*BASE, "--solver-tokens", "32768"], 128),
    "tokens-65536": ("structprune", [*BASE, "--solver-tokens", "65536"], 128),
    "damping-0.001": ("structprune", [*BASE, "--damping", "0.001"], 128),
    "damping-0.1": ("structprune", [*BASE, "--damping", "0.1"], 128),
    "damping-1": ("structprune", [*BASE, "--damping", "1"], 128),
    "ridge-channel": ("structprune", [*BASE, "--ridge-scale", "channel"], 128),
    "ridge-channel-0.001": ("structprune", [*BASE, "--ridge-scale", "channel", "--damping", "0.001"], 128),
    "uniform-damping-0.001": ("structprune", ["--temperature", "inf", "--damping", "0.001"], 128),
    "calib-32": ("structprune", BASE, 32),
    "flap": ("flap", [], 128),
}
SPARSITIES = (0.3, 0.5, 0.2)


def row_name(model: str, row: str) -> str:
    """SmolLM2's rows keep their bare names (they came first); other models' carry a prefix."""
    return row if model == "smollm2" else f"{model}/{row}"


def planned(model: str = "smollm2") -> list[tuple[str, str, list[str], int, float]]:
    return [
        (row_name(model, f"{v}-{round(s * 100)}"), method, flags, calib, s)
        for s in SPARSITIES
        for v, (method, flags, calib) in VARIANTS.items()
    ]


def key(row: dict[str, Any]) -> str:
    """A row's identity in generalisation.json (a new measurement of it replaces the stored one)."""
    return row["name"]


def method_label(row: dict[str, Any]) -> str:
    """The method, saying so when the row ran under StructPrune's former uniform default."""
    return f"{row['method']} (uniform, former default)" if former_default(row) else row["method"]


def render_markdown(stem: str, data: Any) -> str:
    """`generalisation.md`, exactly as this script writes it, from the parsed `generalisation.json`."""
    if stem != STEM:
        raise ValueError(f"benchmark_generalisation.py renders {STEM!r}, not {stem!r}")
    rows = rows_of(data)
    lines = [
        "# Generalisation benchmark (`integration/benchmark_generalisation.py`)",
        "",
        "SmolLM2-135M-Instruct (rows prefixed `gemma3-270m/`: Gemma-3-270M base), calibration on the",
        "Wikipedia train split (seed 0, 512-token windows);",
        "perplexity on the full Wikipedia test split (in domain), the news text and the newsgroups",
        "posts (out of domain). One setting changes per row from `base`, whose allocation its flags",
        "spell out (relative energies at T = 1, each layer's keep share within 0.8 to 1.2 times the",
        "mean); settings the flags do not name are the defaults of the row's commit. `flap` refits",
        "nothing. Times are the pruning process's.",
        "",
        f"Machines: {machine_summary(rows)}.",
        provenance_legend(rows),
        "",
        "| row | method | calib windows | flags | ppl wiki | ppl news | ppl newsgroups | prune s | commit |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]

    def order(r: dict[str, Any]) -> tuple[bool, float, str]:
        return ((r.get("model") or "smollm2") != "smollm2", r["sparsity"], r["name"])

    for r in sorted(rows, key=order):
        ppl = r["ppl"]
        lines.append(
            f"| {r['name']} | {method_label(r)} | {r['calib_samples']} | {' '.join(r['flags'])} | "
            + " | ".join(f"{ppl.get(t) or float('nan'):.2f}" for t in TEXTS.split(","))
            + f" | {r['prune_seconds']:.0f}{mark(r)} | {results_store.short(r.get('provenance'))} |"
        )
    return "\n".join(lines) + "\n"


def _write_md(_rows: list[dict[str, Any]] | None = None) -> str:
    """Write generalisation.md from the JSON as stored (so it is what `render_markdown` gives)."""
    text = render_markdown(STEM, json.loads(OUT.with_suffix(".json").read_text(encoding="utf-8")))
    results_store.write_atomic(OUT.with_suffix(".md"), text)
    return text


def measure(
    name: str, method: str, flags: list[str], calib: int, sparsity: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One `struprune prune` run inside a RunRecord: the row, its provenance and its report's
    resolved settings, calibration, achieved sparsity and per-layer widths."""
    ns = argparse.Namespace(
        model=args.model, runs=Path("runs/generalisation"), calib_samples=calib, device=args.device
    )
    with results_store.RunRecord() as record:
        q = run_row(Row(name, method, sparsity, flags, TEXTS), ns)
    report = json.loads((ns.runs / name / "struprune_report.json").read_text())
    perplexity = report.get("perplexity", {})
    return {
        "name": name,
        "model": args.model,
        "method": method,
        "sparsity": sparsity,
        "flags": flags,
        "calib_samples": calib,
        "ppl": {t: v.get("pruned", {}).get("ppl") for t, v in perplexity.items()},
        "ppl_dense": {t: v.get("dense", {}).get("ppl") for t, v in perplexity.items()},
        "prune_seconds": q["prune_seconds"],
        "peak_memory_mib": q["peak_mib"],
        "threads": q["threads"],
        "run": results_store.from_prune_report(report),
        "provenance": record.provenance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=None, help="row names, without the model prefix")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="re-render the table from the JSON")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    plan = [] if args.report_only else planned(args.model)
    if args.list:
        for name, method, flags, calib, _ in plan:
            print(name, method, calib, " ".join(flags))
        return
    if args.rows:
        by_name = {p[0]: p for p in planned(args.model)}
        names = [row_name(args.model, n) for n in args.rows]
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            parser.error(f"unknown rows {unknown}; see --list")
        plan = [by_name[n] for n in names]
    path = OUT.with_suffix(".json")
    for name, method, flags, calib, sparsity in plan:
        if name in {key(r) for r in results_store.load_rows(path)}:  # another instance may have run it
            continue
        row = measure(name, method, flags, calib, sparsity, args)
        results_store.store_rows(path, [row], key=key, render=_write_md)
    if path.exists():
        print(_write_md())


if __name__ == "__main__":
    main()
