"""Allocation benchmark: StructPrune's solver under every layer allocation rule, on both real models.

Each row is one `struprune prune` run (full protocol: 128 x 512 calibration tokens from the
Wikipedia train split, perplexity on the full Wikipedia test split and the news text), so rows
differ only in `--allocation` (and its temperature). Rows whose exact command already ran in the
quality benchmark (`quality*.json`: the uniform rows) are imported from there, with that row's
provenance, rather than run again. Every row says where it came from: its `provenance` (commit,
dirty tree, machine, library versions, whether other jobs shared the machine) and, for rows run
here, the prune report's resolved settings and per-layer widths under `run`. Writes
`results/allocation.{json,md}` (through `results_store`) and, per model, a plot of every rule's
per-layer keep ratios at 50 %. Resumable: stored rows are skipped.

    .venv/bin/python integration/benchmark_allocation.py --list
    .venv/bin/python integration/benchmark_allocation.py --rows smollm2/kl-knapsack-30 smollm2/uniform-30
    .venv/bin/python integration/benchmark_allocation.py --model gemma3-270m --sparsity 0.5
    .venv/bin/python integration/benchmark_allocation.py --report-only  # .md and plots from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store
from benchmark_quality import MODELS, Row, run_row
from results_store import RESULTS
from results_table import former_default, machine_summary, mark, provenance_legend, rows_of

STEM = "allocation"
OUT = RESULTS / STEM
SPARSITIES = (0.2, 0.3, 0.5, 0.6)
#: The rule StructPrune uses with no options (PruneConfig's allocation "auto" at its default T = 1:
#: the relative-energy softmax, each layer's keep share within 0.8 to 1.2 times the mean). Until
#: this benchmark chose it, the default was uniform (T = inf); `is_default` is re-marked from this
#: constant by every run that measures (the re-marked rows keep their provenance). The rows are
#: channel-exact while the default also rounds MLP widths to 32: the table's `widths` column says so.
DEFAULT_RULE = "energy-relative-T1-rtr20"


def relative_in_trust_region(
    temperature: float, max_deviation: float, bound: str = "max_deviation"
) -> list[str]:
    """Flags of the relative-energy softmax at `temperature`, each layer's share within +-d
    (`bound="relative_deviation"`: within (1 +- d) x the mean kept share)."""
    return [
        "--allocation",
        "energy-relative",
        "--temperature",
        f"{temperature:g}",
        "--allocation-option",
        f"{bound}={max_deviation:g}",
    ]


#: rule label -> CLI flags. The softmax rules run at T = 1 (the temperature sweeps of the quality
#: benchmark's ablations found no better finite T for the absolute energies).
RULES: dict[str, list[str]] = {
    "uniform": ["--temperature", "inf"],
    "energy-T1": ["--allocation", "energy", "--temperature", "1"],
    "energy-relative-T1": ["--allocation", "energy-relative", "--temperature", "1"],
    "kl-T1": ["--allocation", "kl", "--temperature", "1"],
    "kl-knapsack": ["--allocation", "kl-knapsack"],
    # the knapsack within OWL's trust region (every layer's share within +-0.08 of the target)
    "kl-knapsack-tr": ["--allocation", "kl-knapsack", "--allocation-option", "max_deviation=0.08"],
    # the relative-energy softmax within a trust region of +-0.1 around uniform
    "energy-relative-T1-tr": relative_in_trust_region(1, 0.1),
    # its sweep: the trust region's half-width d, and the temperature inside it
    "energy-relative-T1-tr05": relative_in_trust_region(1, 0.05),
    "energy-relative-T1-tr15": relative_in_trust_region(1, 0.15),
    "energy-relative-T0.5-tr": relative_in_trust_region(0.5, 0.1),
    "energy-relative-T2-tr": relative_in_trust_region(2, 0.1),
    # the bound relative to the mean kept share: d = 0.2 x (1 - sparsity), 0.1 at 50 %, 0.08 at 60 %
    "energy-relative-T1-rtr20": relative_in_trust_region(1, 0.2, "relative_deviation"),
    "slimgpt": ["--allocation", "slimgpt"],
    "owl": ["--allocation", "owl"],
    # the default plus SlimGPT's depth schedule as a prior (depth_prior b): b = 1 weighs depth like
    # the energies, b = 4 orders the layers by depth and leaves the energies to break ties
    "energy-relative-T1-rtr20-depth1": [
        *relative_in_trust_region(1, 0.2, "relative_deviation"),
        "--allocation-option",
        "depth_prior=1",
    ],
    "energy-relative-T1-rtr20-depth4": [
        *relative_in_trust_region(1, 0.2, "relative_deviation"),
        "--allocation-option",
        "depth_prior=4",
    ],
}
#: Sweep rows of the trust region's width and temperature: in the table, not in the keep-ratio plots.
SWEEP = {
    "energy-relative-T1-tr05",
    "energy-relative-T1-tr15",
    "energy-relative-T0.5-tr",
    "energy-relative-T2-tr",
}
#: Every run keeps channel-exact MLP widths, as the uniform rows imported from the quality benchmark
#: (measured before the rounding default) do: rounding to 32 channels alone moves SmolLM2's 30 %
#: perplexity by about 1 %, as much as some allocations differ, so all rows share the exact widths.
WIDTH_FLAGS = ["--mlp-round-to", "1"]
#: Quality-benchmark rows that ran the same command: (rule, sparsity) -> (row name, the flags it may
#: store). Those rows ran with no flags while uniform was the default; the quality benchmark now
#: writes the uniform allocation out (`--temperature inf`). (The energy-softmax ablations of that
#: benchmark ran on the Wikipedia text only: not imported.)
IMPORTED = {
    ("uniform", s): (f"structprune-{round(s * 100)}", ([], ["--temperature", "inf"])) for s in SPARSITIES
}


class Planned(NamedTuple):
    """One planned row. (A NamedTuple, not a dataclass: the module stays loadable by file path,
    outside sys.modules, for `render_markdown`.)"""

    model: str
    rule: str
    sparsity: float

    @property
    def name(self) -> str:
        return f"{self.model}/{self.rule}-{round(self.sparsity * 100)}"


def planned(models: Iterable[str], sparsities: Iterable[float]) -> list[Planned]:
    return [Planned(m, rule, s) for m in models for s in sparsities for rule in RULES]


def key(row: dict[str, Any]) -> str:
    """A row's identity in allocation.json (a new measurement of it replaces the stored one)."""
    return row["name"]


def to_row(p: Planned, q: dict[str, Any]) -> dict[str, Any]:
    """The allocation.json row (issue keys first) from a quality-benchmark style result. The
    machine and contention are not copied here: the row's provenance records them."""
    # a layer's prunable parameters: every layer of these models has the same shape
    layer_params = q["prunable_dense"] / len(q["layers"])
    ran_here = q.get("source") is None
    return {
        "model": p.model,
        "method": "structprune",
        "allocation": p.rule,
        "sparsity": p.sparsity,
        "ppl": {"wiki_test": q["ppl_wiki"], "news": q["ppl_news"]},
        "prune_seconds": q["prune_seconds"],
        "peak_memory_mib": q["peak_mib"],
        "is_default": p.rule == DEFAULT_RULE,
        "name": p.name,
        "flags": (RULES[p.rule] + WIDTH_FLAGS) if ran_here else list(q.get("flags") or []),
        "achieved": q["achieved"],
        "mlp_round_to": q.get("mlp_round_to", 1),
        "ppl_dense": {"wiki_test": q["ppl_wiki_dense"], "news": q["ppl_news_dense"]},
        "keep_ratios": [1 - layer["removed_params"] / layer_params for layer in q["layers"]],
        "allocation_summary": q.get("allocation_summary"),
        "threads": q.get("threads"),
        "source": q.get("source", "run"),
    }


def quality_rows(model: str) -> dict[str, dict[str, Any]]:
    path = RESULTS / f"{MODELS[model]['stem']}.json"
    return {r["name"]: r for r in results_store.load_rows(path)}


def run(p: Planned, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prune with the rule's flags (channel-exact widths); the quality-style result and the
    run's `struprune_report.json`."""
    ns = argparse.Namespace(
        model=p.model,
        runs=Path("runs/allocation") / p.model,
        calib_samples=128,
        device=args.device,
    )
    row = Row(f"{p.rule}-{round(p.sparsity * 100)}", "structprune", p.sparsity, RULES[p.rule] + WIDTH_FLAGS)
    q = run_row(row, ns)
    report = json.loads((ns.runs / row.name / "struprune_report.json").read_text())
    q = {k: v for k, v in q.items() if k not in ("source", "provenance", "run")}
    q["allocation_summary"] = report["pruning"].get("allocation")
    q["prunable_dense"] = report["params"]["prunable_before"]
    q["mlp_round_to"] = report["pruning"]["settings"]["mlp_round_to"]
    return q, report


def measure(p: Planned, args: argparse.Namespace) -> dict[str, Any]:
    """Run the row's `struprune prune` inside a RunRecord: the row carries its provenance and the
    report's resolved settings, calibration, achieved sparsity and per-layer widths."""
    with results_store.RunRecord() as record:
        q, report = run(p, args)
    row = to_row(p, q)
    row["run"] = results_store.from_prune_report(report)
    row["provenance"] = record.provenance
    return row


def imported(p: Planned) -> dict[str, Any] | None:
    """The row from the quality benchmark's identical run (same allocation, channel-exact widths),
    with that run's provenance (None when there is none, or it does not say where it came from)."""
    name, accepted = IMPORTED.get((p.rule, p.sparsity), (None, ()))
    q = quality_rows(p.model).get(name) if name else None
    if (
        q is None
        or list(q.get("flags") or []) not in accepted
        or q.get("ppl_news") is None
        or results_store.check_provenance(q)
    ):
        return None
    # every row here is channel-exact: a quality row run under a rounding default is not the same run
    settings = (q.get("run") or {}).get("settings") or q.get("settings") or {}
    if settings.get("mlp_round_to", 1) != 1:
        return None
    q = dict(q)
    q["mlp_round_to"] = 1
    q["source"] = f"{MODELS[p.model]['stem']}.json:{name}"
    q["prunable_dense"] = sum(layer["removed_params"] for layer in q["layers"]) / q["achieved"]
    row = to_row(p, q)
    if q.get("run"):
        row["run"] = q["run"]
    row["provenance"] = q["provenance"]
    return row


# --- rendering: a pure function of the stored JSON (provenance shown through results_table) -------


def allocation_label(row: dict[str, Any]) -> str:
    """The rule, saying when it was the default: StructPrune's default now (`is_default`) or the
    former uniform default the row ran under (recorded, or implied by a uniform row with no flags)."""
    label = row["allocation"]
    if former_default(row) or (row["allocation"] == "uniform" and not row.get("flags")):
        label += " (former default)"
    if row.get("is_default"):
        label += " (default allocation)"
    return label


def render_markdown(stem: str, data: Any) -> str:
    """`allocation.md`, exactly as this script writes it, from the parsed `allocation.json`."""
    if stem != STEM:
        raise ValueError(f"benchmark_allocation.py renders {STEM!r}, not {stem!r}")
    rows = rows_of(data)
    widths = Counter(r.get("mlp_round_to", 1) for r in rows)
    commits = {results_store.short(r.get("provenance")) for r in rows}
    lines = [
        "# Allocation benchmark (`integration/benchmark_allocation.py`)",
        "",
        "StructPrune's solver under each layer allocation rule; only the allocation (and the MLP",
        "rounding, see `widths`) differs between rows of a model and sparsity. The other settings are",
        "the defaults of each row's commit (rows measured with a provenance also store them, resolved,",
        "under `run.settings`). Full protocol: 128 x 512 calibration tokens (Wikipedia train, seed 0),",
        "perplexity on the full Wikipedia test split (in domain) and the news text (out of domain).",
        "Each `vs uniform` column compares the perplexity beside it with the uniform row of the same",
        "model and sparsity. Times and peak memory are the pruning process's.",
        "",
        "`widths`: the MLP rounding the row ran with (1: channel-exact; rows run here pass",
        "`--mlp-round-to 1`, rows at other widths ran under the rounding default of their commit).",
        "`(default allocation)` marks the rule StructPrune runs with no options; with no options it",
        "also rounds MLP widths to multiples of 32 (where every layer allows), which rows with `widths`",
        "1 do not. `(former default)` marks a row that ran under the uniform allocation while that was",
        "the default.",
        "",
        "Rows: "
        + ", ".join(f"{n} at widths {w}" for w, n in sorted(widths.items()))
        + f"; from {len(commits)} commits, each row's in its `provenance` and the `commit` column;"
        + f" machines: {machine_summary(rows)}.",
        provenance_legend(rows),
        "",
        "| model | sparsity | allocation | widths | ppl wiki | vs uniform | ppl news | vs uniform | prune s "
        "| peak MiB | commit |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    uniform = {(r["model"], r["sparsity"]): r for r in rows if r["allocation"] == "uniform"}
    order = list(RULES)

    def rank(r: dict[str, Any]) -> tuple[str, float, int, str]:
        rule = r["allocation"]
        return (r["model"], r["sparsity"], order.index(rule) if rule in order else len(order), rule)

    for r in sorted(rows, key=rank):
        u = uniform.get((r["model"], r["sparsity"]))

        def rel(text: str, r: dict[str, Any] = r, u: dict[str, Any] | None = u) -> str:
            return f"{r['ppl'][text] / u['ppl'][text] - 1:+.1%}" if u and r is not u else ""

        title = MODELS[r["model"]]["title"] if r["model"] in MODELS else r["model"]
        lines.append(
            f"| {title} | {r['sparsity']:.2f} | {allocation_label(r)} | "
            f"{r.get('mlp_round_to', 1)} | {r['ppl']['wiki_test']:.2f} | {rel('wiki_test')} | "
            f"{r['ppl']['news']:.2f} | {rel('news')} | {r['prune_seconds']:.0f}{mark(r)} | "
            f"{r['peak_memory_mib']:.0f} | {results_store.short(r.get('provenance'))} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], sparsity: float = 0.5) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in sorted({r["model"] for r in rows}):
        here = [
            r
            for r in rows
            if r["model"] == model and r["sparsity"] == sparsity and r["allocation"] not in SWEEP
        ]
        if not here:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in sorted(here, key=lambda r: list(RULES).index(r["allocation"])):
            ax.plot(r["keep_ratios"], marker=".", label=f"{r['allocation']} ({r['ppl']['wiki_test']:.1f})")
        ax.set(xlabel="decoder layer", ylabel="kept share of prunable parameters", ylim=(0, 1.02))
        ax.set_title(f"{MODELS[model]['title']} at {sparsity:.0%}: per-layer keep ratios (wiki ppl)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(OUT.with_name(f"allocation_keep_ratios_{model}_{round(sparsity * 100)}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _write_md(_rows: list[dict[str, Any]] | None = None) -> str:
    """Write allocation.md from allocation.json as stored (so it is what `render_markdown` gives)."""
    text = render_markdown(STEM, json.loads(OUT.with_suffix(".json").read_text(encoding="utf-8")))
    results_store.write_atomic(OUT.with_suffix(".md"), text)
    return text


def store(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return results_store.store_rows(OUT.with_suffix(".json"), rows, key=key, render=_write_md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--rule", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (see --list), in this order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="write the .md and plots from the JSON")
    args = parser.parse_args()
    plan = [p for p in planned(args.model, args.sparsity) if p.rule in args.rule]
    if args.rows:
        by_name = {p.name: p for p in planned(list(MODELS), SPARSITIES)}
        unknown = sorted(set(args.rows) - set(by_name))
        if unknown:
            parser.error(f"unknown rows {unknown}; see --list")
        plan = [by_name[n] for n in args.rows]
    if args.list:
        for p in plan:
            print(p.name, " ".join(RULES[p.rule]))
        return
    path = OUT.with_suffix(".json")
    for p in [] if args.report_only else plan:
        if p.name in {key(r) for r in results_store.load_rows(path)}:  # another instance may have run it
            continue
        row = imported(p) or measure(p, args)
        store([row])
        print(f"{p.name}: wiki {row['ppl']['wiki_test']:.2f} news {row['ppl']['news']:.2f}")
    rows = results_store.load_rows(path)
    # `is_default` follows DEFAULT_RULE: re-mark rows whose flag is stale (their provenance is kept)
    stale = [r for r in rows if r.get("is_default") != (r["allocation"] == DEFAULT_RULE)]
    if stale and not args.report_only:
        rows = store([{**r, "is_default": r["allocation"] == DEFAULT_RULE} for r in stale])
    text = _write_md() if path.exists() else ""
    for plot_path in plot(rows):
        print("plot:", plot_path)
    print(text)


if __name__ == "__main__":
    main()
