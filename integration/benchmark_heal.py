"""Healing after pruning: perplexity before and after each way of healing, its time and memory.

For each real model and sparsity the pruned folder is StructPrune's default (`struprune prune` with
no method options, 128 x 512 Wikipedia calibration windows; the quality benchmark's folder is
reused when it is there), plus FLAP at 30 % to see whether StructPrune's lead survives healing.
Each row heals that folder with one mode at one budget of calibration tokens, in its own process
(`struprune heal ... --no-eval`, so the wall time and peak memory are the healing's alone), then
evaluates the healed folder with `struprune eval` on Wikipedia test, news and newsgroups posts.
The pruned folder's own perplexities are measured once the same way (`ppl_before`).

Modes: `layer-wise` (each layer learns its dense layer's output, one layer resident),
`distill-full` and `distill-lora` (KL to the dense teacher's top-64 next-token distribution),
and `finetune-full` (plain next-token training on the same windows: the baseline distillation has
to beat). Rows are stored one by one as they finish (rerunning skips stored rows), each inside a
`results_store.RunRecord` (commit, machine, libraries, whether other jobs shared the machine).

    .venv/bin/python integration/benchmark_heal.py --list
    .venv/bin/python integration/benchmark_heal.py --rows smollm2-30-distill-full-16k ...
    .venv/bin/python integration/benchmark_heal.py --report-only

Writes integration/results/heal.{json,md} and heal.png (perplexity against tokens per mode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from results_table import mark  # noqa: E402

from struprune_plugin.healing.command import DEFAULT_MODE as HEAL_DEFAULT_MODE  # noqa: E402

RESULTS = ROOT / "integration" / "results" / "heal"
RUNS = ROOT / "runs" / "heal"
TEXTS = ("wiki_test", "news", "newsgroups")
#: model -> (zoo name, where the quality benchmark keeps its default-pruned folders)
MODELS = {
    "smollm2": ("smollm2", ROOT / "runs" / "quality"),
    "gemma3": ("gemma3-270m", ROOT / "runs" / "quality_gemma3"),
}
#: mode -> the `struprune heal` flags that select it
MODES: dict[str, list[str]] = {
    "layer-wise": ["--mode", "layerwise"],
    "layer-wise-dense-inputs": ["--mode", "layerwise", "--inputs", "dense"],
    "distill-full": ["--mode", "distill"],
    "distill-lora": ["--mode", "distill", "--lora-rank", "16"],
    "finetune-full": ["--mode", "finetune"],
}
#: the mode `struprune heal` runs with no --mode (rows of it are marked is_default)
DEFAULT_MODE = {"layerwise": "layer-wise", "distill": "distill-full", "finetune": "finetune-full"}[
    HEAL_DEFAULT_MODE
]


@dataclass(frozen=True)
class Row:
    model: str
    sparsity: float
    method: str
    mode: str
    tokens: int
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        method = "" if self.method == "structprune" else f"-{self.method}"
        return f"{self.model}-{round(self.sparsity * 100)}{method}-{self.mode}-{self.tokens // 1024}k"

    @property
    def pruned_name(self) -> str:
        return f"{'default' if self.method == 'structprune' else self.method}-{round(self.sparsity * 100)}"


def planned_rows() -> list[Row]:
    rows = []
    for model in MODELS:
        for sparsity in (0.3, 0.5):
            for mode in ("layer-wise", "distill-full", "distill-lora", "finetune-full"):
                for tokens in (16384, 65536, 262144) if mode == "distill-full" else (16384, 65536):
                    rows.append(Row(model, sparsity, "structprune", mode, tokens))
        rows.append(Row(model, 0.3, "structprune", "layer-wise-dense-inputs", 16384))
        rows.append(Row(model, 0.3, "flap", "distill-full", 65536))
        rows.append(Row(model, 0.3, "flap", "layer-wise", 65536))
    return rows


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "struprune_plugin.cli", *argv]


def pruned_folder(row: Row) -> Path:
    """The row's pruned folder: the quality benchmark's when it holds this pruning, else made here."""
    zoo, quality_runs = MODELS[row.model]
    shared = quality_runs / row.pruned_name
    if row.method == "structprune" and (shared / "struprune_report.json").exists():
        return shared
    folder = RUNS / f"{row.model}-{row.pruned_name}"
    if not (folder / "struprune_report.json").exists():
        cmd = _cli(
            "prune", "--model", zoo, "--method", row.method, "--sparsity", str(row.sparsity),
            "--calib-samples", "128", "--calib-len", "512", "--no-eval", "--no-progress",
            "--output", str(folder), "--overwrite",
        )  # fmt: skip
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def perplexities(folder: Path) -> dict[str, float]:
    """Perplexity of `folder` on TEXTS (cached beside it as heal_eval.json)."""
    cached = folder.with_name(folder.name + ".heal_eval.json")
    if not cached.exists():
        cmd = _cli("eval", str(folder), "--texts", ",".join(TEXTS), "--no-progress", "--output", str(cached))
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(cached.read_text())["perplexity"]
    return {text: data[text]["ppl"] for text in TEXTS}


def run_row(row: Row) -> dict[str, Any]:
    pruned = pruned_folder(row)
    before = perplexities(pruned)
    out = RUNS / row.name
    zoo, _ = MODELS[row.model]
    cmd = _cli(
        "heal", str(pruned), "--teacher", zoo, "--tokens", str(row.tokens), "--output", str(out),
        "--overwrite", "--no-eval", "--no-progress", *MODES[row.mode], *row.flags,
    )  # fmt: skip
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    with results_store.RunRecord() as record:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((out / "struprune_heal.json").read_text())
    after = perplexities(out)
    prune_report = json.loads((pruned / "struprune_report.json").read_text())
    return {
        "name": row.name,
        "model": row.model,
        "sparsity": row.sparsity,
        "method": row.method,
        "mode": row.mode,
        "tokens": report["settings"]["tokens"],
        "ppl_before": before,
        "ppl_after": after,
        "seconds": report["seconds"],
        "wall_seconds": wall,
        "peak_memory_mib": report["peak_memory_bytes"] / 2**20,
        "peak_memory_kind": report["peak_memory_kind"],
        "is_default": row.mode == DEFAULT_MODE and not row.flags,
        "prune_seconds": prune_report["pruning"]["seconds"],
        "prune_peak_memory_mib": prune_report["pruning"]["peak_memory_bytes"] / 2**20,
        "settings": report["settings"],
        "calibration": report["calibration"],
        "training": {k: v for k, v in (report.get("training") or {}).items() if k != "losses"},
        "final_loss": ((report.get("training") or {}).get("losses") or [None])[-1],
        "command": cmd[2:],
        "run": results_store.from_prune_report(prune_report),
        "provenance": record.provenance,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def heal_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table of rows (also rendered into docs/results.md by render_docs.py)."""
    lines = [
        "| model | sparsity | pruned by | mode | tokens | wiki | news | newsgroups | heal s | peak MiB "
        "| prune s | prune MiB | commit |",
        "|---|---:|---|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    order = list(MODES)
    for r in sorted(
        rows,
        key=lambda r: (
            r["model"],
            r["sparsity"],
            r["method"] != "structprune",
            order.index(r["mode"]),
            r["tokens"],
        ),
    ):
        cells = [f"{_fmt(r['ppl_before'][t])} -> {_fmt(r['ppl_after'][t])}" for t in TEXTS]
        mode = r["mode"] + (" (default)" if r.get("is_default") else "")
        lines.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['method']} | {mode} | {r['tokens']} | "
            + " | ".join(cells)
            + f" | {r['seconds']:.0f}{mark(r)} | {r['peak_memory_mib']:.0f} | {r['prune_seconds']:.0f} | "
            f"{r['prune_peak_memory_mib']:.0f} | {results_store.short(r['provenance'])} |"
        )
    return lines


LEGEND = (
    "Perplexity (512-token windows) before -> after healing on Wikipedia test, news and newsgroups "
    "posts (the last two out of domain: healing calibrates on random 512-token windows of the Wikipedia "
    "train split). `heal s` and `peak MiB` are the healing's own (teacher pass included, evaluation "
    "excluded); the pruning's are beside them for scale. † marks rows timed while other jobs shared the "
    "machine (times are upper bounds; perplexities are unaffected)."
)


def render_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Healing after pruning",
        "",
        "Written by `integration/benchmark_heal.py` from `heal.json`.",
        "",
    ]
    return "\n".join([*lines, *heal_table(rows), "", LEGEND]) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/heal.json`."""
    return render_rows(data["rows"] if isinstance(data, dict) else data)


def plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Wikipedia perplexity against healing tokens, one panel per model and sparsity."""
    panels = sorted({(r["model"], r["sparsity"]) for r in rows if r["method"] == "structprune"})
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (model, sparsity) in zip(axes[0], panels):
        mine = [
            r for r in rows if (r["model"], r["sparsity"], r["method"]) == (model, sparsity, "structprune")
        ]
        before = mine[0]["ppl_before"]["wiki_test"]
        for mode in MODES:
            pts = sorted((r["tokens"], r["ppl_after"]["wiki_test"]) for r in mine if r["mode"] == mode)
            if pts:
                ax.plot([0] + [p[0] for p in pts], [before] + [p[1] for p in pts], marker="o", label=mode)
        ax.set(title=f"{model} {sparsity:.0%}", xlabel="healing tokens", ylabel="Wikipedia perplexity")
        ax.set_xscale("symlog", linthresh=8192)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows, in this order (see --list)")
    parser.add_argument("--rerun", action="store_true", help="run the selected rows even if already stored")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    planned = {r.name: r for r in planned_rows()}
    if args.list:
        for name in planned:
            print(name)
        return
    unknown = sorted(set(args.rows or ()) - set(planned))
    if unknown:
        parser.error(f"unknown rows {unknown}; see --list")
    json_path = RESULTS.with_suffix(".json")
    stored = {r["name"]: r for r in results_store.load_rows(json_path)}
    RUNS.mkdir(parents=True, exist_ok=True)
    for name in [] if args.report_only else (args.rows or list(planned)):
        if name in stored and not args.rerun:
            continue
        row = run_row(planned[name])
        rows = results_store.store_rows(json_path, [row], key=lambda r: r["name"], render=render_rows)
        stored = {r["name"]: r for r in rows}
        print(f"{name}: wiki {row['ppl_before']['wiki_test']:.2f} -> {row['ppl_after']['wiki_test']:.2f} "
              f"in {row['seconds']:.0f} s", flush=True)  # fmt: skip
    rows = list(stored.values())
    results_store.write_atomic(RESULTS.with_suffix(".md"), render_rows(rows))
    path = plot(rows, RESULTS)
    if path:
        print("plot:", path)
    print(render_rows(rows))


if __name__ == "__main__":
    main()
