"""Render the results tables of README.md and docs/*.md from the JSON files in integration/results/.

A figure typed by hand into prose goes stale the moment a benchmark row is re-measured, and nobody
notices. So every table of measured figures in the documentation sits between two markers,

    <!-- BEGIN results:NAME -->
    ...
    <!-- END results:NAME -->

and is rewritten from the results files by this script; nothing between the markers is edited by
hand. Usage:

    .venv/bin/python integration/render_docs.py           # rewrite every block in place
    .venv/bin/python integration/render_docs.py --check   # write nothing; exit 1 naming stale blocks

`render_block(name)` and `blocks_in(text)` are pure (they read the results files, never the docs),
so tests can compare a document's blocks with freshly rendered ones. The results directory is the
module attribute `RESULTS`, which a test may point at a copy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "integration"))
import benchmark_quality  # noqa: E402
import results_store  # noqa: E402

#: Where the benchmark scripts store their rows (a test may point this at a copy).
RESULTS = REPO / "integration" / "results"

BEGIN = "<!-- BEGIN results:{name} -->"
END = "<!-- END results:{name} -->"
_BLOCK = re.compile(
    r"<!-- BEGIN results:(?P<name>[A-Za-z0-9_.-]+) -->\n(?P<body>.*?)<!-- END results:(?P=name) -->",
    re.S,
)
_ANY_MARKER = re.compile(r"<!-- (BEGIN|END) results:([A-Za-z0-9_.-]+) -->")

#: The two real models: table title and the quality benchmark's results stem.
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "quality"),
    "gemma3-270m": ("Gemma-3-270M (base)", "quality_gemma3"),
}
#: Short names for prose.
SHORT = {"smollm2": "SmolLM2", "gemma3-270m": "Gemma"}
#: Method order in the quality tables (as the quality benchmark orders them).
METHOD_ORDER = ("magnitude", "wanda-sp", "flap", "energy-threshold", "global-taylor", "structprune")
DAGGER = "†"
NOT_MEASURED = "not measured yet"
DASH = "–"


class UnknownBlockError(ValueError):
    """A marker names a block this script cannot render."""


class MarkerError(ValueError):
    """BEGIN and END markers that do not pair up."""


# --- reading rows ---------------------------------------------------------------------------------


def load_rows(stem: str) -> list[dict[str, Any]]:
    """The rows of `RESULTS/<stem>.json` (a list, or a dict holding `rows`); [] if the file is absent,
    so a block for a benchmark that has not run yet renders as such instead of failing."""
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("rows", [])
    return [row for row in data if isinstance(row, dict)]


def _is(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and abs(value - target) < 1e-9


# --- formatting -----------------------------------------------------------------------------------


def fmt_ppl(value: float | None) -> str:
    """Two decimals; collapsed models (perplexity in the ten thousands and up) as 1.35e6."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if value >= 1e4:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2f}"


def fmt_params(count: int | None) -> str:
    if count is None:
        return DASH
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def fmt_change(value: float | None, base: float | None) -> str:
    """Relative change of `value` against `base`, in percent with a sign."""
    if value is None or not base:
        return DASH
    return f"{(value / base - 1) * 100:+.1f} %"


def fmt_gib(nbytes: float | None) -> str:
    return DASH if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


#: One rendering of a row's commit and of its sharing for every table (results_store's).
shared = results_store.was_shared


def commit_of(row: dict[str, Any]) -> str:
    return results_store.short(row.get("provenance"))


def fmt_seconds(row: dict[str, Any], key: str, digits: int = 0) -> str:
    """A time in seconds, daggered where the machine was shared while it was measured."""
    value = row.get(key)
    if value is None:
        return DASH
    return f"{value:.{digits}f}" + (f" {DAGGER}" if shared(row) else "")


def _table(header: list[str], align: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


LEGEND = (
    f"{DAGGER}: timed while other jobs shared the machine, so the time is an upper bound. commit: the "
    "code that produced the row, + with uncommitted changes, ? not recorded."
)
#: The legend under tables of perplexities, which sharing the machine does not change.
PPL_LEGEND = LEGEND.replace("an upper bound.", "an upper bound (perplexities are unaffected).")


# --- the quality benchmark's rows -----------------------------------------------------------------


def _temperature(row: dict[str, Any]) -> float | None:
    settings = row.get("settings") or {}
    if "temperature" in settings:
        return float(settings["temperature"])
    flags = row.get("flags") or []
    if "--temperature" in flags:
        return float(flags[flags.index("--temperature") + 1])
    return None


#: A quality row's table name, as the quality benchmark's own tables give it.
label = benchmark_quality.label


def dense_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first row that carries the dense model's figures (every full row does)."""
    return next((r for r in rows if r.get("ppl_wiki_dense") is not None), None)


def best_reference(rows: list[dict[str, Any]], sparsity: float) -> dict[str, Any] | None:
    """The method other than StructPrune with the lowest Wikipedia perplexity at `sparsity`."""
    refs = [
        r
        for r in rows
        if r.get("method") != "structprune" and _is(r.get("sparsity"), sparsity) and r.get("ppl_wiki")
    ]
    return min(refs, key=lambda r: r["ppl_wiki"], default=None)


def _calibration(rows: Iterable[dict[str, Any]]) -> str:
    seen = []
    for r in rows:
        cal = r.get("calibration") or {}
        if cal.get("samples") and cal.get("seq_len"):
            text = f"{cal['samples']} x {cal['seq_len']}"
            if text not in seen:
                seen.append(text)
    return " / ".join(seen) or "?"


def _bos_models(models: Iterable[str]) -> list[str]:
    """The models whose rows were evaluated with a BOS token on every window."""
    return [
        SHORT[m]
        for m in models
        if any((r.get("bos") or {}).get("evaluation") for r in load_rows(MODELS[m][1]))
    ]


def render_headline() -> str:
    """README's table: per real model at 30 %, dense, StructPrune's default and the best reference."""
    header = [
        "model",
        "method",
        "params",
        "achieved sparsity",
        "ppl wiki",
        "ppl news",
        "prune s",
        "peak MiB",
        "commit",
    ]
    out, shown = [], []
    for title, stem in MODELS.values():
        rows = load_rows(stem)
        dense = dense_row(rows)
        default = next((r for r in rows if r.get("name") == "default-30"), None)
        ref = best_reference(rows, 0.3)
        if dense:
            out.append(
                [
                    title,
                    "dense",
                    fmt_params(dense.get("params_dense")),
                    "0",
                    fmt_ppl(dense["ppl_wiki_dense"]),
                    fmt_ppl(dense.get("ppl_news_dense")),
                    "",
                    "",
                    commit_of(dense),
                ]
            )
        else:
            out.append([title, "dense", NOT_MEASURED, *[""] * 6])
        for row, name in ((default, "structprune (default)"), (ref, "best reference")):
            if row is None:
                out.append([title, name, NOT_MEASURED, *[""] * 6])
                continue
            shown.append(row)
            method = name if row is default else f"{label(row)} (best reference)"
            out.append(
                [
                    title,
                    method,
                    fmt_params(row.get("params")),
                    DASH if row.get("achieved") is None else f"{row['achieved']:.3f}",
                    fmt_ppl(row.get("ppl_wiki")),
                    fmt_ppl(row.get("ppl_news")),
                    fmt_seconds(row, "prune_seconds"),
                    DASH if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}",
                    commit_of(row),
                ]
            )
    bos = _bos_models(MODELS)
    note = (
        f"30 % structured sparsity. Protocol: {_calibration(shown)} calibration tokens from the Wikipedia "
        "train split; perplexity on the full Wikipedia test split and the news text"
        + (f" ({', '.join(bos)}: a BOS token on every window)" if bos else "")
        + ". Best reference: the lowest Wikipedia perplexity among the other methods at 30 %. "
        + PPL_LEGEND
    )
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---"], out)
    return "\n".join([*lines, "", note]) + "\n"


def _quality_table(model: str) -> str:
    """Every main row of a model's quality benchmark, best perplexity per sparsity in bold."""
    title, stem = MODELS[model]
    rows = load_rows(stem)
    main = [r for r in rows if r.get("group", "main") == "main" and r.get("sparsity") is not None]
    if not rows:
        return f"{title}: {NOT_MEASURED} (`integration/results/{stem}.json` is absent).\n"
    dense = dense_row(rows)
    header = [
        "method",
        "sparsity (req / achieved)",
        "params",
        "ppl wiki",
        "ppl news",
        "prune s",
        "peak MiB",
        "commit",
    ]
    out = []
    if dense:
        out.append(
            [
                "dense",
                "0",
                fmt_params(dense.get("params_dense")),
                fmt_ppl(dense["ppl_wiki_dense"]),
                fmt_ppl(dense.get("ppl_news_dense")),
                "",
                "",
                commit_of(dense),
            ]
        )

    def order(r: dict[str, Any]) -> tuple[int, str]:
        method = r.get("method", "")
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label(r))

    for sparsity in sorted({r["sparsity"] for r in main}):
        here = sorted((r for r in main if _is(r["sparsity"], sparsity)), key=order)
        best = {
            key: min((r[key] for r in here if r.get(key) is not None), default=None)
            for key in ("ppl_wiki", "ppl_news")
        }

        def cell(r: dict[str, Any], key: str, best: dict[str, float | None] = best) -> str:
            """The figure, in bold where it is the lowest at this sparsity."""
            text = fmt_ppl(r.get(key))
            return f"**{text}**" if r.get(key) is not None and r[key] == best[key] else text

        for r in here:
            achieved = DASH if r.get("achieved") is None else f"{r['achieved']:.3f}"
            out.append(
                [
                    label(r),
                    f"{sparsity:.2f} / {achieved}",
                    fmt_params(r.get("params")),
                    cell(r, "ppl_wiki"),
                    cell(r, "ppl_news"),
                    fmt_seconds(r, "prune_seconds"),
                    DASH if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}",
                    commit_of(r),
                ]
            )
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---"], out)
    return "\n".join([*lines, "", PPL_LEGEND]) + "\n"


# --- the allocation benchmark ---------------------------------------------------------------------


def render_allocation_default_vs_uniform() -> str:
    """StructPrune's default allocation against uniform ratios, per model and sparsity, with the
    changes and the summary computed here (so no comparison is typed by hand)."""
    rows = load_rows("allocation")
    header = [
        "model",
        "sparsity",
        "MLP widths",
        "uniform: wiki / news",
        "default: wiki / news",
        "change wiki / news",
        "commit (default)",
    ]
    out, wiki_changes, wins = [], [], {"wiki": 0, "news": 0}
    cells = 0
    for model, (title, _) in MODELS.items():
        here = [r for r in rows if r.get("model") == model]
        for sparsity in sorted({r["sparsity"] for r in here if r.get("is_default")}):
            default = next(r for r in here if r.get("is_default") and _is(r["sparsity"], sparsity))
            uniform = next(
                (r for r in here if r.get("allocation") == "uniform" and _is(r["sparsity"], sparsity)), None
            )
            d, u = default.get("ppl") or {}, (uniform or {}).get("ppl") or {}
            widths = {r.get("mlp_round_to") for r in (default, uniform) if r}
            changes = [fmt_change(d.get(t), u.get(t)) for t in ("wiki_test", "news")]
            if uniform:
                cells += 1
                for text, key in (("wiki_test", "wiki"), ("news", "news")):
                    if d.get(text) is not None and u.get(text) and d[text] <= u[text]:
                        wins[key] += 1
                if d.get("wiki_test") is not None and u.get("wiki_test"):
                    wiki_changes.append((d["wiki_test"] / u["wiki_test"] - 1) * 100)
            out.append(
                [
                    title,
                    f"{sparsity:.2f}",
                    " / ".join(str(w) for w in sorted(w for w in widths if w is not None)) or DASH,
                    f"{fmt_ppl(u.get('wiki_test'))} / {fmt_ppl(u.get('news'))}" if uniform else NOT_MEASURED,
                    f"{fmt_ppl(d.get('wiki_test'))} / {fmt_ppl(d.get('news'))}",
                    " / ".join(changes),
                    commit_of(default),
                ]
            )
    if not out:
        return f"Allocation benchmark: {NOT_MEASURED}.\n"
    lines = _table(header, ["---", "---:", "---:", "---:", "---:", "---:", "---"], out)
    summary = (
        f"Over the {cells} model and sparsity cells measured, the default is at or below uniform ratios "
        f"in {wins['wiki']} on Wikipedia and {wins['news']} on the news text"
    )
    if wiki_changes:
        summary += (
            f"; its Wikipedia change ranges from {min(wiki_changes):+.1f} % to {max(wiki_changes):+.1f} %"
        )
    note = (
        "MLP widths: the rounding the rows ran with (1 = channel-exact); with no options the default "
        "rounds MLP widths to multiples of 32, which these rows do not."
    )
    return "\n".join([*lines, "", summary + ".", "", note]) + "\n"


# --- the other benchmarks -------------------------------------------------------------------------


def render_generalisation() -> str:
    """In and out of domain (Wikipedia, news, newsgroups) as the solver's settings vary, each row
    against its model's base row (the default) at the same sparsity."""
    rows = load_rows("generalisation")
    if not rows:
        return f"Generalisation benchmark: {NOT_MEASURED}.\n"
    texts = ("wiki_test", "news", "newsgroups")

    def model_of(r: dict[str, Any]) -> str:
        """Rows before the Gemma ones carry no model: they are SmolLM2's."""
        if r.get("model"):
            return r["model"]
        return r["name"].split("/")[0] if "/" in r["name"] else "smollm2"

    def base_of(r: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (
                b
                for b in rows
                if b["name"].split("/")[-1].startswith("base-")
                and model_of(b) == model_of(r)
                and _is(b.get("sparsity"), r.get("sparsity", -1))
            ),
            None,
        )

    def setting(r: dict[str, Any]) -> str:
        if r.get("method") != "structprune":
            return f"{r.get('method')} (no refit)" if r.get("method") == "flap" else str(r.get("method"))
        base = base_of(r)
        if base is r:
            return "default"
        extra = list(r.get("flags") or [])
        base_flags = list((base or {}).get("flags") or [])
        if extra[: len(base_flags)] == base_flags:
            extra = extra[len(base_flags) :]
        parts = [f"`{' '.join(extra)}`"] if extra else []
        if base and r.get("calib_samples") != base.get("calib_samples"):
            parts.append(f"`--calib-samples {r.get('calib_samples')}`")
        return ", ".join(parts) or r["name"]

    def order(r: dict[str, Any]) -> tuple[int, float, int, str]:
        models = list(MODELS)
        m = model_of(r)
        return (
            models.index(m) if m in models else len(models),
            r.get("sparsity", 0),
            0 if base_of(r) is r else 1,
            setting(r),
        )

    out = []
    for r in sorted(rows, key=order):
        base = base_of(r)
        ppl = r.get("ppl") or {}
        changes = (
            " / ".join(fmt_change(ppl.get(t), (base.get("ppl") or {}).get(t)) for t in texts)
            if base is not None and base is not r
            else ""
        )
        out.append(
            [
                MODELS.get(model_of(r), (model_of(r),))[0],
                f"{r.get('sparsity', 0):.2f}",
                setting(r),
                " / ".join(fmt_ppl(ppl.get(t)) for t in texts),
                changes,
                commit_of(r),
            ]
        )
    header = ["model", "sparsity", "setting", "ppl wiki / news / newsgroups", "against default", "commit"]
    lines = _table(header, ["---", "---:", "---", "---:", "---:", "---"], out)
    note = (
        "Calibrated on the Wikipedia train split; news and newsgroups posts are out of domain. "
        "`against default`: change from the default's row of the same model and sparsity."
    )
    return "\n".join([*lines, "", note]) + "\n"


def render_llmcompressor() -> str:
    """The llm-compressor `oneshot` rows: StructPrune's modifier beside llm-compressor's own."""
    rows = load_rows("llmcompressor")
    if not rows:
        return f"llm-compressor benchmark: {NOT_MEASURED}.\n"
    out = []
    for r in rows:
        recipe = r.get("recipe") or ""
        source = f"`{recipe}`" if recipe and "\n" not in recipe else "inline recipe"
        ppl = r.get("perplexity") or {}
        out.append(
            [
                f"`{r.get('modifier')}` ({source})",
                str(r.get("kind", DASH)),
                fmt_params(r.get("params")),
                DASH if r.get("sparsity") is None else f"{r['sparsity']:.3f}",
                fmt_ppl(ppl.get("wiki_test")),
                fmt_ppl(ppl.get("news")),
                fmt_seconds(r, "oneshot_seconds"),
                DASH if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}",
                commit_of(r),
            ]
        )
    header = [
        "modifier",
        "kind",
        "params",
        "sparsity",
        "ppl wiki",
        "ppl news",
        "oneshot s",
        "peak MiB",
        "commit",
    ]
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---"], out)
    note = (
        "Unstructured rows keep every weight stored (zeros inside the dense matrices), so their parameter "
        "count does not shrink; the structured row is a smaller dense model. " + PPL_LEGEND
    )
    return "\n".join([*lines, "", note]) + "\n"


def render_heal() -> str:
    """Healing: perplexity before and after each mode and budget, with its time and memory."""
    from benchmark_heal import LEGEND, heal_table

    rows = load_rows("heal")
    if not rows:
        return f"Healing benchmark: {NOT_MEASURED}.\n"
    return "\n".join([*heal_table(rows), "", LEGEND]) + "\n"


_MEMORY_LABELS = {
    "global-taylor": "`global-taylor` (whole model and its gradients resident)",
    "structprune": "StructPrune, model loaded whole",
    "structprune-streamed": "StructPrune, `--stream-weights` (one decoder layer resident)",
}


def render_global_memory() -> str:
    """Peak RSS of the pruning call at 1.1B parameters against the O(N) global reference."""
    rows = load_rows("global_memory")
    if not rows:
        return f"Global memory benchmark: {NOT_MEASURED}.\n"
    ref = next((r for r in rows if r.get("method") == "global-taylor"), None)
    out = []
    for r in rows:
        ratio = (
            f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}"
            if ref and r.get("peak_rss_bytes") and ref.get("peak_rss_bytes")
            else DASH
        )
        out.append(
            [
                _MEMORY_LABELS.get(r.get("method"), str(r.get("method"))),
                str(r.get("pruned_layers", DASH)),
                fmt_gib(r.get("peak_rss_bytes")),
                ratio,
                fmt_seconds(r, "seconds"),
                commit_of(r),
            ]
        )
    first = rows[0]
    header = ["method", "layers pruned", "peak RSS", "against global-taylor", "s", "commit"]
    lines = _table(header, ["---", "---:", "---:", "---:", "---:", "---"], out)
    note = (
        f"Shape `{first.get('shape')}` ({fmt_params(first.get('params'))} parameters, {first.get('dtype')}, "
        f"{fmt_gib(first.get('model_bytes'))} of weights, random values), {first.get('calib_tokens')} "
        f"calibration tokens, sparsity {first.get('sparsity')}; each method in its own process. " + LEGEND
    )
    return "\n".join([*lines, "", note]) + "\n"


def render_scale() -> str:
    """A 7B-shaped model streamed from disk, and the extrapolation to 70B dims (GiB throughout)."""
    rows = load_rows("scale")
    if not rows:
        return f"Scale benchmark: {NOT_MEASURED}.\n"
    out, notes = [], []
    for r in rows:
        share = (
            f"{r['peak_memory_bytes'] / r['model_bytes'] * 100:.1f} %"
            if r.get("peak_memory_bytes") and r.get("model_bytes")
            else DASH
        )
        out.append(
            [
                f"{r.get('device')}: {r.get('machine')}",
                f"`{r.get('shape')}`, {r.get('dtype')}",
                fmt_gib(r.get("model_bytes")),
                str(r.get("pruned_layers", DASH)),
                fmt_seconds(r, "seconds_per_layer", 1),
                fmt_seconds(r, "seconds_per_dense_layer", 1),
                f"{fmt_gib(r.get('peak_memory_bytes'))} ({r.get('peak_memory_kind')})",
                share,
                commit_of(r),
            ]
        )
        est = r.get("extrapolation_70b")
        if isinstance(est, dict) and est.get("peak_rss_bytes_estimate"):
            notes.append(
                f"- {r.get('device')}: peak about {fmt_gib(est['peak_rss_bytes_estimate'])} "
                f"({est.get('peak_share_of_model', 0) * 100:.0f} % of the model's "
                f"{fmt_gib(est.get('model_bytes'))}), about {est.get('hours_all_layers_estimate', 0):.1f} "
                "hours for all layers"
            )
    header = [
        "device",
        "shape",
        "model",
        "layers pruned",
        "s per pruned layer",
        "s per dense layer streamed",
        "peak",
        "peak / model",
        "commit",
    ]
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---"], out)
    lines += ["", LEGEND]
    if notes:
        lines += [
            "",
            "Extrapolated to LLaMA-2-70B dimensions from these rows (an estimate, not a measurement):",
            "",
            *notes,
        ]
    return "\n".join(lines) + "\n"


def render_gguf_summary() -> str:
    """llama.cpp against PyTorch, per GGUF file type: the worst case over every model and layout."""
    data_rows = load_rows("gguf")
    if not data_rows:
        return f"GGUF check: {NOT_MEASURED}.\n"
    out = []
    for outtype in sorted({r["outtype"] for r in data_rows}, key=["f32", "f16", "q8_0"].index):
        here = [r for r in data_rows if r["outtype"] == outtype]
        worst = max(r["max_rel_logit_diff"] for r in here)
        fewest = min(here, key=lambda r: r["greedy_tokens_equal"])
        alike = sum(r["greedy_tokens_equal"] == r["new_tokens"] for r in here)
        out.append(
            [
                outtype,
                str(len(here)),
                f"{worst:.1e}",
                f"{alike} of {len(here)}",
                f"{fewest['greedy_tokens_equal']}/{fewest['new_tokens']}",
                ", ".join(sorted({commit_of(r) for r in here})),
            ]
        )
    header = [
        "file",
        "cases",
        "largest relative logit difference",
        "cases with every greedy token equal",
        "fewest equal tokens",
        "commit",
    ]
    lines = _table(header, ["---", "---:", "---:", "---:", "---:", "---"], out)
    models = sorted({r["model"] for r in data_rows})
    note = (
        f"Models: {', '.join(models)}; cases: "
        + "; ".join(sorted({r["case"] for r in data_rows}))
        + ". Logit differences are relative to the largest logit."
    )
    return "\n".join([*lines, "", note]) + "\n"


def render_dense() -> str:
    """The dense models' figures every pruned row is compared with."""
    gen = load_rows("generalisation")
    out = []
    for model, (title, stem) in MODELS.items():
        dense = dense_row(load_rows(stem))
        newsgroups = next(
            (
                (r.get("ppl_dense") or {}).get("newsgroups")
                for r in gen
                if (r.get("model") or "smollm2") == model and (r.get("ppl_dense") or {}).get("newsgroups")
            ),
            None,
        )
        if dense is None:
            out.append([title, NOT_MEASURED, "", "", "", ""])
            continue
        out.append(
            [
                title,
                fmt_params(dense.get("params_dense")),
                fmt_ppl(dense.get("ppl_wiki_dense")),
                fmt_ppl(dense.get("ppl_news_dense")),
                fmt_ppl(newsgroups),
                commit_of(dense),
            ]
        )
    header = ["model", "params", "ppl wiki", "ppl news", "ppl newsgroups", "commit"]
    lines = _table(header, ["---", "---:", "---:", "---:", "---:", "---"], out)
    return "\n".join(lines) + "\n"


#: Every block this script renders, by the name its markers carry.
RENDERERS: dict[str, Callable[[], str]] = {
    "headline": render_headline,
    "quality-smollm2": lambda: _quality_table("smollm2"),
    "quality-gemma3": lambda: _quality_table("gemma3-270m"),
    "allocation-default-vs-uniform": render_allocation_default_vs_uniform,
    "generalisation": render_generalisation,
    "llmcompressor": render_llmcompressor,
    "heal": render_heal,
    "global-memory": render_global_memory,
    "scale": render_scale,
    "gguf-summary": render_gguf_summary,
    "dense": render_dense,
}


# --- the documents --------------------------------------------------------------------------------


def render_block(name: str) -> str:
    """The text between a block's markers, rendered from the results files."""
    try:
        renderer = RENDERERS[name]
    except KeyError:
        raise UnknownBlockError(
            f"no renderer for results block {name!r}; known blocks: {', '.join(sorted(RENDERERS))}"
        ) from None
    return renderer()


def blocks_in(text: str) -> list[str]:
    """The names of the marker blocks in `text`, in order. Markers that do not pair up (a BEGIN
    without its END, an END with no BEGIN, nesting) raise `MarkerError`."""
    names = [m.group("name") for m in _BLOCK.finditer(text)]
    markers = [(kind, name) for kind, name in _ANY_MARKER.findall(text)]
    expected = [pair for name in names for pair in (("BEGIN", name), ("END", name))]
    if markers != expected:
        raise MarkerError(f"unpaired or nested results markers: {markers}")
    return names


def block_body(text: str, name: str) -> str:
    """What a document currently holds between `name`'s markers."""
    for m in _BLOCK.finditer(text):
        if m.group("name") == name:
            return m.group("body")
    raise KeyError(name)


def rewrite(text: str) -> str:
    """`text` with every block replaced by its fresh rendering."""
    rendered = {name: render_block(name) for name in blocks_in(text)}  # every name checked first
    return _BLOCK.sub(
        lambda m: f"{BEGIN.format(name=m['name'])}\n{rendered[m['name']]}{END.format(name=m['name'])}", text
    )


def documents() -> list[Path]:
    """README.md and every docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


write_atomic = results_store.write_atomic


def stale_blocks(paths: Iterable[Path]) -> list[str]:
    """`path: name` for every block whose text differs from its fresh rendering."""
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for name in _checked_blocks(path, text):
            if block_body(text, name) != render_block(name):
                stale.append(f"{path.relative_to(REPO)}: {name}")
    return stale


def _checked_blocks(path: Path, text: str) -> list[str]:
    """`blocks_in(text)`, with the document named in any error about its markers."""
    try:
        names = blocks_in(text)
        for name in names:
            if name not in RENDERERS:
                render_block(name)  # raises UnknownBlockError naming the known blocks
    except (MarkerError, UnknownBlockError) as err:
        raise type(err)(f"{path.relative_to(REPO)}: {err}") from None
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any block is stale")
    args = parser.parse_args(argv)
    paths = documents()
    if args.check:
        stale = stale_blocks(paths)
        for item in stale:
            print(f"stale: {item}")
        if stale:
            print("run: .venv/bin/python integration/render_docs.py", file=sys.stderr)
            return 1
        print(f"all results blocks up to date ({len(paths)} documents)")
        return 0
    texts = {path: path.read_text(encoding="utf-8") for path in paths}
    for path, text in texts.items():  # every document's markers are checked before any is written
        _checked_blocks(path, text)
    for path, text in texts.items():
        new = rewrite(text)
        if new != text:
            write_atomic(path, new)
            print(f"rewrote {path.relative_to(REPO)}: {', '.join(blocks_in(new))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
