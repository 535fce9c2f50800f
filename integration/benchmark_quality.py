"""Quality benchmark: every method at 20/30/50 % structured sparsity, plus StructPrune ablations at 30 %.

Protocol (fixed, stated in the table): the model in float32 (SmolLM2-135M-Instruct by default,
`--model gemma3-270m` for Gemma-3-270M); calibration 128 windows of 512 tokens sampled from the
Wikipedia train split (seed 0); perplexity over the full Wikipedia test split and the full news text
in non-overlapping 512-token windows, with a BOS token on every window (evaluation and
calibration) where the model's tokenizer adds one (Gemma: yes; SmolLM2: no). Ablation rows are
evaluated on the Wikipedia test split only (an evaluation costs minutes on two CPU cores).

Every row runs `struprune prune` in its own process, so wall time and peak memory do not mix. The
results accumulate in integration/results/quality.json: a row already there is skipped unless
--rerun names it, so the benchmark can be run in pieces. Usage:

    .venv/bin/python integration/benchmark_quality.py                # everything still missing
    .venv/bin/python integration/benchmark_quality.py --rows structprune-30 flap-30
    .venv/bin/python integration/benchmark_quality.py --list         # row names
    .venv/bin/python integration/benchmark_quality.py --report-only  # table and plots from the JSON
    .venv/bin/python integration/benchmark_quality.py --model gemma3-270m --group main  # -> quality_gemma3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_store  # noqa: E402
from results_store import RESULTS  # noqa: E402

METHODS = ("magnitude", "wanda-sp", "flap", "energy-threshold", "global-taylor", "structprune")
SPARSITIES = (0.3, 0.2, 0.5)  # 30 % first: the ablations compare against it
FULL_TEXTS = "wiki_test,news"
#: Per model: the name tables use, the default results stem, and flags a method needs on it. Gemma
#: cannot carry the o_proj/down_proj biases FLAP's compensation writes (transformers' Gemma has no
#: mlp_bias), so its FLAP rows run without compensation and say so.
MODELS = {
    "smollm2": {"title": "SmolLM2-135M-Instruct", "stem": "quality", "flags": {}},
    "gemma3-270m": {
        "title": "Gemma-3-270M (base)",
        "stem": "quality_gemma3",
        "flags": {"flap": ["--no-bias-compensation"]},
        "labels": {"flap": "flap (no bias compensation)"},
    },
}


DEFAULT_LABEL = "structprune (default)"


@dataclass
class Row:
    name: str
    method: str
    sparsity: float
    flags: list[str] = field(default_factory=list)
    texts: str = FULL_TEXTS
    group: str = "main"
    note: str = ""
    label: str = ""  # main-table name where one method has several rows per sparsity


def as_measured(row: Row) -> Row:
    """The row with the allocation it was measured under written out. StructPrune's rows here ran
    while uniform (T = inf) was the default and `--temperature` alone chose the absolute-energy
    softmax; both defaults have changed since (allocation.md), so the flags now say so. The
    `default-*` rows are the exception: they run today's default, with no options."""
    if row.method != "structprune" or "--allocation" in row.flags or row.name.startswith("default-"):
        return row
    pinned = ["--allocation", "energy"] if "--temperature" in row.flags else ["--temperature", "inf"]
    return replace(row, flags=[*pinned, *row.flags])


def planned_rows() -> list[Row]:
    return [as_measured(r) for r in _planned_rows()]


def _planned_rows() -> list[Row]:
    rows = [
        Row(f"{m}-{round(s * 100)}", m, s)
        for s in SPARSITIES
        for m in ("structprune", "energy-threshold", "flap", "wanda-sp", "magnitude")
    ]
    # StructPrune as `struprune prune` runs it with no options (today's default allocation and
    # rounding); the `structprune-*` rows above ran under the former uniform default.
    rows += [Row(f"default-{round(s * 100)}", "structprune", s, label=DEFAULT_LABEL) for s in SPARSITIES]
    # The O(N) global reference (whole model resident, loss gradient), after the original table.
    rows += [Row(f"global-taylor-{round(s * 100)}", "global-taylor", s) for s in SPARSITIES]
    # StructPrune with the references' heads vs MLP rule: heads take the allocation's share rounded
    # to whole head steps (a third of SmolLM2's query heads at 20 and 30 %). Its loss against the
    # default (MLP channels first) is what made mlp-first the default.
    ratio = ["--kind-split", "ratio"]
    rows += [
        Row(f"structprune-ratio-{round(s * 100)}", "structprune", s, ratio, label="structprune (ratio split)")
        for s in SPARSITIES
    ]
    wiki = "wiki_test"

    # Variants measured on the ratio split while it was the default; they stay as its own table
    # (the split changes what the solver prunes, so they are not rows of the default's table).
    on_ratio_too = {"T-0.5", "T-1", "T-2", "T-inf", "admm-1", "admm-0-T1", "bias-refit-T1"}

    def ablation(name: str, flags: list[str], note: str) -> list[Row]:
        """The variant on the default (mlp-first), and on the ratio split where it was measured."""
        rows = [Row(f"ablation-{name}", "structprune", 0.3, flags, wiki, "ablation", note)]
        if name in on_ratio_too:
            rows.append(
                Row(f"ablation-ratio-{name}", "structprune", 0.3, [*ratio, *flags], wiki, "ablation", note)
            )
        return rows

    t1 = ["--temperature", "1"]
    variants = [
        # The temperature sweep (T = inf is the default and the main structprune-30 row).
        ("T-0.5", ["--temperature", "0.5"], "temperature 0.5"),
        ("T-1", t1, "temperature 1"),
        ("T-2", ["--temperature", "2"], "temperature 2"),
        ("T-4", ["--temperature", "4"], "temperature 4"),
        ("T-inf", ["--temperature", "inf"], "temperature inf (uniform allocation)"),
        # Solver ablations at the default (uniform allocation).
        ("admm-0", ["--admm-iterations", "0"], "ADMM 0 iterations (projection + refit)"),
        ("admm-1", ["--admm-iterations", "1"], "ADMM 1 iteration"),
        ("admm-8", ["--admm-iterations", "8"], "ADMM 8 iterations"),
        ("no-aux", ["--no-aux"], "no SparseLLM auxiliary variables"),
        ("bias-refit", ["--bias-refit"], "refits also fit o_proj/down_proj biases"),
        # Energy definitions only matter at a finite temperature: compared at T = 1.
        ("energy-wanda-T1", [*t1, "--energy", "wanda"], "Wanda-group energy"),
        ("energy-flap-T1", [*t1, "--energy", "flap"], "FLAP-fluctuation energy"),
        ("refresh-T1", [*t1, "--refresh-energies"], "energies refreshed on the pruned prefix"),
        ("admm-0-T1", [*t1, "--admm-iterations", "0"], "ADMM 0 iterations (projection + refit)"),
        ("bias-refit-T1", [*t1, "--bias-refit"], "refits also fit o_proj/down_proj biases"),
    ]
    for name, flags, note in variants:
        rows += ablation(name, flags, note)
    rows.append(
        Row(
            "ablation-kind-split-energy",
            "structprune",
            0.3,
            ["--kind-split", "energy"],
            wiki,
            "ablation",
            "heads vs MLP split by one energy threshold per layer",
        )
    )
    return rows


def run_row(row: Row, args) -> dict:
    folder = args.runs / row.name
    cmd = [
        sys.executable,
        "-m",
        "struprune_plugin.cli",
        "prune",
        "--model",
        args.model,
        "--method",
        row.method,
        "--sparsity",
        str(row.sparsity),
        "--calib-samples",
        str(args.calib_samples),
        "--calib-len",
        "512",
        "--texts",
        row.texts,
        "--device",
        args.device,
        "--output",
        str(folder),
        "--overwrite",
        "--no-progress",
        *row.flags,
        *MODELS.get(args.model, {}).get("flags", {}).get(row.method, []),
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    with results_store.RunRecord() as record:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = row_from_report(row, folder, time.perf_counter() - start, args)
    return {**result, "command": cmd[2:], "provenance": record.provenance}


def row_from_report(row: Row, folder: Path, wall_seconds: float | None, args) -> dict:
    """A table row from the report `struprune prune` wrote (also for runs started elsewhere)."""
    report = json.loads((folder / "struprune_report.json").read_text())
    ppl = report.get("perplexity", {})

    def get(text, which):
        return ppl.get(text, {}).get(which, {}).get("ppl")

    model = MODELS.get(args.model, {})
    return {
        **asdict(row),
        "label": row.label or model.get("labels", {}).get(row.method, ""),
        "model": args.model,
        "bos": {
            "evaluation": next(iter(ppl.values()), {}).get("pruned", {}).get("bos"),
            "calibration": (report.get("calibration") or {}).get("bos"),
        },
        "tokens": {text: value.get("pruned", {}).get("tokens") for text, value in ppl.items()},
        "achieved": report["pruning"]["achieved_sparsity"],
        "params": report["params"]["total_after"],
        "params_dense": report["params"]["total_before"],
        "ppl_wiki": get("wiki_test", "pruned"),
        "ppl_news": get("news", "pruned"),
        "ppl_wiki_dense": get("wiki_test", "dense"),
        "ppl_news_dense": get("news", "dense"),
        "prune_seconds": report["pruning"]["seconds"],
        "eval_seconds": report.get("eval_seconds"),
        "wall_seconds": wall_seconds,
        "peak_mib": report["pruning"]["peak_memory_bytes"] / 2**20,
        "peak_kind": report["pruning"]["peak_memory_kind"],
        "threads": report.get("environment", {}).get("threads"),
        "layers": report["layers"],
        "settings": report["pruning"]["settings"],
        "calibration": report.get("calibration"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
        "run": results_store.from_prune_report(report),
    }


def label(row: dict) -> str:
    """The table name: a row's own label, else its method; StructPrune rows that ran under the
    former uniform default say so (their provenance records it)."""
    former = (row.get("provenance") or {}).get("measured_default")
    if row.get("label"):
        name = row["label"]
        if not former or "uniform" in name:
            return name
        return (
            f"{name[:-1]}; uniform, former default)"
            if name.endswith(")")
            else f"{name} (uniform, former default)"
        )
    flags = row.get("flags") or []
    if row["method"] == "structprune" and "--allocation" not in flags and temperature_of(row) == "inf":
        return "structprune (uniform, former default)" if former else "structprune (uniform)"
    return row["method"]


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.{digits}f}"


#: Why some rows' times are not comparable with the others. "shared" is measured by the row's
#: RunRecord (older rows: marked when they were measured); the other note is stored on old rows.
TIMING_NOTES = {
    "timed before the statistics fix (inputs recorded twice)": (
        "timed before a fix of the statistics recorder, which added every activation twice: the solver "
        "then worked on twice the tokens (slower, more memory). Perplexities are unaffected (every "
        "statistic is normalised by its token count). Rows with 1 thread ran two at a time on the 2 cores."
    ),
    "shared": (
        "other jobs shared the cores during the run (measured from /proc/stat by the row's record; rows "
        "before that: marked when measured): the time is an upper bound. Perplexities are unaffected."
    ),
}
MARKS = ("†", "‡", "§", "¶")


def timing_note(row: dict) -> str | None:
    """Why a row's time is not comparable, if it is not (a key of TIMING_NOTES)."""
    if row.get("timing_note") in TIMING_NOTES and row["timing_note"] != "contended":
        return row["timing_note"]
    return "shared" if results_store.was_shared(row) else None


def _timing_marks(rows: list[dict]) -> dict[str, str]:
    notes = sorted({timing_note(r) for r in rows} - {None}, key=list(TIMING_NOTES).index)
    return {note: MARKS[i] for i, note in enumerate(notes)}


def temperature_of(row: dict) -> str:
    """The allocation temperature a row ran at, as written on its command line (default inf)."""
    flags = row.get("flags") or []
    return flags[flags.index("--temperature") + 1] if "--temperature" in flags else "inf"


def _tokens(rows: list[dict], text: str) -> str:
    counts = {r.get("tokens", {}).get(text) for r in rows} - {None}
    return f"{counts.pop():,}" if len(counts) == 1 else {"wiki_test": "58,254", "news": "75,117"}[text]


def _bos_text(rows: list[dict]) -> str:
    used = {(r.get("bos") or {}).get("evaluation") for r in rows} - {None}
    if used == {True}:
        return "a BOS token on every evaluation and calibration window (the tokenizer adds one)"
    return "no BOS (the tokenizer adds none)"


def render(results: dict[str, dict], rows: list[Row], calib_samples: int, model: str = "smollm2") -> str:
    done = [results[r.name] for r in rows if r.name in results]
    main = [r for r in done if r["group"] == "main"]
    ablations = [r for r in done if r["group"] == "ablation"]
    dense = next((r for r in done if r["ppl_wiki_dense"]), None)
    machine = done[0]["machine"] if done else {}
    marks = _timing_marks(done)

    def mark(row: dict) -> str:
        note = timing_note(row)
        return f" {marks[note]}" if note else ""

    lines = [
        "# Quality benchmark (`integration/benchmark_quality.py`)",
        "",
        f"{MODELS[model]['title']} (float32) on {machine.get('device', 'cpu')}, {machine.get('cpus')} CPU cores. "
        f"Calibration: {calib_samples} x 512 tokens from the Wikipedia train split (seed 0). Perplexity: "
        f"full Wikipedia test split ({_tokens(done, 'wiki_test')} tokens) and news text "
        f"({_tokens(done, 'news')} tokens), non-overlapping 512-token windows, "
        f"{_bos_text(done)}. Sparsity = removed share of the attention and MLP linears' "
        "parameters. Peak = peak RSS of the pruning process on CPU (model included), CUDA max "
        "allocated on a GPU.",
        "",
        "| method | sparsity (req / achieved) | params | ppl wiki | ppl news | prune s | threads | peak MiB | commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    if dense:
        lines.append(
            f"| dense | 0 | {dense['params_dense']:,} | {_fmt(dense['ppl_wiki_dense'])} | "
            f"{_fmt(dense['ppl_news_dense'])} | | | | |"
        )
    for s in SPARSITIES:
        for r in sorted(
            (r for r in main if r["sparsity"] == s), key=lambda r: (METHODS.index(r["method"]), label(r))
        ):
            lines.append(
                f"| {label(r)} | {r['sparsity']:.2f} / {r['achieved']:.4f} | {r['params']:,} | "
                f"{_fmt(r['ppl_wiki'])} | {_fmt(r['ppl_news'])} | {r['prune_seconds']:.0f}{mark(r)} | "
                f"{r.get('threads') or 2} | {r['peak_mib']:.0f} | {results_store.short(r.get('provenance'))} |"
            )
    for note, symbol in marks.items():
        lines += ["", f"{symbol} {TIMING_NOTES[note]}"]
    for prefix, default_name, title in (
        ("ablation-", "structprune-30", "on the default (MLP channels first)"),
        (
            "ablation-ratio-",
            "structprune-ratio-30",
            "on the ratio split (heads + MLP by the allocation's ratio)",
        ),
    ):
        rows_here = [r for r in ablations if is_ratio_ablation(r) == (prefix == "ablation-ratio-")]
        if rows_here:
            lines += _ablation_table(rows_here, results, prefix, default_name, title, mark)
    return "\n".join(lines) + "\n"


def is_ratio_ablation(row: dict) -> bool:
    return row["name"].startswith("ablation-ratio-")


def _ablation_table(rows, results, prefix, default_name, title, mark) -> list[str]:
    """Each variant against its base at the same temperature: the main 30 % row for T = inf (the
    default), the base's T-1 row for the variants run at T = 1."""
    bases = {"inf": results.get(default_name), "1": results.get(f"{prefix}T-1")}
    lines = [
        "",
        f"## StructPrune ablations at 30 % {title} (Wikipedia test ppl)",
        "",
        "Base: temperature inf (uniform allocation), OBS energy, 4 ADMM iterations with auxiliary "
        "variables, refit, energies from the dense first pass (32 windows). Energy definitions only "
        "matter at a finite temperature, so they are compared at T = 1.",
        "",
        "| variant | T | ppl wiki | vs base (T = 1 rows: vs temperature 1) | prune s |",
        "|---|---|---:|---:|---:|",
    ]
    if bases["inf"]:
        r = bases["inf"]
        lines.append(
            f"| base ({default_name}) | inf | {_fmt(r['ppl_wiki'])} | | {r['prune_seconds']:.0f}{mark(r)} |"
        )
    for r in rows:
        t = temperature_of(r)
        sweep = r["name"].startswith(f"{prefix}T-")  # temperature rows compare with the T = inf base
        base = bases["inf"] if sweep else bases.get(t)
        rel = f"{r['ppl_wiki'] / base['ppl_wiki'] - 1:+.1%}" if base else ""
        lines.append(
            f"| {r['note']} | {t} | {_fmt(r['ppl_wiki'])} | {rel} | {r['prune_seconds']:.0f}{mark(r)} |"
        )
    return lines


def plot(results: dict[str, dict], out: Path, model: str = "smollm2") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    main = [r for r in results.values() if r["group"] == "main"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({label(r) for r in main}, key=lambda n: METHODS.index(n.split()[0])):
        pts = sorted((r["sparsity"], r["ppl_wiki"]) for r in main if label(r) == name and r["ppl_wiki"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    dense = next((r["ppl_wiki_dense"] for r in main if r["ppl_wiki_dense"]), None)
    if dense:
        ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    ax.set(xlabel="structured sparsity", ylabel="Wikipedia test ppl (log)", yscale="log")
    ax.set_title(f"{MODELS[model]['title']}: perplexity vs sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out.with_name(out.name + "_ppl_vs_sparsity.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # The uniform methods (magnitude, Wanda-sp, StructPrune at T = inf) draw the same line: dashed
    # styles keep them visible; StructPrune's finite-temperature allocations come from the ablations.
    at30 = sorted(
        (r for r in main if r["sparsity"] == 0.3 and not r.get("label")),
        key=lambda r: METHODS.index(r["method"]),
    )
    at30 = [(f"{r['method']} (T = inf)" if r["method"] == "structprune" else r["method"], r) for r in at30]
    at30 += [
        (
            f"structprune{' ratio split' if is_ratio_ablation(results[name]) else ''} "
            f"(T = {temperature_of(results[name])})",
            results[name],
        )
        for name in ("ablation-T-1", "ablation-T-2", "ablation-ratio-T-1")
        if name in results
    ]
    styles = {"magnitude": ":", "wanda-sp": "--"}
    if at30:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
        for name, r in at30:
            idx = [layer["index"] for layer in r["layers"]]
            for ax, unit in zip(axes, ("mlp", "heads")):
                kept = [layer[unit][1] / layer[unit][0] for layer in r["layers"]]
                ax.plot(idx, kept, styles.get(name, "-"), marker=".", label=name)
        axes[0].set(xlabel="layer", ylabel="MLP channels kept", ylim=(0, 1.05))
        axes[1].set(xlabel="layer", ylabel="query heads kept", ylim=(0, 1.05))
        axes[0].legend(fontsize=8)
        fig.suptitle("Per-layer keep ratios at 30 % sparsity")
        fig.tight_layout()
        paths.append(out.with_name(out.name + "_keep_ratios_30.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def load_results(path: Path) -> dict[str, dict]:
    """Stored rows by name; rows of the threshold reference under its first name ("global") are
    renamed to "energy-threshold", which says what it is."""
    rows = json.loads(path.read_text()) if path.exists() else []
    for row in rows:
        if row.get("method") == "global":
            row["method"] = "energy-threshold"
            row["name"] = row["name"].replace("global-", "energy-threshold-", 1)
    return {r["name"]: r for r in rows}


write_atomic = results_store.write_atomic


def render_rows(rows: list[dict[str, Any]], model: str) -> str:
    """The .md of a model's stored rows (the calibration size read from the rows themselves)."""
    results = {r["name"]: r for r in rows}
    samples = {(r.get("calibration") or {}).get("samples") for r in rows} - {None}
    return render(results, planned_rows(), samples.pop() if len(samples) == 1 else 128, model)


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (`quality` or `quality_gemma3`)."""
    model = next(m for m, spec in MODELS.items() if spec["stem"] == stem)
    return render_rows(data, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (see --list)")
    parser.add_argument("--group", choices=("main", "ablation"), default=None)
    parser.add_argument("--rerun", action="store_true", help="run the selected rows even if already stored")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=None, help="stem of .json/.md/.png (default per model)")
    args = parser.parse_args()
    if args.model not in MODELS:
        parser.error(f"--model must be one of {sorted(MODELS)}")
    args.out = args.out or RESULTS / MODELS[args.model]["stem"]
    if args.runs == Path("runs/quality") and args.model != "smollm2":
        args.runs = Path("runs") / MODELS[args.model]["stem"]
    rows = planned_rows()
    if args.list:
        for r in rows:
            print(f"{r.name:24s} {r.method:12s} {r.sparsity:.2f} {' '.join(r.flags)}")
        return
    json_path = args.out.with_suffix(".json")
    results = load_results(json_path)
    by_name = {r.name: r for r in rows}
    unknown = sorted(set(args.rows or ()) - set(by_name))
    if unknown:
        parser.error(f"unknown rows {unknown}; see --list")
    selected = [by_name[n] for n in args.rows] if args.rows else rows  # --rows order is run order
    selected = [r for r in selected if args.group is None or r.group == args.group]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in [] if args.report_only else selected:
        if row.name in results and not args.rerun:
            continue
        row_result = run_row(row, args)
        # store_rows re-reads before writing: several instances may fill one file, a row each.
        stored = results_store.store_rows(
            json_path, [row_result], key=lambda r: r["name"], render=lambda rs: render_rows(rs, args.model)
        )
        results = {r["name"]: r for r in stored}
    table = render_rows(list(results.values()), args.model)
    write_atomic(args.out.with_suffix(".md"), table)
    for path in plot(results, args.out, args.model):
        print("plot:", path)
    print(table)


if __name__ == "__main__":
    main()
