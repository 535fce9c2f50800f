"""The run report: one JSON document for machines, a Markdown rendering for people, a plot of widths."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .outputs import write_text_atomic

TEXT_LABELS = {
    "wiki_test": "Wikipedia subset (test)",
    "wiki_valid": "Wikipedia subset (valid)",
    "news": "news",
    "newsgroups": "newsgroups (Usenet posts)",
}


def _fmt_ppl(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


#: Allocation summary keys that hold measurements, not settings (render_markdown lists settings).
_ALLOCATION_DATA = ("allocation", "seconds", "stream_energy", "outlier_ratios", "sensitivity")


def render_markdown(report: dict) -> str:
    p, r = report["pruning"], report["params"]
    lines = [
        f"# struprune report: {report['model']['name']}",
        "",
        f"- method `{p['method']}`, units {', '.join(p['units'])} (head unit `{p['head_unit']}`)",
        f"- sparsity of prunable parameters: requested {p['requested_sparsity']:.4f}, "
        f"achieved {p['achieved_sparsity']:.4f}",
        f"- parameters: {r['total_before']:,} -> {r['total_after']:,} "
        f"({r['total_after'] / r['total_before']:.1%} of dense); prunable {r['prunable_before']:,} -> "
        f"{r['prunable_after']:,}",
    ]
    if p.get("allocation"):
        a = p["allocation"]
        settings = ", ".join(f"{k} {v}" for k, v in a.items() if k not in _ALLOCATION_DATA)
        passes = ", ".join(f"{k} {v:.1f} s" for k, v in a.get("seconds", {}).items()) or "none needed"
        lines.append(
            f"- allocation `{a['allocation']}`"
            + (f" ({settings})" if settings else "")
            + f"; measurement passes: {passes}"
        )
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(
            f"- calibration: {c['samples']} x {c['seq_len']} tokens from `{c.get('split') or c['source']}`"
            + (f" (sha256 {c['sha256'][:12]})" if c.get("kind") not in (None, "built-in") else "")
            + f", seed {c['seed']}"
        )
    lines += [
        f"- pruning wall time {p['seconds']:.1f} s on {p['device']}; peak memory "
        f"{p['peak_memory_bytes'] / 2**20:.0f} MiB ({p['peak_memory_kind']})",
        "",
    ]
    evals = report.get("perplexity") or {}
    if evals:
        proto = next(iter(evals.values()))["pruned"] or next(iter(evals.values()))["dense"]
        lines += [
            f"Perplexity: windows of {proto['seq_len']} tokens, stride {proto['stride']}, "
            f"BOS {'on' if proto['bos'] else 'off'}.",
            "",
            "| text | dense ppl | pruned ppl | scored tokens |",
            "|---|---:|---:|---:|",
        ]
        for text, pair in evals.items():
            dense, pruned = pair.get("dense"), pair.get("pruned")
            tokens = (pruned or dense)["tokens"]
            lines.append(
                f"| {TEXT_LABELS.get(text, text)} | {_fmt_ppl(dense and dense['ppl'])} | "
                f"{_fmt_ppl(pruned and pruned['ppl'])} | {tokens:,} |"
            )
        for label, origin in (report.get("evaluation_texts") or {}).items():
            if origin.get("kind") != "built-in":
                lines.append(
                    f"- `{label}`: {origin['source']} ({origin['kind']}, sha256 {origin['sha256'][:12]})"
                )
        lines.append("")
    lines += [
        "| layer | query heads | KV heads | MLP channels | removed params |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        lines.append(
            f"| {layer['index']} | {layer['heads'][0]} -> {layer['heads'][1]} | "
            f"{layer['kv_heads'][0]} -> {layer['kv_heads'][1]} | {layer['mlp'][0]} -> {layer['mlp'][1]} | "
            f"{layer['removed_params']:,} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    report: dict, folder: str | os.PathLike, stem: str = "struprune_report"
) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    for path, text in (
        (json_path, json.dumps(report, indent=2, default=str)),
        (md_path, render_markdown(report)),
    ):
        write_text_atomic(path, text)
    return json_path, md_path


def plot_layer_widths(layers: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Kept fraction of query heads and MLP channels per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [layer["index"] for layer in layers]
    heads = [layer["heads"][1] / layer["heads"][0] for layer in layers]
    mlp = [layer["mlp"][1] / layer["mlp"][0] for layer in layers]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(idx, heads, "o-", label="query heads kept")
    ax.plot(idx, mlp, "s-", label="MLP channels kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
